//! Registering VMs with a vault: "Start Discovery" (candidates and their failed
//! prerequisites), "Discover DBs" and "Rediscover DBs", unregistering, and the periodic
//! discovery of registered VMs.

use backvault_domain::jobs::{JobKind, Priority};
use backvault_domain::protection::{VaultTarget, VmPrerequisites, check_registration};
use backvault_store::inventory::{self};
use backvault_store::jobs as queue;
use backvault_store::protection::{self as store};
use backvault_store::vms;
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{Job, new_job};
use crate::vms::{Vm, vm_not_found};
use crate::{Principal, Service};

/// A VM that "Start Discovery" lists, with what would stop its registration.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DiscoveryCandidate {
    pub vm: Vm,
    /// Prerequisites it fails now (empty: ready to register).
    pub issues: Vec<backvault_domain::Violation>,
}

impl Service {
    /// "Start Discovery": the VMs of the vault's subscription registered with no vault,
    /// each with the prerequisites it fails now.
    pub async fn discovery_candidates(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<Vec<DiscoveryCandidate>> {
        principal.require(Operation::Read)?;
        let vault = self.visible_vault(&self.pool, principal, vault_id).await?;
        let rows = inventory::vms_unregistered(&self.pool, &vault.subscription_id).await?;
        let now = self.now();
        let vault_id_text = vault.id.to_string();
        let target = VaultTarget {
            id: &vault_id_text,
            subscription_id: &vault.subscription_id,
            region: &vault.region,
        };
        Ok(rows
            .into_iter()
            .map(|row| {
                let vm = Vm::from(row);
                let issues = check_registration(
                    &prerequisites(&vm, None),
                    &target,
                    now,
                    self.config.agent_heard_within,
                );
                DiscoveryCandidate { vm, issues }
            })
            .collect())
    }

    /// "Discover DBs": checks every prerequisite, registers the VM with the vault and
    /// dispatches a discovery job to its agent.
    pub async fn vm_discover(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<Job> {
        principal.require(Operation::RegisterVm)?;
        let mut tx = self.pool.begin().await?;
        let vault = self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = inventory::vm_lock(&mut tx, vm_id)
            .await?
            .filter(|vm| principal.sees_subscription(&vm.subscription_id))
            .ok_or_else(|| vm_not_found(vm_id))?;
        let registered = inventory::vm_vault(&mut *tx, vm_id)
            .await?
            .map(|v| v.to_string());
        let vm = Vm::from(row);
        let vault_id_text = vault.id.to_string();
        let target = VaultTarget {
            id: &vault_id_text,
            subscription_id: &vault.subscription_id,
            region: &vault.region,
        };
        let issues = check_registration(
            &prerequisites(&vm, registered.as_deref()),
            &target,
            self.now(),
            self.config.agent_heard_within,
        );
        if !issues.is_empty() {
            let mut e = Error::validation(issues);
            e.code = "prerequisites_failed";
            e.message = format!("the VM cannot be registered with this vault: {}", e.message);
            return Err(e);
        }
        inventory::vm_register(
            &mut tx,
            vm_id,
            vault_id,
            backvault_domain::instants::later(self.now(), self.config.discovery_period),
        )
        .await?;
        let job = discovery_job(vm_id, &vm.subscription_id, vault_id, Priority::OnDemand)?;
        tracing::info!(vm.id = %vm_id, vault.id = %vault_id, "VM registered; discovery dispatched");
        self.commit_with_job(principal, tx, job).await
    }

    /// "Rediscover DBs" for a VM registered with this vault.
    pub async fn vm_rediscover(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<Job> {
        principal.require(Operation::RegisterVm)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let vm = self
            .registered_vm(&mut tx, principal, vault_id, vm_id)
            .await?;
        let job = discovery_job(vm_id, &vm.subscription_id, vault_id, Priority::OnDemand)?;
        self.commit_with_job(principal, tx, job).await
    }

    async fn registered_vm(
        &self,
        conn: &mut PgConnection,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<vms::VmRow> {
        let vm = self.visible_vm(&mut *conn, principal, vm_id).await?;
        if inventory::vm_vault(&mut *conn, vm_id).await? != Some(vault_id) {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_not_registered",
                "the VM is not registered with this vault",
            ));
        }
        Ok(vm)
    }

    /// Unregisters a VM; refused while any of its databases is protected.
    pub async fn vm_unregister(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        vm_id: Uuid,
    ) -> Result<()> {
        principal.require(Operation::UnregisterVm)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        inventory::vm_lock(&mut tx, vm_id).await?;
        self.registered_vm(&mut tx, principal, vault_id, vm_id)
            .await?;
        if store::items_on_vm(&mut *tx, vm_id).await? > 0 {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vm_has_protected_items",
                "databases on this VM are protected; stop protection (and delete their data) first",
            ));
        }
        inventory::vm_unregister(&mut tx, vm_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Dispatches the periodic discovery of registered VMs that are due. Safe across
    /// replicas: each due VM is claimed by one of them and moved to its next period.
    pub async fn discover_due_vms(&self) -> Result<usize> {
        let mut tx = self.pool.begin().await?;
        let due =
            inventory::vms_claim_discovery_due(&mut tx, self.config.discovery_period, 500).await?;
        let jobs = due
            .iter()
            .map(|vm| discovery_job(vm.id, &vm.subscription_id, vm.vault_id, Priority::Scheduled))
            .collect::<Result<Vec<_>>>()?;
        queue::jobs_enqueue(&mut tx, &jobs).await?;
        tx.commit().await?;
        Ok(jobs.len())
    }
}

fn discovery_job(
    vm_id: Uuid,
    subscription: &str,
    vault_id: Uuid,
    priority: Priority,
) -> Result<queue::NewJob> {
    new_job(
        vm_id,
        subscription,
        Some(vault_id),
        JobKind::Discovery,
        priority,
        &[],
        serde_json::json!({}),
    )
}

fn prerequisites<'a>(vm: &'a Vm, registered_vault: Option<&'a str>) -> VmPrerequisites<'a> {
    VmPrerequisites {
        name: &vm.name,
        resource_group: &vm.resource_group,
        subscription_id: &vm.subscription_id,
        region: &vm.region,
        deployment_model: vm.deployment_model,
        agent_installed: vm.agent_installed,
        last_seen_at: vm.last_seen_at,
        dotnet_version: vm.dotnet_version.as_deref(),
        other_backup_product: vm.other_backup_product,
        registered_vault,
    }
}
