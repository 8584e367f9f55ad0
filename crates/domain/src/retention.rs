//! How long recovery points live. A point's own expiry comes from the policy; the recovery
//! chain may keep a full longer: a full is kept until the last differential or log that
//! depends on it has expired.
//!
//! Durations are counted on the policy's local calendar ("kept 30 days" means the same
//! local time 30 days later), resolved to an instant with the DST rules of `schedule`.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::policy::{DaySelector, FullFrequency, Month, Policy, WeekOfMonth, Weekday};
use crate::schedule::resolve_local;

/// Backup types whose retention the policy decides. On-demand fulls and copy-only fulls
/// carry their own retention and are not listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupType {
    Full,
    Differential,
    Log,
}

/// The retention range that tagged a full backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetentionTag {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Expiry {
    pub expires_at: DateTime<Utc>,
    /// For a full backup: every range that tagged it (the longest decides `expires_at`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<RetentionTag>,
}

fn week_of_month_matches(date: NaiveDate, week: WeekOfMonth) -> bool {
    let day = date.day();
    match week {
        WeekOfMonth::First => day <= 7,
        WeekOfMonth::Second => (8..=14).contains(&day),
        WeekOfMonth::Third => (15..=21).contains(&day),
        WeekOfMonth::Fourth => (22..=28).contains(&day),
        WeekOfMonth::Last => date
            .checked_add_days(Days::new(7))
            .is_none_or(|d| d.month() != date.month()),
    }
}

fn last_day_of_month(date: NaiveDate) -> u32 {
    let first_of_next = if date.month() == 12 {
        date.year()
            .checked_add(1)
            .and_then(|y| NaiveDate::from_ymd_opt(y, 1, 1))
    } else {
        date.month()
            .checked_add(1)
            .and_then(|m| NaiveDate::from_ymd_opt(date.year(), m, 1))
    };
    first_of_next
        .and_then(|d| d.pred_opt())
        .map_or(31, |d| d.day())
}

impl DaySelector {
    pub fn matches(&self, date: NaiveDate) -> bool {
        match self {
            DaySelector::WeekdaysOfWeeks { weeks, days } => {
                days.contains(&Weekday::from(date.weekday()))
                    && weeks.iter().any(|w| week_of_month_matches(date, *w))
            }
            // A day past the month's end (31 in April) means the month's last day.
            DaySelector::DaysOfMonth(days) => {
                let last = last_day_of_month(date);
                days.iter().any(|d| (*d).min(last) == date.day())
            }
        }
    }
}

impl Policy {
    fn local_add_days(&self, at: DateTime<Utc>, days: u32) -> DateTime<Utc> {
        let local = at.with_timezone(&self.time_zone).naive_local();
        local
            .checked_add_days(Days::new(days.into()))
            .map_or(DateTime::<Utc>::MAX_UTC, |l| {
                resolve_local(self.time_zone, l)
            })
    }

    fn local_add_months(&self, at: DateTime<Utc>, months: u32) -> DateTime<Utc> {
        let local = at.with_timezone(&self.time_zone).naive_local();
        local
            .checked_add_months(Months::new(months))
            .map_or(DateTime::<Utc>::MAX_UTC, |l| {
                resolve_local(self.time_zone, l)
            })
    }

    /// The expiry of a full backup taken at `taken_at`: the longest of the ranges that tag
    /// it. A full of this policy is always tagged by its base range (daily for a daily full,
    /// weekly for a weekly one).
    pub fn full_expiry(&self, taken_at: DateTime<Utc>) -> Expiry {
        let date = taken_at.with_timezone(&self.time_zone).date_naive();
        let weekday = Weekday::from(date.weekday());
        let r = &self.retention;
        let mut candidates = Vec::new();
        if let Some(days) = r.daily_days {
            candidates.push((RetentionTag::Daily, self.local_add_days(taken_at, days)));
        }
        if let Some((days, weeks)) = &r.weekly {
            let is_weekly_point = match self.full.frequency {
                FullFrequency::Weekly => true,
                FullFrequency::Daily => days.contains(&weekday),
            };
            if is_weekly_point {
                candidates.push((
                    RetentionTag::Weekly,
                    self.local_add_days(taken_at, weeks.saturating_mul(7)),
                ));
            }
        }
        if let Some((selector, months)) = &r.monthly
            && selector.matches(date)
        {
            candidates.push((
                RetentionTag::Monthly,
                self.local_add_months(taken_at, *months),
            ));
        }
        if let Some((months_of_year, selector, years)) = &r.yearly
            && months_of_year
                .iter()
                .any(|m: &Month| m.number() == date.month())
            && selector.matches(date)
        {
            candidates.push((
                RetentionTag::Yearly,
                self.local_add_months(taken_at, years.saturating_mul(12)),
            ));
        }
        let expires_at = candidates
            .iter()
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(taken_at);
        Expiry {
            expires_at,
            tags: candidates.into_iter().map(|(tag, _)| tag).collect(),
        }
    }

    /// The expiry of a point of the given type, or `None` when the policy no longer takes
    /// that type (the caller keeps what it had).
    pub fn expiry(&self, backup_type: BackupType, taken_at: DateTime<Utc>) -> Option<Expiry> {
        let days = match backup_type {
            BackupType::Full => return Some(self.full_expiry(taken_at)),
            BackupType::Differential => self.differential.as_ref()?.retention_days,
            BackupType::Log => self.log?.retention_days,
        };
        Some(Expiry {
            expires_at: self.local_add_days(taken_at, days),
            tags: Vec::new(),
        })
    }
}

/// The recovery-chain rule: a full is kept until its own expiry or the expiry of the last
/// point that depends on it, whichever is later.
pub fn chain_retained_until(
    full_expires_at: DateTime<Utc>,
    dependents_expire_at: impl IntoIterator<Item = DateTime<Utc>>,
) -> DateTime<Utc> {
    dependents_expire_at
        .into_iter()
        .fold(full_expires_at, DateTime::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySpec;
    use proptest::prelude::*;
    use serde_json::json;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn policy(v: serde_json::Value) -> Policy {
        serde_json::from_value::<PolicySpec>(v)
            .unwrap()
            .validate("")
            .unwrap()
    }

    /// The seed's example: a weekly full on Nov 16, logs until Nov 22, everything kept 30
    /// days. The full's own expiry is Dec 16, its last log's Dec 22, so the full stays
    /// until Dec 22.
    #[test]
    fn seed_example_full_is_kept_until_its_last_log_expires() {
        let p = policy(json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "00:00"},
            "log": {"frequency_minutes": 60, "retention_days": 30},
            "retention": {"daily": {"days": 30}}
        }));
        let full_at = utc("2026-11-16T00:00:00Z");
        let full = p.full_expiry(full_at);
        assert_eq!(full.expires_at, utc("2026-12-16T00:00:00Z"));
        let logs = p
            .log_runs(full_at)
            .take_while(|t| *t <= utc("2026-11-22T23:00:00Z"));
        let log_expiries: Vec<_> = logs
            .map(|t| p.expiry(BackupType::Log, t).unwrap().expires_at)
            .collect();
        assert_eq!(log_expiries.len(), 6 * 24 + 23);
        assert_eq!(
            chain_retained_until(full.expires_at, log_expiries),
            utc("2026-12-22T23:00:00Z")
        );
    }

    #[test]
    fn longest_matching_range_wins() {
        let p = policy(json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "22:00"},
            "retention": {
                "daily": {"days": 7},
                "weekly": {"days_of_week": ["sunday"], "weeks": 4},
                "monthly": {"weeks_of_month": ["first"], "days_of_week": ["sunday"], "months": 12},
                "yearly": {"months_of_year": ["november"], "days_of_month": [1], "years": 10}
            }
        }));
        // Wednesday: daily only.
        let wed = p.full_expiry(utc("2026-11-25T22:00:00Z"));
        assert_eq!(wed.tags, [RetentionTag::Daily]);
        assert_eq!(wed.expires_at, utc("2026-12-02T22:00:00Z"));
        // Sunday Nov 29, last week of the month: daily + weekly.
        let sun = p.full_expiry(utc("2026-11-29T22:00:00Z"));
        assert_eq!(sun.tags, [RetentionTag::Daily, RetentionTag::Weekly]);
        assert_eq!(sun.expires_at, utc("2026-12-27T22:00:00Z"));
        // Sunday Dec 6, first Sunday: monthly wins.
        let first_sun = p.full_expiry(utc("2026-12-06T22:00:00Z"));
        assert_eq!(
            first_sun.tags,
            [
                RetentionTag::Daily,
                RetentionTag::Weekly,
                RetentionTag::Monthly
            ]
        );
        assert_eq!(first_sun.expires_at, utc("2027-12-06T22:00:00Z"));
        // Nov 1 2026 is the first Sunday and a yearly point: ten years.
        let yearly = p.full_expiry(utc("2026-11-01T22:00:00Z"));
        assert_eq!(yearly.tags.last(), Some(&RetentionTag::Yearly));
        assert_eq!(yearly.expires_at, utc("2036-11-01T22:00:00Z"));
    }

    #[test]
    fn weekly_full_is_always_a_weekly_point() {
        let p = policy(json!({
            "time_zone": "Europe/Amsterdam",
            "full": {"frequency": "weekly", "days": ["sunday", "wednesday"], "time": "22:00"},
            "retention": {"weekly": {"weeks": 2}}
        }));
        let e = p.full_expiry(utc("2026-11-25T21:00:00Z"));
        assert_eq!(e.tags, [RetentionTag::Weekly]);
        assert_eq!(e.expires_at, utc("2026-12-09T21:00:00Z"));
    }

    #[test]
    fn day_of_month_past_month_end_means_last_day() {
        let sel = DaySelector::DaysOfMonth([31].into());
        assert!(sel.matches(NaiveDate::from_ymd_opt(2027, 2, 28).unwrap()));
        assert!(sel.matches(NaiveDate::from_ymd_opt(2028, 2, 29).unwrap()));
        assert!(!sel.matches(NaiveDate::from_ymd_opt(2028, 2, 28).unwrap()));
        assert!(sel.matches(NaiveDate::from_ymd_opt(2026, 4, 30).unwrap()));
        assert!(sel.matches(NaiveDate::from_ymd_opt(2026, 12, 31).unwrap()));
    }

    #[test]
    fn last_week_of_month_is_its_last_seven_days() {
        let date = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        assert!(week_of_month_matches(date(24), WeekOfMonth::Last));
        assert!(!week_of_month_matches(date(23), WeekOfMonth::Last));
        assert!(week_of_month_matches(date(28), WeekOfMonth::Fourth));
        assert!(!week_of_month_matches(date(29), WeekOfMonth::Fourth));
    }

    #[test]
    fn retention_counts_local_days_across_dst() {
        let p = policy(json!({
            "time_zone": "Europe/Amsterdam",
            "full": {"frequency": "daily", "time": "22:00"},
            "differential": null,
            "log": {"frequency_minutes": 60, "retention_days": 7},
            "retention": {"daily": {"days": 7}}
        }));
        // 22:00 CEST on Oct 20 is kept until 22:00 CET on Oct 27: 7 days and one hour.
        let e = p.full_expiry(utc("2026-10-20T20:00:00Z"));
        assert_eq!(e.expires_at, utc("2026-10-27T21:00:00Z"));
    }

    #[test]
    fn types_the_policy_lacks_have_no_expiry() {
        let p = policy(json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "22:00"},
            "retention": {"daily": {"days": 7}}
        }));
        assert_eq!(p.expiry(BackupType::Log, utc("2026-01-01T00:00:00Z")), None);
        assert_eq!(
            p.expiry(BackupType::Differential, utc("2026-01-01T00:00:00Z")),
            None
        );
    }

    proptest! {
        #[test]
        fn a_full_never_expires_before_its_dependents(
            full_days in 7u32..400, log_days in 7u32..=35, diff_days in 7u32..=180,
            start in 1_700_000_000i64..1_900_000_000,
        ) {
            let weeks = full_days.div_ceil(7);
            prop_assume!(diff_days <= weeks * 7);
            let p = policy(json!({
                "time_zone": "America/New_York",
                "full": {"frequency": "weekly", "days": ["sunday"], "time": "01:30"},
                "differential": {"days": ["wednesday"], "time": "02:00", "retention_days": diff_days},
                "log": {"frequency_minutes": 240, "retention_days": log_days},
                "retention": {"weekly": {"weeks": weeks}}
            }));
            let after = DateTime::from_timestamp(start, 0).unwrap();
            let mut fulls = p.full_runs(after);
            let full = fulls.next().unwrap();
            let next_full = fulls.next().unwrap();
            let dependents: Vec<_> = p.log_runs(full).take_while(|t| *t < next_full)
                .map(|t| p.expiry(BackupType::Log, t).unwrap().expires_at)
                .chain(p.differential_runs(full).take_while(|t| *t < next_full)
                    .map(|t| p.expiry(BackupType::Differential, t).unwrap().expires_at))
                .collect();
            let kept = chain_retained_until(p.full_expiry(full).expires_at, dependents.iter().copied());
            prop_assert!(kept >= p.full_expiry(full).expires_at);
            for d in dependents {
                prop_assert!(kept >= d);
            }
        }
    }
}
