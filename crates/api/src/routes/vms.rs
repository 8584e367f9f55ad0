use axum::extract::State;
use axum::http::StatusCode;
use backvault_service::vms::Vm;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::ListParams;
use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::{Caller, Path, Query};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_vms))
        .routes(routes!(get_vm, delete_vm))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmList {
    pub items: Vec<Vm>,
    pub next_cursor: Option<String>,
}

/// List the VMs of your subscriptions.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(ListParams),
    responses((status = 200, body = VmList), (status = 400, body = Problem, content_type = "application/problem+json")))]
async fn list_vms(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<VmList>> {
    let page = state
        .service
        .vm_list(&principal, params.cursor.as_deref(), params.limit)
        .await?;
    Ok(axum::Json(VmList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a VM.
#[utoipa::path(get, path = "/v1/vms/{vm_id}", tag = "vms", params(("vm_id" = Uuid, Path)),
    responses((status = 200, body = Vm), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vm_id): Path<Uuid>,
) -> ApiResult<axum::Json<Vm>> {
    Ok(axum::Json(state.service.vm_get(&principal, vm_id).await?))
}

/// Remove a VM from the inventory, with its jobs; its agent's tokens stop working.
#[utoipa::path(delete, path = "/v1/vms/{vm_id}", tag = "vms", params(("vm_id" = Uuid, Path)),
    responses((status = 204), (status = 403, body = Problem, content_type = "application/problem+json"),
              (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn delete_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vm_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    state.service.vm_delete(&principal, vm_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
