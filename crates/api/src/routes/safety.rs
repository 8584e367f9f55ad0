//! Data safety: a vault's soft delete, immutability and retention bounds; guards and
//! approvals (multi-user authorization); undeleting soft-deleted items.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use backvault_service::data_safety::{
    ApprovalView, ChangeVaultSafety, CreateGuard, GrantApproval, Guard, RequestApproval,
    VaultSafetyView,
};
use backvault_service::protection::ProtectedItem;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::location;
use crate::AppState;
use crate::audit::AuditSlot;
use crate::error::{ApiResult, Problem};
use crate::extract::{Caller, Json, Path};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_vault_safety, change_vault_safety))
        .routes(routes!(create_guard, list_guards))
        .routes(routes!(delete_guard))
        .routes(routes!(request_approval, list_approvals))
        .routes(routes!(grant_approval))
        .routes(routes!(deny_approval))
        .routes(routes!(undelete_protected_item))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GuardList {
    pub items: Vec<Guard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApprovalList {
    /// Newest first, the latest 500.
    pub items: Vec<ApprovalView>,
}

/// A vault's soft delete, immutability, retention bounds and guard.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/safety", tag = "safety",
    params(("vault_id" = Uuid, Path)),
    responses((status = 200, body = VaultSafetyView)))]
async fn get_vault_safety(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
) -> ApiResult<axum::Json<VaultSafetyView>> {
    Ok(axum::Json(
        state.service.vault_safety_get(&principal, vault_id).await?,
    ))
}

/// Change a vault's soft delete, immutability, retention bounds or guard.
///
/// Locking is irreversible once its cooling-off window (72 hours) has passed. On a vault
/// with a guard, disabling soft delete, lowering immutability and removing or replacing
/// the guard need an approval (`Backvault-Approval`).
#[utoipa::path(patch, path = "/v1/vaults/{vault_id}/safety", tag = "safety",
    params(("vault_id" = Uuid, Path),
           ("Backvault-Approval" = Option<Uuid>, Header, description = "A granted approval of the change, on a guarded vault")),
    request_body = ChangeVaultSafety,
    responses((status = 200, body = VaultSafetyView),
              (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_required`, `approval_not_granted`, `approval_expired`, `approval_used`, `approval_not_yours`: the guard's approval is missing or unusable (the code says why); or `forbidden`"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "`vault_locked`: the lock is final")))]
async fn change_vault_safety(
    State(state): State<AppState>,
    Caller(principal): Caller,
    audit: AuditSlot,
    Path(vault_id): Path<Uuid>,
    Json(req): Json<ChangeVaultSafety>,
) -> ApiResult<axum::Json<VaultSafetyView>> {
    // Read first for the audit log's before (a lock, a guard removed...): the settings
    // are what an attacker would change.
    let before = state
        .service
        .vault_safety_get(&principal, vault_id)
        .await
        .ok();
    let after = state
        .service
        .vault_safety_change(&principal, vault_id, req)
        .await?;
    if let Some(before) = before {
        audit.record_changes(&before, &after);
    }
    Ok(axum::Json(after))
}

/// Create a guard (Resource Guard): vaults bound to it need approvals for operations that
/// reduce protection.
#[utoipa::path(post, path = "/v1/guards", tag = "safety",
    request_body = CreateGuard,
    responses((status = 201, body = Guard, headers(("Location" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "guard_name_taken")))]
async fn create_guard(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<CreateGuard>,
) -> ApiResult<Response> {
    let guard = state.service.guard_create(&principal, req).await?;
    let at = format!("/v1/guards/{}", guard.id);
    Ok((StatusCode::CREATED, [location(at)], axum::Json(guard)).into_response())
}

/// List the guards of your subscriptions.
#[utoipa::path(get, path = "/v1/guards", tag = "safety",
    responses((status = 200, body = GuardList)))]
async fn list_guards(
    State(state): State<AppState>,
    Caller(principal): Caller,
) -> ApiResult<axum::Json<GuardList>> {
    Ok(axum::Json(GuardList {
        items: state.service.guard_list(&principal).await?,
    }))
}

/// Delete a guard no vault is bound to.
#[utoipa::path(delete, path = "/v1/guards/{guard_id}", tag = "safety",
    params(("guard_id" = Uuid, Path)),
    responses((status = 204),
              (status = 404, body = Problem, content_type = "application/problem+json", description = "guard_not_found"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "guard_in_use")))]
async fn delete_guard(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(guard_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    state.service.guard_delete(&principal, guard_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ask for an approval of an operation the vault's guard protects.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/approvals", tag = "safety",
    params(("vault_id" = Uuid, Path)),
    request_body = RequestApproval,
    responses((status = 201, body = ApprovalView, headers(("Location" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "vault_not_guarded")))]
async fn request_approval(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Json(req): Json<RequestApproval>,
) -> ApiResult<Response> {
    let approval = state
        .service
        .approval_request(&principal, vault_id, req)
        .await?;
    let at = format!("/v1/vaults/{vault_id}/approvals/{}", approval.id);
    Ok((StatusCode::CREATED, [location(at)], axum::Json(approval)).into_response())
}

/// The vault's approval requests, newest first.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/approvals", tag = "safety",
    params(("vault_id" = Uuid, Path)),
    responses((status = 200, body = ApprovalList)))]
async fn list_approvals(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
) -> ApiResult<axum::Json<ApprovalList>> {
    Ok(axum::Json(ApprovalList {
        items: state.service.approval_list(&principal, vault_id).await?,
    }))
}

/// Grant an approval request (approvers only, never one's own request).
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/approvals/{approval_id}/grant", tag = "safety",
    params(("vault_id" = Uuid, Path), ("approval_id" = Uuid, Path)),
    request_body = GrantApproval,
    responses((status = 200, body = ApprovalView),
              (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_self`: no one approves their own request; or `forbidden`"),
              (status = 404, body = Problem, content_type = "application/problem+json", description = "approval_not_found"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "`approval_decided` or `approval_expired`")))]
async fn grant_approval(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, approval_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<GrantApproval>,
) -> ApiResult<axum::Json<ApprovalView>> {
    Ok(axum::Json(
        state
            .service
            .approval_decide(&principal, vault_id, approval_id, Some(req))
            .await?,
    ))
}

/// Deny an approval request (approvers only, never one's own request).
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/approvals/{approval_id}/deny", tag = "safety",
    params(("vault_id" = Uuid, Path), ("approval_id" = Uuid, Path)),
    responses((status = 200, body = ApprovalView),
              (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_self`; or `forbidden`"),
              (status = 404, body = Problem, content_type = "application/problem+json", description = "approval_not_found"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "`approval_decided` or `approval_expired`")))]
async fn deny_approval(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, approval_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<ApprovalView>> {
    Ok(axum::Json(
        state
            .service
            .approval_decide(&principal, vault_id, approval_id, None)
            .await?,
    ))
}

/// Bring a soft-deleted item back, stopped with its recovery points retained.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/undelete", tag = "safety",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)),
    responses((status = 200, body = ProtectedItem),
              (status = 404, body = Problem, content_type = "application/problem+json", description = "protected_item_not_found"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "item_not_soft_deleted: never was, or undeleted already"),
              (status = 410, body = Problem, content_type = "application/problem+json", description = "undelete_period_over: the soft-delete period ended (the item is, or is being, purged)")))]
async fn undelete_protected_item(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<ProtectedItem>> {
    Ok(axum::Json(
        state
            .service
            .protected_item_undelete(&principal, vault_id, item_id)
            .await?,
    ))
}
