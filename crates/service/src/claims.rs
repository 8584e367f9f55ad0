//! Claims and job heartbeats: an agent's long-poll for its VM's due jobs, coalesced with
//! other agents' claims into one `FOR UPDATE SKIP LOCKED` statement by a batcher, and the
//! heartbeats that keep a job's lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backvault_domain::Violation;
use backvault_domain::agent::protocol::{
    ClaimV2Request, ClaimedJob, JobHeartbeat, JobHeartbeatResponse,
};
use backvault_domain::agent::{
    JobItem, MAX_CLAIM_REPORTS, check_lease, check_progress, check_warnings,
};
use backvault_domain::jobs::{JobKind, JobPayload};
use backvault_store::PgPool;
use backvault_store::jobs::{self as store, ClaimLimits};
use futures_util::future::join_all;
use uuid::Uuid;

use crate::agents::{
    JobOutcome, MAX_CLAIM_JOBS, MAX_CLAIM_WAIT_SECONDS, MAX_FAILURE_CODE_CHARS, deadline_after,
    job_not_found, lease_lost,
};
use crate::batcher::{Batcher, BatcherSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::job_events::JobEvents;
use crate::metrics::Metrics;
use crate::{Config, Principal, Service};

/// What a version 2 claim did: the jobs claimed, and each report's outcome in the order
/// sent.
pub struct ClaimedWithReports {
    pub jobs: Vec<ClaimedJob>,
    pub completions: Vec<(Uuid, Result<JobOutcome>)>,
    pub failures: Vec<(Uuid, Result<JobOutcome>)>,
}

pub(crate) struct ClaimRequest {
    vm_id: Uuid,
    want: u32,
}

/// A stored payload as agents get it: tagged with the job's kind. One the current types do
/// not read (queued by an older server) goes as stored, with its kind.
fn tagged_payload(kind: JobKind, stored: serde_json::Value) -> serde_json::Value {
    match JobPayload::from_stored(kind, &stored).map(serde_json::to_value) {
        Ok(Ok(tagged)) => tagged,
        _ => {
            let mut fields = match stored {
                serde_json::Value::Object(fields) => fields,
                _ => serde_json::Map::new(),
            };
            fields.insert("kind".into(), kind.as_str().into());
            serde_json::Value::Object(fields)
        }
    }
}

pub(crate) fn claimed_job(row: store::ClaimedRow) -> Result<ClaimedJob> {
    Ok(ClaimedJob {
        job_id: row.job_id,
        kind: row.kind,
        lease: row.lease,
        lease_expires_at: row.lease_expires_at,
        attempt: row.attempt,
        items: serde_json::from_value::<Vec<JobItem>>(row.items.0).map_err(Error::internal)?,
        payload: tagged_payload(row.kind, row.payload.0),
    })
}

/// Claims for many VMs in one statement; each requester gets its own VM's jobs.
pub(crate) fn claim_batcher(
    pool: PgPool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    job_events: Arc<JobEvents>,
    workers: usize,
) -> Batcher<ClaimRequest, Vec<ClaimedJob>> {
    let spec = BatcherSpec {
        name: "claims",
        workers,
        max_batch: 256,
        describe: |r: &ClaimRequest| format!("claim of VM {}", r.vm_id),
    };
    Batcher::spawn(spec, metrics, move |requests: &[ClaimRequest]| {
        let pool = pool.clone();
        let config = config.clone();
        let job_events = job_events.clone();
        Box::pin(async move {
            let mut wants: HashMap<Uuid, i32> = HashMap::new();
            for r in requests {
                let want = wants.entry(r.vm_id).or_default();
                *want = want.saturating_add(i32::try_from(r.want).unwrap_or(i32::MAX));
            }
            let (vm_ids, counts): (Vec<Uuid>, Vec<i32>) = wants.into_iter().unzip();
            let limits = ClaimLimits {
                max_running_backups: config.max_running_backups_per_vm as i32,
                max_running_restores: config.max_running_restores_per_vm as i32,
                lease: config.lease,
            };
            let mut tx = pool.begin().await?;
            let rows = store::queue_claim(&mut tx, &vm_ids, &counts, limits).await?;
            tx.commit().await?;
            if !rows.is_empty() {
                job_events.changed(rows.iter().map(|r| r.job_id));
            }
            let mut by_vm: HashMap<Uuid, Vec<store::ClaimedRow>> = HashMap::new();
            for row in rows {
                by_vm.entry(row.vm_id).or_default().push(row);
            }
            Ok(requests
                .iter()
                .map(|r| {
                    let mine = by_vm.entry(r.vm_id).or_default();
                    let take = mine.len().min(r.want as usize);
                    mine.drain(..take).map(claimed_job).collect()
                })
                .collect())
        })
    })
}

impl Service {
    /// Claims up to `max_jobs` of this VM's due jobs, waiting up to `wait_seconds` for one
    /// to arrive. Wakes on the enqueue's notification, with a slow re-check as a fallback.
    pub async fn agent_claim(
        &self,
        principal: &Principal,
        max_jobs: u32,
        wait_seconds: u32,
    ) -> Result<Vec<ClaimedJob>> {
        let vm = self.agent_vm(principal).await?;
        if !(1..=MAX_CLAIM_JOBS).contains(&max_jobs) || wait_seconds > MAX_CLAIM_WAIT_SECONDS {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "invalid_claim",
                format!(
                    "max_jobs is 1 to {MAX_CLAIM_JOBS} and wait_seconds 0 to {MAX_CLAIM_WAIT_SECONDS}"
                ),
            ));
        }
        self.claim_for(vm, max_jobs, wait_seconds).await
    }

    /// Version 2 of the claim: records the finished jobs the agent reports, each on its
    /// own (one refused report does not stop the others), then claims as version 1 does.
    /// A report the database could not take fails the whole call with 503 before anything
    /// is claimed: every report is idempotent, so the agent sends the same call again.
    pub async fn agent_claim_v2(
        &self,
        principal: &Principal,
        req: ClaimV2Request,
    ) -> Result<ClaimedWithReports> {
        let vm = self.agent_vm(principal).await?;
        let reports = req.completions.len().saturating_add(req.failures.len());
        if req.max_jobs > MAX_CLAIM_JOBS
            || req.wait_seconds > MAX_CLAIM_WAIT_SECONDS
            || reports > MAX_CLAIM_REPORTS
        {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "invalid_claim",
                format!(
                    "max_jobs is 0 to {MAX_CLAIM_JOBS}, wait_seconds 0 to {MAX_CLAIM_WAIT_SECONDS}, and at most {MAX_CLAIM_REPORTS} completions and failures together"
                ),
            ));
        }
        // What can be judged of a report without its job (what the document states, and a
        // result's own rules) is checked for the whole call, as a malformed body is; what
        // depends on the job (its lease, its kind, its items) is answered per report.
        let mut violations = Vec::new();
        for (i, c) in req.completions.iter().enumerate() {
            violations.extend(check_lease(c.lease, &format!("/completions/{i}/lease")));
            violations.extend(c.result.violations(&format!("/completions/{i}/result")));
            violations.extend(check_warnings(
                &c.warnings,
                &format!("/completions/{i}/warnings"),
            ));
        }
        for (i, f) in req.failures.iter().enumerate() {
            violations.extend(check_lease(f.lease, &format!("/failures/{i}/lease")));
            if f.code.is_empty() || f.code.chars().count() > MAX_FAILURE_CODE_CHARS {
                violations.push(Violation::new(
                    format!("/failures/{i}/code"),
                    "invalid_error_code",
                    format!("code is 1 to {MAX_FAILURE_CODE_CHARS} characters"),
                ));
            }
        }
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        let completions = join_all(req.completions.into_iter().map(|c| {
            let (job_id, complete) = c.into_parts();
            async move { (job_id, self.complete_for(vm, job_id, complete).await) }
        }));
        let failures = join_all(req.failures.into_iter().map(|f| {
            let (job_id, fail) = f.into_parts();
            async move { (job_id, self.fail_for(vm, job_id, fail).await) }
        }));
        let (completions, failures) = tokio::join!(completions, failures);
        if let Some((_, Err(e))) = completions
            .iter()
            .chain(&failures)
            .find(|(_, r)| matches!(r, Err(e) if e.kind == ErrorKind::Unavailable))
        {
            return Err(e.for_each_request());
        }
        let jobs = if req.max_jobs == 0 {
            Vec::new()
        } else {
            self.claim_for(vm, req.max_jobs, req.wait_seconds).await?
        };
        Ok(ClaimedWithReports {
            jobs,
            completions,
            failures,
        })
    }

    async fn claim_for(
        &self,
        vm: Uuid,
        max_jobs: u32,
        wait_seconds: u32,
    ) -> Result<Vec<ClaimedJob>> {
        let deadline = deadline_after(Duration::from_secs(wait_seconds.into()));
        let subscription = self.notifier.vm(vm);
        loop {
            let notified = subscription.notify.notified();
            tokio::pin!(notified);
            // Registered before the claim, so an enqueue that commits in between still wakes us.
            notified.as_mut().enable();
            let jobs = self
                .claimer
                .call(ClaimRequest {
                    vm_id: vm,
                    want: max_jobs,
                })
                .await?;
            let now = Instant::now();
            if !jobs.is_empty() || now >= deadline {
                self.metrics.jobs_claimed.inc_by(jobs.len() as u64);
                return Ok(jobs);
            }
            let recheck = self
                .config
                .long_poll_recheck
                .min(deadline.saturating_duration_since(now));
            if self.wait_for_change(recheck, notified).await {
                return Ok(Vec::new());
            }
        }
    }

    pub async fn agent_job_heartbeat(
        &self,
        principal: &Principal,
        job_id: Uuid,
        hb: JobHeartbeat,
    ) -> Result<JobHeartbeatResponse> {
        let vm = self.agent_vm(principal).await?;
        let violations = check_progress(hb.progress.as_ref(), "/progress");
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        match store::queue_job_heartbeat(
            &self.pool,
            vm,
            job_id,
            hb.lease,
            hb.progress
                .as_ref()
                .map(serde_json::to_value)
                .transpose()
                .map_err(Error::internal)?
                .as_ref(),
            self.config.lease,
        )
        .await?
        {
            Some(extended) => Ok(JobHeartbeatResponse {
                lease_expires_at: extended.lease_expires_at,
                cancel_requested: extended.cancel_requested,
            }),
            None => Err(self.lease_check_failed(vm, job_id).await),
        }
    }

    /// 404 for a job that is not this VM's (or does not exist), else 409.
    pub(crate) async fn lease_check_failed(&self, vm: Uuid, job_id: Uuid) -> Error {
        match store::job_ownership(&self.pool, job_id).await {
            Ok(Some(job)) if job.vm_id == vm => lease_lost(),
            Ok(_) => job_not_found(job_id),
            Err(e) => e.into(),
        }
    }
}
