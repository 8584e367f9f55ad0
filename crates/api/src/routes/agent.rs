//! The agent protocol. Every route takes an agent token bound to one VM (enrollment also
//! takes an enrollment token); a job of another VM answers 404.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use backvault_domain::agent::protocol::{
    AgentHeartbeat, AgentHeartbeatResponse, ClaimRequest, ClaimResponse, ClaimV2Request,
    ClaimV2Response, CompleteJob, EnrollRequest, EnrollResponse, FailJob, JobHeartbeat,
    JobHeartbeatResponse, ReportOutcome,
};
use backvault_service::agents::JobOutcome;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::tokens::no_store;
use crate::AppState;
use crate::audit::AuditSlot;
use crate::error::{ApiResult, Problem, refusal};
use crate::extract::{Caller, Json, Path};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll_agent))
        .routes(routes!(agent_heartbeat))
        .routes(routes!(claim_jobs))
        .routes(routes!(claim_jobs_v2))
        .routes(routes!(heartbeat_job))
        .routes(routes!(complete_job))
        .routes(routes!(fail_job))
}

/// Enroll a VM's agent; returns the agent's token.
///
/// With an enrollment token, a new agent enrolls its VM; a VM that already has an agent
/// answers 409 `vm_already_enrolled` unless the token is bound to it. With the VM's current
/// agent token, the agent refreshes its token (a new expiry, the current signing key) and
/// the VM's facts, which must name the same VM.
#[utoipa::path(post, path = "/v1/agent/enroll", tag = "agent", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse, headers(("Cache-Control" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "vm_already_enrolled, vm_identity_mismatch")))]
async fn enroll_agent(
    State(state): State<AppState>,
    Caller(principal): Caller,
    audit: AuditSlot,
    Json(req): Json<EnrollRequest>,
) -> ApiResult<Response> {
    let enrolled = state.service.agent_enroll(&principal, req.facts).await?;
    audit.resource(enrolled.vm_id);
    Ok(([no_store()], axum::Json(enrolled)).into_response())
}

/// The agent is alive: updates the VM's facts and extends the leases of its running jobs.
#[utoipa::path(post, path = "/v1/agent/heartbeat", tag = "agent", request_body = AgentHeartbeat,
    responses((status = 200, body = AgentHeartbeatResponse)))]
async fn agent_heartbeat(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<AgentHeartbeat>,
) -> ApiResult<axum::Json<AgentHeartbeatResponse>> {
    Ok(axum::Json(
        state.service.agent_heartbeat(&principal, req).await?,
    ))
}

/// Claim jobs for this VM, waiting up to `wait_seconds` for one (long-poll).
#[utoipa::path(post, path = "/v1/agent/claim", tag = "agent", request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse)))]
async fn claim_jobs(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<ClaimRequest>,
) -> ApiResult<axum::Json<ClaimResponse>> {
    let jobs = state
        .service
        .agent_claim(&principal, req.max_jobs, req.wait_seconds)
        .await?;
    Ok(axum::Json(ClaimResponse { jobs }))
}

/// Report the jobs finished since the last claim, then claim more (version 2 of the claim).
///
/// Each completion and failure is recorded as its version 1 call would record it, and
/// answered in `completions` / `failures` in the order sent: a refused one (a lost lease, a
/// result that does not fit its job) carries the problem that call would have answered,
/// and does not stop the others. Reports are recorded before the claim waits. Repeating a
/// report is harmless, so a call that failed as a whole (503) is sent again as it was.
#[utoipa::path(post, path = "/v2/agent/claim", tag = "agent", request_body = ClaimV2Request,
    responses((status = 200, body = ClaimV2Response)))]
async fn claim_jobs_v2(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<ClaimV2Request>,
) -> ApiResult<axum::Json<ClaimV2Response>> {
    let done = state.service.agent_claim_v2(&principal, req).await?;
    let outcomes = |reports: Vec<(Uuid, backvault_service::Result<JobOutcome>)>| {
        reports
            .into_iter()
            .map(|(job_id, outcome)| match outcome {
                Ok(o) => ReportOutcome {
                    job_id,
                    status: Some(o.status),
                    retry_at: o.retry_at,
                    refused: None,
                },
                Err(e) => ReportOutcome {
                    job_id,
                    status: None,
                    retry_at: None,
                    refused: Some(refusal(e)),
                },
            })
            .collect()
    };
    Ok(axum::Json(ClaimV2Response {
        jobs: done.jobs,
        completions: outcomes(done.completions),
        failures: outcomes(done.failures),
    }))
}

/// Extend one job's lease and report progress; says whether a user cancelled it.
#[utoipa::path(post, path = "/v1/agent/jobs/{job_id}/heartbeat", tag = "agent", params(("job_id" = Uuid, Path)),
    request_body = JobHeartbeat,
    responses((status = 200, body = JobHeartbeatResponse),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "lease_lost")))]
async fn heartbeat_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(job_id): Path<Uuid>,
    Json(req): Json<JobHeartbeat>,
) -> ApiResult<axum::Json<JobHeartbeatResponse>> {
    Ok(axum::Json(
        state
            .service
            .agent_job_heartbeat(&principal, job_id, req)
            .await?,
    ))
}

/// Complete a job with its kind's result. Repeating the same completion is harmless.
#[utoipa::path(post, path = "/v1/agent/jobs/{job_id}/complete", tag = "agent", params(("job_id" = Uuid, Path)),
    request_body = CompleteJob,
    responses((status = 200, body = JobOutcome),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "lease_lost"),
              (status = 422, body = Problem, content_type = "application/problem+json", description = "result_kind_mismatch")))]
async fn complete_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(job_id): Path<Uuid>,
    Json(req): Json<CompleteJob>,
) -> ApiResult<axum::Json<JobOutcome>> {
    Ok(axum::Json(
        state
            .service
            .agent_complete(&principal, job_id, req)
            .await?,
    ))
}

/// Report a failed attempt; retryable failures are retried with backoff.
#[utoipa::path(post, path = "/v1/agent/jobs/{job_id}/fail", tag = "agent", params(("job_id" = Uuid, Path)),
    request_body = FailJob,
    responses((status = 200, body = JobOutcome),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "lease_lost")))]
async fn fail_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(job_id): Path<Uuid>,
    Json(req): Json<FailJob>,
) -> ApiResult<axum::Json<JobOutcome>> {
    Ok(axum::Json(
        state.service.agent_fail(&principal, job_id, req).await?,
    ))
}
