use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use backvault_service::vms::{UpsertVm, Vm, VmQuery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::location;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Path, Query, Tagged};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_vms, upsert_vm))
        .routes(routes!(get_vm, delete_vm))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VmList {
    pub items: Vec<Vm>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmListParams {
    pub subscription_id: Option<String>,
    pub resource_group: Option<String>,
    pub region: Option<String>,
    /// true: registered with a vault; false: not registered.
    pub registered: Option<bool>,
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
}

/// Add or update a VM from inventory automation (by subscription, resource group and name).
#[utoipa::path(put, path = "/v1/vms", tag = "vms", request_body = UpsertVm,
    responses((status = 200, body = Vm, description = "Updated", headers(("ETag" = String))),
              (status = 201, body = Vm, description = "Created", headers(("ETag" = String), ("Location" = String)))))]
async fn upsert_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<UpsertVm>,
) -> ApiResult<Response> {
    let (vm, created) = state.service.vm_upsert(&principal, req).await?;
    if !created {
        return Ok(Tagged::of(&vm)?.into_response());
    }
    let at = location(format!("/v1/vms/{}", vm.id));
    Ok((StatusCode::CREATED, [at], Tagged::of(&vm)?).into_response())
}

/// List the VMs of your subscriptions.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmListParams),
    responses((status = 200, body = VmList)))]
async fn list_vms(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(params): Query<VmListParams>,
) -> ApiResult<axum::Json<VmList>> {
    let query = VmQuery {
        subscription_id: params.subscription_id,
        resource_group: params.resource_group,
        region: params.region,
        registered: params.registered,
    };
    let page = state
        .service
        .vm_list(&principal, &query, params.cursor.as_deref(), params.limit)
        .await?;
    Ok(axum::Json(VmList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a VM.
#[utoipa::path(get, path = "/v1/vms/{vm_id}", tag = "vms", params(("vm_id" = Uuid, Path)),
    responses((status = 200, body = Vm, headers(("ETag" = String)))))]
async fn get_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vm_id): Path<Uuid>,
) -> ApiResult<Response> {
    let vm = state.service.vm_get(&principal, vm_id).await?;
    Ok(Tagged::of(&vm)?.into_response())
}

/// Remove a VM from the inventory, with its jobs; its agent's tokens stop working.
#[utoipa::path(delete, path = "/v1/vms/{vm_id}", tag = "vms", params(("vm_id" = Uuid, Path)),
    responses((status = 204)))]
async fn delete_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vm_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    state.service.vm_delete(&principal, vm_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
