//! Registration, discovery, protectable items, protection and auto-protection, all scoped
//! to a vault.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use backvault_domain::protection::ProtectionState;
use backvault_service::auto_protection::{AutoProtection, CreateAutoProtection};
use backvault_service::jobs::Job;
use backvault_service::on_demand::OnDemandBackup;
use backvault_service::protectable_items::ProtectableContainer;
use backvault_service::protection::{
    ChangePolicy, ConfigureProtection, ConfigureProtectionResult, ItemQuery, ProtectedItem,
    StopProtection,
};
use backvault_service::recovery::RecoveryPoints;
use backvault_service::registration::DiscoveryCandidate;
use backvault_service::reports::RpoReport;
use backvault_service::restore::{RestorePlan, RestoreRequest, RestoreTarget};
use backvault_service::scheduler::{RunScheduler, SchedulerRun};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{ListParams, location};
use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::{Caller, IfMatch, Json, Path, Query, Tagged};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_discovery_candidates))
        .routes(routes!(discover_vm))
        .routes(routes!(rediscover_vm))
        .routes(routes!(unregister_vm))
        .routes(routes!(list_protectable_items))
        .routes(routes!(configure_protection, list_protected_items))
        .routes(routes!(get_protected_item, change_protected_item_policy))
        .routes(routes!(stop_protection))
        .routes(routes!(resume_protection))
        .routes(routes!(backup_now))
        .routes(routes!(enable_auto_protection, list_auto_protection))
        .routes(routes!(get_auto_protection, disable_auto_protection))
        .routes(routes!(list_recovery_points))
        .routes(routes!(plan_restore))
        .routes(routes!(start_restore))
        .routes(routes!(rpo_report))
        .routes(routes!(run_scheduler))
}

/// Run a scheduler tick now (admin). A server started with `--dev` also takes `now`, to
/// rehearse a schedule without waiting for it.
#[utoipa::path(post, path = "/v1/scheduler/run", tag = "scheduler", request_body = RunScheduler,
    responses((status = 200, body = SchedulerRun)))]
async fn run_scheduler(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Json(req): Json<RunScheduler>,
) -> ApiResult<axum::Json<SchedulerRun>> {
    Ok(axum::Json(
        state.service.scheduler_run(&principal, req).await?,
    ))
}

/// Recovery points of a protected item, with the continuous restorable time ranges.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/recovery-points", tag = "recovery",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)),
    responses((status = 200, body = RecoveryPoints)))]
async fn list_recovery_points(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<axum::Json<RecoveryPoints>> {
    Ok(axum::Json(
        state
            .service
            .recovery_points(&principal, vault_id, item_id)
            .await?,
    ))
}

/// The restore plan for an instant or a recovery point: the full, the latest
/// differential before it, and the logs up to it, in order, with sizes.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/restore-plan", tag = "recovery",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)), request_body = RestoreTarget,
    responses((status = 200, body = RestorePlan),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "point_not_covered")))]
async fn plan_restore(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<RestoreTarget>,
) -> ApiResult<axum::Json<RestorePlan>> {
    Ok(axum::Json(
        state
            .service
            .restore_plan(&principal, vault_id, item_id, &req)
            .await?,
    ))
}

/// Restore to the original database (overwrite) or under another name, on a VM of the vault.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/restore", tag = "recovery",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)), request_body = RestoreRequest,
    responses((status = 202, body = Job, headers(("Location" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json")))]
async fn start_restore(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<Response> {
    Ok(accepted_job(
        state
            .service
            .restore_start(&principal, vault_id, item_id, req)
            .await?,
    ))
}

/// RPO report: per protected item the latest backups, the gap the policy allows and
/// whether it is breached now, a page at a time (in item id order). The first page (no
/// `cursor`) also counts the whole vault: `protected` and `breached` are on it only.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/rpo", tag = "reports", params(("vault_id" = Uuid, Path), ListParams),
    responses((status = 200, body = RpoReport)))]
async fn rpo_report(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Query(p): Query<ListParams>,
) -> ApiResult<axum::Json<RpoReport>> {
    Ok(axum::Json(
        state
            .service
            .rpo_report(
                &principal,
                Some(vault_id),
                chrono::Utc::now(),
                p.cursor.as_deref(),
                p.limit,
            )
            .await?,
    ))
}

fn accepted_job(job: Job) -> Response {
    (
        StatusCode::ACCEPTED,
        [location(format!("/v1/jobs/{}", job.id))],
        axum::Json(job),
    )
        .into_response()
}

/// "Start Discovery": VMs of the vault's subscription not registered with any vault.
///
/// Each comes with the prerequisites it fails now (empty when it can be registered).
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/discovery", tag = "discovery", params(("vault_id" = Uuid, Path)),
    responses((status = 200, body = Vec<DiscoveryCandidate>)))]
async fn list_discovery_candidates(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
) -> ApiResult<axum::Json<Vec<DiscoveryCandidate>>> {
    Ok(axum::Json(
        state
            .service
            .discovery_candidates(&principal, vault_id)
            .await?,
    ))
}

/// "Discover DBs": register the VM with the vault and discover its databases.
///
/// Every failed prerequisite is reported at once (422 `prerequisites_failed`).
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/vms/{vm_id}/discover", tag = "discovery",
    params(("vault_id" = Uuid, Path), ("vm_id" = Uuid, Path)),
    responses((status = 202, body = Job, headers(("Location" = String))),
              (status = 422, body = Problem, content_type = "application/problem+json", description = "prerequisites_failed")))]
async fn discover_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, vm_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    Ok(accepted_job(
        state
            .service
            .vm_discover(&principal, vault_id, vm_id)
            .await?,
    ))
}

/// "Rediscover DBs" on a registered VM.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/vms/{vm_id}/rediscover", tag = "discovery",
    params(("vault_id" = Uuid, Path), ("vm_id" = Uuid, Path)),
    responses((status = 202, body = Job, headers(("Location" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "vm_not_registered")))]
async fn rediscover_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, vm_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    Ok(accepted_job(
        state
            .service
            .vm_rediscover(&principal, vault_id, vm_id)
            .await?,
    ))
}

/// Unregister a VM from the vault; refused while its databases are protected.
#[utoipa::path(delete, path = "/v1/vaults/{vault_id}/vms/{vm_id}", tag = "discovery",
    params(("vault_id" = Uuid, Path), ("vm_id" = Uuid, Path)),
    responses((status = 204), (status = 409, body = Problem, content_type = "application/problem+json")))]
async fn unregister_vm(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, vm_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    state
        .service
        .vm_unregister(&principal, vault_id, vm_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProtectableParams {
    /// Only databases not yet protected.
    #[serde(default)]
    pub unprotected_only: bool,
}

/// Registered instances and availability groups with their databases.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/protectable-items", tag = "discovery",
    params(("vault_id" = Uuid, Path), ProtectableParams),
    responses((status = 200, body = Vec<ProtectableContainer>)))]
async fn list_protectable_items(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Query(p): Query<ProtectableParams>,
) -> ApiResult<axum::Json<Vec<ProtectableContainer>>> {
    Ok(axum::Json(
        state
            .service
            .protectable_items(&principal, vault_id, p.unprotected_only)
            .await?,
    ))
}

/// Configure protection for databases with a policy of the vault.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items", tag = "protection",
    params(("vault_id" = Uuid, Path)), request_body = ConfigureProtection,
    responses((status = 202, body = ConfigureProtectionResult)))]
async fn configure_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Json(req): Json<ConfigureProtection>,
) -> ApiResult<Response> {
    let result = state
        .service
        .protection_configure(&principal, vault_id, req)
        .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(result)).into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProtectedItemList {
    pub items: Vec<ProtectedItem>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ItemParams {
    #[param(inline)]
    pub state: Option<ProtectionState>,
    /// Policy name.
    pub policy: Option<String>,
    pub vm_id: Option<Uuid>,
    pub auto_protected: Option<bool>,
    /// Items of this availability group's databases (its id from protectable items).
    pub availability_group_id: Option<Uuid>,
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

/// List protected items.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/protected-items", tag = "protection",
    params(("vault_id" = Uuid, Path), ItemParams),
    responses((status = 200, body = ProtectedItemList),
              (status = 422, body = Problem, content_type = "application/problem+json", description = "`policy_not_found`: the `policy` filter names no policy of the vault")))]
async fn list_protected_items(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Query(p): Query<ItemParams>,
) -> ApiResult<axum::Json<ProtectedItemList>> {
    let query = ItemQuery {
        state: p.state,
        policy: p.policy,
        vm_id: p.vm_id,
        auto_protected: p.auto_protected,
        availability_group_id: p.availability_group_id,
    };
    let page = state
        .service
        .protected_item_list(&principal, vault_id, &query, p.cursor.as_deref(), p.limit)
        .await?;
    Ok(axum::Json(ProtectedItemList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

fn item_response(item: ProtectedItem) -> ApiResult<Response> {
    Ok(Tagged::versioned(item.version, &item)?.into_response())
}

/// Get a protected item.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/protected-items/{item_id}", tag = "protection",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)),
    responses((status = 200, body = ProtectedItem, headers(("ETag" = String)))))]
async fn get_protected_item(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    item_response(
        state
            .service
            .protected_item_get(&principal, vault_id, item_id)
            .await?,
    )
}

/// Change a protected item's policy.
#[utoipa::path(patch, path = "/v1/vaults/{vault_id}/protected-items/{item_id}", tag = "protection",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path), ("If-Match" = Option<String>, Header)),
    request_body = ChangePolicy,
    responses((status = 200, body = ProtectedItem, headers(("ETag" = String))), (status = 412, body = Problem, content_type = "application/problem+json")))]
async fn change_protected_item_policy(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    IfMatch(expected): IfMatch,
    Json(req): Json<ChangePolicy>,
) -> ApiResult<Response> {
    let item = state
        .service
        .protected_item_change_policy(&principal, vault_id, item_id, expected, req)
        .await?;
    item_response(item)
}

/// Stop protection, deleting or retaining the recovery points.
///
/// `delete_data` deletes at once only on a vault with soft delete off and immutability
/// disabled (204). With soft delete on, the item becomes `soft_deleted` until its purge
/// (200, undelete within the period); on an immutable vault protection stops and the
/// points stay until each one expires (200, `stopped_retain_per_policy`).
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/stop", tag = "protection",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path), ("Backvault-Approval" = Option<Uuid>, Header, description = "A granted approval of this operation, on a vault whose guard covers it")), request_body = StopProtection,
    responses((status = 200, body = ProtectedItem, headers(("ETag" = String))), (status = 204, description = "Stopped and deleted"),
              (status = 403, body = Problem, content_type = "application/problem+json", description = "`approval_required`, `approval_not_granted`, `approval_expired`, `approval_used` or `approval_not_yours`: the vault's guard needs a usable approval of this operation (the code says why); or `forbidden`"),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "item_soft_deleted")))]
async fn stop_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<StopProtection>,
) -> ApiResult<Response> {
    match state
        .service
        .protected_item_stop(&principal, vault_id, item_id, req)
        .await?
    {
        Some(item) => item_response(item),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Resume stopped protection with a policy.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/resume", tag = "protection",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)), request_body = ChangePolicy,
    responses((status = 200, body = ProtectedItem, headers(("ETag" = String))), (status = 409, body = Problem, content_type = "application/problem+json")))]
async fn resume_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<ChangePolicy>,
) -> ApiResult<Response> {
    item_response(
        state
            .service
            .protected_item_resume(&principal, vault_id, item_id, req)
            .await?,
    )
}

/// Back up now (full, copy-only full, differential or log).
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/protected-items/{item_id}/backup", tag = "protection",
    params(("vault_id" = Uuid, Path), ("item_id" = Uuid, Path)), request_body = OnDemandBackup,
    responses((status = 202, body = Job, headers(("Location" = String))),
              (status = 409, body = Problem, content_type = "application/problem+json", description = "`item_not_protected`; `availability_group_no_replica`: no replica of the item's availability group can take this backup type now (the message says why)")))]
async fn backup_now(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, item_id)): Path<(Uuid, Uuid)>,
    Json(req): Json<OnDemandBackup>,
) -> ApiResult<Response> {
    Ok(accepted_job(
        state
            .service
            .protected_item_backup(&principal, vault_id, item_id, req)
            .await?,
    ))
}

/// Enable auto-protection on an instance or availability group.
#[utoipa::path(post, path = "/v1/vaults/{vault_id}/auto-protection", tag = "protection",
    params(("vault_id" = Uuid, Path)), request_body = CreateAutoProtection,
    responses((status = 201, body = AutoProtection, headers(("Location" = String))), (status = 409, body = Problem, content_type = "application/problem+json", description = "`auto_protection_exists`; `availability_group_replica_in_other_vault` or `availability_group_replica_not_registered`: a replica's VM of the group is not registered with this vault")))]
async fn enable_auto_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
    Json(req): Json<CreateAutoProtection>,
) -> ApiResult<Response> {
    let intent = state
        .service
        .auto_protection_create(&principal, vault_id, req)
        .await?;
    let at = format!("/v1/vaults/{vault_id}/auto-protection/{}", intent.id);
    Ok((StatusCode::CREATED, [location(at)], axum::Json(intent)).into_response())
}

/// List auto-protection intents.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/auto-protection", tag = "protection",
    params(("vault_id" = Uuid, Path)), responses((status = 200, body = Vec<AutoProtection>)))]
async fn list_auto_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(vault_id): Path<Uuid>,
) -> ApiResult<axum::Json<Vec<AutoProtection>>> {
    Ok(axum::Json(
        state
            .service
            .auto_protection_list(&principal, vault_id)
            .await?,
    ))
}

/// Get an auto-protection intent.
#[utoipa::path(get, path = "/v1/vaults/{vault_id}/auto-protection/{intent_id}", tag = "protection",
    params(("vault_id" = Uuid, Path), ("intent_id" = Uuid, Path)),
    responses((status = 200, body = AutoProtection, headers(("ETag" = String)))))]
async fn get_auto_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, intent_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let intent = state
        .service
        .auto_protection_get(&principal, vault_id, intent_id)
        .await?;
    Ok(Tagged::of(&intent)?.into_response())
}

/// Disable auto-protection; protected databases stay protected.
#[utoipa::path(delete, path = "/v1/vaults/{vault_id}/auto-protection/{intent_id}", tag = "protection",
    params(("vault_id" = Uuid, Path), ("intent_id" = Uuid, Path)),
    responses((status = 204)))]
async fn disable_auto_protection(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path((vault_id, intent_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    state
        .service
        .auto_protection_delete(&principal, vault_id, intent_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
