//! Restores: plans (the statements that reach an instant or a recovery point), restore
//! jobs to the original or another database and VM, and what a completed restore does to
//! the chains of the databases it overwrote.

use backvault_domain::agent::JobItem;
use backvault_domain::chain::PlanError;
use backvault_domain::chain::{self};
use backvault_domain::jobs::{JobKind, Priority};
use backvault_domain::restore::{
    Overwritten, RestoreJobPayload, RestoreStep, RestoreTargetFacts, check_restore_target,
    overwrite_mode,
};
use backvault_domain::text::check_instant;
use backvault_store::inventory::DatabaseRow;
use backvault_store::jobs as queue;
use backvault_store::recovery::{self as store, PointRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::jobs::{Job, new_job};
use crate::recovery::chain_point;
use crate::{Principal, Service};

/// Completed restores (their payloads) that overwrote protected databases: those items'
/// chains restart now (a new recovery fork), after any tail-log backup was recorded.
pub(crate) async fn restores_completed(
    tx: &mut PgConnection,
    payloads: &[&serde_json::Value],
) -> Result<()> {
    let items: Vec<Uuid> = payloads
        .iter()
        .filter_map(|p| RestoreJobPayload::deserialize(*p).ok())
        .flat_map(|p| p.overwritten_items)
        .collect();
    if !items.is_empty() {
        let chains = vec![chain::overwritten(); items.len()];
        store::chains_set(&mut *tx, &items, &chains).await?;
    }
    Ok(())
}

/// What to restore to: an instant, or a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreTarget {
    #[serde(default)]
    pub point_in_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub recovery_point_id: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RestorePlan {
    /// The statements to run, in order: a full (or copy-only full), at most one
    /// differential on it, then logs; all `WITH NORECOVERY` but the last, which recovers
    /// (with `STOPAT` when the instant lies inside its log).
    pub steps: Vec<RestoreStep>,
    pub total_size_bytes: i64,
    pub restores_to: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "point_in_time": "2026-11-30T14:05:00Z",
    "target_database": "sales_restored"
}))]
pub struct RestoreRequest {
    #[serde(default)]
    pub point_in_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub recovery_point_id: Option<Uuid>,
    /// A VM registered with the same vault; the original VM when absent.
    #[serde(default)]
    pub target_vm_id: Option<Uuid>,
    /// The database name to restore as; the original name when absent. A database of that
    /// name on the target instance is replaced only with `overwrite: true`; system
    /// databases are never targets.
    #[serde(default)]
    pub target_database: Option<String>,
    /// The SQL Server instance on the target VM; when absent, the item's instance, or on
    /// another replica of the item's availability group, the group's instance there.
    #[serde(default)]
    pub target_instance: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
    /// When overwriting the item's own database: back up the tail of its log first
    /// (`BACKUP LOG … WITH NORECOVERY`). The default where possible (full or bulk-logged
    /// recovery model); `false` overwrites `WITH REPLACE`, losing what was logged since
    /// the last log backup.
    #[serde(default)]
    pub tail_log_backup: Option<bool>,
}

/// A soft-deleted item's points are kept, not offered: undelete the item to restore.
fn refuse_soft_deleted(item: &backvault_store::protection::ProtectedItemRow) -> Result<()> {
    if item.state == backvault_domain::protection::ProtectionState::SoftDeleted {
        Err(crate::protection::item_soft_deleted())
    } else {
        Ok(())
    }
}

impl Service {
    pub async fn restore_plan(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
        target: &RestoreTarget,
    ) -> Result<RestorePlan> {
        let (item, rows) = self.item_points(principal, vault_id, item_id).await?;
        refuse_soft_deleted(&item)?;
        plan(&rows, target)
    }

    /// A restore job: to the original database (overwrite) or under another name, on the
    /// original VM or another one registered with the vault.
    pub async fn restore_start(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        item_id: Uuid,
        req: RestoreRequest,
    ) -> Result<Job> {
        principal.require(if req.overwrite {
            Operation::RestoreOverwrite
        } else {
            Operation::RestoreAsNew
        })?;
        let (item, rows) = self.item_points(principal, vault_id, item_id).await?;
        refuse_soft_deleted(&item)?;
        let target = RestoreTarget {
            point_in_time: req.point_in_time,
            recovery_point_id: req.recovery_point_id,
        };
        let plan = plan(&rows, &target)?;
        let target_vm = req.target_vm_id.unwrap_or(item.vm_id);
        let mut tx = self.pool.begin().await?;
        let vm = self.visible_vm(&mut *tx, principal, target_vm).await?;
        if backvault_store::inventory::vm_vault(&mut *tx, target_vm).await? != Some(vault_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_not_registered",
                "the target VM is not registered with this vault",
            ));
        }
        let database = req
            .target_database
            .clone()
            .unwrap_or_else(|| item.database_name.clone());
        // On another replica of the item's availability group, the group's instance there.
        let replica_instance = match (req.target_instance.is_none(), item.availability_group_id) {
            (true, Some(group)) if target_vm != item.vm_id => {
                backvault_store::availability::replica_instance(&mut *tx, group, target_vm).await?
            }
            _ => None,
        };
        let instance = req
            .target_instance
            .clone()
            .or(replica_instance)
            .unwrap_or_else(|| item.instance_name.clone());
        let instances = backvault_store::inventory::instance_names(&mut *tx, target_vm).await?;
        let instance_id = instances
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(&instance))
            .map(|(id, _)| *id);
        let databases = backvault_store::inventory::databases_of_vm(&mut *tx, target_vm).await?;
        let present: Vec<&DatabaseRow> = databases
            .iter()
            .filter(|d| Some(d.instance_id) == instance_id && d.gone_at.is_none())
            .collect();
        let existing: Vec<&str> = present.iter().map(|d| d.name.as_str()).collect();
        let violations = check_restore_target(RestoreTargetFacts {
            database: &database,
            overwrite: req.overwrite,
            instance_found: instance_id.is_some(),
            existing_databases: &existing,
        });
        if !violations.is_empty() {
            return Err(Error::validation(violations));
        }
        // One restore per target at a time (the queue's unique index settles a race).
        if let Some(running) =
            queue::restore_of_target(&mut *tx, target_vm, &instance, &database).await?
        {
            return Err(restore_in_progress(Some(running)));
        }
        let overwritten: Vec<&DatabaseRow> = present
            .iter()
            .copied()
            .filter(|d| req.overwrite && d.name.eq_ignore_ascii_case(&database))
            .collect();
        let overwritten_database = overwritten
            .iter()
            .find(|d| d.id == item.database_id)
            .or(overwritten.first())
            .map(|d| Overwritten {
                own_database: d.id == item.database_id,
                recovery_model: d.recovery_model,
                in_availability_group: d.availability_group_id.is_some(),
            });
        let mode = overwrite_mode(overwritten_database, req.tail_log_backup)
            .map_err(|v| Error::validation(vec![v]))?;
        // Overwriting a protected database starts a new recovery fork there: its chain
        // restarts with a full once the restore completes (a restore that never ran
        // overwrote nothing).
        let overwritten_ids: Vec<Uuid> = overwritten.iter().map(|d| d.id).collect();
        let overwritten_items: Vec<Uuid> = if overwritten_ids.is_empty() {
            Vec::new()
        } else {
            backvault_store::protection::items_for_databases(&mut *tx, &overwritten_ids)
                .await?
                .into_iter()
                .map(|p| p.item_id)
                .collect()
        };
        let payload = serde_json::to_value(RestoreJobPayload {
            target_database: database.clone(),
            target_instance: instance.clone(),
            overwrite: req.overwrite,
            tail_log_backup: mode.tail_log_backup,
            replace: mode.replace,
            restores_to: plan.restores_to,
            steps: plan.steps,
            overwritten_items,
        })
        .map_err(Error::internal)?;
        let items = [JobItem {
            instance: instance.clone(),
            database: database.clone(),
            protected_item_id: Some(item_id),
        }];
        let job = new_job(
            target_vm,
            &vm.subscription_id,
            Some(vault_id),
            JobKind::Restore,
            Priority::OnDemand,
            &items,
            payload,
        )?;
        let id = job.id;
        queue::jobs_enqueue(&mut tx, &[job])
            .await
            .on_constraint(queue::ONE_RESTORE_PER_TARGET, || restore_in_progress(None))?;
        tx.commit().await?;
        self.job_get(principal, id, None).await
    }
}

/// A restore of the same target (VM, instance, database) is queued or running.
fn restore_in_progress(job: Option<Uuid>) -> Error {
    let which = job.map_or_else(String::new, |id| format!(" (job {id})"));
    Error::new(
        ErrorKind::Conflict,
        "restore_in_progress",
        format!(
            "a restore of this database on the target VM's instance is queued or running{which}; wait for it to finish or cancel it"
        ),
    )
}

fn plan(rows: &[PointRow], target: &RestoreTarget) -> Result<RestorePlan> {
    let at = match (target.point_in_time, target.recovery_point_id) {
        (Some(at), None) => {
            if let Some(v) = check_instant(at, "/point_in_time") {
                return Err(Error::validation(vec![v]));
            }
            at
        }
        (None, Some(id)) => rows
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.backup_time)
            .ok_or_else(|| {
                Error::not_found(
                    "recovery_point_not_found",
                    format_args!("recovery point {id}"),
                )
            })?,
        _ => {
            let mut v = backvault_domain::violation::Violations::default();
            v.push(
                "",
                "restore_target_invalid",
                "give exactly one of point_in_time and recovery_point_id",
            );
            return Err(Error::validation(v.into_vec()));
        }
    };
    let points: Vec<chain::Point> = rows.iter().map(chain_point).collect();
    match chain::Catalogue::new(&points).plan_to(at) {
        Ok(sequence) => {
            let steps: Vec<RestoreStep> = sequence
                .steps
                .iter()
                .map(|step| {
                    let row = &rows[step.point];
                    RestoreStep {
                        recovery_point_id: row.id,
                        statement: step.statement,
                        backup_type: row.backup_type,
                        backup_time: row.backup_time,
                        backup_set_uuid: row.backup_set_uuid,
                        first_lsn: row.first_lsn.to_string(),
                        last_lsn: row.last_lsn.to_string(),
                        recovery: step.recovery,
                        stop_at: step.stop_at,
                    }
                })
                .collect();
            Ok(RestorePlan {
                // Sizes are agent-reported: a sum that cannot overflow.
                total_size_bytes: sequence.steps.iter().fold(0i64, |total, s| {
                    total.saturating_add(rows[s.point].size_bytes)
                }),
                restores_to: sequence.restores_to,
                steps,
            })
        }
        Err(PlanError::InsideBulkLoggedLog { log_from, log_to }) => Err(Error::new(
            ErrorKind::Conflict,
            "UserErrorRestoreNotPossibleBecauseLogBackupContainsBulkLoggedChanges",
            format!(
                "the log backup covering that instant holds bulk-logged changes: SQL Server restores it only to its end ({log_to}); choose {log_from} or {log_to}"
            ),
        )),
        Err(PlanError::NoFullBefore) => Err(Error::new(
            ErrorKind::Conflict,
            "point_not_covered",
            "no full backup exists before that instant",
        )),
        Err(PlanError::NotCovered { restorable }) => Err(Error::new(
            ErrorKind::Conflict,
            "point_not_covered",
            format!(
                "the log chain does not reach that instant; restorable ranges: {}",
                restorable
                    .iter()
                    .map(|r| format!("{} to {}", r.from, r.to))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
