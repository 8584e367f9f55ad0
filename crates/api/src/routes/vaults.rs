use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use backvault_service::vaults::{CreateVault, UpdateVault, Vault};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{ListParams, location};
use crate::AppState;
use crate::audit::AuditSlot;
use crate::error::{ApiResult, Problem};
use crate::extract::{CREATED, Caller, IdempotencyKey, IfMatch, Json, Path, Query, Tagged};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_vault, list_vaults))
        .routes(routes!(get_vault, update_vault, delete_vault))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VaultList {
    pub items: Vec<Vault>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

fn vault_response(status: StatusCode, vault: Vault) -> ApiResult<Response> {
    let body = Tagged::versioned(vault.version, &vault)?;
    Ok(if status == CREATED {
        let at = location(format!("/v1/vaults/{}", vault.id));
        (status, [at], body).into_response()
    } else {
        (status, body).into_response()
    })
}

/// Create a vault.
///
/// The vault starts with the default policy `HourlyLogBackup`. Send `Idempotency-Key` to
/// make retries safe: a retried create returns the first response.
#[utoipa::path(post, path = "/v1/vaults", tag = "vaults",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried create return the first response")),
    request_body = CreateVault,
    responses(
        (status = 201, body = Vault, headers(("ETag" = String), ("Location" = String))),
        (status = 409, body = Problem, content_type = "application/problem+json", description = "vault_name_taken"),
    ))]
async fn create_vault(
    State(state): State<AppState>,
    Caller(principal): Caller,
    IdempotencyKey(key): IdempotencyKey,
    Json(req): Json<CreateVault>,
) -> ApiResult<Response> {
    let created = state
        .service
        .vault_create(&principal, req, key.as_deref())
        .await?;
    vault_response(CREATED, created.resource)
}

/// List the vaults of your subscriptions.
#[utoipa::path(get, path = "/v1/vaults", tag = "vaults", params(ListParams),
    responses((status = 200, body = VaultList)))]
async fn list_vaults(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<VaultList>> {
    let page = state
        .service
        .vault_list(&principal, params.cursor.as_deref(), params.limit)
        .await?;
    Ok(axum::Json(VaultList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a vault.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}", tag = "vaults",
    params(("vault_id" = Uuid, Path)),
    responses((status = 200, body = Vault, headers(("ETag" = String)))))]
async fn get_vault(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
) -> ApiResult<Response> {
    let vault = state.service.vault_get(&principal, vault_id).await?;
    vault_response(StatusCode::OK, vault)
}

/// Update a vault's description.
#[utoipa::path(patch, path = "/v1/vaults/{vault_id}", tag = "vaults",
    params(("vault_id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "The ETag you read; 412 if the vault changed since")),
    request_body = UpdateVault,
    responses(
        (status = 200, body = Vault, headers(("ETag" = String))),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
async fn update_vault(
    State(state): State<AppState>,
    Caller(principal): Caller,
    audit: AuditSlot,
    Path(vault_id): Path<Uuid>,
    IfMatch(expected): IfMatch,
    Json(req): Json<UpdateVault>,
) -> ApiResult<Response> {
    // Read first for the audit log's before; a change someone made in between shows in
    // the versions the event records (3 → 5). A read that fails is the update's failure
    // too, which answers as it always did.
    let before = state.service.vault_get(&principal, vault_id).await.ok();
    let vault = state
        .service
        .vault_update(&principal, vault_id, expected, req)
        .await?;
    if let Some(before) = before {
        audit.record_changes(&before, &vault);
    }
    vault_response(StatusCode::OK, vault)
}

/// Delete a vault and its policies.
///
/// Refused with 409 `vault_not_empty` while the vault has registered VMs or protected items.
#[utoipa::path(delete, path = "/v1/vaults/{vault_id}", tag = "vaults",
    params(("vault_id" = Uuid, Path), ("If-Match" = Option<String>, Header), ("Backvault-Approval" = Option<Uuid>, Header, description = "A granted approval of this operation, on a vault whose guard covers it")),
    responses(
        (status = 204),
        (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_required`, `approval_not_granted`, `approval_expired`, `approval_used` or `approval_not_yours`: the vault's guard needs a usable approval of this operation (the code says why); or `forbidden`"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
async fn delete_vault(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    IfMatch(expected): IfMatch,
) -> ApiResult<StatusCode> {
    state
        .service
        .vault_delete(&principal, vault_id, expected)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
