use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backvault_domain::jobs::{JobKind, JobStatus};
use backvault_service::ErrorKind;
use backvault_service::jobs::{DispatchJob, Job, JobQuery};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::location;
use crate::AppState;
use crate::error::{ApiError, ApiResult, Problem};
use crate::extract::bounded_instants;
use crate::extract::{Caller, Json, Path, Query, Tagged, none_match_hit};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs, dispatch_job))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub items: Vec<Job>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobListParams {
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub vm_id: Option<Uuid>,
    /// Jobs created at or after this instant.
    pub created_after: Option<DateTime<Utc>>,
    /// Jobs created before this instant.
    pub created_before: Option<DateTime<Utc>>,
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobListParams),
    responses((status = 200, body = JobList)))]
async fn list_jobs(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(p): Query<JobListParams>,
) -> ApiResult<axum::Json<JobList>> {
    bounded_instants(&[
        ("created_after", p.created_after),
        ("created_before", p.created_before),
    ])?;
    let query = JobQuery {
        status: p.status,
        kind: p.kind,
        vm_id: p.vm_id,
        created_after: p.created_after,
        created_before: p.created_before,
    };
    let page = state
        .service
        .job_list(&principal, &query, p.cursor.as_deref(), p.limit)
        .await?;
    Ok(axum::Json(JobList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetJobParams {
    /// Wait up to this long for the job to change state: seconds (`30s` or `30`) or
    /// milliseconds (`500ms`); a wait over 60 seconds waits 60.
    pub wait: Option<String>,
}

/// Get a job with its attempts; optionally wait for it to change.
///
/// With `?wait=30s` the response comes as soon as the job changes state (at once if it has
/// finished), so clients need no polling loop. With `If-None-Match` too, the wait is for a
/// job unlike the one the client holds: if it already differs, the answer comes at once.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs", params(("job_id" = Uuid, Path), GetJobParams),
    responses((status = 200, body = Job, headers(("ETag" = String)))))]
async fn get_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(job_id): Path<Uuid>,
    Query(p): Query<GetJobParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let wait = p.wait.as_deref().map(parse_wait).transpose()?;
    let held = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if let (Some(_), Some(held)) = (wait, held) {
        let now = state.service.job_get(&principal, job_id, None).await?;
        let current = Tagged::of(&now)?;
        if !none_match_hit(held, current.etag().to_str().unwrap_or("")) {
            return Ok(current.into_response());
        }
    }
    // A change between that read and the wait's start is seen when the wait ends: late,
    // never lost.
    let job = state.service.job_get(&principal, job_id, wait).await?;
    Ok(Tagged::of(&job)?.into_response())
}

/// What `parse_wait` takes, as the document states it.
pub const WAIT_PATTERN: &str = "^[0-9]{1,9}(s|ms)?$";

fn parse_wait(raw: &str) -> Result<Duration, ApiError> {
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    if !(1..=9).contains(&number.len()) {
        return Err(invalid_wait());
    }
    let n: u64 = number.parse().map_err(|_| invalid_wait())?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(invalid_wait()),
    }
}

fn invalid_wait() -> ApiError {
    ApiError::new(
        ErrorKind::BadRequest,
        "invalid_wait",
        "wait is a number of seconds like 30s, or of milliseconds like 500ms (at most 9 digits)",
    )
}

/// Cancel a job: a queued one at once, a running one at its agent's next heartbeat.
#[utoipa::path(post, path = "/v1/jobs/{job_id}/cancel", tag = "jobs", params(("job_id" = Uuid, Path)),
    responses((status = 202, body = Job, description = "Cancelled, or cancellation requested from the agent"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "job_finished")))]
async fn cancel_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(job_id): Path<Uuid>,
) -> ApiResult<Response> {
    let job = state.service.job_cancel(&principal, job_id).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(job)).into_response())
}

/// Dispatch an on-demand job to a VM's agent.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = DispatchJob,
    responses((status = 202, body = Job, headers(("Location" = String))),
              (status = 404, body = Problem, content_type = "application/problem+json", description = "`vm_not_found`; `protected_item_not_found` for an item that is not the VM's")))]
async fn dispatch_job(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<DispatchJob>,
) -> ApiResult<Response> {
    let job = state.service.job_dispatch(&principal, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        [location(format!("/v1/jobs/{}", job.id))],
        axum::Json(job),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_wait` takes exactly what `WAIT_PATTERN` describes.
    #[test]
    fn wait_pattern_is_the_parser() {
        let pattern = regex::Regex::new(WAIT_PATTERN).unwrap();
        for raw in [
            "",
            "0",
            "30",
            "30s",
            "500ms",
            "999999999",
            "1234567890",
            "s",
            "30m",
            "2h",
            "-1",
            "1.5s",
            " 30s",
            "30s ",
            "007s",
            "30S",
            "30mss",
            "٣٠s",
        ] {
            assert_eq!(pattern.is_match(raw), parse_wait(raw).is_ok(), "{raw:?}");
        }
    }
}
