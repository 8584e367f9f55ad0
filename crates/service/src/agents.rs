//! The agent protocol: enrollment, heartbeats, claims (long-poll), job heartbeats,
//! completions and failures. Claims and completions from concurrent agents are coalesced
//! into shared statements.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backvault_domain::Violation;
use backvault_domain::agent::protocol::{
    AgentHeartbeat, AgentHeartbeatResponse, ClaimedJob, CompleteJob, EnrollResponse, FailJob,
    JobHeartbeat, JobHeartbeatResponse,
};
use backvault_domain::agent::{
    JobItem, JobResult, MAX_HEARTBEAT_LEASES, ReportedJob, VmFacts, check_lease, check_progress,
    check_warnings,
};
use backvault_domain::instants::later;
use backvault_domain::jobs::{JobKind, JobPayload, JobStatus, retry_delay};
use backvault_store::PgPool;
use backvault_store::jobs::{self as store, AttemptEnd, ClaimLimits, Completion};
use backvault_store::vms;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Role;
use crate::batcher::{Batcher, BatcherSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::Metrics;
use crate::protection::jobs_finished;
use crate::recovery::{BackupReport, record_points, restores_completed};
use crate::tokens::{same_name, take_enrollment_use};
use crate::vms::{check_facts, facts_row};
use crate::{Config, Principal, Service};

pub const MAX_CLAIM_JOBS: u32 = 50;
pub const MAX_CLAIM_WAIT_SECONDS: u32 = 60;
/// The longest error code an agent may report for a failed job.
pub const MAX_FAILURE_CODE_CHARS: usize = 128;
/// Agent codes that mean the log chain is broken: the next backup must be a full.
const LOG_CHAIN_BROKEN: [&str; 3] = [
    "UserErrorSQLLSNValidationFailure",
    "UserErrorParentFullBackupMissing",
    "UserErrorSQLNoFullBackup",
];

/// The code of a job whose agent reported a result that breaks the protocol's rules.
pub const RESULT_INVALID: &str = "JobResultInvalid";

/// The code of a job whose completion the server could not record.
pub const RESULT_NOT_RECORDED: &str = "JobResultNotRecorded";

/// The code an agent reports when it stopped a job because a user cancelled it.
pub const CANCELLED_CODE: &str = "JobCancelled";

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobOutcome {
    pub job_id: Uuid,
    pub status: JobStatus,
    /// When a failed attempt will be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

pub(crate) struct ClaimRequest {
    vm_id: Uuid,
    want: u32,
}

fn job_not_found(id: Uuid) -> Error {
    Error::not_found("job_not_found", format_args!("job {id}"))
}

fn token_revoked() -> Error {
    Error::new(
        ErrorKind::Unauthorized,
        "token_revoked",
        "this agent token was replaced by a newer enrollment or its VM was removed; enroll again",
    )
}

fn lease_lost() -> Error {
    Error::new(
        ErrorKind::Conflict,
        "lease_lost",
        "this agent no longer holds the job's lease (it expired and the job was retried, or it finished); drop the job",
    )
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
    let kind = JobKind::parse(&row.kind)
        .ok_or_else(|| Error::internal(format!("unknown job kind {}", row.kind)))?;
    Ok(ClaimedJob {
        job_id: row.job_id,
        kind,
        lease: row.lease,
        lease_expires_at: row.lease_expires_at,
        attempt: row.attempt,
        items: serde_json::from_value::<Vec<JobItem>>(row.items.0).map_err(Error::internal)?,
        payload: tagged_payload(kind, row.payload.0),
    })
}

/// Claims for many VMs in one statement; each requester gets its own VM's jobs.
pub(crate) fn claim_batcher(
    pool: PgPool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
) -> Batcher<ClaimRequest, Vec<ClaimedJob>> {
    let spec = BatcherSpec {
        name: "claims",
        workers: 4,
        max_batch: 256,
        describe: |r: &ClaimRequest| format!("claim of VM {}", r.vm_id),
    };
    Batcher::spawn(spec, metrics, move |requests: &[ClaimRequest]| {
        let pool = pool.clone();
        let config = config.clone();
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

/// Completes many jobs in one transaction (group commit). A completion whose lease is no
/// longer held comes back as `lease_lost`, to be told apart from a repeat by the caller.
/// Each result is first judged against its job (loaded for the whole batch in one
/// statement): one that does not fit fails its job with `JobResultInvalid` and comes back
/// as `validation_failed`.
pub(crate) fn complete_batcher(
    pool: PgPool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
) -> Batcher<Completion, ()> {
    let spec = BatcherSpec {
        name: "completions",
        workers: 4,
        max_batch: 256,
        describe: |c: &Completion| format!("completion of job {}", c.job_id),
    };
    Batcher::spawn(spec, metrics, move |completions: &[Completion]| {
        let pool = pool.clone();
        let rehearsal = config.allow_clock_override;
        Box::pin(async move {
            let outcome = async {
                let mut tx = pool.begin().await?;
                let held: HashMap<Uuid, store::CompletingJob> =
                    store::queue_lock_completing(&mut tx, completions)
                        .await?
                        .into_iter()
                        .map(|j| (j.job_id, j))
                        .collect();
                let results: Vec<Option<JobResult>> = completions
                    .iter()
                    .map(|c| JobResult::deserialize(&c.result).ok())
                    .collect();
                let mut rejected: HashMap<Uuid, Vec<Violation>> = HashMap::new();
                for (c, result) in completions.iter().zip(&results) {
                    let (Some(result), Some(job)) = (result, held.get(&c.job_id)) else {
                        continue;
                    };
                    let Some(kind) = JobKind::parse(&job.kind) else {
                        continue;
                    };
                    let items = Vec::<JobItem>::deserialize(&job.items.0).unwrap_or_default();
                    let violations = result.job_violations(
                        &ReportedJob {
                            kind,
                            items: &items,
                            payload: &job.payload.0,
                            claimed_at: job.started_at,
                            completed_at: job.now,
                            rehearsal,
                        },
                        "/result",
                    );
                    if !violations.is_empty() {
                        rejected.insert(c.job_id, violations);
                    }
                }
                if !rejected.is_empty() {
                    fail_rejected(&mut tx, &rejected).await?;
                }
                let accepted: Vec<&Completion> = completions
                    .iter()
                    .filter(|c| !rejected.contains_key(&c.job_id))
                    .collect();
                let done = store::queue_complete(&mut tx, &accepted).await?;
                // The restores done, with the payloads the completion already read.
                let restores: Vec<&serde_json::Value> = completions
                    .iter()
                    .zip(&results)
                    .filter(|(c, r)| {
                        matches!(r, Some(JobResult::Restore { .. })) && done.contains(&c.job_id)
                    })
                    .filter_map(|(c, _)| held.get(&c.job_id).map(|j| &j.payload.0))
                    .collect();
                // Recovery points are recorded in the completion's own transaction.
                let reports: Vec<BackupReport> = completions
                    .iter()
                    .zip(results)
                    .filter(|(c, _)| done.contains(&c.job_id))
                    .filter_map(|(c, result)| match result {
                        Some(JobResult::Backup { recovery_points }) => Some(BackupReport {
                            job_id: c.job_id,
                            points: recovery_points,
                        }),
                        // A tail-log backup is a log of the item like any other.
                        Some(JobResult::Restore {
                            tail_log_backup: Some(tail),
                            ..
                        }) => Some(BackupReport {
                            job_id: c.job_id,
                            points: vec![*tail],
                        }),
                        _ => None,
                    })
                    .collect();
                record_points(&mut tx, &reports).await?;
                restores_completed(&mut tx, &restores).await?;
                jobs_finished(&mut tx, &done, true).await?;
                tx.commit().await?;
                Ok::<_, Error>((done, rejected))
            }
            .await;
            let (done, rejected) = outcome?;
            Ok(completions
                .iter()
                .map(|c| {
                    if let Some(violations) = rejected.get(&c.job_id) {
                        Err(Error::validation(violations.clone()))
                    } else if done.contains(&c.job_id) {
                        Ok(())
                    } else {
                        Err(lease_lost())
                    }
                })
                .collect())
        })
    })
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
            outcome: "failed",
            code: RESULT_INVALID,
            message,
        })
        .collect();
    store::queue_finish(tx, &ids, JobStatus::Failed.as_str(), &ends).await?;
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
    /// The VM an agent token speaks for, if the token is still current: a later enrollment
    /// or the VM's removal revokes it.
    pub async fn agent_vm(&self, principal: &Principal) -> Result<Uuid> {
        let (Role::Agent, Some(vm), Some(generation)) =
            (principal.role, principal.vm, principal.generation)
        else {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "forbidden",
                "this needs an agent token",
            ));
        };
        let current = match self.notifier.cached_generation(vm) {
            Some(cached) => Some(cached),
            None => {
                let current = vms::vm_token_generation(&self.pool, vm).await?;
                if let Some(g) = current {
                    self.notifier.remember_generation(vm, g);
                }
                current
            }
        };
        match current {
            Some(current) if current == generation => Ok(vm),
            _ => Err(token_revoked()),
        }
    }

    /// `POST /v1/agent/enroll`. With an enrollment token: a new agent enrolls its VM (see
    /// [`Self::enroll_with_token`]). With the VM's current agent token: its agent refreshes
    /// that token (see [`Self::refresh_agent_token`]).
    pub async fn agent_enroll(
        &self,
        principal: &Principal,
        facts: VmFacts,
    ) -> Result<EnrollResponse> {
        match principal.role {
            Role::Enrollment => self.enroll_with_token(principal, facts).await,
            Role::Agent => self.refresh_agent_token(principal, facts).await,
            _ => Err(Error::new(
                ErrorKind::Forbidden,
                "forbidden",
                "enrollment needs an enrollment token, or the VM's current agent token to refresh it",
            )),
        }
    }

    /// The VM is upserted into the inventory and the agent gets a token bound to it, for
    /// one use of the enrollment token. A VM that already has an agent is not taken over
    /// (`vm_already_enrolled`) unless the token is bound to it: a token that leaked from
    /// one machine must not let another impersonate the subscription's VMs.
    async fn enroll_with_token(
        &self,
        principal: &Principal,
        facts: VmFacts,
    ) -> Result<EnrollResponse> {
        check_facts(&facts, "/facts")?;
        if !principal.sees_subscription(&facts.subscription_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "the enrollment token does not grant this VM's subscription",
            ));
        }
        let mut tx = self.pool.begin().await?;
        let grant = take_enrollment_use(&mut tx, principal, &facts).await?;
        // Dropping the transaction on refusal gives the enrollment token's use back.
        let vm = vms::vm_enroll(&mut tx, Uuid::now_v7(), &facts_row(&facts), grant.bound)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Conflict,
                    "vm_already_enrolled",
                    format!(
                        "VM {} in resource group {} already has an agent. Its agent refreshes its token with that token; to replace the agent, enroll with a token bound to this VM (vm_name, resource_group) or remove the VM first",
                        facts.name, facts.resource_group
                    ),
                )
            })?;
        // Other replicas drop their cached generation of this VM at commit.
        store::notify(&mut *tx, &store::notify_payload('g', [vm.id])).await?;
        tx.commit().await?;
        self.notifier.forget_generations(&vm.id.to_string());
        let (agent_token, exp) = self.auth.mint_agent(
            vm.id,
            &vm.subscription_id,
            vm.token_generation,
            self.config.agent_token_ttl,
        );
        tracing::info!(vm.id = %vm.id, vm.name = %vm.name, enrollment_token.id = %grant.token_id,
                       replaced_agent = vm.token_generation > 1, "agent enrolled");
        Ok(EnrollResponse {
            vm_id: vm.id,
            agent_token,
            expires_at: DateTime::from_timestamp(exp, 0).unwrap_or_default(),
        })
    }

    /// A fresh token for the agent that holds the VM's current one, signed with the current
    /// key, and the VM's facts updated. The generation stays, so the presented token keeps
    /// working until it expires: an agent whose refresh answer was lost is not locked out.
    /// The facts must name the token's VM: an agent token never reaches another VM.
    async fn refresh_agent_token(
        &self,
        principal: &Principal,
        facts: VmFacts,
    ) -> Result<EnrollResponse> {
        let vm_id = self.agent_vm(principal).await?;
        check_facts(&facts, "/facts")?;
        let generation = principal.generation.ok_or_else(token_revoked)?;
        let mut tx = self.pool.begin().await?;
        let current = vms::vm_get(&mut *tx, vm_id)
            .await?
            .ok_or_else(token_revoked)?;
        if current.subscription_id != facts.subscription_id
            || !same_name(&current.resource_group, &facts.resource_group)
            || !same_name(&current.name, &facts.name)
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_identity_mismatch",
                format!(
                    "this agent token is for VM {} in resource group {} of subscription {}; the facts name another VM. Enroll that one with an enrollment token",
                    current.name, current.resource_group, current.subscription_id
                ),
            ));
        }
        let vm = vms::vm_refresh(&mut tx, vm_id, generation, &facts_row(&facts))
            .await?
            .ok_or_else(token_revoked)?;
        tx.commit().await?;
        let (agent_token, exp) = self.auth.mint_agent(
            vm.id,
            &vm.subscription_id,
            vm.token_generation,
            self.config.agent_token_ttl,
        );
        tracing::info!(vm.id = %vm.id, vm.name = %vm.name, "agent token refreshed");
        Ok(EnrollResponse {
            vm_id: vm.id,
            agent_token,
            expires_at: DateTime::from_timestamp(exp, 0).unwrap_or_default(),
        })
    }

    pub async fn agent_heartbeat(
        &self,
        principal: &Principal,
        hb: AgentHeartbeat,
    ) -> Result<AgentHeartbeatResponse> {
        let vm = self.agent_vm(principal).await?;
        if let Some(facts) = &hb.facts {
            check_facts(facts, "/facts")?;
        }
        let mut violations = Vec::new();
        if hb.jobs.len() > MAX_HEARTBEAT_LEASES {
            violations.push(Violation::new(
                "/jobs",
                "field_too_large",
                format!("a heartbeat extends at most {MAX_HEARTBEAT_LEASES} leases"),
            ));
        } else {
            violations.extend(hb.jobs.iter().enumerate().flat_map(|(i, j)| {
                let mut v = check_progress(j.progress.as_ref(), &format!("/jobs/{i}/progress"));
                v.extend(check_lease(j.lease, &format!("/jobs/{i}/lease")));
                v
            }));
        }
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        vms::vm_heartbeat(&self.pool, vm, hb.facts.as_ref().map(facts_row).as_ref()).await?;
        let leases: Vec<(Uuid, i64)> = hb.jobs.iter().map(|j| (j.job_id, j.lease)).collect();
        let extended = if leases.is_empty() {
            Vec::new()
        } else {
            store::queue_extend_leases(&self.pool, vm, &leases, self.config.lease).await?
        };
        let lease_expires_at = extended
            .first()
            .map_or_else(|| later(Utc::now(), self.config.lease), |(_, _, at)| *at);
        Ok(AgentHeartbeatResponse {
            lost: leases
                .iter()
                .map(|l| l.0)
                .filter(|id| !extended.iter().any(|e| e.0 == *id))
                .collect(),
            cancel_requested: extended.iter().filter(|e| e.1).map(|e| e.0).collect(),
            extended: extended.iter().map(|e| e.0).collect(),
            lease_expires_at,
        })
    }

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
            Some((lease_expires_at, cancel_requested)) => Ok(JobHeartbeatResponse {
                lease_expires_at,
                cancel_requested,
            }),
            None => Err(self.lease_check_failed(vm, job_id).await),
        }
    }

    /// 404 for a job that is not this VM's (or does not exist), else 409.
    async fn lease_check_failed(&self, vm: Uuid, job_id: Uuid) -> Error {
        match store::job_ownership(&self.pool, job_id).await {
            Ok(Some(job)) if job.vm_id == vm => lease_lost(),
            Ok(_) => job_not_found(job_id),
            Err(e) => e.into(),
        }
    }

    pub async fn agent_complete(
        &self,
        principal: &Principal,
        job_id: Uuid,
        req: CompleteJob,
    ) -> Result<JobOutcome> {
        let vm = self.agent_vm(principal).await?;
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
            status: status.as_str(),
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
                let finished = JobStatus::parse(&job.status).filter(|s| s.is_finished());
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
                            format!("a {} job cannot complete with this result kind", job.kind),
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
            outcome: "failed",
            code,
            message,
        };
        store::queue_finish(&mut tx, &[job_id], JobStatus::Failed.as_str(), &[end]).await?;
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
            _ => self.after_jobs_finished(&mut tx, &done, true).await?,
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn agent_fail(
        &self,
        principal: &Principal,
        job_id: Uuid,
        req: FailJob,
    ) -> Result<JobOutcome> {
        let vm = self.agent_vm(principal).await?;
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
            for (_, _, items, _) in store::jobs_content(&mut *tx, &[job_id]).await? {
                let ids = crate::jobs::protected_items_of(&items.0);
                backvault_store::recovery::needs_full_set(&mut *tx, &ids).await?;
            }
        }
        let outcome = if held.cancel_requested {
            let end = AttemptEnd {
                outcome: "cancelled",
                code: CANCELLED_CODE,
                message: "cancelled by a user while running",
            };
            store::queue_finish(&mut tx, &[job_id], JobStatus::Cancelled.as_str(), &[end]).await?;
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
                outcome: "failed",
                code: &req.code,
                message: &message,
            };
            store::queue_retry(&mut tx, &[job_id], &[retry_at], &[end]).await?;
            JobOutcome {
                job_id,
                status: JobStatus::Queued,
                retry_at: Some(retry_at),
            }
        } else {
            let end = AttemptEnd {
                outcome: "failed",
                code: &req.code,
                message: &message,
            };
            store::queue_finish(&mut tx, &[job_id], JobStatus::Failed.as_str(), &[end]).await?;
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

/// `wait` from now, for a long-poll; a wait too long for the clock ends now.
pub(crate) fn deadline_after(wait: Duration) -> Instant {
    Instant::now()
        .checked_add(wait)
        .unwrap_or_else(Instant::now)
}

/// Jitter in [0.5, 1.5) for retry delays.
pub(crate) fn rand_jitter() -> f64 {
    0.5 + rand::random::<f64>()
}
