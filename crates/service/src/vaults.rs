//! Vault use cases.

use backvault_domain::names::{
    MAX_REGION_CHARS, MAX_RESOURCE_GROUP_CHARS, MAX_SUBSCRIPTION_ID_CHARS, VaultName,
    check_identifier,
};
use backvault_domain::policy::{DEFAULT_POLICY_NAME, Policy};
use backvault_domain::violation::Violations;
use backvault_store::{policies, vaults};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::idempotency::idempotent;
use crate::pagination::{Page, page, page_request};
use crate::{Created, ExpectedVersion, Principal, Service};

/// A Recovery Services vault: where policies live and VMs register.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vault {
    pub id: Uuid,
    pub name: String,
    pub subscription_id: String,
    pub resource_group: String,
    pub region: String,
    pub description: String,
    /// Increases with every change; the `ETag` header carries it.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<vaults::VaultRow> for Vault {
    fn from(r: vaults::VaultRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            subscription_id: r.subscription_id,
            resource_group: r.resource_group,
            region: r.region,
            description: r.description,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "prod-sql",
    "subscription_id": "sub-1",
    "resource_group": "rg-sql",
    "region": "westeurope",
    "description": "Production SQL Server VMs"
}))]
pub struct CreateVault {
    /// 2–50 characters: letters, digits and hyphens, a letter first, no hyphen last.
    /// Unique per subscription and resource group, ignoring case.
    pub name: String,
    pub subscription_id: String,
    pub resource_group: String,
    pub region: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVault {
    /// The only mutable field: name, subscription, resource group and region are fixed
    /// for a vault's life, as in Azure.
    pub description: String,
}

/// The longest vault description.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

pub(crate) fn vault_not_found(id: Uuid) -> Error {
    Error::not_found("vault_not_found", format_args!("vault {id}"))
}

impl Service {
    /// Loads a vault the principal may see; others' vaults are indistinguishable from
    /// missing ones.
    pub(crate) async fn visible_vault(
        &self,
        db: impl sqlx::PgExecutor<'_>,
        principal: &Principal,
        id: Uuid,
    ) -> Result<vaults::VaultRow> {
        match vaults::vault_get(db, id).await? {
            Some(v) if principal.sees_subscription(&v.subscription_id) => Ok(v),
            _ => Err(vault_not_found(id)),
        }
    }

    pub async fn vault_create(
        &self,
        principal: &Principal,
        req: CreateVault,
        idempotency_key: Option<&str>,
    ) -> Result<Created<Vault>> {
        principal.require(Operation::CreateVault)?;
        let mut v = Violations::default();
        let name = VaultName::parse(&req.name, "/name").map_err(|e| v.extend(e));
        check_identifier(
            &req.subscription_id,
            "/subscription_id",
            "subscription_id",
            MAX_SUBSCRIPTION_ID_CHARS,
            &mut v,
        );
        check_identifier(
            &req.resource_group,
            "/resource_group",
            "resource_group",
            MAX_RESOURCE_GROUP_CHARS,
            &mut v,
        );
        check_identifier(&req.region, "/region", "region", MAX_REGION_CHARS, &mut v);
        if req.description.chars().count() > MAX_DESCRIPTION_CHARS {
            v.push(
                "/description",
                "description_too_long",
                "a description has at most 1024 characters",
            );
        }
        let name = match (name, v.is_empty()) {
            (Ok(name), true) => name,
            _ => return Err(Error::validation(v.into_vec())),
        };
        if !principal.sees_subscription(&req.subscription_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "your token does not grant this subscription",
            ));
        }

        let mut tx = self.pool.begin().await?;
        let created = idempotent(&mut tx, principal, idempotency_key, "vault_create", &req, async |tx| {
            let row = vaults::vault_insert(
                tx,
                vaults::NewVault {
                    id: Uuid::now_v7(),
                    subscription_id: &req.subscription_id,
                    resource_group: &req.resource_group,
                    name: name.as_str(),
                    region: &req.region,
                    description: &req.description,
                },
            )
            .await
            .on_constraint("vaults_name_key", || {
                Error::new(
                    ErrorKind::Conflict,
                    "vault_name_taken",
                    "a vault with this name already exists in the subscription and resource group (names ignore case)",
                )
            })?;
            let spec = serde_json::to_value(Policy::default_spec()).map_err(Error::internal)?;
            policies::policy_insert(tx, Uuid::now_v7(), row.id, DEFAULT_POLICY_NAME, &spec).await?;
            Ok(Vault::from(row))
        })
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn vault_get(&self, principal: &Principal, id: Uuid) -> Result<Vault> {
        principal.require(Operation::Read)?;
        Ok(self.visible_vault(&self.pool, principal, id).await?.into())
    }

    pub async fn vault_list(
        &self,
        principal: &Principal,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<Vault>> {
        principal.require(Operation::Read)?;
        let (request, limit) = page_request(cursor, limit)?;
        let rows =
            vaults::vault_list(&self.pool, principal.subscriptions.as_deref(), request).await?;
        Ok(page(rows, limit, |r| r.id, Vault::from))
    }

    pub async fn vault_update(
        &self,
        principal: &Principal,
        id: Uuid,
        expected: ExpectedVersion,
        req: UpdateVault,
    ) -> Result<Vault> {
        principal.require(Operation::UpdateVault)?;
        if req.description.chars().count() > MAX_DESCRIPTION_CHARS {
            let mut v = Violations::default();
            v.push(
                "/description",
                "description_too_long",
                "a description has at most 1024 characters",
            );
            return Err(Error::validation(v.into_vec()));
        }
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, id).await?;
        let row = vaults::vault_update(&mut tx, id, expected, &req.description)
            .await?
            .ok_or_else(Error::precondition_failed)?;
        tx.commit().await?;
        Ok(row.into())
    }

    pub async fn vault_delete(
        &self,
        principal: &Principal,
        id: Uuid,
        expected: ExpectedVersion,
    ) -> Result<()> {
        principal.require(Operation::DeleteVault)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, id).await?;
        let safety = self.vault_safety_locked(&mut tx, id).await?;
        self.require_approval(
            &mut tx,
            principal,
            id,
            &safety,
            backvault_domain::safety::GuardedOperation::DeleteVault,
            id,
        )
        .await?;
        let deleted = vaults::vault_delete(&mut tx, id, expected).await.on_foreign_key(|| {
            Error::new(
                ErrorKind::Conflict,
                "vault_not_empty",
                "the vault still has registered VMs, protected items (soft-deleted ones and those an immutable vault keeps until they expire included); stop protection and unregister them first",
            )
        })?;
        if !deleted {
            return Err(Error::precondition_failed());
        }
        tx.commit().await?;
        Ok(())
    }
}
