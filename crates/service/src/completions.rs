//! Completions and failures: each result is checked against its job (`domain::agent`)
//! and group-committed with other agents' by a batcher that isolates a bad item; its
//! effects (recovery points, inventory, chains after a restore) are applied in the same
//! transaction; a failure is retried or ends the job.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use backvault_domain::Violation;
use backvault_domain::agent::protocol::{CompleteJob, FailJob};
use backvault_domain::agent::{JobItem, JobResult, ReportedJob, check_warnings};
use backvault_domain::instants::later;
use backvault_domain::jobs::{AttemptOutcome, JobStatus, retry_delay};
use backvault_store::PgPool;
use backvault_store::jobs::{self as store, AttemptEnd, Completion};
use chrono::Utc;
use serde::Deserialize;
use uuid::Uuid;

use crate::agents::{
    CANCELLED_CODE, JobOutcome, MAX_FAILURE_CODE_CHARS, RESULT_INVALID, RESULT_NOT_RECORDED,
    job_not_found, lease_lost, rand_jitter,
};
use crate::batcher::{Batcher, BatcherSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::job_events::JobEvents;
use crate::metrics::Metrics;
use crate::protection::jobs_finished;
use crate::recovery::{BackupReport, record_points};
use crate::restore::restores_completed;
use crate::{Config, Principal, Service};

/// Agent codes that mean the log chain is broken: the next backup must be a full.
const LOG_CHAIN_BROKEN: [&str; 3] = [
    "UserErrorSQLLSNValidationFailure",
    "UserErrorParentFullBackupMissing",
    "UserErrorSQLNoFullBackup",
];

/// Completes many jobs in one transaction (group commit). A completion whose lease is no
/// longer held comes back as `lease_lost`, to be told apart from a repeat by the caller.
/// Each result is judged against its job: one that does not fit fails its job with
/// `JobResultInvalid` and comes back as `validation_failed`.
pub(crate) fn complete_batcher(
    pool: PgPool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    job_events: Arc<JobEvents>,
    workers: usize,
) -> Batcher<Completion, ()> {
    let spec = BatcherSpec {
        name: "completions",
        workers,
        max_batch: 256,
        describe: |c: &Completion| format!("completion of job {}", c.job_id),
    };
    Batcher::spawn(spec, metrics, move |completions: &[Completion]| {
        let pool = pool.clone();
        let job_events = job_events.clone();
        let batch = Batch {
            completions,
            results: completions
                .iter()
                .map(|c| JobResult::deserialize(&c.result).ok())
                .collect(),
            // The same job's completion can arrive several times at once (a retried
            // request, a report sent by two paths): only the batch's first is recorded.
            // The others come back as `lease_lost`, which the caller answers as a repeat
            // when the result is the same.
            first: {
                let mut seen = HashSet::new();
                completions.iter().map(|c| seen.insert(c.job_id)).collect()
            },
            rehearsal: config.allow_clock_override,
        };
        Box::pin(async move {
            let (done, rejected) = match batch.complete_unchecked(&pool).await? {
                Some(done) => (done, HashMap::new()),
                None => batch.complete_checked(&pool).await?,
            };
            job_events.changed(done.iter().copied());
            Ok(completions
                .iter()
                .zip(&batch.first)
                .map(|(c, first)| {
                    if let Some(violations) = rejected.get(&c.job_id) {
                        Err(Error::validation(violations.clone()))
                    } else if *first && done.contains(&c.job_id) {
                        Ok(())
                    } else {
                        Err(lease_lost())
                    }
                })
                .collect())
        })
    })
}

/// A batch of completions and what is known of them before the database is asked.
struct Batch<'a> {
    completions: &'a [Completion],
    results: Vec<Option<JobResult>>,
    first: Vec<bool>,
    rehearsal: bool,
}

impl Batch<'_> {
    /// The common case in one statement: every completion holds its lease and every result
    /// fits its job. The batch completes first and is judged after, from the content the
    /// completion returns; when anything would come out otherwise (a lease lost, a repeat,
    /// a result that does not fit) it is rolled back (`None`), and [`Self::complete_checked`]
    /// decides the batch as if this had never run.
    async fn complete_unchecked(&self, pool: &PgPool) -> Result<Option<HashSet<Uuid>>> {
        if self.first.iter().any(|first| !first) {
            return Ok(None);
        }
        let mut tx = pool.begin().await?;
        let done = store::queue_complete(&mut tx, self.completions).await?;
        let held: HashMap<Uuid, store::CompletingJob> =
            done.into_iter().map(|j| (j.job_id, j)).collect();
        if held.len() != self.completions.len() || !self.judge(&held).is_empty() {
            // Explicitly, so that the rows are unlocked before the checked run locks them.
            tx.rollback().await?;
            return Ok(None);
        }
        let done: HashSet<Uuid> = held.keys().copied().collect();
        self.record_effects(&mut tx, &held, &done).await?;
        tx.commit().await?;
        Ok(Some(done))
    }

    /// Locks the jobs whose leases are held, judges each result against its job, fails
    /// those that do not fit and completes the rest.
    async fn complete_checked(
        &self,
        pool: &PgPool,
    ) -> Result<(HashSet<Uuid>, HashMap<Uuid, Vec<Violation>>)> {
        let mut tx = pool.begin().await?;
        let held: HashMap<Uuid, store::CompletingJob> =
            store::queue_lock_completing(&mut tx, self.completions)
                .await?
                .into_iter()
                .map(|j| (j.job_id, j))
                .collect();
        let rejected = self.judge(&held);
        if !rejected.is_empty() {
            fail_rejected(&mut tx, &rejected).await?;
        }
        let accepted: Vec<&Completion> = self
            .completions
            .iter()
            .zip(&self.first)
            .filter(|(c, first)| **first && !rejected.contains_key(&c.job_id))
            .map(|(c, _)| c)
            .collect();
        let done: HashSet<Uuid> = store::queue_complete(&mut tx, &accepted)
            .await?
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        self.record_effects(&mut tx, &held, &done).await?;
        tx.commit().await?;
        Ok((done, rejected))
    }

    /// The violations of each result against its job, for the jobs in `held`.
    fn judge(&self, held: &HashMap<Uuid, store::CompletingJob>) -> HashMap<Uuid, Vec<Violation>> {
        let mut rejected = HashMap::new();
        for (c, result) in self.completions.iter().zip(&self.results) {
            let (Some(result), Some(job)) = (result, held.get(&c.job_id)) else {
                continue;
            };
            let items = Vec::<JobItem>::deserialize(&job.items.0).unwrap_or_default();
            let violations = result.job_violations(
                &ReportedJob {
                    kind: job.kind,
                    items: &items,
                    payload: &job.payload.0,
                    claimed_at: job.started_at,
                    completed_at: job.now,
                    rehearsal: self.rehearsal,
                },
                "/result",
            );
            if !violations.is_empty() {
                rejected.insert(c.job_id, violations);
            }
        }
        rejected
    }

    /// What the completions recorded now (`done`) change besides their jobs, in the
    /// completion's own transaction: recovery points, and the chains a restore overwrote.
    /// No `jobs_finished`: it acts on protection jobs, which complete with their effects
    /// (`complete_with_effects`), never in a batch, whose results complete only backups and
    /// restores (`result_kind_like`).
    async fn record_effects(
        &self,
        tx: &mut sqlx::PgConnection,
        held: &HashMap<Uuid, store::CompletingJob>,
        done: &HashSet<Uuid>,
    ) -> Result<()> {
        let recorded = self
            .completions
            .iter()
            .zip(&self.results)
            .zip(&self.first)
            .filter(|((c, _), first)| **first && done.contains(&c.job_id))
            .filter_map(|((c, result), _)| Some((held.get(&c.job_id)?, result.as_ref()?)));
        let mut restores: Vec<&serde_json::Value> = Vec::new();
        let mut reports: Vec<BackupReport<'_>> = Vec::new();
        for (job, result) in recorded {
            let points = match result {
                JobResult::Backup { recovery_points } => recovery_points.iter().collect(),
                JobResult::Restore {
                    tail_log_backup, ..
                } => {
                    restores.push(&job.payload.0);
                    // A tail-log backup is a log of the item like any other.
                    tail_log_backup.iter().map(|tail| &**tail).collect()
                }
                _ => continue,
            };
            reports.push(BackupReport {
                job_id: job.job_id,
                items: &job.items.0,
                payload: &job.payload.0,
                points,
            });
        }
        record_points(tx, &reports).await?;
        restores_completed(tx, &restores).await
    }
}

/// Fails the jobs whose results do not fit them, with `JobResultInvalid`: retrying such a
/// completion would be refused again.
async fn fail_rejected(
    tx: &mut sqlx::PgConnection,
    rejected: &HashMap<Uuid, Vec<Violation>>,
) -> Result<()> {
    let ids: Vec<Uuid> = rejected.keys().copied().collect();
    let messages: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                "the agent reported a result that does not fit its job: {}",
                rejected[id].first().map_or("", |v| v.message.as_str())
            )
        })
        .collect();
    let ends: Vec<AttemptEnd<'_>> = messages
        .iter()
        .map(|message| AttemptEnd {
            outcome: AttemptOutcome::Failed,
            code: RESULT_INVALID,
            message,
        })
        .collect();
    store::queue_finish(tx, &ids, JobStatus::Failed, &ends).await?;
    jobs_finished(tx, &ids, false).await
}

fn result_kind_like(result: &JobResult) -> &'static str {
    match result {
        JobResult::Discovery { .. } => "discovery",
        JobResult::ConfigureProtection {} => "configure_protection",
        JobResult::Backup { .. } => "backup_%",
        JobResult::Restore { .. } => "restore",
    }
}

impl Service {
    pub async fn agent_complete(
        &self,
        principal: &Principal,
        job_id: Uuid,
        req: CompleteJob,
    ) -> Result<JobOutcome> {
        let vm = self.agent_vm(principal).await?;
        self.complete_for(vm, job_id, req).await
    }

    /// Records `vm`'s completion of a job; a repeat of a recorded completion answers as
    /// the first did.
    pub(crate) async fn complete_for(
        &self,
        vm: Uuid,
        job_id: Uuid,
        req: CompleteJob,
    ) -> Result<JobOutcome> {
        let mut violations = req.result.violations("/result");
        violations.extend(check_warnings(&req.warnings, "/warnings"));
        if !violations.is_empty() {
            // A result that cannot be right would be as wrong on every retry: end the job so
            // that the operator sees the agent's fault, then tell the agent what was wrong.
            if self
                .fail_for_result(
                    vm,
                    job_id,
                    req.lease,
                    RESULT_INVALID,
                    &format!(
                        "the agent reported a result that cannot be recorded: {}",
                        violations[0].message
                    ),
                )
                .await?
            {
                self.metrics.jobs_failed.inc();
            }
            return Err(Error::validation(violations));
        }
        let status = if req.warnings.is_empty() {
            JobStatus::Completed
        } else {
            JobStatus::CompletedWithWarnings
        };
        let result = serde_json::to_value(&req.result).map_err(Error::internal)?;
        let completion = Completion {
            job_id,
            vm_id: vm,
            lease: req.lease,
            kind_like: result_kind_like(&req.result),
            status,
            result: result.clone(),
            warnings: serde_json::to_value(&req.warnings).map_err(Error::internal)?,
        };
        // Discovery and protection results change the inventory and protection in the
        // completion's own transaction; backups and restores go through the group commit.
        let outcome = match &req.result {
            JobResult::Discovery { .. } | JobResult::ConfigureProtection {} => {
                self.complete_with_effects(completion, &req.result).await
            }
            _ => self.completer.call(completion).await,
        };
        match outcome {
            Ok(()) => {
                self.metrics.jobs_completed.inc();
                Ok(JobOutcome {
                    job_id,
                    status,
                    retry_at: None,
                })
            }
            Err(e) if e.code == "lease_lost" => {
                let job = store::job_ownership(&self.pool, job_id)
                    .await?
                    .filter(|j| j.vm_id == vm)
                    .ok_or_else(|| job_not_found(job_id))?;
                let finished = Some(job.status).filter(|s| s.is_finished());
                match finished {
                    // The same completion again (a retried request): answer as the first time.
                    Some(s @ (JobStatus::Completed | JobStatus::CompletedWithWarnings))
                        if job.result.as_ref().map(|r| &r.0) == Some(&result) =>
                    {
                        Ok(JobOutcome {
                            job_id,
                            status: s,
                            retry_at: None,
                        })
                    }
                    None if job.lease == Some(req.lease) && job.running == Some(true) => {
                        Err(Error::new(
                            ErrorKind::Validation,
                            "result_kind_mismatch",
                            format!(
                                "a {} job cannot complete with this result kind",
                                job.kind.as_str()
                            ),
                        ))
                    }
                    _ => Err(lease_lost()),
                }
            }
            // The result does not fit its job: the batch failed the job already.
            Err(e) if e.code == "validation_failed" => {
                self.metrics.jobs_failed.inc();
                Err(e)
            }
            Err(e) if e.kind == ErrorKind::Unavailable => Err(e),
            // Not a lease problem and not the database being down: this result cannot be
            // recorded, and retrying it would fail the same way.
            Err(e) => Err(self.fail_unrecordable(vm, job_id, req.lease, e).await),
        }
    }

    /// The server cannot record this job's result: the job ends with `JobResultNotRecorded`
    /// so that neither the agent nor the rescuer retries it forever, and the agent is told
    /// with a 422 that it should not retry.
    async fn fail_unrecordable(&self, vm: Uuid, job_id: Uuid, lease: i64, cause: Error) -> Error {
        let message = "the server could not record this job's result; the backup may exist on the VM but is not in the catalogue. Run the backup again; if it fails the same way, report it with the job id";
        match self
            .fail_for_result(vm, job_id, lease, RESULT_NOT_RECORDED, message)
            .await
        {
            Ok(true) if cause.kind != ErrorKind::Internal => {
                tracing::warn!(job.id = %job_id, vm.id = %vm, error = %cause, "job failed: its result breaks a rule");
                self.metrics.results_not_recorded.inc();
                cause
            }
            Ok(true) => {
                tracing::error!(job.id = %job_id, vm.id = %vm, error = %cause, "job failed: its result could not be recorded");
                self.metrics.results_not_recorded.inc();
                Error::new(
                    ErrorKind::Validation,
                    "result_not_recorded",
                    "the server could not record this result; the job is failed with JobResultNotRecorded. Do not retry the completion",
                )
            }
            Ok(false) | Err(_) => cause,
        }
    }

    /// Fails the job with `code` if `lease` still holds it; false when it does not.
    async fn fail_for_result(
        &self,
        vm: Uuid,
        job_id: Uuid,
        lease: i64,
        code: &str,
        message: &str,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if store::queue_lock_held(&mut tx, vm, job_id, lease)
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let end = AttemptEnd {
            outcome: AttemptOutcome::Failed,
            code,
            message,
        };
        store::queue_finish(&mut tx, &[job_id], JobStatus::Failed, &[end]).await?;
        self.after_jobs_finished(&mut tx, &[job_id], false).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn complete_with_effects(
        &self,
        completion: Completion,
        result: &JobResult,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let done = store::queue_complete(&mut tx, std::slice::from_ref(&completion)).await?;
        if done.is_empty() {
            return Err(lease_lost());
        }
        match result {
            JobResult::Discovery { inventory } => {
                self.apply_discovery(&mut tx, completion.vm_id, inventory)
                    .await?
            }
            _ => {
                self.after_jobs_finished(&mut tx, &[completion.job_id], true)
                    .await?
            }
        }
        // The commit and the wake-up in a task of their own: a request cancelled while it
        // commits (the client gone, the timeout) would otherwise commit without waking.
        let (job_events, job_id) = (self.job_events.clone(), completion.job_id);
        tokio::spawn(async move {
            tx.commit().await?;
            job_events.changed([job_id]);
            Ok::<_, sqlx::Error>(())
        })
        .await
        .map_err(Error::internal)??;
        Ok(())
    }

    pub async fn agent_fail(
        &self,
        principal: &Principal,
        job_id: Uuid,
        req: FailJob,
    ) -> Result<JobOutcome> {
        let vm = self.agent_vm(principal).await?;
        self.fail_for(vm, job_id, req).await
    }

    /// Records `vm`'s failed attempt at a job: retried, cancelled or failed for good.
    pub(crate) async fn fail_for(
        &self,
        vm: Uuid,
        job_id: Uuid,
        req: FailJob,
    ) -> Result<JobOutcome> {
        if req.code.is_empty() || req.code.chars().count() > MAX_FAILURE_CODE_CHARS {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "invalid_error_code",
                format!("code is 1 to {MAX_FAILURE_CODE_CHARS} characters"),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let Some(held) = store::queue_lock_held(&mut tx, vm, job_id, req.lease).await? else {
            drop(tx);
            return Err(self.lease_check_failed(vm, job_id).await);
        };
        let message = req.message.chars().take(4000).collect::<String>();
        if LOG_CHAIN_BROKEN.contains(&req.code.as_str()) {
            for job in store::jobs_content(&mut *tx, &[job_id]).await? {
                let ids = crate::jobs::protected_items_of(&job.items.0)?;
                backvault_store::recovery::needs_full_set(&mut *tx, &ids).await?;
            }
        }
        let outcome = if held.cancel_requested {
            let end = AttemptEnd {
                outcome: AttemptOutcome::Cancelled,
                code: CANCELLED_CODE,
                message: "cancelled by a user while running",
            };
            store::queue_finish(&mut tx, &[job_id], JobStatus::Cancelled, &[end]).await?;
            self.after_jobs_finished(&mut tx, &[job_id], false).await?;
            JobOutcome {
                job_id,
                status: JobStatus::Cancelled,
                retry_at: None,
            }
        } else if req.retryable && held.attempt < held.max_attempts {
            let delay = retry_delay(held.attempt, rand_jitter());
            let retry_at = later(
                Utc::now(),
                chrono::Duration::from_std(delay).unwrap_or_default(),
            );
            let end = AttemptEnd {
                outcome: AttemptOutcome::Failed,
                code: &req.code,
                message: &message,
            };
            store::queue_retry(&mut tx, &[job_id], &[retry_at], &[end]).await?;
            // A replica that stopped being primary refuses a full there: the retry goes
            // where the group's route points now (at once, if that moved it).
            if let Some(group) =
                backvault_store::availability::group_of_job(&mut *tx, job_id).await?
            {
                backvault_store::availability::queue_reroute(&mut tx, Some(&[group])).await?;
            }
            JobOutcome {
                job_id,
                status: JobStatus::Queued,
                retry_at: Some(retry_at),
            }
        } else {
            let end = AttemptEnd {
                outcome: AttemptOutcome::Failed,
                code: &req.code,
                message: &message,
            };
            store::queue_finish(&mut tx, &[job_id], JobStatus::Failed, &[end]).await?;
            self.after_jobs_finished(&mut tx, &[job_id], false).await?;
            JobOutcome {
                job_id,
                status: JobStatus::Failed,
                retry_at: None,
            }
        };
        tx.commit().await?;
        self.metrics.jobs_failed.inc();
        Ok(outcome)
    }
}
