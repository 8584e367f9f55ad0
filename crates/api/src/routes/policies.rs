use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use backvault_domain::policy::PolicySpec;
use backvault_domain::preview::PolicyPreview;
use backvault_service::policies::{BackupPolicy, CopyPolicy, CreatePolicy, ReplacePolicy};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{ListParams, location};
use crate::AppState;
use crate::audit::AuditSlot;
use crate::error::{ApiResult, Problem};
use crate::extract::bounded_instants;
use crate::extract::{CREATED, Caller, IdempotencyKey, IfMatch, Json, Path, Query, Tagged};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_policy, list_policies))
        .routes(routes!(get_policy, replace_policy, delete_policy))
        .routes(routes!(copy_policy))
        .routes(routes!(preview_policy))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyList {
    pub items: Vec<BackupPolicy>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

fn policy_response(status: StatusCode, policy: BackupPolicy) -> ApiResult<Response> {
    let body = Tagged::versioned(policy.version, &policy)?;
    Ok(if status == StatusCode::CREATED {
        let at = location(format!(
            "/v1/vaults/{}/policies/{}",
            policy.vault_id, policy.name
        ));
        (status, [at], body).into_response()
    } else {
        (status, body).into_response()
    })
}

/// Create a policy in a vault.
///
/// Every violated rule is reported at once in `errors`, each with a JSON pointer into the
/// request body and a stable code.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/policies", tag = "policies",
    params(("vault_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = CreatePolicy,
    responses(
        (status = 201, body = BackupPolicy, headers(("ETag" = String), ("Location" = String))),
        (status = 409, body = Problem, content_type = "application/problem+json", description = "policy_name_taken"),
    ))]
async fn create_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    IdempotencyKey(key): IdempotencyKey,
    Json(req): Json<CreatePolicy>,
) -> ApiResult<Response> {
    let created = state
        .service
        .policy_create(&principal, vault_id, req, key.as_deref())
        .await?;
    policy_response(CREATED, created.resource)
}

/// List a vault's policies.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/policies", tag = "policies",
    params(("vault_id" = Uuid, Path), ListParams),
    responses((status = 200, body = PolicyList)))]
async fn list_policies(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<PolicyList>> {
    let page = state
        .service
        .policy_list(&principal, vault_id, params.cursor.as_deref(), params.limit)
        .await?;
    Ok(axum::Json(PolicyList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a policy by name (names ignore case).
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/policies/{policy_name}", tag = "policies",
    params(("vault_id" = Uuid, Path), ("policy_name" = String, Path)),
    responses((status = 200, body = BackupPolicy, headers(("ETag" = String)))))]
async fn get_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, name)): Path<(Uuid, String)>,
) -> ApiResult<Response> {
    let policy = state
        .service
        .policy_get(&principal, vault_id, &name)
        .await?;
    policy_response(StatusCode::OK, policy)
}

/// Replace a policy's spec.
#[utoipa::path(put, path = "/v1/vaults/{vault_id}/policies/{policy_name}", tag = "policies",
    params(("vault_id" = Uuid, Path), ("policy_name" = String, Path), ("If-Match" = Option<String>, Header), ("Backvault-Approval" = Option<Uuid>, Header, description = "A granted approval of this operation, on a vault whose guard covers it")),
    request_body = ReplacePolicy,
    responses(
        (status = 200, body = BackupPolicy, headers(("ETag" = String))),
        (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_required`, `approval_not_granted`, `approval_expired`, `approval_used` or `approval_not_yours`: the vault's guard needs a usable approval of this operation (the code says why); or `forbidden`"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
async fn replace_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    audit: AuditSlot,
    Path((vault_id, name)): Path<(Uuid, String)>,
    IfMatch(expected): IfMatch,
    Json(req): Json<ReplacePolicy>,
) -> ApiResult<Response> {
    // Read first for the audit log's before (as `update_vault` does).
    let before = state
        .service
        .policy_get(&principal, vault_id, &name)
        .await
        .ok();
    let policy = state
        .service
        .policy_replace(&principal, vault_id, &name, expected, req)
        .await?;
    if let Some(before) = before {
        audit.record_changes(&before, &policy);
    }
    policy_response(StatusCode::OK, policy)
}

/// Delete a policy.
///
/// Refused with 409 `policy_in_use` while protected items or auto-protection use it.
#[utoipa::path(delete, path = "/v1/vaults/{vault_id}/policies/{policy_name}", tag = "policies",
    params(("vault_id" = Uuid, Path), ("policy_name" = String, Path), ("If-Match" = Option<String>, Header)),
    responses(
        (status = 204),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, name)): Path<(Uuid, String)>,
    IfMatch(expected): IfMatch,
) -> ApiResult<StatusCode> {
    state
        .service
        .policy_delete(&principal, vault_id, &name, expected)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Copy a policy to another vault.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/policies/{policy_name}/copy", tag = "policies",
    params(("vault_id" = Uuid, Path), ("policy_name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = CopyPolicy,
    responses(
        (status = 201, body = BackupPolicy, headers(("ETag" = String), ("Location" = String))),
        (status = 409, body = Problem, content_type = "application/problem+json"),
    ))]
async fn copy_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, name)): Path<(Uuid, String)>,
    IdempotencyKey(key): IdempotencyKey,
    Json(req): Json<CopyPolicy>,
) -> ApiResult<Response> {
    let created = state
        .service
        .policy_copy(&principal, vault_id, &name, req, key.as_deref())
        .await?;
    policy_response(CREATED, created.resource)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PreviewParams {
    /// Show runs after this instant (default: now).
    pub from: Option<DateTime<Utc>>,
    /// Runs per backup type, 1 to 100 (default 10).
    pub count: Option<usize>,
    /// Preview for this vault: its retention bounds apply, and the preview says how an
    /// immutable vault treats existing points.
    pub vault_id: Option<Uuid>,
}

/// Preview a policy without saving it.
///
/// Validates the policy (every violation at once, as on create) and, when valid, returns
/// the next runs of each backup type in UTC and local time, which runs a DST change moves,
/// each point's expiry, how long the recovery chain keeps each full, and the worst-case
/// gap between recovery points.
#[utoipa::path(post, path = "/v1/policies/preview", tag = "policies",
    params(PreviewParams),
    request_body = PolicySpec,
    responses(
        (status = 200, body = PolicyPreview),
        (status = 400, body = Problem, content_type = "application/problem+json", description = "invalid_count, invalid_query"),
    ))]
async fn preview_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(params): Query<PreviewParams>,
    Json(spec): Json<PolicySpec>,
) -> ApiResult<axum::Json<PolicyPreview>> {
    bounded_instants(&[("from", params.from)])?;
    let from = params.from.unwrap_or_else(Utc::now);
    let preview = state
        .service
        .policy_preview(
            &principal,
            &spec,
            from,
            params.count.unwrap_or(10),
            params.vault_id,
        )
        .await?;
    Ok(axum::Json(preview))
}
