//! Jobs as the rules see them: kinds, statuses, the 50-database batch limit, per-VM
//! concurrency caps, attempts and the retry backoff.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::restore::RestoreJobPayload;
use crate::violation::{Violation, Violations};

/// How one attempt at a job ended. The database holds the same set in a CHECK constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Completed,
    Failed,
    /// The agent stopped heartbeating; the job was handed out again.
    LeaseExpired,
    Cancelled,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 4] = [
        AttemptOutcome::Completed,
        AttemptOutcome::Failed,
        AttemptOutcome::LeaseExpired,
        AttemptOutcome::Cancelled,
    ];

    /// As on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::LeaseExpired => "lease_expired",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// What a backup job's agent is told beyond its databases. A scheduled job names its
/// policy slot; an on-demand one its retention; a copy-only full says so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPayload {
    /// The policy slot a scheduled job serves; after downtime, the first slot missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_at: Option<DateTime<Utc>>,
    /// The scheduler's clock when it enqueued the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<DateTime<Utc>>,
    /// A full backup outside the recovery chain (`BACKUP ... WITH COPY_ONLY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_only: Option<bool>,
    /// Days an on-demand backup is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    /// Taken by a user (`backup_now`), not by the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<bool>,
}

/// Nothing beyond the job's items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoPayload {}

/// What a job's agent is told beyond its items, by the job's kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobPayload {
    Discovery(NoPayload),
    ConfigureProtection(NoPayload),
    BackupFull(BackupPayload),
    BackupDifferential(BackupPayload),
    BackupLog(BackupPayload),
    Restore(RestoreJobPayload),
}

impl JobPayload {
    /// The payload of a job of `kind` as stored (without its kind).
    pub fn from_stored(
        kind: JobKind,
        stored: &serde_json::Value,
    ) -> Result<Self, serde_json::Error> {
        let mut tagged = match stored {
            serde_json::Value::Object(fields) => fields.clone(),
            _ => serde_json::Map::new(),
        };
        tagged.insert("kind".into(), kind.as_str().into());
        serde_json::from_value(serde_json::Value::Object(tagged))
    }

    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Discovery(_) => JobKind::Discovery,
            JobPayload::ConfigureProtection(_) => JobKind::ConfigureProtection,
            JobPayload::BackupFull(_) => JobKind::BackupFull,
            JobPayload::BackupDifferential(_) => JobKind::BackupDifferential,
            JobPayload::BackupLog(_) => JobKind::BackupLog,
            JobPayload::Restore(_) => JobKind::Restore,
        }
    }
}

/// At most this many databases go into one job (Azure Backup's limit per backup job).
pub const MAX_ITEMS_PER_JOB: usize = 50;
/// Azure Backup runs at most 20 backup jobs and 15 restore jobs at once on one VM.
pub const DEFAULT_MAX_RUNNING_BACKUPS_PER_VM: u32 = 20;
pub const DEFAULT_MAX_RUNNING_RESTORES_PER_VM: u32 = 15;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Discovery,
    ConfigureProtection,
    BackupFull,
    BackupDifferential,
    BackupLog,
    Restore,
}

impl JobKind {
    pub const ALL: [JobKind; 6] = [
        JobKind::Discovery,
        JobKind::ConfigureProtection,
        JobKind::BackupFull,
        JobKind::BackupDifferential,
        JobKind::BackupLog,
        JobKind::Restore,
    ];

    /// The kinds `POST /v1/jobs` dispatches: configuring protection and restoring have
    /// operations of their own, which check their rules.
    pub const DISPATCHABLE: [JobKind; 4] = [
        JobKind::Discovery,
        JobKind::BackupFull,
        JobKind::BackupDifferential,
        JobKind::BackupLog,
    ];

    /// The kinds the scheduler makes from a policy's slots.
    pub const SCHEDULED: [JobKind; 3] = [
        JobKind::BackupFull,
        JobKind::BackupDifferential,
        JobKind::BackupLog,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Discovery => "discovery",
            JobKind::ConfigureProtection => "configure_protection",
            JobKind::BackupFull => "backup_full",
            JobKind::BackupDifferential => "backup_differential",
            JobKind::BackupLog => "backup_log",
            JobKind::Restore => "restore",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Restores count against the restore cap; everything else against the backup cap.
    pub fn is_restore(self) -> bool {
        self == JobKind::Restore
    }

    pub fn max_attempts(self) -> i32 {
        DEFAULT_MAX_ATTEMPTS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    InProgress,
    Completed,
    CompletedWithWarnings,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::InProgress,
        JobStatus::Completed,
        JobStatus::CompletedWithWarnings,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::CompletedWithWarnings => "completed_with_warnings",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::InProgress)
    }

    /// The status a user sees, from the history's `stored` status and whether the job's
    /// queue row runs (`None`: the job is out of the queue). A claim writes only the queue
    /// row, so a running job's history still says queued; its SQL twin is
    /// `backvault_job_status`.
    pub fn as_seen(stored: JobStatus, running: Option<bool>) -> JobStatus {
        if running == Some(true) {
            JobStatus::InProgress
        } else {
            stored
        }
    }
}

/// On-demand work goes before scheduled work; lower runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    OnDemand,
    Scheduled,
}

impl Priority {
    pub const ALL: [Priority; 2] = [Priority::OnDemand, Priority::Scheduled];

    /// As in the database (`jobs.priority`, `job_queue.priority`).
    pub fn rank(self) -> i16 {
        match self {
            Priority::OnDemand => 0,
            Priority::Scheduled => 1,
        }
    }

    pub fn from_rank(rank: i16) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.rank() == rank)
    }
}

/// Splits items into jobs of at most [`MAX_ITEMS_PER_JOB`], in order, as evenly as the
/// limit allows (120 databases make jobs of 40, 40 and 40, not 50, 50 and 20), so no job
/// runs much longer than its siblings.
pub fn batch<T>(items: Vec<T>) -> Vec<Vec<T>> {
    let count = items.len();
    let mut jobs: Vec<Vec<T>> = (0..count.div_ceil(MAX_ITEMS_PER_JOB))
        .map(|_| Vec::new())
        .collect();
    for (index, item) in items.into_iter().enumerate() {
        jobs[batch_of(index, count)].push(item);
    }
    jobs
}

/// The job (from 0) that the `index`-th of `count` items goes to in [`batch`]. A closed
/// form, so the scheduler's set-based statement (`backvault_batch_of` in the migrations)
/// computes the same split in SQL; a test compares the two.
pub fn batch_of(index: usize, count: usize) -> usize {
    index
        .saturating_mul(count.div_ceil(MAX_ITEMS_PER_JOB))
        .checked_div(count)
        .unwrap_or(0)
}

/// Delay before retry number `attempt` (1 after the first failure): exponential from 2 s,
/// capped at 10 minutes, scaled by `jitter` in [0.5, 1.5) so that jobs that failed together
/// do not retry together.
pub fn retry_delay(attempt: i32, jitter: f64) -> Duration {
    let exp = attempt.clamp(1, 16) as u32;
    let base = 2f64.powi(exp as i32).min(600.0);
    Duration::from_secs_f64(base * jitter.clamp(0.5, 1.5))
}

/// At most [`MAX_ITEMS_PER_JOB`] databases a job: every job is checked against it when it
/// is built (the `jobs_items_at_most_50` CHECK is its twin, tested to agree).
pub fn check_item_count(item_count: usize) -> Option<Violation> {
    (item_count > MAX_ITEMS_PER_JOB).then(|| {
        Violation::new(
            "/items",
            "too_many_items",
            format!("a job carries at most {MAX_ITEMS_PER_JOB} databases"),
        )
    })
}

/// Every reason `POST /v1/jobs` may not send this job. Only the kinds whose rules the
/// generic dispatch can check go through it: discovery, and backups of the VM's own
/// databases with no payload beyond `copy_only`. Configure protection and restores have
/// endpoints that check their rules (eligibility, restore targets); a raw job would skip
/// them.
pub fn check_dispatch(kind: JobKind, item_count: usize, copy_only: Option<bool>) -> Vec<Violation> {
    let mut v = Violations::default();
    match kind {
        _ if !JobKind::DISPATCHABLE.contains(&kind) => v.push(
            "/kind",
            "job_kind_not_dispatchable",
            "configure protection with POST /v1/vaults/{vault_id}/protected-items and restore with POST .../protected-items/{item_id}/restore, which check their rules",
        ),
        JobKind::Discovery if item_count > 0 => v.push(
            "/items",
            "items_not_allowed",
            "a discovery job names no databases: it reports them",
        ),
        _ => {}
    }
    v.extend(check_item_count(item_count));
    if copy_only.is_some() && kind != JobKind::BackupFull {
        v.push(
            "/payload/copy_only",
            "payload_not_allowed",
            "only a full backup may be copy-only; a dispatched job's payload is otherwise {}",
        );
    }
    v.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_running_queue_row_shows_in_progress_and_nothing_else_changes_the_history() {
        for stored in JobStatus::ALL {
            assert_eq!(
                JobStatus::as_seen(stored, Some(true)),
                JobStatus::InProgress
            );
            assert_eq!(JobStatus::as_seen(stored, Some(false)), stored);
            assert_eq!(JobStatus::as_seen(stored, None), stored);
        }
    }

    #[test]
    fn kinds_and_statuses_round_trip() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(JobStatus::Cancelled.is_finished());
        assert!(!JobStatus::InProgress.is_finished());
        assert!(Priority::OnDemand.rank() < Priority::Scheduled.rank());
    }

    #[test]
    fn one_hundred_twenty_databases_make_three_jobs() {
        let jobs = batch((0..120).collect());
        assert_eq!(jobs.iter().map(Vec::len).collect::<Vec<_>>(), [40, 40, 40]);
        assert_eq!(batch((0..50).collect()).len(), 1);
        assert_eq!(batch((0..51).collect::<Vec<i32>>().clone()).len(), 2);
        assert!(batch(Vec::<i32>::new()).is_empty());
    }

    proptest! {
        #[test]
        fn batches_are_full_ordered_and_bounded(n in 0usize..2000) {
            let jobs = batch((0..n).collect());
            prop_assert_eq!(jobs.len(), n.div_ceil(MAX_ITEMS_PER_JOB));
            prop_assert!(jobs.iter().all(|j| !j.is_empty() && j.len() <= MAX_ITEMS_PER_JOB));
            let max = jobs.iter().map(Vec::len).max().unwrap_or(0);
            let min = jobs.iter().map(Vec::len).min().unwrap_or(0);
            prop_assert!(max - min <= 1);
            let flat: Vec<usize> = jobs.into_iter().flatten().collect();
            prop_assert_eq!(flat, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn backoff_grows_until_the_cap(attempt in 1i32..20, jitter in 0.5f64..1.5) {
            let this = retry_delay(attempt, 1.0);
            let next = retry_delay(attempt + 1, 1.0);
            prop_assert!(next >= this);
            prop_assert!(next <= Duration::from_secs(600));
            let jittered = retry_delay(attempt, jitter);
            prop_assert!(jittered >= this / 2 && jittered <= this * 3 / 2);
        }
    }

    #[test]
    fn backoff_doubles_from_two_seconds() {
        assert_eq!(retry_delay(1, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(2, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(30, 1.0), Duration::from_secs(600));
    }

    #[test]
    fn only_checkable_jobs_are_dispatched_and_only_with_plain_payloads() {
        let codes = |kind, items, copy_only| -> Vec<&'static str> {
            check_dispatch(kind, items, copy_only)
                .into_iter()
                .map(|v| v.code)
                .collect()
        };
        assert!(codes(JobKind::Discovery, 0, None).is_empty());
        assert!(codes(JobKind::BackupLog, 3, None).is_empty());
        assert!(codes(JobKind::BackupFull, 1, Some(true)).is_empty());
        assert!(codes(JobKind::BackupFull, 1, Some(false)).is_empty());
        assert_eq!(
            codes(JobKind::Restore, 1, None),
            ["job_kind_not_dispatchable"]
        );
        assert_eq!(
            codes(JobKind::ConfigureProtection, 1, None),
            ["job_kind_not_dispatchable"]
        );
        assert_eq!(codes(JobKind::Discovery, 1, None), ["items_not_allowed"]);
        assert_eq!(
            codes(JobKind::BackupLog, 1, Some(true)),
            ["payload_not_allowed"]
        );
        assert_eq!(
            codes(JobKind::BackupDifferential, 1, Some(false)),
            ["payload_not_allowed"]
        );
        assert_eq!(
            codes(JobKind::BackupLog, MAX_ITEMS_PER_JOB + 1, None),
            ["too_many_items"]
        );
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn stored_payloads_read_as_their_kind() {
        let scheduled = serde_json::json!({"slot_at": "2026-11-30T22:00:00Z", "scheduled_at": "2026-11-30T22:00:05Z"});
        let payload = JobPayload::from_stored(JobKind::BackupLog, &scheduled).unwrap();
        let JobPayload::BackupLog(backup) = &payload else {
            panic!("{payload:?}");
        };
        assert!(backup.slot_at.is_some() && backup.copy_only.is_none());
        let wire = serde_json::to_value(&payload).unwrap();
        assert_eq!(wire["kind"], "backup_log");
        assert_eq!(wire["slot_at"], "2026-11-30T22:00:00Z");

        let on_demand =
            serde_json::json!({"copy_only": true, "retention_days": 30, "on_demand": true});
        assert!(matches!(
            JobPayload::from_stored(JobKind::BackupFull, &on_demand).unwrap(),
            JobPayload::BackupFull(BackupPayload {
                copy_only: Some(true),
                retention_days: Some(30),
                ..
            })
        ));
        assert_eq!(
            JobPayload::from_stored(JobKind::Discovery, &serde_json::json!({})).unwrap(),
            JobPayload::Discovery(NoPayload {})
        );
        // A field no payload of that kind has is refused, not dropped.
        assert!(JobPayload::from_stored(JobKind::Discovery, &on_demand).is_err());
        for kind in JobKind::ALL {
            if kind != JobKind::Restore {
                let payload = JobPayload::from_stored(kind, &serde_json::json!({})).unwrap();
                assert_eq!(payload.kind(), kind);
            }
        }
    }
}
