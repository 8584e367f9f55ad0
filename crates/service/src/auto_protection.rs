//! Auto-protection intents on an instance or availability group: create (protecting
//! what is there now), list, read, delete, and protecting databases discovery finds
//! later.

use backvault_domain::protection::NameIssue;
use backvault_domain::violation::Violations;
use backvault_store::inventory::{self, DatabaseRow};
use backvault_store::policies;
use backvault_store::protection::{self as store, IntentRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::protectable_items::vm_name_issues;
use crate::{Principal, Service};

/// Configure-protection jobs of auto-protection are retried 3 times after the first try.
const AUTO_PROTECTION_ATTEMPTS: i32 = 4;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAutoProtection {
    /// A standalone instance (from protectable items); or give `availability_group_id`.
    #[serde(default)]
    pub instance_id: Option<Uuid>,
    #[serde(default)]
    pub availability_group_id: Option<Uuid>,
    pub policy: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AutoProtection {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub policy: String,
    pub instance_id: Option<Uuid>,
    pub availability_group_id: Option<Uuid>,
    pub target_name: String,
    pub created_at: DateTime<Utc>,
    /// Jobs that protect the databases found when the intent was created.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<Uuid>,
}

impl From<IntentRow> for AutoProtection {
    fn from(r: IntentRow) -> Self {
        Self {
            id: r.id,
            vault_id: r.vault_id,
            policy: r.policy_name,
            instance_id: r.instance_id,
            availability_group_id: r.availability_group_id,
            target_name: r.target_name,
            created_at: r.created_at,
            jobs: Vec::new(),
        }
    }
}

impl Service {
    /// Protects every present, unprotected database under the intent whose name allows
    /// auto-protection, with configure-protection jobs of at most 50 databases per VM.
    pub(crate) async fn auto_protect(
        &self,
        tx: &mut PgConnection,
        intent: &IntentRow,
    ) -> Result<Vec<Uuid>> {
        if let Some(group) = intent.availability_group_id {
            let issues =
                crate::availability::group_issues(&mut *tx, intent.vault_id, &[group]).await?;
            if let Some(issue) = issues.get(&group).copied().flatten() {
                tracing::warn!(intent = %intent.id, group = %group, code = issue.code(), "auto-protection skips a group the vault cannot protect");
                return Ok(Vec::new());
            }
        }
        let candidates =
            store::unprotected_under(&mut *tx, intent.instance_id, intent.availability_group_id)
                .await?;
        let mut vm_ids: Vec<Uuid> = candidates.iter().map(|d| d.vm_id).collect();
        vm_ids.sort_unstable();
        vm_ids.dedup();
        let issues = vm_name_issues(&inventory::databases_of_vms(&mut *tx, &vm_ids).await?);
        let eligible: Vec<DatabaseRow> = candidates
            .into_iter()
            .filter(|d| {
                issues
                    .get(&d.id)
                    .copied()
                    .flatten()
                    .is_none_or(NameIssue::auto_protection_allowed)
            })
            .collect();
        self.protect(
            tx,
            intent.vault_id,
            intent.policy_id,
            Some(intent.id),
            eligible,
            AUTO_PROTECTION_ATTEMPTS,
        )
        .await
    }

    /// Enables auto-protection on an instance or availability group, and protects what is
    /// there now.
    pub async fn auto_protection_create(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: CreateAutoProtection,
    ) -> Result<AutoProtection> {
        principal.require(Operation::ManageAutoProtection)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let mut v = Violations::default();
        let policy = policies::policy_get(&mut *tx, vault_id, &req.policy).await?;
        if policy.is_none() {
            v.push(
                "/policy",
                "policy_not_found",
                format!("the vault has no policy '{}'", req.policy),
            );
        }
        let in_vault = match (req.instance_id, req.availability_group_id) {
            (Some(_), None) | (None, Some(_)) => {
                inventory::target_in_vault(
                    &mut *tx,
                    req.instance_id,
                    req.availability_group_id,
                    vault_id,
                )
                .await?
            }
            _ => {
                v.push(
                    "",
                    "auto_protection_target_invalid",
                    "give exactly one of instance_id and availability_group_id",
                );
                false
            }
        };
        let Some(policy_id) = policy.map(|p| p.id).filter(|_| v.is_empty()) else {
            return Err(Error::validation(v.into_vec()));
        };
        if !in_vault {
            return Err(Error::not_found(
                "auto_protection_target_not_found",
                "the instance or availability group on a VM of this vault",
            ));
        }
        if let Some(group) = req.availability_group_id {
            let issues = crate::availability::group_issues(&mut tx, vault_id, &[group]).await?;
            if let Some(issue) = issues.get(&group).copied().flatten() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    issue.code(),
                    issue.message(),
                ));
            }
        }
        let id = Uuid::now_v7();
        store::intent_insert(
            &mut tx,
            id,
            vault_id,
            policy_id,
            req.instance_id,
            req.availability_group_id,
        )
        .await
        .map_err(Error::from)
        .map_err(|e| {
            match e
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<sqlx::Error>())
            {
                Some(sqlx::Error::Database(db)) if db.is_unique_violation() => Error::new(
                    ErrorKind::Conflict,
                    "auto_protection_exists",
                    "auto-protection is already on for this target",
                ),
                _ => e,
            }
        })?;
        let intent = store::intent_get(&mut *tx, id)
            .await?
            .ok_or_else(|| Error::internal("intent vanished"))?;
        let jobs = self.auto_protect(&mut tx, &intent).await?;
        tx.commit().await?;
        let mut out = AutoProtection::from(intent);
        out.jobs = jobs;
        Ok(out)
    }

    pub async fn auto_protection_list(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<Vec<AutoProtection>> {
        principal.require(Operation::Read)?;
        self.visible_vault(&self.pool, principal, vault_id).await?;
        Ok(store::intents_of_vault(&self.pool, vault_id)
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    pub async fn auto_protection_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<AutoProtection> {
        principal.require(Operation::Read)?;
        self.visible_vault(&self.pool, principal, vault_id).await?;
        store::intent_get(&self.pool, id)
            .await?
            .filter(|i| i.vault_id == vault_id)
            .map(Into::into)
            .ok_or_else(|| {
                Error::not_found(
                    "auto_protection_not_found",
                    format_args!("auto-protection {id}"),
                )
            })
    }

    /// Disables auto-protection; what it protected stays protected.
    pub async fn auto_protection_delete(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<()> {
        principal.require(Operation::ManageAutoProtection)?;
        self.auto_protection_get(principal, vault_id, id).await?;
        let mut tx = self.pool.begin().await?;
        store::intent_delete(&mut tx, id).await?;
        tx.commit().await?;
        Ok(())
    }
}
