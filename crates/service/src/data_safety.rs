//! Data safety: a vault's soft delete, immutability and retention bounds; guards and the
//! approvals they require; soft-deleted items (undelete, purge). The rules are
//! `domain::safety`; every time rule here reads the database's clock.

use backvault_domain::policy::Policy;
use backvault_domain::safety::{
    APPROVAL_REQUEST_HOURS, Approval, ApprovalStatus, DEFAULT_APPROVAL_MINUTES, GuardedOperation,
    Immutability, MAX_APPROVAL_MINUTES, SafetyChange, SoftDelete, UndeleteRefusal, VaultSafety,
    Wanted, check_approval, check_decision, check_retention_bounds, check_safety_change,
    check_undelete, guarded_by_change, needs_approval,
};
use backvault_domain::violation::Violations;
use backvault_store::safety::{self as store, ApprovalRow, GuardRow, SafetyRow, SafetyWrite};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::protection::{ProtectedItem, item_not_found};
use crate::{Principal, Service};

/// A vault's data-safety settings, as clients see them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VaultSafetyView {
    pub vault_id: Uuid,
    pub soft_delete: SoftDelete,
    /// How long soft-deleted items are kept before they are purged.
    pub soft_delete_days: u32,
    pub immutability: Immutability,
    /// When the vault was locked.
    pub locked_at: Option<DateTime<Utc>>,
    /// Until when the lock can still be undone (it is final from then on).
    pub lock_final_at: Option<DateTime<Utc>>,
    /// Whether the lock can no longer be undone.
    pub lock_final: bool,
    pub min_retention_days: Option<u32>,
    pub max_retention_days: Option<u32>,
    /// The guard whose approvals operations that reduce protection need.
    pub guard_id: Option<Uuid>,
}

/// A change to a vault's data-safety settings; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeVaultSafety {
    #[serde(default)]
    pub soft_delete: Option<SoftDelete>,
    /// 14 to 180.
    #[serde(default)]
    pub soft_delete_days: Option<u32>,
    #[serde(default)]
    pub immutability: Option<Immutability>,
    /// `null` clears the bound. Only on an immutable vault.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>)]
    pub min_retention_days: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>)]
    pub max_retention_days: Option<Option<u32>>,
    /// `null` removes the guard (which always needs an approval).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Uuid>)]
    pub guard_id: Option<Option<Uuid>>,
}

/// A field sent as `null` is `Some(None)`; a field left out is `None`.
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Guard {
    pub id: Uuid,
    pub subscription_id: String,
    pub name: String,
    /// Operations beyond the always-guarded ones (disable soft delete, disable
    /// immutability, remove guard) that need an approval.
    pub operations: Vec<GuardedOperation>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGuard {
    pub subscription_id: String,
    pub name: String,
    #[serde(default)]
    pub operations: Vec<GuardedOperation>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApprovalView {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub guard_id: Uuid,
    pub operation: GuardedOperation,
    /// The item, policy, VM or vault the operation acts on.
    pub resource_id: Uuid,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub reason: String,
    /// `pending`, `granted`, `denied` or `used`; see `expired`.
    pub status: ApprovalStatus,
    /// A pending request lapsed, or a grant ran out before it was used.
    pub expired: bool,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestApproval {
    pub operation: GuardedOperation,
    /// The protected item (stop with delete), policy (shorten retention), VM (unregister)
    /// or the vault itself (the others).
    pub resource_id: Uuid,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantApproval {
    /// How long the approval may be used: 1 to 1440 minutes, 60 by default.
    #[serde(default)]
    pub minutes: Option<u32>,
}

pub(crate) fn safety_of(row: &SafetyRow) -> VaultSafety {
    let days = |d: Option<i32>| d.and_then(|d| u32::try_from(d).ok());
    VaultSafety {
        soft_delete: row.soft_delete,
        soft_delete_days: u32::try_from(row.soft_delete_days).unwrap_or(0),
        immutability: row.immutability,
        locked_at: row.locked_at,
        min_retention_days: days(row.min_retention_days),
        max_retention_days: days(row.max_retention_days),
        guard_id: row.guard_id,
    }
}

fn guarded_ops(row: &SafetyRow) -> Option<Vec<GuardedOperation>> {
    row.guard_id.map(|_| {
        row.guarded
            .iter()
            .filter_map(|s| GuardedOperation::parse(s))
            .collect()
    })
}

fn view(vault_id: Uuid, s: &VaultSafety, now: DateTime<Utc>) -> VaultSafetyView {
    VaultSafetyView {
        vault_id,
        soft_delete: s.soft_delete,
        soft_delete_days: s.soft_delete_days,
        immutability: s.immutability,
        locked_at: s.locked_at,
        lock_final_at: s.lock_final_at(),
        lock_final: s.lock_final(now),
        min_retention_days: s.min_retention_days,
        max_retention_days: s.max_retention_days,
        guard_id: s.guard_id,
    }
}

fn guard_view(g: GuardRow) -> Guard {
    Guard {
        id: g.id,
        subscription_id: g.subscription_id,
        name: g.name,
        operations: g
            .operations
            .iter()
            .filter_map(|s| GuardedOperation::parse(s))
            .collect(),
        created_at: g.created_at,
    }
}

fn approval_view(a: ApprovalRow, now: DateTime<Utc>) -> ApprovalView {
    let expired = matches!(a.status, ApprovalStatus::Pending | ApprovalStatus::Granted)
        && now >= a.expires_at;
    ApprovalView {
        id: a.id,
        vault_id: a.vault_id,
        guard_id: a.guard_id,
        operation: a.operation,
        resource_id: a.resource_id,
        requested_by: a.requested_by,
        requested_at: a.requested_at,
        reason: a.reason,
        status: a.status,
        expired,
        decided_by: a.decided_by,
        decided_at: a.decided_at,
        expires_at: a.expires_at,
        used_at: a.used_at,
    }
}

/// The stored approval, as the rules see it.
fn approval_of(a: &ApprovalRow) -> Approval {
    Approval {
        vault_id: a.vault_id,
        operation: a.operation,
        resource_id: a.resource_id,
        requested_by: a.requested_by.clone(),
        status: a.status,
        expires_at: a.expires_at,
    }
}

fn approval_not_found(id: Uuid) -> Error {
    Error::not_found("approval_not_found", format_args!("approval {id}"))
}

fn guard_not_found(id: Uuid) -> Error {
    Error::not_found("guard_not_found", format_args!("guard {id}"))
}

/// The longest reason an approval request may give.
pub const MAX_REASON_CHARS: usize = 1024;

impl Service {
    /// A vault's settings, locked for the caller's transaction.
    pub(crate) async fn vault_safety_locked(
        &self,
        conn: &mut PgConnection,
        vault_id: Uuid,
    ) -> Result<SafetyRow> {
        store::safety_lock(conn, vault_id)
            .await?
            .ok_or_else(|| Error::not_found("vault_not_found", format_args!("vault {vault_id}")))
    }

    /// Passes when the vault's guard does not cover `operation`, or the request carries a
    /// granted approval of it on `resource_id`, which is then used up.
    pub(crate) async fn require_approval(
        &self,
        conn: &mut PgConnection,
        principal: &Principal,
        vault_id: Uuid,
        safety: &SafetyRow,
        operation: GuardedOperation,
        resource_id: Uuid,
    ) -> Result<()> {
        let guarded = guarded_ops(safety);
        if !needs_approval(operation, guarded.as_deref()) {
            return Ok(());
        }
        let row = match principal.approval {
            Some(id) => store::approval_lock(&mut *conn, vault_id, id).await?,
            None => None,
        };
        let approval = row.as_ref().map(approval_of);
        let now = store::db_now(&mut *conn).await?;
        let wanted = Wanted {
            vault_id,
            operation,
            resource_id,
            subject: &principal.subject,
        };
        check_approval(approval.as_ref(), wanted, now)
            .map_err(|r| Error::new(ErrorKind::Forbidden, r.code(), r.message()))?;
        if let Some(a) = row {
            store::approval_use(conn, a.id).await?;
        }
        Ok(())
    }

    /// Refuses a policy whose retention lies outside the vault's bounds.
    pub(crate) async fn check_policy_bounds(
        &self,
        conn: &mut PgConnection,
        vault_id: Uuid,
        policy: &Policy,
    ) -> Result<()> {
        let row = self.vault_safety_locked(conn, vault_id).await?;
        let violations = check_retention_bounds(policy, &safety_of(&row));
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::validation(violations))
        }
    }

    pub async fn vault_safety_get(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<VaultSafetyView> {
        principal.require(Operation::Read)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = self.vault_safety_locked(&mut tx, vault_id).await?;
        let now = store::db_now(&mut *tx).await?;
        tx.commit().await?;
        Ok(view(vault_id, &safety_of(&row), now))
    }

    /// Changes a vault's data-safety settings. Switching protection off (soft delete,
    /// immutability) and removing the guard need an approval on a guarded vault.
    pub async fn vault_safety_change(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: ChangeVaultSafety,
    ) -> Result<VaultSafetyView> {
        principal.require(Operation::ChangeVaultSecurity)?;
        let mut tx = self.pool.begin().await?;
        let vault = self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = self.vault_safety_locked(&mut tx, vault_id).await?;
        let current = safety_of(&row);
        let now = store::db_now(&mut *tx).await?;
        let change = SafetyChange {
            soft_delete: req.soft_delete,
            soft_delete_days: req.soft_delete_days,
            immutability: req.immutability,
            min_retention_days: req.min_retention_days,
            max_retention_days: req.max_retention_days,
            guard_id: req.guard_id,
        };
        let next = check_safety_change(&current, &change, now).map_err(Error::validation)?;
        if let Some(Some(guard)) = req.guard_id {
            match store::guard_get(&mut *tx, guard).await? {
                Some(g) if g.subscription_id == vault.subscription_id => {}
                _ => {
                    let mut v = Violations::default();
                    v.push(
                        "/guard_id",
                        "guard_not_found",
                        "no such guard in the vault's subscription",
                    );
                    return Err(Error::validation(v.into_vec()));
                }
            }
        }
        for operation in guarded_by_change(&current, &next) {
            self.require_approval(&mut tx, principal, vault_id, &row, operation, vault_id)
                .await?;
        }
        let days = |d: Option<u32>| d.and_then(|d| i32::try_from(d).ok());
        store::safety_set(
            &mut tx,
            vault_id,
            &SafetyWrite {
                soft_delete: next.soft_delete,
                soft_delete_days: i32::try_from(next.soft_delete_days).unwrap_or(i32::MAX),
                immutability: next.immutability,
                locked_at: next.locked_at,
                min_retention_days: days(next.min_retention_days),
                max_retention_days: days(next.max_retention_days),
                guard_id: next.guard_id,
            },
        )
        .await
        .on_constraint("vault_locked", || {
            Error::new(
                ErrorKind::Conflict,
                "vault_locked",
                "the vault is locked and its cooling-off window has passed",
            )
        })?;
        tx.commit().await?;
        Ok(view(vault_id, &next, now))
    }

    pub async fn guard_create(&self, principal: &Principal, req: CreateGuard) -> Result<Guard> {
        principal.require(Operation::ManageGuards)?;
        let mut v = Violations::default();
        backvault_domain::names::check_identifier(
            &req.name,
            "/name",
            "name",
            backvault_domain::names::MAX_RESOURCE_GROUP_CHARS,
            &mut v,
        );
        if req.operations.iter().any(|o| o.always_guarded()) {
            v.push(
                "/operations",
                "guard_operation_always_guarded",
                "disable_soft_delete, disable_immutability and remove_guard are always guarded: list only the others",
            );
        }
        if !v.is_empty() {
            return Err(Error::validation(v.into_vec()));
        }
        if !principal.sees_subscription(&req.subscription_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "your token does not grant this subscription",
            ));
        }
        let mut ops = req.operations.clone();
        ops.sort_by_key(|o| o.as_str());
        ops.dedup();
        let mut tx = self.pool.begin().await?;
        let row = store::guard_insert(
            &mut tx,
            Uuid::now_v7(),
            &req.subscription_id,
            &req.name,
            &ops,
        )
        .await
        .on_constraint("guards_name_key", || {
            Error::new(
                ErrorKind::Conflict,
                "guard_name_taken",
                "a guard of this name exists in the subscription",
            )
        })?;
        tx.commit().await?;
        Ok(guard_view(row))
    }

    pub async fn guard_list(&self, principal: &Principal) -> Result<Vec<Guard>> {
        principal.require(Operation::Read)?;
        let rows = store::guard_list(&self.pool, principal.subscriptions.as_deref()).await?;
        Ok(rows.into_iter().map(guard_view).collect())
    }

    pub async fn guard_delete(&self, principal: &Principal, id: Uuid) -> Result<()> {
        principal.require(Operation::ManageGuards)?;
        let mut tx = self.pool.begin().await?;
        match store::guard_get(&mut *tx, id).await? {
            Some(g) if principal.sees_subscription(&g.subscription_id) => {}
            _ => return Err(guard_not_found(id)),
        }
        store::guard_delete(&mut tx, id).await.on_foreign_key(|| {
            Error::new(
                ErrorKind::Conflict,
                "guard_in_use",
                "a vault is bound to this guard; remove it from the vault (with an approval) first",
            )
        })?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn approval_request(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        req: RequestApproval,
    ) -> Result<ApprovalView> {
        principal.require(Operation::RequestApproval)?;
        if req.reason.chars().count() > MAX_REASON_CHARS {
            let mut v = Violations::default();
            v.push(
                "/reason",
                "reason_too_long",
                "a reason has at most 1024 characters",
            );
            return Err(Error::validation(v.into_vec()));
        }
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = self.vault_safety_locked(&mut tx, vault_id).await?;
        let Some(guard_id) = row.guard_id else {
            return Err(Error::new(
                ErrorKind::Conflict,
                "vault_not_guarded",
                "the vault has no guard: its operations need no approval",
            ));
        };
        let approval = store::approval_insert(
            &mut tx,
            store::NewApproval {
                id: Uuid::now_v7(),
                vault_id,
                guard_id,
                operation: req.operation,
                resource_id: req.resource_id,
                requested_by: &principal.subject,
                reason: &req.reason,
                lapses_after_hours: i32::try_from(APPROVAL_REQUEST_HOURS).unwrap_or(24),
            },
        )
        .await?;
        let now = store::db_now(&mut *tx).await?;
        tx.commit().await?;
        Ok(approval_view(approval, now))
    }

    pub async fn approval_list(
        &self,
        principal: &Principal,
        vault_id: Uuid,
    ) -> Result<Vec<ApprovalView>> {
        principal.require(Operation::Read)?;
        let mut conn = self.pool.acquire().await?;
        self.visible_vault(&mut *conn, principal, vault_id).await?;
        let now = store::db_now(&mut *conn).await?;
        Ok(store::approval_list(&mut *conn, vault_id)
            .await?
            .into_iter()
            .map(|a| approval_view(a, now))
            .collect())
    }

    /// Grants (`Some(minutes)`) or denies (`None`) a pending request; never one's own.
    pub async fn approval_decide(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
        grant: Option<GrantApproval>,
    ) -> Result<ApprovalView> {
        principal.require(Operation::DecideApproval)?;
        let minutes = match &grant {
            Some(g) => {
                let minutes = g.minutes.unwrap_or(DEFAULT_APPROVAL_MINUTES);
                if !(1..=MAX_APPROVAL_MINUTES).contains(&minutes) {
                    let mut v = Violations::default();
                    v.push(
                        "/minutes",
                        "approval_minutes_range",
                        format!("an approval lasts 1 to {MAX_APPROVAL_MINUTES} minutes"),
                    );
                    return Err(Error::validation(v.into_vec()));
                }
                minutes
            }
            None => 0,
        };
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let row = store::approval_lock(&mut tx, vault_id, id)
            .await?
            .ok_or_else(|| approval_not_found(id))?;
        let now = store::db_now(&mut *tx).await?;
        check_decision(&approval_of(&row), &principal.subject, now).map_err(|r| {
            let kind = match r {
                backvault_domain::safety::DecisionRefusal::OwnRequest => ErrorKind::Forbidden,
                _ => ErrorKind::Conflict,
            };
            Error::new(kind, r.code(), r.message())
        })?;
        let status = if grant.is_some() {
            ApprovalStatus::Granted
        } else {
            ApprovalStatus::Denied
        };
        let decided = store::approval_decide(
            &mut tx,
            id,
            status,
            &principal.subject,
            i32::try_from(minutes).unwrap_or(60),
        )
        .await?;
        tx.commit().await?;
        Ok(approval_view(decided, now))
    }

    /// Brings a soft-deleted item back, stopped with its data retained, within the
    /// vault's soft-delete period.
    pub async fn protected_item_undelete(
        &self,
        principal: &Principal,
        vault_id: Uuid,
        id: Uuid,
    ) -> Result<ProtectedItem> {
        principal.require(Operation::Undelete)?;
        let mut tx = self.pool.begin().await?;
        self.visible_vault(&mut *tx, principal, vault_id).await?;
        let item = match store::soft_deleted_state(&mut *tx, id).await? {
            Some(item) => item,
            None if store::item_purged(&mut *tx, vault_id, id).await? => {
                return Err(Error::new(
                    ErrorKind::Gone,
                    "undelete_period_over",
                    "the item's soft-delete period ended and it was purged",
                ));
            }
            None => return Err(item_not_found(id)),
        };
        self.visible_item(&mut tx, principal, vault_id, id).await?;
        let now = store::db_now(&mut *tx).await?;
        check_undelete(item.purge_after, now).map_err(|r| match r {
            UndeleteRefusal::NotSoftDeleted => Error::new(
                ErrorKind::Conflict,
                "item_not_soft_deleted",
                "the item is not soft-deleted (never was, or was undeleted already)",
            ),
            UndeleteRefusal::PeriodOver => Error::new(
                ErrorKind::Gone,
                "undelete_period_over",
                "the item's soft-delete period is over; it is being purged",
            ),
        })?;
        store::item_undelete(&mut tx, id).await?;
        backvault_store::recovery::points_retain_forever(&mut *tx, id).await?;
        tx.commit().await?;
        self.protected_item_get(principal, vault_id, id).await
    }

    /// Purges soft-deleted items whose period is over, with their points. Safe to run on
    /// every replica at once (rows are claimed with SKIP LOCKED) and again (nothing twice).
    pub async fn purge_soft_deleted(&self) -> Result<u64> {
        let mut total: u64 = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let purged = store::items_purge_due(&mut tx, 1_000).await?;
            // Recorded with the deletion, in its transaction: a purge is never unaudited.
            for (item, vault) in &purged {
                self.audit_system(
                    &mut tx,
                    "soft_delete.purge",
                    Some(&item.to_string()),
                    serde_json::json!({"vault_id": vault}),
                )
                .await?;
            }
            tx.commit().await?;
            for (item, vault) in &purged {
                tracing::info!(item = %item, vault = %vault, "purged a soft-deleted item and its recovery points");
            }
            total = total.saturating_add(purged.len() as u64);
            if purged.is_empty() {
                return Ok(total);
            }
        }
    }
}
