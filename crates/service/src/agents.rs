//! The agent protocol's identity side and its bounds: enrollment (with an enrollment
//! token or the VM's current agent token), token refresh and agent heartbeats (the VM's
//! facts, and every held lease extended in one request). Jobs move in `claims` and
//! `completions`.

use std::time::{Duration, Instant};

use backvault_domain::Violation;
use backvault_domain::agent::protocol::{AgentHeartbeat, AgentHeartbeatResponse, EnrollResponse};
use backvault_domain::agent::{MAX_HEARTBEAT_LEASES, VmFacts, check_lease, check_progress};
use backvault_domain::instants::later;
use backvault_domain::jobs::JobStatus;
use backvault_store::jobs::{self as store, HeldToken};
use backvault_store::vms;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Role;
use crate::error::{Error, ErrorKind, Result};
use crate::tokens::{same_name, take_enrollment_use};
use crate::vms::{check_facts, facts_row};
use crate::{Principal, Service};

pub const MAX_CLAIM_JOBS: u32 = 50;
pub const MAX_CLAIM_WAIT_SECONDS: u32 = 60;
/// The longest error code an agent may report for a failed job.
pub const MAX_FAILURE_CODE_CHARS: usize = 128;

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

pub(crate) fn job_not_found(id: Uuid) -> Error {
    Error::not_found("job_not_found", format_args!("job {id}"))
}

pub(crate) fn token_revoked() -> Error {
    Error::new(
        ErrorKind::Unauthorized,
        "token_revoked",
        "this agent token was replaced by a newer enrollment or its VM was removed; enroll again",
    )
}

pub(crate) fn lease_lost() -> Error {
    Error::new(
        ErrorKind::Conflict,
        "lease_lost",
        "this agent no longer holds the job's lease (it expired and the job was retried, or it finished); drop the job",
    )
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
        let leases: Vec<HeldToken> = hb
            .jobs
            .iter()
            .map(|j| HeldToken {
                job_id: j.job_id,
                lease: j.lease,
            })
            .collect();
        let extended = if leases.is_empty() {
            Vec::new()
        } else {
            store::queue_extend_leases(&self.pool, vm, &leases, self.config.lease).await?
        };
        let lease_expires_at = extended.first().map_or_else(
            || later(Utc::now(), self.config.lease),
            |e| e.lease_expires_at,
        );
        Ok(AgentHeartbeatResponse {
            lost: leases
                .iter()
                .map(|l| l.job_id)
                .filter(|id| !extended.iter().any(|e| e.job_id == *id))
                .collect(),
            cancel_requested: extended
                .iter()
                .filter(|e| e.cancel_requested)
                .map(|e| e.job_id)
                .collect(),
            extended: extended.iter().map(|e| e.job_id).collect(),
            lease_expires_at,
        })
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
