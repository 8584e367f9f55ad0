//! The VM inventory.

use backvault_domain::agent::{DeploymentModel, VmFacts};
use backvault_domain::names::{
    MAX_REGION_CHARS, MAX_RESOURCE_GROUP_CHARS, MAX_SUBSCRIPTION_ID_CHARS, MAX_VM_NAME_CHARS,
    check_identifier,
};
use backvault_domain::violation::Violations;
use backvault_store::vms::{self, VmFactsRow, VmRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::pagination::{Page, page, page_request};
use crate::{Principal, Service};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub resource_group: String,
    pub subscription_id: String,
    pub region: String,
    pub deployment_model: DeploymentModel,
    pub agent_installed: bool,
    pub agent_version: Option<String>,
    pub dotnet_version: Option<String>,
    pub sql_iaas_extension: bool,
    pub other_backup_product: bool,
    /// When its agent was last heard from.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The vault it is registered with; none while unregistered.
    pub vault_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<VmRow> for Vm {
    fn from(r: VmRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            resource_group: r.resource_group,
            subscription_id: r.subscription_id,
            region: r.region,
            deployment_model: r.deployment_model,
            agent_installed: r.agent_installed,
            agent_version: r.agent_version,
            dotnet_version: r.dotnet_version,
            sql_iaas_extension: r.sql_iaas_extension,
            other_backup_product: r.other_backup_product,
            last_seen_at: r.last_seen_at,
            vault_id: r.vault_id,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// A VM as inventory automation reports it (agents report the rest when they enroll).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpsertVm {
    pub name: String,
    pub resource_group: String,
    pub subscription_id: String,
    pub region: String,
    pub deployment_model: DeploymentModel,
}

#[derive(Debug, Clone, Default)]
pub struct VmQuery {
    pub subscription_id: Option<String>,
    pub resource_group: Option<String>,
    pub region: Option<String>,
    pub registered: Option<bool>,
}

/// Checks the identity fields of reported facts and the size of the free-form ones;
/// pointers are under `base`.
pub(crate) fn check_facts(facts: &VmFacts, base: &str) -> Result<()> {
    let mut v = Violations::default();
    check_identifier(
        &facts.name,
        &format!("{base}/name"),
        "name",
        MAX_VM_NAME_CHARS,
        &mut v,
    );
    check_identifier(
        &facts.resource_group,
        &format!("{base}/resource_group"),
        "resource_group",
        MAX_RESOURCE_GROUP_CHARS,
        &mut v,
    );
    check_identifier(
        &facts.subscription_id,
        &format!("{base}/subscription_id"),
        "subscription_id",
        MAX_SUBSCRIPTION_ID_CHARS,
        &mut v,
    );
    check_identifier(
        &facts.region,
        &format!("{base}/region"),
        "region",
        MAX_REGION_CHARS,
        &mut v,
    );
    v.extend(facts.size_violations(base));
    v.finish(()).map_err(Error::validation)
}

pub(crate) fn facts_row(f: &VmFacts) -> VmFactsRow<'_> {
    VmFactsRow {
        subscription_id: &f.subscription_id,
        resource_group: &f.resource_group,
        name: &f.name,
        region: &f.region,
        deployment_model: f.deployment_model,
        agent_version: &f.agent_version,
        dotnet_version: &f.dotnet_version,
        sql_iaas_extension: f.sql_iaas_extension,
        other_backup_product: f.other_backup_product,
    }
}

pub(crate) fn vm_not_found(id: Uuid) -> Error {
    Error::not_found("vm_not_found", format_args!("VM {id}"))
}

impl Service {
    pub(crate) async fn visible_vm(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        principal: &Principal,
        id: Uuid,
    ) -> Result<VmRow> {
        match vms::vm_get(db, id).await? {
            Some(vm) if principal.sees_subscription(&vm.subscription_id) => Ok(vm),
            _ => Err(vm_not_found(id)),
        }
    }

    pub async fn vm_get(&self, principal: &Principal, id: Uuid) -> Result<Vm> {
        principal.require(Operation::Read)?;
        Ok(self.visible_vm(&self.pool, principal, id).await?.into())
    }

    pub async fn vm_list(
        &self,
        principal: &Principal,
        query: &VmQuery,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<Vm>> {
        principal.require(Operation::Read)?;
        let mut v = Violations::default();
        for (name, value, max) in [
            (
                "subscription_id",
                &query.subscription_id,
                MAX_SUBSCRIPTION_ID_CHARS,
            ),
            (
                "resource_group",
                &query.resource_group,
                MAX_RESOURCE_GROUP_CHARS,
            ),
            ("region", &query.region, MAX_REGION_CHARS),
        ] {
            if let Some(value) = value {
                check_identifier(value, name, name, max, &mut v);
            }
        }
        if let Some(fault) = v.into_vec().into_iter().next() {
            // A filter no VM can match is a malformed query, not an empty page.
            return Err(Error::new(
                ErrorKind::BadRequest,
                "invalid_query",
                fault.message,
            ));
        }
        let (request, limit) = page_request(cursor, limit)?;
        let filter = vms::VmFilter {
            subscriptions: principal.subscriptions.as_deref(),
            subscription_id: query.subscription_id.as_deref(),
            resource_group: query.resource_group.as_deref(),
            region: query.region.as_deref(),
            registered: query.registered,
        };
        let rows = vms::vm_list(&self.pool, &filter, request).await?;
        Ok(page(rows, limit, |r| r.id, Vm::from))
    }

    /// Inventory automation adds or updates a VM; returns it and whether it is new.
    pub async fn vm_upsert(&self, principal: &Principal, req: UpsertVm) -> Result<(Vm, bool)> {
        principal.require(Operation::UpsertVm)?;
        let facts = VmFacts {
            name: req.name,
            resource_group: req.resource_group,
            subscription_id: req.subscription_id,
            region: req.region,
            deployment_model: req.deployment_model,
            agent_version: String::new(),
            dotnet_version: String::new(),
            sql_iaas_extension: false,
            other_backup_product: false,
        };
        check_facts(&facts, "")?;
        if !principal.sees_subscription(&facts.subscription_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "your token does not grant this subscription",
            ));
        }
        let mut tx = self.pool.begin().await?;
        let upserted = vms::vm_upsert(&mut tx, Uuid::now_v7(), &facts_row(&facts)).await?;
        tx.commit().await?;
        Ok((upserted.vm.into(), upserted.created))
    }

    /// Removes a VM, its jobs and (through its token generation) its agent's tokens.
    pub async fn vm_delete(&self, principal: &Principal, id: Uuid) -> Result<()> {
        principal.require(Operation::DeleteVm)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vm(&mut *tx, principal, id).await?;
        vms::vm_delete(&mut tx, id).await.on_foreign_key(|| {
            Error::new(
                ErrorKind::Conflict,
                "vm_has_protected_items",
                "databases on this VM are protected; stop protection (and delete their data) first",
            )
        })?;
        backvault_store::jobs::notify(&mut *tx, &backvault_store::jobs::notify_payload('g', [id]))
            .await?;
        tx.commit().await?;
        self.notifier.forget_generations(&id.to_string());
        Ok(())
    }
}
