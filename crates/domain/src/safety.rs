//! Data safety: what a vault's soft delete, immutability (vault lock), retention bounds
//! and guard (multi-user authorization) let an operation do. Pure: the caller brings the
//! vault's settings and the database's clock.
//!
//! The promise: no recovery point disappears before its time by a user's action while the
//! vault is immutable; a user's deletion is reversible for the soft-delete period; and an
//! operation that reduces protection on a guarded vault needs a second person's approval.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::policy::Policy;
use crate::violation::{Violation, Violations};

/// Azure's enhanced soft delete: 14 to 180 days, 14 by default.
pub const MIN_SOFT_DELETE_DAYS: u32 = 14;
pub const MAX_SOFT_DELETE_DAYS: u32 = 180;
pub const DEFAULT_SOFT_DELETE_DAYS: u32 = 14;
/// A lock can still be undone this long after it was set (AWS Vault Lock's compliance mode
/// grace time is at least 72 hours).
pub const LOCK_COOLING_OFF_HOURS: i64 = 72;
/// How long a granted approval may be used, by default and at most.
pub const DEFAULT_APPROVAL_MINUTES: u32 = 60;
pub const MAX_APPROVAL_MINUTES: u32 = 1_440;
/// How long a request waits for a decision before it expires.
pub const APPROVAL_REQUEST_HOURS: i64 = 24;
/// The longest retention bound: 99 years, as an on-demand full's.
pub const MAX_RETENTION_BOUND_DAYS: u32 = 36_159;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SoftDelete {
    Enabled,
    Disabled,
    /// Enabled for good: it can never be disabled again.
    AlwaysOn,
}

impl SoftDelete {
    pub const ALL: [SoftDelete; 3] = [
        SoftDelete::Enabled,
        SoftDelete::Disabled,
        SoftDelete::AlwaysOn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SoftDelete::Enabled => "enabled",
            SoftDelete::Disabled => "disabled",
            SoftDelete::AlwaysOn => "always_on",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    fn on(self) -> bool {
        self != SoftDelete::Disabled
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Immutability {
    Disabled,
    /// Points cannot be deleted or expire early; can be disabled again.
    Enabled,
    /// As enabled, and irreversible once the cooling-off window has passed.
    Locked,
}

impl Immutability {
    pub const ALL: [Immutability; 3] = [
        Immutability::Disabled,
        Immutability::Enabled,
        Immutability::Locked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Immutability::Disabled => "disabled",
            Immutability::Enabled => "enabled",
            Immutability::Locked => "locked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A vault's data-safety settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultSafety {
    pub soft_delete: SoftDelete,
    pub soft_delete_days: u32,
    pub immutability: Immutability,
    /// When the lock was set; it is final [`LOCK_COOLING_OFF_HOURS`] later.
    pub locked_at: Option<DateTime<Utc>>,
    pub min_retention_days: Option<u32>,
    pub max_retention_days: Option<u32>,
    pub guard_id: Option<Uuid>,
}

impl Default for VaultSafety {
    fn default() -> Self {
        Self {
            soft_delete: SoftDelete::Enabled,
            soft_delete_days: DEFAULT_SOFT_DELETE_DAYS,
            immutability: Immutability::Disabled,
            locked_at: None,
            min_retention_days: None,
            max_retention_days: None,
            guard_id: None,
        }
    }
}

impl VaultSafety {
    /// Recovery points cannot be deleted or made to expire earlier.
    pub fn immutable(&self) -> bool {
        self.immutability != Immutability::Disabled
    }

    /// The lock can no longer be undone.
    pub fn lock_final(&self, now: DateTime<Utc>) -> bool {
        self.immutability == Immutability::Locked
            && self.lock_final_at().is_none_or(|final_at| now >= final_at)
    }

    /// When the lock becomes final, while it can still be undone.
    pub fn lock_final_at(&self) -> Option<DateTime<Utc>> {
        match self.immutability {
            // Past the end of time, a lock is final at once.
            Immutability::Locked => self
                .locked_at
                .and_then(|at| at.checked_add_signed(Duration::hours(LOCK_COOLING_OFF_HOURS))),
            _ => None,
        }
    }
}

/// A change to a vault's settings: absent fields stay as they are; `guard_id: Some(None)`
/// removes the guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SafetyChange {
    pub soft_delete: Option<SoftDelete>,
    pub soft_delete_days: Option<u32>,
    pub immutability: Option<Immutability>,
    pub min_retention_days: Option<Option<u32>>,
    pub max_retention_days: Option<Option<u32>>,
    pub guard_id: Option<Option<Uuid>>,
}

/// Operations that reduce protection, which a vault's guard may require an approval for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardedOperation {
    /// Always guarded.
    DisableSoftDelete,
    /// Always guarded: disabling immutability, or undoing a lock in its cooling-off.
    DisableImmutability,
    /// Always guarded.
    RemoveGuard,
    StopProtectionDeleteData,
    ShortenRetention,
    UnregisterVm,
    DeleteVault,
}

impl GuardedOperation {
    pub const ALL: [GuardedOperation; 7] = [
        GuardedOperation::DisableSoftDelete,
        GuardedOperation::DisableImmutability,
        GuardedOperation::RemoveGuard,
        GuardedOperation::StopProtectionDeleteData,
        GuardedOperation::ShortenRetention,
        GuardedOperation::UnregisterVm,
        GuardedOperation::DeleteVault,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuardedOperation::DisableSoftDelete => "disable_soft_delete",
            GuardedOperation::DisableImmutability => "disable_immutability",
            GuardedOperation::RemoveGuard => "remove_guard",
            GuardedOperation::StopProtectionDeleteData => "stop_protection_delete_data",
            GuardedOperation::ShortenRetention => "shorten_retention",
            GuardedOperation::UnregisterVm => "unregister_vm",
            GuardedOperation::DeleteVault => "delete_vault",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Guarded whatever the guard selects: they would switch the protection itself off.
    pub fn always_guarded(self) -> bool {
        matches!(
            self,
            GuardedOperation::DisableSoftDelete
                | GuardedOperation::DisableImmutability
                | GuardedOperation::RemoveGuard
        )
    }
}

/// Whether `operation` needs an approval on a vault whose guard selects `selected` (no
/// guard: never).
pub fn needs_approval(operation: GuardedOperation, guard: Option<&[GuardedOperation]>) -> bool {
    guard.is_some_and(|selected| operation.always_guarded() || selected.contains(&operation))
}

/// The changes that need an approval, for a settings change.
pub fn guarded_by_change(current: &VaultSafety, next: &VaultSafety) -> Vec<GuardedOperation> {
    let mut ops = Vec::new();
    if current.soft_delete.on() && !next.soft_delete.on() {
        ops.push(GuardedOperation::DisableSoftDelete);
    }
    let rank = |i: Immutability| match i {
        Immutability::Disabled => 0,
        Immutability::Enabled => 1,
        Immutability::Locked => 2,
    };
    if rank(next.immutability) < rank(current.immutability) {
        ops.push(GuardedOperation::DisableImmutability);
    }
    if current.guard_id.is_some() && next.guard_id != current.guard_id {
        ops.push(GuardedOperation::RemoveGuard);
    }
    ops
}

/// The settings a change leads to, or every reason it cannot be made.
pub fn check_safety_change(
    current: &VaultSafety,
    change: &SafetyChange,
    now: DateTime<Utc>,
) -> Result<VaultSafety, Vec<Violation>> {
    let mut v = Violations::default();
    let mut next = *current;
    if let Some(soft_delete) = change.soft_delete {
        if current.soft_delete == SoftDelete::AlwaysOn && soft_delete != SoftDelete::AlwaysOn {
            v.push(
                "/soft_delete",
                "soft_delete_always_on",
                "soft delete is always on for this vault: that cannot be undone",
            );
        }
        next.soft_delete = soft_delete;
    }
    if let Some(days) = change.soft_delete_days {
        if !(MIN_SOFT_DELETE_DAYS..=MAX_SOFT_DELETE_DAYS).contains(&days) {
            v.push(
                "/soft_delete_days",
                "soft_delete_days_range",
                format!(
                    "soft-deleted data is kept {MIN_SOFT_DELETE_DAYS} to {MAX_SOFT_DELETE_DAYS} days"
                ),
            );
        } else if current.soft_delete == SoftDelete::AlwaysOn && days < current.soft_delete_days {
            v.push(
                "/soft_delete_days",
                "soft_delete_always_on",
                "soft delete is always on for this vault: its period can grow, not shrink",
            );
        }
        next.soft_delete_days = days;
    }
    let lock_final = current.lock_final(now);
    if let Some(immutability) = change.immutability {
        if lock_final && immutability != Immutability::Locked {
            v.push(
                "/immutability",
                "vault_locked",
                "the vault is locked and its cooling-off window has passed: immutability cannot be changed",
            );
        } else {
            if immutability != current.immutability {
                next.locked_at = (immutability == Immutability::Locked).then_some(now);
            }
            next.immutability = immutability;
        }
    }
    for (field, change, slot) in [
        (
            "/min_retention_days",
            change.min_retention_days,
            &mut next.min_retention_days,
        ),
        (
            "/max_retention_days",
            change.max_retention_days,
            &mut next.max_retention_days,
        ),
    ] {
        let Some(days) = change else { continue };
        if lock_final {
            v.push(
                field,
                "vault_locked",
                "the vault is locked and its cooling-off window has passed: its retention bounds cannot be changed",
            );
            continue;
        }
        if let Some(d) = days
            && !(1..=MAX_RETENTION_BOUND_DAYS).contains(&d)
        {
            v.push(
                field,
                "retention_bound_range",
                format!("a retention bound is 1 to {MAX_RETENTION_BOUND_DAYS} days"),
            );
        }
        *slot = days;
    }
    if !next.immutable() && (next.min_retention_days.is_some() || next.max_retention_days.is_some())
    {
        v.push(
            "/immutability",
            "retention_bounds_need_immutability",
            "retention bounds apply to an immutable vault: enable immutability, or clear the bounds",
        );
    }
    if let (Some(min), Some(max)) = (next.min_retention_days, next.max_retention_days)
        && min > max
    {
        v.push(
            "/min_retention_days",
            "retention_bounds_inverted",
            "the minimum retention is longer than the maximum",
        );
    }
    if let Some(guard) = change.guard_id {
        next.guard_id = guard;
    }
    if v.is_empty() {
        Ok(next)
    } else {
        Err(v.into_vec())
    }
}

/// What a user's deletion of recovery points (stop protection with delete data) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserDeletion {
    /// Deleted now (soft delete off, vault not immutable).
    Delete,
    /// Kept, hidden from use, until `purge_at`; can be undeleted until then.
    SoftDelete { purge_at: DateTime<Utc> },
    /// Immutable vault: protection stops, the points stay until each one's expiry.
    RetainUntilExpiry,
}

pub fn user_deletion(safety: &VaultSafety, now: DateTime<Utc>) -> UserDeletion {
    if safety.immutable() {
        UserDeletion::RetainUntilExpiry
    } else if safety.soft_delete.on() {
        UserDeletion::SoftDelete {
            purge_at: now
                .checked_add_signed(Duration::days(i64::from(safety.soft_delete_days)))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    } else {
        UserDeletion::Delete
    }
}

/// A point's expiry after its policy changed: on an immutable vault never earlier than it
/// was (`None`: kept until deleted, the latest of all).
pub fn expiry_after_policy_change(
    immutable: bool,
    current: Option<DateTime<Utc>>,
    proposed: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    if !immutable {
        return proposed;
    }
    match (current, proposed) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// Each retention a policy sets, with the shortest and longest number of days it can mean
/// (a month is 28 to 31 days, a year 365 or 366), at its pointer in the policy spec.
pub fn retention_spans(policy: &Policy) -> Vec<(&'static str, u32, u32)> {
    let r = &policy.retention;
    let mut spans = Vec::new();
    if let Some(days) = r.daily_days {
        spans.push(("/retention/daily/days", days, days));
    }
    if let Some((_, weeks)) = &r.weekly {
        let days = weeks.saturating_mul(7);
        spans.push(("/retention/weekly/weeks", days, days));
    }
    if let Some((_, months)) = &r.monthly {
        spans.push((
            "/retention/monthly/months",
            months.saturating_mul(28),
            months.saturating_mul(31),
        ));
    }
    if let Some((_, _, years)) = &r.yearly {
        spans.push((
            "/retention/yearly/years",
            years.saturating_mul(365),
            years.saturating_mul(366),
        ));
    }
    if let Some(d) = &policy.differential {
        spans.push((
            "/differential/retention_days",
            d.retention_days,
            d.retention_days,
        ));
    }
    if let Some(l) = &policy.log {
        spans.push(("/log/retention_days", l.retention_days, l.retention_days));
    }
    spans
}

/// Every retention of the policy outside the vault's bounds.
pub fn check_retention_bounds(policy: &Policy, safety: &VaultSafety) -> Vec<Violation> {
    let mut v = Violations::default();
    if !safety.immutable() {
        return v.into_vec();
    }
    for (pointer, shortest, longest) in retention_spans(policy) {
        if let Some(min) = safety.min_retention_days
            && shortest < min
        {
            v.push(
                format!("/spec{pointer}"),
                "retention_below_vault_minimum",
                format!("the vault keeps every recovery point at least {min} days"),
            );
        }
        if let Some(max) = safety.max_retention_days
            && longest > max
        {
            v.push(
                format!("/spec{pointer}"),
                "retention_above_vault_maximum",
                format!("the vault keeps recovery points at most {max} days"),
            );
        }
    }
    v.into_vec()
}

/// Whether `new` keeps some kind of recovery point shorter than `old` did (or not at all):
/// a policy edit that shortens retention.
pub fn shortens_retention(old: &Policy, new: &Policy) -> bool {
    let new_spans = retention_spans(new);
    retention_spans(old).iter().any(|(pointer, shortest, _)| {
        new_spans
            .iter()
            .find(|(p, _, _)| p == pointer)
            .is_none_or(|(_, new_shortest, _)| new_shortest < shortest)
    })
}

/// Why an approval cannot be used for an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalRefusal {
    /// No approval was given, or it names another operation, vault or resource.
    Missing,
    NotGranted,
    Expired,
    Used,
    /// Requested by someone else: an approval is for its requester only.
    OtherRequester,
}

impl ApprovalRefusal {
    pub fn code(self) -> &'static str {
        match self {
            ApprovalRefusal::Missing => "approval_required",
            ApprovalRefusal::NotGranted => "approval_not_granted",
            ApprovalRefusal::Expired => "approval_expired",
            ApprovalRefusal::Used => "approval_used",
            ApprovalRefusal::OtherRequester => "approval_not_yours",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ApprovalRefusal::Missing => {
                "the vault's guard requires an approval for this operation on this resource: request one (POST /v1/vaults/{vault_id}/approvals), have an approver grant it, then send its id in the Backvault-Approval header"
            }
            ApprovalRefusal::NotGranted => "the approval is not granted (pending or denied)",
            ApprovalRefusal::Expired => "the approval expired; request a new one",
            ApprovalRefusal::Used => "the approval was used already: each approves one operation",
            ApprovalRefusal::OtherRequester => "the approval was requested by someone else",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Granted,
    Denied,
    Used,
}

impl ApprovalStatus {
    pub const ALL: [ApprovalStatus; 4] = [
        ApprovalStatus::Pending,
        ApprovalStatus::Granted,
        ApprovalStatus::Denied,
        ApprovalStatus::Used,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Granted => "granted",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Used => "used",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// An approval as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub vault_id: Uuid,
    pub operation: GuardedOperation,
    pub resource_id: Uuid,
    pub requested_by: String,
    pub status: ApprovalStatus,
    /// For a pending one, when the request lapses; for a granted one, when the grant does.
    pub expires_at: DateTime<Utc>,
}

/// What an operation wants approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted<'a> {
    pub vault_id: Uuid,
    pub operation: GuardedOperation,
    pub resource_id: Uuid,
    pub subject: &'a str,
}

/// Whether `approval` lets `wanted` happen now.
pub fn check_approval(
    approval: Option<&Approval>,
    wanted: Wanted<'_>,
    now: DateTime<Utc>,
) -> Result<(), ApprovalRefusal> {
    let Some(a) = approval.filter(|a| {
        a.vault_id == wanted.vault_id
            && a.operation == wanted.operation
            && a.resource_id == wanted.resource_id
    }) else {
        return Err(ApprovalRefusal::Missing);
    };
    if a.requested_by != wanted.subject {
        return Err(ApprovalRefusal::OtherRequester);
    }
    match a.status {
        ApprovalStatus::Used => Err(ApprovalRefusal::Used),
        ApprovalStatus::Pending | ApprovalStatus::Denied => Err(ApprovalRefusal::NotGranted),
        ApprovalStatus::Granted if now >= a.expires_at => Err(ApprovalRefusal::Expired),
        ApprovalStatus::Granted => Ok(()),
    }
}

/// Why an approver cannot decide a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionRefusal {
    OwnRequest,
    NotPending,
    Lapsed,
}

impl DecisionRefusal {
    pub fn code(self) -> &'static str {
        match self {
            DecisionRefusal::OwnRequest => "approval_self",
            DecisionRefusal::NotPending => "approval_decided",
            DecisionRefusal::Lapsed => "approval_expired",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            DecisionRefusal::OwnRequest => "no one approves their own request",
            DecisionRefusal::NotPending => "the request was decided already",
            DecisionRefusal::Lapsed => {
                "the request lapsed before a decision; it must be made again"
            }
        }
    }
}

pub fn check_decision(
    approval: &Approval,
    approver: &str,
    now: DateTime<Utc>,
) -> Result<(), DecisionRefusal> {
    if approval.requested_by == approver {
        Err(DecisionRefusal::OwnRequest)
    } else if approval.status != ApprovalStatus::Pending {
        Err(DecisionRefusal::NotPending)
    } else if now >= approval.expires_at {
        Err(DecisionRefusal::Lapsed)
    } else {
        Ok(())
    }
}

/// Why a soft-deleted item cannot be undeleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndeleteRefusal {
    /// It is not soft-deleted (never was, or undeleted already).
    NotSoftDeleted,
    /// Its soft-delete period is over: it is (or is about to be) purged.
    PeriodOver,
}

pub fn check_undelete(
    purge_after: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), UndeleteRefusal> {
    match purge_after {
        None => Err(UndeleteRefusal::NotSoftDeleted),
        Some(at) if now >= at => Err(UndeleteRefusal::PeriodOver),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn codes(r: Result<VaultSafety, Vec<Violation>>) -> Vec<String> {
        r.unwrap_err()
            .into_iter()
            .map(|v| v.code.to_string())
            .collect()
    }

    #[test]
    fn a_user_deletion_is_deferred_by_immutability_and_softened_by_soft_delete() {
        let now = at("2026-12-01T00:00:00Z");
        let mut s = VaultSafety {
            ..VaultSafety::default()
        };
        assert_eq!(
            user_deletion(&s, now),
            UserDeletion::SoftDelete {
                purge_at: at("2026-12-15T00:00:00Z")
            }
        );
        s.soft_delete = SoftDelete::Disabled;
        assert_eq!(user_deletion(&s, now), UserDeletion::Delete);
        s.immutability = Immutability::Enabled;
        assert_eq!(user_deletion(&s, now), UserDeletion::RetainUntilExpiry);
    }

    #[test]
    fn a_lock_can_be_undone_only_in_its_cooling_off() {
        let set = at("2026-12-01T00:00:00Z");
        let locked = check_safety_change(
            &VaultSafety::default(),
            &SafetyChange {
                immutability: Some(Immutability::Locked),
                ..Default::default()
            },
            set,
        )
        .unwrap();
        assert_eq!(locked.locked_at, Some(set));
        assert_eq!(locked.lock_final_at(), Some(at("2026-12-04T00:00:00Z")));
        let undo = SafetyChange {
            immutability: Some(Immutability::Enabled),
            ..Default::default()
        };
        assert!(check_safety_change(&locked, &undo, at("2026-12-03T23:59:59Z")).is_ok());
        assert_eq!(
            codes(check_safety_change(
                &locked,
                &undo,
                at("2026-12-04T00:00:00Z")
            )),
            ["vault_locked"]
        );
        let bounds = SafetyChange {
            min_retention_days: Some(Some(30)),
            ..Default::default()
        };
        assert_eq!(
            codes(check_safety_change(
                &locked,
                &bounds,
                at("2026-12-05T00:00:00Z")
            )),
            ["vault_locked"]
        );
    }

    #[test]
    fn settings_are_checked_together() {
        let now = at("2026-12-01T00:00:00Z");
        let always = VaultSafety {
            soft_delete: SoftDelete::AlwaysOn,
            ..VaultSafety::default()
        };
        assert_eq!(
            codes(check_safety_change(
                &always,
                &SafetyChange {
                    soft_delete: Some(SoftDelete::Disabled),
                    soft_delete_days: Some(200),
                    min_retention_days: Some(Some(10)),
                    ..Default::default()
                },
                now
            )),
            [
                "soft_delete_always_on",
                "soft_delete_days_range",
                "retention_bounds_need_immutability"
            ]
        );
        let enabled = VaultSafety {
            immutability: Immutability::Enabled,
            ..VaultSafety::default()
        };
        assert_eq!(
            codes(check_safety_change(
                &enabled,
                &SafetyChange {
                    min_retention_days: Some(Some(40)),
                    max_retention_days: Some(Some(30)),
                    ..Default::default()
                },
                now
            )),
            ["retention_bounds_inverted"]
        );
    }

    #[test]
    fn switching_protection_off_and_removing_the_guard_are_always_guarded() {
        let guard = Uuid::from_u128(7);
        let current = VaultSafety {
            immutability: Immutability::Locked,
            guard_id: Some(guard),
            ..VaultSafety::default()
        };
        let mut next = current;
        next.soft_delete = SoftDelete::Disabled;
        next.immutability = Immutability::Enabled;
        next.guard_id = None;
        assert_eq!(
            guarded_by_change(&current, &next),
            [
                GuardedOperation::DisableSoftDelete,
                GuardedOperation::DisableImmutability,
                GuardedOperation::RemoveGuard
            ]
        );
        for op in GuardedOperation::ALL {
            assert!(!needs_approval(op, None), "no guard, no approval");
            assert_eq!(needs_approval(op, Some(&[])), op.always_guarded());
            assert!(needs_approval(op, Some(&GuardedOperation::ALL)));
        }
    }

    fn approval(status: ApprovalStatus) -> Approval {
        Approval {
            vault_id: Uuid::from_u128(1),
            operation: GuardedOperation::DeleteVault,
            resource_id: Uuid::from_u128(1),
            requested_by: "alice".into(),
            status,
            expires_at: at("2026-12-01T01:00:00Z"),
        }
    }

    fn wanted(subject: &str) -> Wanted<'_> {
        Wanted {
            vault_id: Uuid::from_u128(1),
            operation: GuardedOperation::DeleteVault,
            resource_id: Uuid::from_u128(1),
            subject,
        }
    }

    #[test]
    fn an_approval_serves_its_requester_once_in_time() {
        let now = at("2026-12-01T00:30:00Z");
        let granted = approval(ApprovalStatus::Granted);
        assert_eq!(check_approval(Some(&granted), wanted("alice"), now), Ok(()));
        assert_eq!(
            check_approval(Some(&granted), wanted("mallory"), now),
            Err(ApprovalRefusal::OtherRequester)
        );
        assert_eq!(
            check_approval(Some(&granted), wanted("alice"), at("2026-12-01T01:00:00Z")),
            Err(ApprovalRefusal::Expired)
        );
        assert_eq!(
            check_approval(Some(&approval(ApprovalStatus::Used)), wanted("alice"), now),
            Err(ApprovalRefusal::Used)
        );
        assert_eq!(
            check_approval(
                Some(&approval(ApprovalStatus::Pending)),
                wanted("alice"),
                now
            ),
            Err(ApprovalRefusal::NotGranted)
        );
        assert_eq!(
            check_approval(None, wanted("alice"), now),
            Err(ApprovalRefusal::Missing)
        );
        assert_eq!(
            check_decision(&approval(ApprovalStatus::Pending), "alice", now),
            Err(DecisionRefusal::OwnRequest)
        );
        assert_eq!(
            check_decision(&approval(ApprovalStatus::Pending), "bob", now),
            Ok(())
        );
    }

    #[test]
    fn undelete_within_the_period_only() {
        let purge = at("2026-12-15T00:00:00Z");
        assert_eq!(
            check_undelete(Some(purge), at("2026-12-14T23:59:59Z")),
            Ok(())
        );
        assert_eq!(
            check_undelete(Some(purge), purge),
            Err(UndeleteRefusal::PeriodOver)
        );
        assert_eq!(
            check_undelete(None, purge),
            Err(UndeleteRefusal::NotSoftDeleted)
        );
    }

    fn any_instant() -> impl Strategy<Value = Option<DateTime<Utc>>> {
        prop::option::of(
            (0i64..4_000_000_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
        )
    }

    fn any_safety() -> impl Strategy<Value = VaultSafety> {
        (
            prop::sample::select(SoftDelete::ALL.to_vec()),
            MIN_SOFT_DELETE_DAYS..=MAX_SOFT_DELETE_DAYS,
            prop::sample::select(Immutability::ALL.to_vec()),
            any_instant(),
        )
            .prop_map(|(soft_delete, soft_delete_days, immutability, locked_at)| {
                VaultSafety {
                    soft_delete,
                    soft_delete_days,
                    immutability,
                    locked_at: if immutability == Immutability::Locked {
                        locked_at
                    } else {
                        None
                    },
                    ..VaultSafety::default()
                }
            })
    }

    fn any_change() -> impl Strategy<Value = SafetyChange> {
        (
            prop::option::of(prop::sample::select(SoftDelete::ALL.to_vec())),
            prop::option::of(0u32..400),
            prop::option::of(prop::sample::select(Immutability::ALL.to_vec())),
            prop::option::of(prop::option::of(0u32..1000)),
            prop::option::of(prop::option::of(0u32..1000)),
        )
            .prop_map(|(soft_delete, soft_delete_days, immutability, min, max)| {
                SafetyChange {
                    soft_delete,
                    soft_delete_days,
                    immutability,
                    min_retention_days: min,
                    max_retention_days: max,
                    guard_id: None,
                }
            })
    }

    proptest! {
        #[test]
        fn no_change_undoes_a_final_lock_or_always_on_soft_delete(
            current in any_safety(),
            change in any_change(),
            now in (0i64..4_000_000_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
        ) {
            if let Ok(next) = check_safety_change(&current, &change, now) {
                if current.lock_final(now) {
                    prop_assert_eq!(next.immutability, Immutability::Locked);
                    prop_assert_eq!(next.min_retention_days, current.min_retention_days);
                    prop_assert_eq!(next.max_retention_days, current.max_retention_days);
                }
                if current.soft_delete == SoftDelete::AlwaysOn {
                    prop_assert_eq!(next.soft_delete, SoftDelete::AlwaysOn);
                    prop_assert!(next.soft_delete_days >= current.soft_delete_days);
                }
                prop_assert!((MIN_SOFT_DELETE_DAYS..=MAX_SOFT_DELETE_DAYS).contains(&next.soft_delete_days));
                if next.min_retention_days.is_some() || next.max_retention_days.is_some() {
                    prop_assert!(next.immutable());
                }
            }
        }

        #[test]
        fn an_immutable_vault_never_brings_an_expiry_forward(
            current in any_instant(),
            proposed in any_instant(),
            immutable in any::<bool>(),
        ) {
            let next = expiry_after_policy_change(immutable, current, proposed);
            if immutable {
                match (current, next) {
                    (None, next) => prop_assert_eq!(next, None),
                    (Some(c), Some(n)) => prop_assert!(n >= c),
                    (Some(_), None) => {}
                }
            } else {
                prop_assert_eq!(next, proposed);
            }
        }

        #[test]
        fn an_approval_never_unlocks_another_operation_or_resource(
            op in prop::sample::select(GuardedOperation::ALL.to_vec()),
            other_op in prop::sample::select(GuardedOperation::ALL.to_vec()),
            resource in 0u128..3,
            other_resource in 0u128..3,
        ) {
            let a = Approval {
                vault_id: Uuid::from_u128(1),
                operation: op,
                resource_id: Uuid::from_u128(resource),
                requested_by: "alice".into(),
                status: ApprovalStatus::Granted,
                expires_at: at("2030-01-01T00:00:00Z"),
            };
            let w = Wanted {
                vault_id: Uuid::from_u128(1),
                operation: other_op,
                resource_id: Uuid::from_u128(other_resource),
                subject: "alice",
            };
            let ok = check_approval(Some(&a), w, at("2026-01-01T00:00:00Z")).is_ok();
            prop_assert_eq!(ok, op == other_op && resource == other_resource);
        }
    }
}
