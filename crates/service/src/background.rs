//! Periodic work every replica runs: the scheduler, the retention sweep, periodic
//! discovery, the lease rescuer, history pruning and the audit log's purge. Each tick is a
//! plain function of the current state, so tests drive it without sleeping; leader work
//! is guarded by a transaction-scoped advisory lock, so replicas never double it.

use std::time::Duration;

use backvault_domain::jobs::{AttemptOutcome, JobStatus, retry_delay};
use backvault_store::jobs::{self as store, AttemptEnd};
use chrono::Utc;
use tokio::sync::watch;

use futures_util::FutureExt;

use backvault_domain::instants::later;

use crate::Service;
use crate::agents::rand_jitter;
use crate::batcher::panic_message;
use crate::error::Result;
use crate::metrics::TaskLabels;

const RESCUER_LOCK: i64 = 0x6261_636b_0001;
const RESCUE_BATCH: i64 = 1000;
/// Audit events expire by the day; a replica purges when it starts, then daily.
const AUDIT_PURGE_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// How often the hot queue is vacuumed: often enough that claims do not walk more than a
/// few seconds of dead entries, whatever the server's autovacuum does.
const QUEUE_VACUUM_EVERY: Duration = Duration::from_secs(10);
pub const ATTEMPTS_EXHAUSTED: &str = "JobAttemptsExhausted";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rescued {
    pub retried: usize,
    pub failed: usize,
}

impl Service {
    /// Returns jobs whose lease expired to the queue (with backoff), or fails them after
    /// their last attempt. One replica at a time; others skip the tick.
    pub async fn rescue_expired_leases(&self) -> Result<Rescued> {
        let mut tx = self.pool.begin().await?;
        let leader = backvault_store::try_lead(&mut tx, RESCUER_LOCK).await?;
        if !leader {
            return Ok(Rescued::default());
        }
        let expired = store::queue_lock_expired(&mut tx, RESCUE_BATCH).await?;
        let (retry, fail): (Vec<_>, Vec<_>) = expired
            .into_iter()
            .partition(|e| e.attempt < e.max_attempts);
        let now = Utc::now();
        if !retry.is_empty() {
            let ids: Vec<_> = retry.iter().map(|e| e.job_id).collect();
            let run_at: Vec<_> = retry
                .iter()
                .map(|e| {
                    later(
                        now,
                        chrono::Duration::from_std(retry_delay(e.attempt, rand_jitter()))
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let ends: Vec<_> = retry
                .iter()
                .map(|_| AttemptEnd {
                    outcome: AttemptOutcome::LeaseExpired,
                    code: "JobLeaseExpired",
                    message: "the agent stopped heartbeating before it finished; the job will be retried",
                })
                .collect();
            store::queue_retry(&mut tx, &ids, &run_at, &ends).await?;
        }
        if !fail.is_empty() {
            let ids: Vec<_> = fail.iter().map(|e| e.job_id).collect();
            let ends: Vec<_> = fail
                .iter()
                .map(|_| AttemptEnd {
                    outcome: AttemptOutcome::LeaseExpired,
                    code: ATTEMPTS_EXHAUSTED,
                    message: "the agent lost the job on every attempt (crashed or stopped heartbeating); check the agent on this VM and run the job again",
                })
                .collect();
            store::queue_finish(&mut tx, &ids, JobStatus::Failed, &ends).await?;
            self.after_jobs_finished(&mut tx, &ids, false).await?;
        }
        tx.commit().await?;
        let rescued = Rescued {
            retried: retry.len(),
            failed: fail.len(),
        };
        self.metrics
            .lease_expiries
            .inc_by(rescued.retried.saturating_add(rescued.failed) as u64);
        if rescued != Rescued::default() {
            tracing::info!(
                retried = rescued.retried,
                failed = rescued.failed,
                "rescued expired leases"
            );
        }
        Ok(rescued)
    }

    /// Vacuums the hot queue table (see `store::jobs::queue_vacuum`).
    pub async fn vacuum_queue(&self) -> Result<()> {
        store::queue_vacuum(&self.pool).await?;
        Ok(())
    }

    /// Removes finished jobs, fired schedule slots and expired enrollment tokens past the
    /// job retention, day-old idempotency keys, and deny-list entries of expired tokens.
    pub async fn prune_history(&self) -> Result<u64> {
        let jobs = store::jobs_prune(&self.pool, self.config.job_retention, 10_000).await?;
        let slots =
            backvault_store::schedule::schedule_prune(&self.pool, self.config.job_retention)
                .await?;
        let keys =
            backvault_store::idempotency::idempotency_prune(&self.pool, chrono::Duration::days(1))
                .await?;
        let enrollment_tokens =
            backvault_store::tokens::enrollment_tokens_prune(&self.pool, self.config.job_retention)
                .await?;
        let revoked = backvault_store::tokens::revoked_tokens_prune(&self.pool).await?;
        Ok(jobs
            .saturating_add(slots)
            .saturating_add(keys)
            .saturating_add(enrollment_tokens)
            .saturating_add(revoked))
    }

    /// Runs one tick of a periodic task. An error is logged; a panic is caught, logged with
    /// the task's name and counted, so that one bad tick never stops the loop.
    async fn guarded<T>(
        &self,
        task: &'static str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Option<T> {
        match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                tracing::warn!(task, error = %e, "background task failed; it runs again at its next tick");
                None
            }
            Err(panic) => {
                self.metrics
                    .task_panics
                    .get_or_create(&TaskLabels { task })
                    .inc();
                tracing::error!(
                    task,
                    panic = %panic_message(panic.as_ref()),
                    "background task panicked; it runs again at its next tick"
                );
                None
            }
        }
    }

    /// Runs the periodic work until `shutdown` flips: the scheduler, the retention sweep,
    /// periodic discovery, the lease rescuer, history pruning, the hot queue's vacuum and,
    /// daily, the audit log's purge.
    pub async fn run_background(
        self,
        rescue_every: Duration,
        prune_every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _running = self.health.background_started();
        let mut rescue = tokio::time::interval(rescue_every);
        let mut prune = tokio::time::interval(prune_every);
        let mut discovery =
            tokio::time::interval(rescue_every.max(Duration::from_secs(1)).saturating_mul(6));
        let mut schedule = tokio::time::interval(self.config.scheduler_interval);
        let mut sweep = tokio::time::interval(prune_every.checked_div(6).unwrap_or(prune_every));
        let mut audit_purge = tokio::time::interval(AUDIT_PURGE_EVERY);
        let mut queue_vacuum = tokio::time::interval(QUEUE_VACUUM_EVERY);
        loop {
            tokio::select! {
                _ = schedule.tick() => {
                    self.guarded("scheduler", self.schedule_tick(self.now())).await;
                }
                _ = sweep.tick() => {
                    if let Some(n @ 1..) = self.guarded("retention_sweep", self.sweep_recovery_points()).await {
                        tracing::info!(removed = n, "retention sweep");
                    }
                    if let Some(n @ 1..) = self.guarded("soft_delete_purge", self.purge_soft_deleted()).await {
                        tracing::info!(purged = n, "soft-deleted items purged");
                    }
                }
                _ = discovery.tick() => {
                    self.guarded("periodic_discovery", self.discover_due_vms()).await;
                }
                _ = rescue.tick() => {
                    self.guarded("lease_rescue", self.rescue_expired_leases()).await;
                }
                _ = prune.tick() => {
                    self.guarded("pruning", self.prune_history()).await;
                }
                _ = queue_vacuum.tick() => {
                    self.guarded("queue_vacuum", self.vacuum_queue()).await;
                }
                _ = audit_purge.tick() => {
                    if let Some(n @ 1..) = self.guarded("audit_purge", self.purge_audit_events()).await {
                        tracing::info!(removed = n, "audit log purge");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
