//! Policy use cases, scoped to a vault, and the preview that shows a policy's effect
//! without saving it.

use backvault_domain::jobs::JobKind;
use backvault_domain::names::PolicyName;
use backvault_domain::policy::{Policy, PolicySpec};
use backvault_domain::preview::{IMMUTABLE_EXISTING_POINTS, MAX_PREVIEW_RUNS, PolicyPreview};
use backvault_domain::safety::{GuardedOperation, shortens_retention};
use backvault_store::policies::{self, PolicyPageRow, PolicyRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::idempotency::idempotent;
use crate::pagination::{Page, page, page_request};
use crate::recovery::policy_of;
use crate::vaults::vault_not_found;
use crate::{Created, ExpectedVersion, Principal, Service};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackupPolicy {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub name: String,
    pub spec: PolicySpec,
    /// Increases with every change; the `ETag` header carries it.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<PolicyPageRow> for BackupPolicy {
    fn from(r: PolicyPageRow) -> Self {
        Self {
            id: r.id,
            vault_id: r.vault_id,
            name: r.name,
            spec: r.spec.0,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

impl TryFrom<PolicyRow> for BackupPolicy {
    type Error = Error;
    fn try_from(r: PolicyRow) -> Result<Self> {
        Ok(Self {
            id: r.id,
            vault_id: r.vault_id,
            name: r.name,
            spec: serde_json::from_value(r.spec.0).map_err(Error::internal)?,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "Gold",
    "spec": {
        "time_zone": "Europe/Amsterdam",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
        "differential": {"days": ["wednesday"], "time": "22:00", "retention_days": 30},
        "log": {"frequency_minutes": 30, "retention_days": 14},
        "retention": {"weekly": {"weeks": 8}},
        "compression": true
    }
}))]
pub struct CreatePolicy {
    /// Unique within the vault, ignoring case.
    pub name: String,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplacePolicy {
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyPolicy {
    pub target_vault_id: Uuid,
    /// Name in the target vault; the source's name when absent.
    #[serde(default)]
    pub name: Option<String>,
}

fn policy_not_found(name: &str) -> Error {
    Error::not_found("policy_not_found", format_args!("policy '{name}'"))
}

fn name_taken() -> Error {
    Error::new(
        ErrorKind::Conflict,
        "policy_name_taken",
        "the vault already has a policy with this name (names ignore case)",
    )
}

/// The spec as stored, and the policy it validates to.
fn validated(spec: &PolicySpec) -> Result<(serde_json::Value, Policy)> {
    let policy = spec.validate("/spec").map_err(Error::validation)?;
    Ok((serde_json::to_value(spec).map_err(Error::internal)?, policy))
}

impl Service {
    async fn visible_policy(
        &self,
        db: &mut sqlx::PgConnection,
        principal: &Principal,
        vault_id: Uuid,
        name: &str,
    ) -> Result<PolicyRow> {
        self.visible_vault(&mut *db, principal, vault_id).await?;
        policies::policy_get(db, vault_id, name)
            .await?
            .ok_or_else(|| policy_not_found(name))
    }

    pub async fn policy_create(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: CreatePolicy,
        idempotency_key: Option<&str>,
    ) -> Result<Created<BackupPolicy>> {
        principal.require(Operation::WritePolicy)?;
        let name_check = PolicyName::parse(&req.name, "/name");
        let spec_check = req.spec.validate("/spec");
        if name_check.is_err() || spec_check.is_err() {
            let violations = name_check
                .err()
                .into_iter()
                .chain(spec_check.err())
                .flatten()
                .collect();
            return Err(Error::validation(violations));
        }
        let spec = serde_json::to_value(&req.spec).map_err(Error::internal)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        if let Ok(policy) = &spec_check {
            self.check_policy_bounds(&mut tx, vault_id, policy).await?;
        }
        let created = idempotent(
            &mut tx,
            principal,
            idempotency_key,
            "policy_create",
            &(vault_id, &req),
            async |tx| {
                policies::policy_insert(tx, Uuid::now_v7(), vault_id, &req.name, &spec)
                    .await
                    .on_constraint("policies_name_key", name_taken)?
                    .try_into()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub async fn policy_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        name: &str,
    ) -> Result<BackupPolicy> {
        principal.require(Operation::Read)?;
        let mut conn = self.pool.acquire().await?;
        self.visible_policy(&mut conn, principal, vault_id, name)
            .await?
            .try_into()
    }

    pub async fn policy_list(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<BackupPolicy>> {
        principal.require(Operation::Read)?;
        let (request, limit) = page_request(cursor, limit)?;
        // The page carries its vault's subscription: a page that has rows needs no statement
        // of its own to check that the caller sees the vault. An empty page may be a missing
        // vault, which is a 404 as before.
        let rows = policies::policy_list(&self.pool, vault_id, request).await?;
        match rows.first() {
            Some(row) if !principal.sees_subscription(&row.vault_subscription_id) => {
                return Err(vault_not_found(vault_id));
            }
            Some(_) => {}
            None => {
                self.visible_vault(&self.pool, principal, vault_id).await?;
            }
        }
        Ok(page(rows, limit, |r| r.id, BackupPolicy::from))
    }

    pub async fn policy_replace(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        name: &str,
        expected: ExpectedVersion,
        req: ReplacePolicy,
    ) -> Result<BackupPolicy> {
        principal.require(Operation::WritePolicy)?;
        let (spec, new_policy) = validated(&req.spec)?;
        let mut tx = self.pool.begin().await?;
        let current = self
            .visible_policy(&mut tx, principal, vault_id, name)
            .await?;
        self.check_policy_bounds(&mut tx, vault_id, &new_policy)
            .await?;
        if let Some(old_policy) = policy_of(Some(&current.spec))
            && shortens_retention(&old_policy, &new_policy)
        {
            let safety = self.vault_safety_locked(&mut tx, vault_id).await?;
            self.require_approval(
                &mut tx,
                principal,
                vault_id,
                &safety,
                GuardedOperation::ShortenRetention,
                current.id,
            )
            .await?;
        }
        let row = policies::policy_replace(&mut tx, current.id, expected, &spec)
            .await?
            .ok_or_else(Error::precondition_failed)?;
        // Existing points follow the new retention; moved schedules start afresh.
        self.recompute_retention(&mut tx, current.id, &req.spec)
            .await?;
        let moved: Vec<JobKind> = match (policy_of(Some(&row.spec)), policy_of(Some(&current.spec)))
        {
            (Some(new), Some(old)) => new.rescheduled_since(&old),
            _ => JobKind::SCHEDULED.to_vec(),
        };
        backvault_store::schedule::schedule_reset(&mut *tx, current.id, &moved).await?;
        tx.commit().await?;
        row.try_into()
    }

    pub async fn policy_delete(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        name: &str,
        expected: ExpectedVersion,
    ) -> Result<()> {
        principal.require(Operation::WritePolicy)?;
        let mut tx = self.pool.begin().await?;
        let current = self
            .visible_policy(&mut tx, principal, vault_id, name)
            .await?;
        let deleted = policies::policy_delete(&mut tx, current.id, expected)
            .await
            .on_foreign_key(|| {
                Error::new(
                    ErrorKind::Conflict,
                    "policy_in_use",
                    "protected items or auto-protection intents use this policy; move them to another policy first",
                )
            })?;
        if !deleted {
            return Err(Error::precondition_failed());
        }
        tx.commit().await?;
        Ok(())
    }

    /// Copies a policy to another vault (a policy belongs to one vault; to use it
    /// elsewhere, copy it).
    pub async fn policy_copy(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        name: &str,
        req: CopyPolicy,
        idempotency_key: Option<&str>,
    ) -> Result<Created<BackupPolicy>> {
        principal.require(Operation::WritePolicy)?;
        let mut tx = self.pool.begin().await?;
        let source = self
            .visible_policy(&mut tx, principal, vault_id, name)
            .await?;
        self.visible_vault(&mut *tx, principal, req.target_vault_id)
            .await?;
        let target_name = req.name.clone().unwrap_or_else(|| source.name.clone());
        PolicyName::parse(&target_name, "/name").map_err(Error::validation)?;
        if let Some(policy) = policy_of(Some(&source.spec)) {
            self.check_policy_bounds(&mut tx, req.target_vault_id, &policy)
                .await?;
        }
        let created = idempotent(
            &mut tx,
            principal,
            idempotency_key,
            "policy_copy",
            &(vault_id, name, &req),
            async |tx| {
                policies::policy_insert(
                    tx,
                    Uuid::now_v7(),
                    req.target_vault_id,
                    &target_name,
                    &source.spec.0,
                )
                .await
                .on_constraint("policies_name_key", name_taken)?
                .try_into()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Validates a policy and, when valid, returns its next runs and their expiries.
    /// With `vault_id`, also checks the vault's retention bounds and says how an immutable
    /// vault treats existing points.
    pub async fn policy_preview(
        &self,
        principal: &Principal,
        spec: &PolicySpec,
        from: DateTime<Utc>,
        count: usize,
        vault_id: Option<Uuid>,
    ) -> Result<PolicyPreview> {
        principal.require(Operation::Read)?;
        if !(1..=MAX_PREVIEW_RUNS).contains(&count) {
            return Err(Error::new(
                ErrorKind::BadRequest,
                "invalid_count",
                format!("count is 1 to {MAX_PREVIEW_RUNS}"),
            ));
        }
        let policy = spec.validate("").map_err(Error::validation)?;
        let mut preview = policy.preview(from, count);
        if let Some(vault_id) = vault_id {
            let mut tx = self.pool.begin().await?;
            self.visible_vault(&mut *tx, principal, vault_id).await?;
            self.check_policy_bounds(&mut tx, vault_id, &policy).await?;
            let safety = self.vault_safety_locked(&mut tx, vault_id).await?;
            tx.commit().await?;
            if crate::data_safety::safety_of(&safety).immutable() {
                preview.existing_points = Some(IMMUTABLE_EXISTING_POINTS);
            }
        }
        Ok(preview)
    }
}
