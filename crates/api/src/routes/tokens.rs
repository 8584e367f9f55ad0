//! Enrollment tokens (mint, list outstanding, revoke) and the revocation of any token.

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backvault_service::tokens::{
    CreateEnrollmentToken, EnrollmentToken, EnrollmentTokenRecord, RevokeToken,
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::ListParams;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_enrollment_tokens, create_enrollment_token))
        .routes(routes!(revoke_enrollment_token))
        .routes(routes!(revoke_token))
}

/// A response that carries a secret: no cache on the way may keep it.
pub fn no_store() -> (HeaderName, HeaderValue) {
    (header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollmentTokenList {
    pub items: Vec<EnrollmentTokenRecord>,
    pub next_cursor: Option<String>,
}

/// Mint a short-lived enrollment token for agents of one subscription.
///
/// Single-use unless `max_uses` says otherwise. Bound to one VM with `vm_name` and
/// `resource_group`, it may also re-enroll that VM when it already has an agent. The token
/// is in this response only.
#[utoipa::path(post, path = "/v1/enrollment-tokens", tag = "tokens", request_body = CreateEnrollmentToken,
    responses((status = 201, body = EnrollmentToken, headers(("Cache-Control" = String)))))]
async fn create_enrollment_token(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<CreateEnrollmentToken>,
) -> ApiResult<Response> {
    let token = state
        .service
        .enrollment_token_create(&principal, req)
        .await?;
    Ok((StatusCode::CREATED, [no_store()], axum::Json(token)).into_response())
}

/// List the enrollment tokens that can still enroll a VM (not revoked, not expired, uses
/// left), oldest first. The tokens themselves are never shown again.
#[utoipa::path(get, path = "/v1/enrollment-tokens", tag = "tokens", params(ListParams),
    responses((status = 200, body = EnrollmentTokenList)))]
async fn list_enrollment_tokens(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<EnrollmentTokenList>> {
    let page = state
        .service
        .enrollment_token_list(&principal, params.cursor.as_deref(), params.limit)
        .await?;
    Ok(axum::Json(EnrollmentTokenList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Revoke an enrollment token: it enrolls nothing more. Agents it enrolled keep working.
#[utoipa::path(delete, path = "/v1/enrollment-tokens/{token_id}", tag = "tokens", params(("token_id" = Uuid, Path)),
    responses((status = 204)))]
async fn revoke_enrollment_token(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(token_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    state
        .service
        .enrollment_token_revoke(&principal, token_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revoke a token by its id (`jti` claim): from the next request on, on every replica, it
/// answers 401 `token_revoked`. Agent tokens carry no id: remove the VM, or re-enroll it
/// with a token bound to it, to revoke them.
#[utoipa::path(post, path = "/v1/tokens/revoke", tag = "tokens", request_body = RevokeToken,
    responses((status = 204)))]
async fn revoke_token(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<RevokeToken>,
) -> ApiResult<StatusCode> {
    state.service.token_revoke(&principal, req).await?;
    Ok(StatusCode::NO_CONTENT)
}
