//! What a policy will do, before it is saved: the next runs of each backup type, when each
//! point expires, how long the recovery chain keeps each full, and the worst gap between
//! recovery points. Tools ask this instead of copying the rules.

use crate::instants::{earlier, later, minutes};
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use utoipa::ToSchema;

use crate::policy::Policy;
use crate::retention::{BackupType, RetentionTag, chain_retained_until};
use crate::schedule::interval_slot_at_or_before;

pub const MAX_PREVIEW_RUNS: usize = 100;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PolicyPreview {
    /// Runs are strictly after this instant.
    pub from: DateTime<Utc>,
    pub time_zone: String,
    pub full: Vec<FullRun>,
    pub differential: Vec<DependentRun>,
    pub log: Vec<DependentRun>,
    /// The longest time between two consecutive recovery points over the next two weeks:
    /// the worst-case data loss (RPO) this policy allows.
    pub max_gap_minutes: i64,
    /// Previewed for an immutable vault (`vault_id`): a retention change applies to new
    /// recovery points only where it would shorten; existing ones keep their expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existing_points: Option<&'static str>,
}

/// What [`PolicyPreview::existing_points`] says for an immutable vault.
pub const IMMUTABLE_EXISTING_POINTS: &str = "an immutable vault never brings an expiry forward: a shorter retention applies to new recovery points only, existing ones keep their expiry (a longer one applies to both)";

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FullRun {
    pub at: DateTime<Utc>,
    /// The run in the policy's zone, RFC 3339 with offset.
    pub local_time: String,
    /// True when the requested local time does not exist that day (spring forward) and the
    /// run moved past the gap.
    pub shifted_by_dst: bool,
    /// Expiry from the retention ranges alone.
    pub expires_at: DateTime<Utc>,
    pub retention_tags: Vec<RetentionTag>,
    /// Expiry with the recovery chain: kept until the last differential or log taken
    /// before the next full has expired.
    pub retained_until: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DependentRun {
    pub at: DateTime<Utc>,
    pub local_time: String,
    pub shifted_by_dst: bool,
    pub expires_at: DateTime<Utc>,
    /// The full backup this point restores on top of.
    pub depends_on_full_at: DateTime<Utc>,
}

fn local(tz: Tz, at: DateTime<Utc>) -> String {
    at.with_timezone(&tz).to_rfc3339()
}

impl Policy {
    /// The next `count` runs of each type after `from` (`count` is capped at
    /// [`MAX_PREVIEW_RUNS`]).
    pub fn preview(&self, from: DateTime<Utc>, count: usize) -> PolicyPreview {
        let count = count.clamp(1, MAX_PREVIEW_RUNS);
        let tz = self.time_zone;
        // Fulls from a week back, so that the first dependents know their full.
        let fulls: Vec<_> = self
            .full_runs(earlier(from, Duration::days(8)))
            .take(count.saturating_add(2))
            .collect();
        let full_before = |at: DateTime<Utc>| {
            fulls
                .iter()
                .rev()
                .find(|f| **f <= at)
                .copied()
                .unwrap_or(at)
        };
        let full_after = |at: DateTime<Utc>| {
            self.full_runs(at)
                .next()
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        };

        let shifted = |at: DateTime<Utc>, time| at.with_timezone(&tz).time() != time;
        let dependent = |kind, time: Option<chrono::NaiveTime>, at: DateTime<Utc>| DependentRun {
            at,
            local_time: local(tz, at),
            shifted_by_dst: time.is_some_and(|t| shifted(at, t)),
            expires_at: self.expiry(kind, at).map_or(at, |e| e.expires_at),
            depends_on_full_at: full_before(at),
        };

        let full = self
            .full_runs(from)
            .take(count)
            .map(|at| {
                let expiry = self.full_expiry(at);
                let next_full = full_after(at);
                let last_log = self.log.map(|l| {
                    interval_slot_at_or_before(
                        l.frequency_minutes,
                        earlier(next_full, Duration::seconds(1)),
                    )
                });
                let last_diff = self
                    .differential_runs(at)
                    .take_while(|d| *d < next_full)
                    .last();
                let dependents = last_log
                    .filter(|l| *l >= at)
                    .and_then(|l| self.expiry(BackupType::Log, l))
                    .into_iter()
                    .chain(last_diff.and_then(|d| self.expiry(BackupType::Differential, d)))
                    .map(|e| e.expires_at);
                FullRun {
                    at,
                    local_time: local(tz, at),
                    shifted_by_dst: shifted(at, self.full.time),
                    expires_at: expiry.expires_at,
                    retention_tags: expiry.tags,
                    retained_until: chain_retained_until(expiry.expires_at, dependents),
                }
            })
            .collect();
        let differential_time = self.differential.as_ref().map(|d| d.time);
        let differential = self
            .differential_runs(from)
            .take(count)
            .map(|at| dependent(BackupType::Differential, differential_time, at))
            .collect();
        let log = self
            .log_runs(from)
            .take(count)
            .map(|at| dependent(BackupType::Log, None, at))
            .collect();

        PolicyPreview {
            from,
            time_zone: tz.name().to_owned(),
            full,
            differential,
            log,
            max_gap_minutes: self.max_gap_minutes(from),
            existing_points: None,
        }
    }

    /// The longest gap between consecutive recovery points the policy allows (its RPO).
    pub fn max_gap_minutes(&self, from: DateTime<Utc>) -> i64 {
        if let Some(log) = self.log {
            return log.frequency_minutes.into();
        }
        let horizon = later(from, Duration::days(14));
        let mut points: Vec<_> = self
            .full_runs(from)
            .take_while(|t| *t <= horizon)
            .chain(self.differential_runs(from).take_while(|t| *t <= horizon))
            .collect();
        points.sort();
        points
            .windows(2)
            .map(|w| w[1].signed_duration_since(w[0]).num_minutes())
            .max()
            .unwrap_or(7 * 24 * 60)
    }
}

/// A backup needs time to run after its slot before its absence counts as a breach.
pub const RPO_GRACE_MINUTES: i64 = 15;

/// Whether a recovery point objective is breached: the latest point (or the start of
/// protection) is older than the policy's allowed gap plus the grace.
pub fn rpo_breached(latest: DateTime<Utc>, allowed_gap_minutes: i64, now: DateTime<Utc>) -> bool {
    now > rpo_deadline(latest, allowed_gap_minutes)
}

/// The instant after which an item whose latest point is `latest` breaches its RPO.
pub fn rpo_deadline(latest: DateTime<Utc>, allowed_gap_minutes: i64) -> DateTime<Utc> {
    later(
        latest,
        minutes(allowed_gap_minutes.saturating_add(RPO_GRACE_MINUTES)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySpec;
    use serde_json::json;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn weekly() -> Policy {
        serde_json::from_value::<PolicySpec>(json!({
            "time_zone": "Europe/Amsterdam",
            "full": {"frequency": "weekly", "days": ["sunday"], "time": "02:30"},
            "differential": {"days": ["wednesday"], "time": "02:00", "retention_days": 14},
            "log": {"frequency_minutes": 60, "retention_days": 30},
            "retention": {"weekly": {"weeks": 2}}
        }))
        .unwrap()
        .validate("")
        .unwrap()
    }

    #[test]
    fn preview_chains_fulls_to_their_last_log() {
        let p = weekly().preview(utc("2026-11-20T00:00:00Z"), 2);
        let first = &p.full[0];
        assert_eq!(first.at, utc("2026-11-22T01:30:00Z"));
        assert_eq!(first.expires_at, utc("2026-12-06T01:30:00Z"));
        // The last log before the next full (Nov 29 01:30Z) is at 01:00Z, kept 30 days.
        assert_eq!(first.retained_until, utc("2026-12-29T01:00:00Z"));
        assert_eq!(first.retention_tags, [RetentionTag::Weekly]);
        assert_eq!(p.differential[0].depends_on_full_at, first.at);
        assert_eq!(p.log[0].depends_on_full_at, utc("2026-11-15T01:30:00Z"));
        assert_eq!(p.log.len(), 2);
        assert_eq!(p.max_gap_minutes, 60);
    }

    #[test]
    fn preview_marks_dst_shifted_runs() {
        let p = weekly().preview(utc("2027-03-27T00:00:00Z"), 1);
        assert!(p.full[0].shifted_by_dst);
        assert_eq!(p.full[0].local_time, "2027-03-28T03:30:00+02:00");
        let normal = weekly().preview(utc("2027-04-01T00:00:00Z"), 1);
        assert!(!normal.full[0].shifted_by_dst);
    }

    #[test]
    fn gap_without_logs_is_the_widest_full_or_differential_gap() {
        let p: Policy = serde_json::from_value::<PolicySpec>(json!({
            "time_zone": "UTC",
            "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:00"},
            "differential": {"days": ["wednesday"], "time": "00:00", "retention_days": 7},
            "retention": {"weekly": {"weeks": 1}}
        }))
        .unwrap()
        .validate("")
        .unwrap();
        // Wednesday to Sunday is four days.
        assert_eq!(
            p.preview(utc("2026-11-20T00:00:00Z"), 3).max_gap_minutes,
            4 * 24 * 60
        );
    }

    #[test]
    fn rpo_is_breached_after_the_gap_and_the_grace() {
        let latest = utc("2026-11-25T10:00:00Z");
        assert!(!rpo_breached(latest, 60, utc("2026-11-25T11:15:00Z")));
        assert!(rpo_breached(latest, 60, utc("2026-11-25T11:15:01Z")));
    }

    #[test]
    fn count_is_capped() {
        let p = weekly().preview(utc("2026-11-20T00:00:00Z"), 10_000);
        assert_eq!(p.full.len(), MAX_PREVIEW_RUNS);
    }
}
