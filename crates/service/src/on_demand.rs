//! On-demand backups ("Backup now") of a protected item.

use backvault_domain::agent::JobItem;
use backvault_domain::availability::{Placement, placement};
use backvault_domain::jobs::{BackupPayload, JobKind, Priority};
use backvault_domain::protection::{
    OnDemandTarget, OnDemandType, ProtectionState, check_on_demand,
};
use backvault_store::protection::{self as store};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{Job, new_job};
use crate::{Principal, Service};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnDemandBackup {
    #[serde(rename = "type")]
    pub backup_type: OnDemandType,
    /// Full: 45 to 36159 days; copy-only full: 1 to 36159 days; differential and log:
    /// none (they follow the policy).
    #[serde(default)]
    pub retention_days: Option<u32>,
}

impl Service {
    /// An on-demand backup of one protected database, as a job for its VM's agent.
    pub async fn protected_item_backup(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        req: OnDemandBackup,
    ) -> Result<Job> {
        principal.require(Operation::BackupNow)?;
        let mut tx = self.pool.begin().await?;
        let item = self.visible_item(&mut tx, principal, vault_id, id).await?;
        if item.state != ProtectionState::Protected {
            return Err(Error::new(
                ErrorKind::Conflict,
                "item_not_protected",
                format!(
                    "the item is {}; backups need it protected",
                    item.state.as_str()
                ),
            ));
        }
        let midnight = self
            .now()
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        let fulls_today = store::on_demand_fulls_since(&mut *tx, id, midnight).await?;
        let issues = check_on_demand(
            req.backup_type,
            req.retention_days,
            OnDemandTarget {
                database_name: &item.database_name,
                read_only: item.read_only,
                recovery_model: item.recovery_model,
                on_demand_fulls_today: fulls_today,
            },
        );
        if !issues.is_empty() {
            return Err(Error::validation(issues));
        }
        let (kind, copy_only) = match req.backup_type {
            OnDemandType::Full => (JobKind::BackupFull, false),
            OnDemandType::CopyOnlyFull => (JobKind::BackupFull, true),
            OnDemandType::Differential => (JobKind::BackupDifferential, false),
            OnDemandType::Log => (JobKind::BackupLog, false),
        };
        // A group database's backup runs where its group's route says now.
        let (vm_id, instance) = match item.availability_group_id {
            None => (item.vm_id, item.instance_name.clone()),
            Some(group) => {
                self.refresh_routes(&mut tx, Some(&[group])).await?;
                let placement = placement(req.backup_type.point_type());
                let to = backvault_store::availability::route_of(
                    &mut *tx,
                    group,
                    placement == Placement::PrimaryOnly,
                )
                .await?;
                match (to.vm_id, to.instance) {
                    (Some(vm), Some(instance)) => (vm, instance),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Conflict,
                            "availability_group_no_replica",
                            to.unroutable.unwrap_or_else(|| {
                                "no replica of the availability group can take this backup now"
                                    .to_owned()
                            }),
                        ));
                    }
                }
            }
        };
        let items = [JobItem {
            instance,
            database: item.database_name.clone(),
            protected_item_id: Some(id),
        }];
        let payload = serde_json::to_value(BackupPayload {
            copy_only: Some(copy_only),
            retention_days: req.retention_days,
            on_demand: Some(true),
            ..BackupPayload::default()
        })
        .map_err(Error::internal)?;
        let mut job = new_job(
            vm_id,
            &item.subscription_id,
            Some(vault_id),
            kind,
            Priority::OnDemand,
            &items,
            payload,
        )?;
        job.availability_group_id = item.availability_group_id;
        self.commit_with_job(principal, tx, job).await
    }
}
