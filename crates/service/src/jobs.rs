//! Jobs as users see them: list, get (optionally waiting for a change), cancel, and
//! on-demand dispatch to a VM's agent.

use std::time::{Duration, Instant};

use backvault_domain::agent::{JobItem, JobProgress, JobResult};
use backvault_domain::jobs::{
    AttemptOutcome, JobKind, JobPayload, JobStatus, Priority, check_dispatch, check_item_count,
};
use backvault_store::jobs::{self as store, CancelOutcome, JobFilter, JobRow, NewJob};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::pagination::{Page, page, page_request};
use crate::{Principal, Service};

pub const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Stable code, e.g. `UserErrorSQLNoSysAdminMembership` or `JobAttemptsExhausted`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobAttempt {
    pub attempt: i32,
    pub lease: i64,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// Absent while running.
    pub outcome: Option<AttemptOutcome>,
    pub error: Option<JobError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub vault_id: Option<Uuid>,
    pub kind: JobKind,
    pub status: JobStatus,
    pub priority: Priority,
    pub items: Vec<JobItem>,
    /// What the job's agent is told beyond its items, tagged with the job's kind. Omitted
    /// from lists (`GET /v1/jobs`): read the job (`GET /v1/jobs/{job_id}`) for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<JobPayload>,
    /// What the agent reported, once the job completed. Omitted from lists
    /// (`GET /v1/jobs`): read the job (`GET /v1/jobs/{job_id}`) for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    pub warnings: Vec<String>,
    /// The last error: the final one for a failed job, the latest for a retried one.
    pub error: Option<JobError>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    /// The agent's latest progress report while running. Omitted from lists
    /// (`GET /v1/jobs`): read the job (`GET /v1/jobs/{job_id}`) for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// When a queued job becomes claimable (later than now while backing off).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Every attempt, on `GET /v1/jobs/{id}` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_history: Option<Vec<JobAttempt>>,
}

/// A stored body read as its type. One the current types do not read (written by an older
/// server or agent) is left out of the view, with a warning: the row keeps it.
fn stored<T: serde::de::DeserializeOwned>(
    job: Uuid,
    what: &str,
    read: impl FnOnce() -> serde_json::Result<T>,
) -> Option<T> {
    read()
        .inspect_err(
            |e| tracing::warn!(%job, error = %e, "a stored job {what} is not of the current type"),
        )
        .ok()
}

impl TryFrom<JobRow> for Job {
    type Error = Error;
    fn try_from(r: JobRow) -> Result<Self> {
        let (kind, status) = (r.kind, r.status);
        Ok(Self {
            id: r.id,
            vm_id: r.vm_id,
            vault_id: r.vault_id,
            kind,
            status,
            priority: r.priority,
            items: serde_json::from_value(r.items.0).map_err(Error::internal)?,
            payload: r
                .payload
                .and_then(|p| stored(r.id, "payload", || JobPayload::from_stored(kind, &p.0))),
            result: r
                .result
                .and_then(|v| stored(r.id, "result", || serde_json::from_value(v.0))),
            warnings: serde_json::from_value(r.warnings.0).map_err(Error::internal)?,
            error: r.error_code.map(|code| JobError {
                code,
                message: r.error_message.unwrap_or_default(),
            }),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            cancel_requested: r.cancel_requested,
            progress: r
                .progress
                .and_then(|v| stored(r.id, "progress", || serde_json::from_value(v.0))),
            next_attempt_at: if status == JobStatus::Queued {
                r.run_at
            } else {
                None
            },
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            updated_at: r.updated_at,
            attempt_history: None,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub vm_id: Option<Uuid>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// An on-demand job for a VM's agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchJob {
    pub vm_id: Uuid,
    pub kind: JobKind,
    /// At most 50 databases of this VM; none for discovery. A `protected_item_id` names a
    /// protected item of this VM's databases.
    #[serde(default)]
    pub items: Vec<JobItem>,
    #[serde(default)]
    pub payload: DispatchPayload,
}

/// What a dispatched job adds to its items: nothing, except that a full backup may be
/// copy-only.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_only: Option<bool>,
}

/// The protected items a job works on. The server wrote the items; ones it cannot read
/// back are a data error, not an empty job.
pub(crate) fn protected_items_of(items: &serde_json::Value) -> Result<Vec<Uuid>> {
    Ok(Vec::<JobItem>::deserialize(items)
        .map_err(Error::internal)?
        .into_iter()
        .filter_map(|i| i.protected_item_id)
        .collect())
}

fn job_not_found(id: Uuid) -> Error {
    Error::not_found("job_not_found", format_args!("job {id}"))
}

/// Builds the queue rows for new jobs; items are checked against the 50-database limit.
pub(crate) fn new_job(
    vm_id: Uuid,
    subscription_id: &str,
    vault_id: Option<Uuid>,
    kind: JobKind,
    priority: Priority,
    items: &[JobItem],
    payload: serde_json::Value,
) -> Result<NewJob> {
    if let Some(v) = check_item_count(items.len()) {
        return Err(Error::validation(vec![v]));
    }
    Ok(NewJob {
        id: Uuid::now_v7(),
        vm_id,
        subscription_id: subscription_id.to_owned(),
        vault_id,
        kind,
        priority: priority.rank(),
        items: serde_json::to_value(items).map_err(Error::internal)?,
        payload,
        max_attempts: kind.max_attempts(),
        run_at: Utc::now(),
        availability_group_id: None,
    })
}

impl Service {
    /// Enqueues `job` in `tx`, commits, and returns the job as users see it.
    pub(crate) async fn commit_with_job(
        &self,
        principal: &Principal,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        job: NewJob,
    ) -> Result<Job> {
        let id = job.id;
        store::jobs_enqueue(&mut tx, &[job]).await?;
        tx.commit().await?;
        self.job_get(principal, id, None).await
    }

    async fn visible_job(&self, principal: &Principal, id: Uuid) -> Result<JobRow> {
        match store::job_get(&self.pool, id).await? {
            Some(job) if principal.sees_subscription(&job.subscription_id) => Ok(job),
            _ => Err(job_not_found(id)),
        }
    }

    pub async fn job_list(
        &self,
        principal: &Principal,
        query: &JobQuery,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<Job>> {
        principal.require(Operation::Read)?;
        let (request, limit) = page_request(cursor, limit)?;
        let filter = JobFilter {
            subscriptions: principal.subscriptions.as_deref(),
            status: query.status,
            kind: query.kind,
            vm_id: query.vm_id,
            created_after: query.created_after,
            created_before: query.created_before,
        };
        let rows = store::job_list(&self.pool, &filter, request).await?;
        let page = page(rows, limit, |r| r.id, Job::try_from);
        Ok(Page {
            items: page.items.into_iter().collect::<Result<_>>()?,
            next_cursor: page.next_cursor,
        })
    }

    /// The job, with its attempts. With `wait`, returns as soon as the job's state changes
    /// (or at once if it is finished), or as it is when the wait is over.
    pub async fn job_get(
        &self,
        principal: &Principal,
        id: Uuid,
        wait: Option<Duration>,
    ) -> Result<Job> {
        principal.require(Operation::Read)?;
        let wait = wait.unwrap_or_default();
        // A longer wait is cut to the longest: the client re-asks, as after any wait.
        let wait = wait.min(MAX_WAIT);
        let deadline = crate::agents::deadline_after(wait);
        let subscription = self.notifier.job(id);
        let first = self.visible_job(principal, id).await?;
        let mut current = first.clone();
        loop {
            let changed = current.status != first.status || current.updated_at != first.updated_at;
            let finished = current.status.is_finished();
            let now = Instant::now();
            if changed || finished || now >= deadline {
                break;
            }
            let notified = subscription.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-read after registering, so a change committed meanwhile is not missed.
            current = self.visible_job(principal, id).await?;
            if current.status != first.status || current.updated_at != first.updated_at {
                break;
            }
            let recheck = self
                .config
                .long_poll_recheck
                .min(deadline.saturating_duration_since(now));
            let stopping = self.wait_for_change(recheck, notified).await;
            current = self.visible_job(principal, id).await?;
            if stopping {
                break;
            }
        }
        let attempts = store::job_attempts(&self.pool, id).await?;
        let mut job = Job::try_from(current)?;
        job.attempt_history = Some(
            attempts
                .into_iter()
                .map(|a| JobAttempt {
                    attempt: a.attempt,
                    lease: a.lease,
                    started_at: a.started_at,
                    ended_at: a.ended_at,
                    outcome: a.outcome,
                    error: a.error_code.map(|code| JobError {
                        code,
                        message: a.error_message.unwrap_or_default(),
                    }),
                })
                .collect(),
        );
        Ok(job)
    }

    /// Cancels a queued job at once; flags a running one for its agent.
    pub async fn job_cancel(&self, principal: &Principal, id: Uuid) -> Result<Job> {
        principal.require(Operation::CancelJob)?;
        self.visible_job(principal, id).await?;
        let mut tx = self.pool.begin().await?;
        let outcome = store::queue_cancel(&mut tx, id).await?;
        if let CancelOutcome::Cancelled = outcome {
            self.after_jobs_finished(&mut tx, &[id], false).await?;
        }
        tx.commit().await?;
        if let CancelOutcome::NotPending = outcome {
            return Err(Error::new(
                ErrorKind::Conflict,
                "job_finished",
                "the job has already finished",
            ));
        }
        self.job_get(principal, id, None).await
    }

    /// Sends an on-demand job to a VM's agent.
    pub async fn job_dispatch(&self, principal: &Principal, req: DispatchJob) -> Result<Job> {
        principal.require(Operation::DispatchJob)?;
        let violations = check_dispatch(req.kind, req.items.len(), req.payload.copy_only);
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        let mut tx = self.pool.begin().await?;
        let vm = self.visible_vm(&mut *tx, principal, req.vm_id).await?;
        // A job's results are applied to the protected items it names: each must be one of
        // this VM's, or an agent could write into another tenant's recovery chain.
        let named: Vec<Uuid> = req
            .items
            .iter()
            .filter_map(|i| i.protected_item_id)
            .collect();
        if !named.is_empty() {
            let own = backvault_store::protection::items_of_vm(&mut *tx, vm.id, &named).await?;
            if let Some(foreign) = named.iter().find(|id| !own.contains(id)) {
                return Err(Error::not_found(
                    "protected_item_not_found",
                    format_args!("protected item {foreign} on this VM"),
                ));
            }
        }
        let job = new_job(
            vm.id,
            &vm.subscription_id,
            None,
            req.kind,
            Priority::OnDemand,
            &req.items,
            serde_json::to_value(&req.payload).map_err(Error::internal)?,
        )?;
        self.commit_with_job(principal, tx, job).await
    }
}
