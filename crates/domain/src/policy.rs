//! The SQL workload backup policy: the JSON an administrator writes (`PolicySpec`), and the
//! validated form the scheduler and retention work from (`Policy`). `PolicySpec::validate`
//! is the only way to get a `Policy`, and reports every violated rule at once.

use std::collections::BTreeSet;

use chrono::{NaiveTime, Timelike};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::violation::{Violation, Violations};

pub const MIN_RETENTION_DAYS: u32 = 7;
pub const MAX_DAILY_RETENTION_DAYS: u32 = 9999;
pub const MAX_WEEKLY_RETENTION_WEEKS: u32 = 5163;
pub const MAX_MONTHLY_RETENTION_MONTHS: u32 = 1188;
pub const MAX_YEARLY_RETENTION_YEARS: u32 = 99;
pub const MAX_DIFFERENTIAL_RETENTION_DAYS: u32 = 180;
pub const MAX_LOG_RETENTION_DAYS: u32 = 35;
pub const MIN_LOG_FREQUENCY_MINUTES: u32 = 15;
pub const ALLOWED_LOG_FREQUENCIES: [u32; 8] = [15, 30, 60, 120, 240, 480, 720, 1440];

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Weekday {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

impl From<chrono::Weekday> for Weekday {
    fn from(w: chrono::Weekday) -> Self {
        use chrono::Weekday as C;
        match w {
            C::Mon => Self::Monday,
            C::Tue => Self::Tuesday,
            C::Wed => Self::Wednesday,
            C::Thu => Self::Thursday,
            C::Fri => Self::Friday,
            C::Sat => Self::Saturday,
            C::Sun => Self::Sunday,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FullFrequency {
    Daily,
    Weekly,
}

/// Which week of the month a monthly or yearly retention point falls in: `first` is days
/// 1–7, `second` 8–14, `third` 15–21, `fourth` 22–28, `last` the month's last seven days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeekOfMonth {
    First,
    Second,
    Third,
    Fourth,
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Month {
    January,
    February,
    March,
    April,
    May,
    June,
    July,
    August,
    September,
    October,
    November,
    December,
}

impl Month {
    #[expect(
        clippy::arithmetic_side_effects,
        reason = "a month's discriminant is 0 to 11"
    )]
    pub fn number(self) -> u32 {
        self as u32 + 1
    }
}

/// A backup policy as written by hand or sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "time_zone": "Europe/Amsterdam",
    "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
    "differential": {"days": ["wednesday"], "time": "22:00", "retention_days": 30},
    "log": {"frequency_minutes": 60, "retention_days": 30},
    "retention": {"weekly": {"weeks": 8}, "monthly": {"weeks_of_month": ["first"], "days_of_week": ["sunday"], "months": 12}},
    "compression": false
}))]
pub struct PolicySpec {
    /// IANA time zone the schedule times are in, e.g. `Europe/Amsterdam` or `UTC`.
    pub time_zone: String,
    pub full: FullScheduleSpec,
    /// Differential backups; only with a weekly full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential: Option<DifferentialSpec>,
    /// Transaction log backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogSpec>,
    /// How long full backups are kept.
    pub retention: RetentionSpec,
    /// SQL backup compression; when set it overrides the instance default.
    #[serde(default)]
    pub compression: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FullScheduleSpec {
    pub frequency: FullFrequency,
    /// Days of a weekly full backup; absent for a daily one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<Weekday>>,
    /// Local time `HH:MM`, on the hour or half hour.
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DifferentialSpec {
    pub days: Vec<Weekday>,
    /// Local time `HH:MM`, on the hour or half hour.
    pub time: String,
    pub retention_days: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogSpec {
    /// One of 15, 30, 60, 120, 240, 480, 720, 1440.
    pub frequency_minutes: u32,
    pub retention_days: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<DailyRetentionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<WeeklyRetentionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<MonthlyRetentionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<YearlyRetentionSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DailyRetentionSpec {
    pub days: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeeklyRetentionSpec {
    /// Which days' full backups are weekly points. Required with a daily full; with a weekly
    /// full every full backup is a weekly point, so it may be left out (or must list the
    /// full-backup days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_of_week: Option<Vec<Weekday>>,
    pub weeks: u32,
}

/// A monthly point is chosen either by week of month and weekday (`weeks_of_month` +
/// `days_of_week`) or by day of month (`days_of_month`, daily full only); exactly one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MonthlyRetentionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weeks_of_month: Option<Vec<WeekOfMonth>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_of_week: Option<Vec<Weekday>>,
    /// 1–31; a day past the end of a month means that month's last day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_of_month: Option<Vec<u32>>,
    pub months: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct YearlyRetentionSpec {
    pub months_of_year: Vec<Month>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weeks_of_month: Option<Vec<WeekOfMonth>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_of_week: Option<Vec<Weekday>>,
    /// 1–31; a day past the end of a month means that month's last day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_of_month: Option<Vec<u32>>,
    pub years: u32,
}

/// A validated policy. Only `PolicySpec::validate` makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub time_zone: Tz,
    pub full: FullSchedule,
    pub differential: Option<DifferentialSchedule>,
    pub log: Option<LogSchedule>,
    pub retention: Retention,
    pub compression: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FullSchedule {
    /// All seven days for a daily full.
    pub days: BTreeSet<Weekday>,
    pub frequency: FullFrequency,
    pub time: NaiveTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DifferentialSchedule {
    pub days: BTreeSet<Weekday>,
    pub time: NaiveTime,
    pub retention_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogSchedule {
    pub frequency_minutes: u32,
    pub retention_days: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Retention {
    pub daily_days: Option<u32>,
    /// `None` days: every full backup day (weekly full).
    pub weekly: Option<(BTreeSet<Weekday>, u32)>,
    pub monthly: Option<(DaySelector, u32)>,
    pub yearly: Option<(BTreeSet<Month>, DaySelector, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DaySelector {
    WeekdaysOfWeeks {
        weeks: BTreeSet<WeekOfMonth>,
        days: BTreeSet<Weekday>,
    },
    DaysOfMonth(BTreeSet<u32>),
}

impl Policy {
    /// The policy every new vault starts with: daily full and hourly logs, both kept 30 days.
    pub fn default_spec() -> PolicySpec {
        PolicySpec {
            time_zone: "UTC".into(),
            full: FullScheduleSpec {
                frequency: FullFrequency::Daily,
                days: None,
                time: "22:00".into(),
            },
            differential: None,
            log: Some(LogSpec {
                frequency_minutes: 60,
                retention_days: 30,
            }),
            retention: RetentionSpec {
                daily: Some(DailyRetentionSpec { days: 30 }),
                ..Default::default()
            },
            compression: false,
        }
    }

    /// How long a full backup is kept at least: the daily range of a daily full, the
    /// weekly range of a weekly one. Differentials may not outlive it.
    pub fn base_full_retention_days(&self) -> u32 {
        match self.full.frequency {
            FullFrequency::Daily => self.retention.daily_days.unwrap_or(0),
            FullFrequency::Weekly => self
                .retention
                .weekly
                .as_ref()
                .map_or(0, |(_, w)| w.saturating_mul(7)),
        }
    }
}

pub const DEFAULT_POLICY_NAME: &str = "HourlyLogBackup";

/// Longer than every IANA time zone name (the longest has 32 characters).
pub const MAX_TIME_ZONE_CHARS: usize = 64;

/// The times `parse_time` accepts, as a JSON Schema pattern: HH:MM on the hour or half hour.
pub const TIME_OF_DAY_PATTERN: &str = "^([01][0-9]|2[0-3]):(00|30)$";

fn parse_time(raw: &str, pointer: &str, v: &mut Violations) -> Option<NaiveTime> {
    let Ok(time) = NaiveTime::parse_from_str(raw, "%H:%M") else {
        v.push(
            pointer,
            "time_invalid",
            format!("'{raw}' is not a time of day HH:MM (00:00 to 23:59)"),
        );
        return None;
    };
    if raw.len() != 5 {
        v.push(
            pointer,
            "time_invalid",
            format!("'{raw}' is not a time of day HH:MM (00:00 to 23:59)"),
        );
        return None;
    }
    if time.minute() % 30 != 0 {
        v.push(
            pointer,
            "time_not_on_half_hour",
            "backups start on the hour or the half hour (minutes 00 or 30)",
        );
        return None;
    }
    Some(time)
}

/// Checks a day list: non-empty, no repeats. `duplicate_code` lets a caller give repeats a
/// more specific meaning (a differential twice on one day).
fn parse_days(
    days: &[Weekday],
    pointer: &str,
    duplicate_code: &'static str,
    v: &mut Violations,
) -> BTreeSet<Weekday> {
    if days.is_empty() {
        v.push(pointer, "days_empty", "list at least one day");
    }
    let mut set = BTreeSet::new();
    for (i, day) in days.iter().enumerate() {
        if !set.insert(*day) {
            let message = if duplicate_code == "differential_twice_a_day" {
                format!("a differential backup runs at most once a day; {day:?} is listed twice")
            } else {
                format!("{day:?} is listed twice")
            };
            v.push(format!("{pointer}/{i}"), duplicate_code, message);
        }
    }
    set
}

/// `unit` is singular ("day", "week"...).
fn check_range(value: u32, min: u32, max: u32, unit: &str, pointer: &str, v: &mut Violations) {
    let amount = |n: u32| {
        if n == 1 {
            format!("{n} {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    if value < min {
        v.push(
            pointer,
            "retention_below_minimum",
            format!(
                "keep backups at least {} (no backup is kept less than 7 days)",
                amount(min)
            ),
        );
    } else if value > max {
        v.push(
            pointer,
            "retention_above_maximum",
            format!("keep backups at most {}", amount(max)),
        );
    }
}

impl PolicySpec {
    /// Validates every rule and returns either the policy or all violations, each with a
    /// JSON pointer under `base` (the spec's own pointer within the request body).
    pub fn validate(&self, base: &str) -> Result<Policy, Vec<Violation>> {
        let mut v = Violations::default();
        let p = |suffix: &str| format!("{base}{suffix}");

        let time_zone = match self.time_zone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                v.push(
                    p("/time_zone"),
                    "time_zone_unknown",
                    format!(
                        "'{}' is not an IANA time zone (e.g. 'Europe/Amsterdam' or 'UTC')",
                        self.time_zone
                    ),
                );
                None
            }
        };

        let full_time = parse_time(&self.full.time, &p("/full/time"), &mut v);
        let full_days = match (self.full.frequency, &self.full.days) {
            (FullFrequency::Daily, None) => all_days(),
            (FullFrequency::Daily, Some(_)) => {
                v.push(
                    p("/full/days"),
                    "days_not_allowed",
                    "a daily full backup runs every day; remove 'days' or make it weekly",
                );
                all_days()
            }
            (FullFrequency::Weekly, None) => {
                v.push(
                    p("/full/days"),
                    "days_empty",
                    "a weekly full backup lists its days",
                );
                BTreeSet::new()
            }
            (FullFrequency::Weekly, Some(days)) => {
                parse_days(days, &p("/full/days"), "days_duplicate", &mut v)
            }
        };
        let weekly_full = self.full.frequency == FullFrequency::Weekly;

        let retention = self.validate_retention(base, weekly_full, &full_days, &mut v);
        let base_full_days = match self.full.frequency {
            FullFrequency::Daily => retention.daily_days,
            FullFrequency::Weekly => retention.weekly.as_ref().map(|(_, w)| w.saturating_mul(7)),
        };

        let differential = self.differential.as_ref().and_then(|d| {
            if !weekly_full {
                v.push(
                    p("/differential"),
                    "differential_requires_weekly_full",
                    "differential backups need a weekly full backup; make the full weekly or remove the differential",
                );
            }
            let days = parse_days(&d.days, &p("/differential/days"), "differential_twice_a_day", &mut v);
            if weekly_full {
                for (i, day) in d.days.iter().enumerate() {
                    if full_days.contains(day) {
                        v.push(
                            p(&format!("/differential/days/{i}")),
                            "differential_on_full_day",
                            format!("{day:?} already has a full backup; a differential never runs on a full-backup day"),
                        );
                    }
                }
            }
            let time = parse_time(&d.time, &p("/differential/time"), &mut v);
            let pointer = p("/differential/retention_days");
            check_range(d.retention_days, MIN_RETENTION_DAYS, u32::MAX, "day", &pointer, &mut v);
            if d.retention_days > MAX_DIFFERENTIAL_RETENTION_DAYS {
                v.push(
                    &pointer,
                    "differential_retention_above_maximum",
                    "differential backups are kept at most 180 days",
                );
            }
            if let Some(full) = base_full_days
                && d.retention_days > full
            {
                v.push(
                    &pointer,
                    "differential_retention_exceeds_full",
                    format!("differential backups cannot be kept longer than the full backups they depend on ({full} days)"),
                );
            }
            Some(DifferentialSchedule {
                days,
                time: time?,
                retention_days: d.retention_days,
            })
        });

        let log = self.log.as_ref().map(|l| {
            let pointer = p("/log/frequency_minutes");
            if l.frequency_minutes < MIN_LOG_FREQUENCY_MINUTES {
                v.push(
                    &pointer,
                    "log_frequency_below_minimum",
                    "log backups run every 15 minutes or less often",
                );
            } else if !ALLOWED_LOG_FREQUENCIES.contains(&l.frequency_minutes) {
                v.push(
                    &pointer,
                    "log_frequency_not_allowed",
                    "log frequency is one of 15, 30, 60, 120, 240, 480, 720 or 1440 minutes",
                );
            }
            let pointer = p("/log/retention_days");
            if l.retention_days < MIN_RETENTION_DAYS {
                check_range(
                    l.retention_days,
                    MIN_RETENTION_DAYS,
                    u32::MAX,
                    "day",
                    &pointer,
                    &mut v,
                );
            } else if l.retention_days > MAX_LOG_RETENTION_DAYS {
                v.push(
                    &pointer,
                    "log_retention_above_maximum",
                    "log backups are kept at most 35 days",
                );
            }
            LogSchedule {
                frequency_minutes: l.frequency_minutes,
                retention_days: l.retention_days,
            }
        });

        let policy = match (time_zone, full_time) {
            (Some(time_zone), Some(time)) if v.is_empty() => Some(Policy {
                time_zone,
                full: FullSchedule {
                    days: full_days,
                    frequency: self.full.frequency,
                    time,
                },
                differential,
                log,
                retention,
                compression: self.compression,
            }),
            _ => None,
        };
        match policy {
            Some(policy) => Ok(policy),
            None => Err(v.into_vec()),
        }
    }

    fn validate_retention(
        &self,
        base: &str,
        weekly_full: bool,
        full_days: &BTreeSet<Weekday>,
        v: &mut Violations,
    ) -> Retention {
        let r = &self.retention;
        let p = |suffix: &str| format!("{base}/retention{suffix}");
        let mut out = Retention::default();

        match (&r.daily, weekly_full) {
            (Some(_), true) => v.push(
                p("/daily"),
                "daily_retention_requires_daily_full",
                "a daily retention range needs a daily full backup; use the weekly range",
            ),
            (None, false) => v.push(
                p("/daily"),
                "full_retention_missing",
                "a daily full backup needs a daily retention range",
            ),
            _ => {}
        }
        if let Some(daily) = &r.daily {
            check_range(
                daily.days,
                MIN_RETENTION_DAYS,
                MAX_DAILY_RETENTION_DAYS,
                "day",
                &p("/daily/days"),
                v,
            );
            out.daily_days = Some(daily.days);
        }

        match &r.weekly {
            None if weekly_full => v.push(
                p("/weekly"),
                "full_retention_missing",
                "a weekly full backup needs a weekly retention range",
            ),
            None => {}
            Some(weekly) => {
                check_range(
                    weekly.weeks,
                    1,
                    MAX_WEEKLY_RETENTION_WEEKS,
                    "week",
                    &p("/weekly/weeks"),
                    v,
                );
                let days = match (&weekly.days_of_week, weekly_full) {
                    (None, true) => full_days.clone(),
                    (None, false) => {
                        v.push(
                            p("/weekly/days_of_week"),
                            "days_empty",
                            "with a daily full backup, say which days' backups are weekly points",
                        );
                        BTreeSet::new()
                    }
                    (Some(days), _) => {
                        let pointer = p("/weekly/days_of_week");
                        let set = parse_days(days, &pointer, "days_duplicate", v);
                        check_on_full_days(days, full_days, &pointer, v);
                        if weekly_full
                            && !set.is_empty()
                            && full_days.iter().any(|d| !set.contains(d))
                        {
                            v.push(
                                &pointer,
                                "weekly_retention_days_mismatch",
                                "with a weekly full backup every full backup is a weekly point; list all full-backup days or leave days_of_week out",
                            );
                        }
                        set
                    }
                };
                out.weekly = Some((days, weekly.weeks));
            }
        }

        if let Some(m) = &r.monthly {
            check_range(
                m.months,
                1,
                MAX_MONTHLY_RETENTION_MONTHS,
                "month",
                &p("/monthly/months"),
                v,
            );
            let selector = parse_selector(
                (&m.weeks_of_month, &m.days_of_week, &m.days_of_month),
                &p("/monthly"),
                weekly_full,
                full_days,
                v,
            );
            out.monthly = selector.map(|s| (s, m.months));
        }

        if let Some(y) = &r.yearly {
            check_range(
                y.years,
                1,
                MAX_YEARLY_RETENTION_YEARS,
                "year",
                &p("/yearly/years"),
                v,
            );
            let mut months = BTreeSet::new();
            if y.months_of_year.is_empty() {
                v.push(
                    p("/yearly/months_of_year"),
                    "days_empty",
                    "list at least one month",
                );
            }
            for (i, month) in y.months_of_year.iter().enumerate() {
                if !months.insert(*month) {
                    v.push(
                        p(&format!("/yearly/months_of_year/{i}")),
                        "days_duplicate",
                        format!("{month:?} is listed twice"),
                    );
                }
            }
            let selector = parse_selector(
                (&y.weeks_of_month, &y.days_of_week, &y.days_of_month),
                &p("/yearly"),
                weekly_full,
                full_days,
                v,
            );
            out.yearly = selector.map(|s| (months, s, y.years));
        }
        out
    }
}

fn all_days() -> BTreeSet<Weekday> {
    use Weekday::*;
    [
        Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday,
    ]
    .into()
}

fn check_on_full_days(
    days: &[Weekday],
    full_days: &BTreeSet<Weekday>,
    pointer: &str,
    v: &mut Violations,
) {
    // An empty full-day list is reported once, where it is; not again here for every day.
    if full_days.is_empty() {
        return;
    }
    for (i, day) in days.iter().enumerate() {
        if !full_days.contains(day) {
            v.push(
                format!("{pointer}/{i}"),
                "retention_day_not_full_day",
                format!("no full backup runs on {day:?}, so it cannot be a retention point"),
            );
        }
    }
}

type SelectorSpec<'a> = (
    &'a Option<Vec<WeekOfMonth>>,
    &'a Option<Vec<Weekday>>,
    &'a Option<Vec<u32>>,
);

fn parse_selector(
    (weeks, weekdays, days_of_month): SelectorSpec<'_>,
    pointer: &str,
    weekly_full: bool,
    full_days: &BTreeSet<Weekday>,
    v: &mut Violations,
) -> Option<DaySelector> {
    match (weeks, weekdays, days_of_month) {
        (Some(weeks), Some(weekdays), None) => {
            let mut week_set = BTreeSet::new();
            if weeks.is_empty() {
                v.push(
                    format!("{pointer}/weeks_of_month"),
                    "days_empty",
                    "list at least one week of the month",
                );
            }
            for (i, w) in weeks.iter().enumerate() {
                if !week_set.insert(*w) {
                    v.push(
                        format!("{pointer}/weeks_of_month/{i}"),
                        "days_duplicate",
                        format!("{w:?} is listed twice"),
                    );
                }
            }
            let day_pointer = format!("{pointer}/days_of_week");
            let days = parse_days(weekdays, &day_pointer, "days_duplicate", v);
            check_on_full_days(weekdays, full_days, &day_pointer, v);
            Some(DaySelector::WeekdaysOfWeeks {
                weeks: week_set,
                days,
            })
        }
        (None, None, Some(days)) => {
            let day_pointer = format!("{pointer}/days_of_month");
            if weekly_full {
                v.push(
                    &day_pointer,
                    "day_based_retention_requires_daily_full",
                    "with a weekly full backup, choose monthly and yearly points by week of month and weekday",
                );
            }
            if days.is_empty() {
                v.push(
                    &day_pointer,
                    "days_empty",
                    "list at least one day of the month",
                );
            }
            let mut set = BTreeSet::new();
            for (i, d) in days.iter().enumerate() {
                if !(1..=31).contains(d) {
                    v.push(
                        format!("{day_pointer}/{i}"),
                        "day_of_month_invalid",
                        "a day of the month is 1 to 31",
                    );
                } else if !set.insert(*d) {
                    v.push(
                        format!("{day_pointer}/{i}"),
                        "days_duplicate",
                        format!("day {d} is listed twice"),
                    );
                }
            }
            Some(DaySelector::DaysOfMonth(set))
        }
        _ => {
            v.push(
                pointer,
                "retention_selector_invalid",
                "choose points either by weeks_of_month with days_of_week, or by days_of_month (not both, not neither)",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({
            "time_zone": "Europe/Amsterdam",
            "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
            "differential": {"days": ["wednesday"], "time": "22:30", "retention_days": 30},
            "log": {"frequency_minutes": 60, "retention_days": 30},
            "retention": {
                "weekly": {"weeks": 8},
                "monthly": {"weeks_of_month": ["first"], "days_of_week": ["sunday"], "months": 12},
                "yearly": {"months_of_year": ["january"], "weeks_of_month": ["last"], "days_of_week": ["sunday"], "years": 5}
            }
        })
    }

    fn daily() -> Value {
        json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "02:30"},
            "log": {"frequency_minutes": 15, "retention_days": 7},
            "retention": {
                "daily": {"days": 30},
                "weekly": {"days_of_week": ["sunday"], "weeks": 12},
                "monthly": {"days_of_month": [1, 31], "months": 24}
            }
        })
    }

    /// Applies `edit` to a valid policy and returns the (pointer, code) pairs reported.
    fn violations(mut spec: Value, edit: impl FnOnce(&mut Value)) -> Vec<(String, &'static str)> {
        edit(&mut spec);
        let spec: PolicySpec = serde_json::from_value(spec).expect("spec deserializes");
        match spec.validate("") {
            Ok(_) => Vec::new(),
            Err(v) => v.into_iter().map(|v| (v.pointer, v.code)).collect(),
        }
    }

    fn one(pointer: &str, code: &'static str) -> Vec<(String, &'static str)> {
        vec![(pointer.to_owned(), code)]
    }

    #[test]
    fn valid_policies_validate() {
        assert_eq!(violations(base(), |_| {}), []);
        assert_eq!(violations(daily(), |_| {}), []);
        let default = Policy::default_spec().validate("").unwrap();
        assert_eq!(default.log.unwrap().frequency_minutes, 60);
        assert_eq!(default.base_full_retention_days(), 30);
        assert!(default.differential.is_none());
        assert!(!default.compression);
    }

    #[test]
    fn unknown_time_zone() {
        assert_eq!(
            violations(base(), |s| s["time_zone"] = json!("Mars/Olympus")),
            one("/time_zone", "time_zone_unknown")
        );
    }

    #[test]
    fn times_are_hh_mm_on_the_half_hour() {
        for bad in ["24:00", "7:00", "22:00:00", "noon"] {
            assert_eq!(
                violations(base(), |s| s["full"]["time"] = json!(bad)),
                one("/full/time", "time_invalid"),
                "{bad}"
            );
        }
        assert_eq!(
            violations(base(), |s| s["differential"]["time"] = json!("22:15")),
            one("/differential/time", "time_not_on_half_hour")
        );
    }

    #[test]
    fn day_lists_are_non_empty_without_repeats() {
        assert_eq!(
            violations(base(), |s| s["full"]["days"] = json!([])),
            one("/full/days", "days_empty")
        );
        assert_eq!(
            violations(base(), |s| s["full"]["days"] =
                json!(["sunday", "saturday", "sunday"])),
            one("/full/days/2", "days_duplicate")
        );
        assert_eq!(
            violations(base(), |s| {
                s["full"].as_object_mut().unwrap().remove("days");
            }),
            one("/full/days", "days_empty")
        );
        assert_eq!(
            violations(daily(), |s| s["full"]["days"] = json!(["monday"])),
            one("/full/days", "days_not_allowed")
        );
    }

    #[test]
    fn differential_needs_weekly_full() {
        assert_eq!(
            violations(
                daily(),
                |s| s["differential"] =
                    json!({"days": ["wednesday"], "time": "22:00", "retention_days": 7})
            ),
            one("/differential", "differential_requires_weekly_full")
        );
    }

    #[test]
    fn differential_never_on_a_full_day_and_once_a_day() {
        assert_eq!(
            violations(base(), |s| s["differential"]["days"] =
                json!(["monday", "sunday"])),
            one("/differential/days/1", "differential_on_full_day")
        );
        assert_eq!(
            violations(base(), |s| s["differential"]["days"] =
                json!(["monday", "monday"])),
            one("/differential/days/1", "differential_twice_a_day")
        );
    }

    #[test]
    fn differential_retention_bounds() {
        assert_eq!(
            violations(base(), |s| s["differential"]["retention_days"] = json!(6)),
            one("/differential/retention_days", "retention_below_minimum")
        );
        // 181 days against a 30-week full: only the 180-day cap.
        assert_eq!(
            violations(base(), |s| {
                s["differential"]["retention_days"] = json!(181);
                s["retention"]["weekly"]["weeks"] = json!(30);
            }),
            one(
                "/differential/retention_days",
                "differential_retention_above_maximum"
            )
        );
        // 60 days against an 8-week (56-day) full.
        assert_eq!(
            violations(base(), |s| s["differential"]["retention_days"] = json!(60)),
            one(
                "/differential/retention_days",
                "differential_retention_exceeds_full"
            )
        );
    }

    #[test]
    fn log_frequency_and_retention() {
        assert_eq!(
            violations(base(), |s| s["log"]["frequency_minutes"] = json!(10)),
            one("/log/frequency_minutes", "log_frequency_below_minimum")
        );
        assert_eq!(
            violations(base(), |s| s["log"]["frequency_minutes"] = json!(45)),
            one("/log/frequency_minutes", "log_frequency_not_allowed")
        );
        for ok in ALLOWED_LOG_FREQUENCIES {
            assert_eq!(
                violations(base(), |s| s["log"]["frequency_minutes"] = json!(ok)),
                []
            );
        }
        assert_eq!(
            violations(base(), |s| s["log"]["retention_days"] = json!(36)),
            one("/log/retention_days", "log_retention_above_maximum")
        );
        assert_eq!(
            violations(base(), |s| s["log"]["retention_days"] = json!(6)),
            one("/log/retention_days", "retention_below_minimum")
        );
    }

    #[test]
    fn retention_minimums_and_maximums() {
        assert_eq!(
            violations(daily(), |s| s["retention"]["daily"]["days"] = json!(6)),
            one("/retention/daily/days", "retention_below_minimum")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["daily"]["days"] = json!(10000)),
            one("/retention/daily/days", "retention_above_maximum")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["daily"]["days"] = json!(9999)),
            []
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["weekly"]["weeks"] = json!(0)),
            one("/retention/weekly/weeks", "retention_below_minimum")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["weekly"]["weeks"] = json!(5164)),
            one("/retention/weekly/weeks", "retention_above_maximum")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["monthly"]["months"] =
                json!(1189)),
            one("/retention/monthly/months", "retention_above_maximum")
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["years"] = json!(100)),
            one("/retention/yearly/years", "retention_above_maximum")
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["years"] = json!(0)),
            one("/retention/yearly/years", "retention_below_minimum")
        );
    }

    #[test]
    fn huge_numbers_are_violations_not_overflows() {
        assert_eq!(
            violations(base(), |s| s["retention"]["weekly"]["weeks"] =
                json!(u32::MAX)),
            one("/retention/weekly/weeks", "retention_above_maximum")
        );
    }

    #[test]
    fn the_base_range_matches_the_full_frequency() {
        assert_eq!(
            violations(daily(), |s| {
                s["retention"].as_object_mut().unwrap().remove("daily");
            }),
            one("/retention/daily", "full_retention_missing")
        );
        assert_eq!(
            violations(base(), |s| {
                s["retention"].as_object_mut().unwrap().remove("weekly");
            }),
            // Without the weekly range the differential has no full retention to compare
            // with, so only the missing range is reported.
            one("/retention/weekly", "full_retention_missing")
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["daily"] = json!({"days": 30})),
            one("/retention/daily", "daily_retention_requires_daily_full")
        );
    }

    #[test]
    fn retention_points_fall_on_full_backup_days() {
        assert_eq!(
            violations(base(), |s| s["retention"]["monthly"]["days_of_week"] =
                json!(["monday"])),
            one(
                "/retention/monthly/days_of_week/0",
                "retention_day_not_full_day"
            )
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["days_of_week"] =
                json!(["sunday", "friday"])),
            one(
                "/retention/yearly/days_of_week/1",
                "retention_day_not_full_day"
            )
        );
        let weekly_days = violations(base(), |s| {
            s["full"]["days"] = json!(["sunday", "saturday"]);
            s["retention"]["weekly"]["days_of_week"] = json!(["saturday", "monday"]);
        });
        assert_eq!(
            weekly_days,
            [
                (
                    "/retention/weekly/days_of_week/1".to_owned(),
                    "retention_day_not_full_day"
                ),
                (
                    "/retention/weekly/days_of_week".to_owned(),
                    "weekly_retention_days_mismatch"
                ),
            ]
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["weekly"]["days_of_week"] =
                json!(["sunday"])),
            []
        );
        assert_eq!(
            violations(daily(), |s| {
                s["retention"]["weekly"]
                    .as_object_mut()
                    .unwrap()
                    .remove("days_of_week");
            }),
            one("/retention/weekly/days_of_week", "days_empty")
        );
    }

    #[test]
    fn monthly_and_yearly_selectors() {
        assert_eq!(
            violations(base(), |s| s["retention"]["monthly"] =
                json!({"days_of_month": [1], "months": 3})),
            one(
                "/retention/monthly/days_of_month",
                "day_based_retention_requires_daily_full"
            )
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["monthly"] =
                json!({"months": 3})),
            one("/retention/monthly", "retention_selector_invalid")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["monthly"]["weeks_of_month"] =
                json!(["first"])),
            one("/retention/monthly", "retention_selector_invalid")
        );
        assert_eq!(
            violations(daily(), |s| s["retention"]["monthly"]["days_of_month"] =
                json!([0, 32, 5, 5])),
            [
                (
                    "/retention/monthly/days_of_month/0".to_owned(),
                    "day_of_month_invalid"
                ),
                (
                    "/retention/monthly/days_of_month/1".to_owned(),
                    "day_of_month_invalid"
                ),
                (
                    "/retention/monthly/days_of_month/3".to_owned(),
                    "days_duplicate"
                ),
            ]
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["months_of_year"] =
                json!([])),
            one("/retention/yearly/months_of_year", "days_empty")
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["months_of_year"] =
                json!(["may", "may"])),
            one("/retention/yearly/months_of_year/1", "days_duplicate")
        );
        assert_eq!(
            violations(base(), |s| s["retention"]["yearly"]["weeks_of_month"] =
                json!(["last", "last"])),
            one("/retention/yearly/weeks_of_month/1", "days_duplicate")
        );
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let all = violations(base(), |s| {
            s["time_zone"] = json!("Nowhere/Land");
            s["full"]["time"] = json!("22:10");
            s["differential"]["days"] = json!(["sunday"]);
            s["differential"]["retention_days"] = json!(200);
            s["log"]["frequency_minutes"] = json!(5);
            s["log"]["retention_days"] = json!(90);
            s["retention"]["weekly"]["weeks"] = json!(0);
        });
        let codes: BTreeSet<_> = all.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            codes,
            BTreeSet::from([
                "time_zone_unknown",
                "time_not_on_half_hour",
                "differential_on_full_day",
                "differential_retention_above_maximum",
                "differential_retention_exceeds_full",
                "log_frequency_below_minimum",
                "log_retention_above_maximum",
                "retention_below_minimum",
            ])
        );
    }

    #[test]
    fn unknown_fields_are_rejected_not_ignored() {
        let mut spec = base();
        spec["log"]["retention"] = json!(30);
        assert!(serde_json::from_value::<PolicySpec>(spec).is_err());
    }

    #[test]
    fn base_pointer_prefixes_every_pointer() {
        let mut spec = base();
        spec["time_zone"] = json!("x");
        let spec: PolicySpec = serde_json::from_value(spec).unwrap();
        let err = spec.validate("/spec").unwrap_err();
        assert_eq!(err[0].pointer, "/spec/time_zone");
    }
}

#[cfg(test)]
mod time_zone_tests {
    use super::*;

    #[test]
    fn every_time_zone_name_fits_the_bound() {
        for tz in chrono_tz::TZ_VARIANTS {
            assert!(
                tz.name().chars().count() <= MAX_TIME_ZONE_CHARS,
                "{}",
                tz.name()
            );
        }
    }
}
