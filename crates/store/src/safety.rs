//! Data safety: a vault's soft delete, immutability, retention bounds and guard; guards
//! and approvals; soft-deleted items and their purge.

use backvault_domain::safety::{ApprovalStatus, GuardedOperation, Immutability, SoftDelete};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// The database's clock: every time rule of data safety reads it, so that a server whose
/// clock is off cannot open a lock or an approval early.
pub async fn db_now(db: impl PgExecutor<'_>) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar!(r#"select now() as "now!""#)
        .fetch_one(db)
        .await
}

#[derive(Debug, Clone)]
pub struct SafetyRow {
    pub soft_delete: SoftDelete,
    pub soft_delete_days: i32,
    pub immutability: Immutability,
    pub locked_at: Option<DateTime<Utc>>,
    pub min_retention_days: Option<i32>,
    pub max_retention_days: Option<i32>,
    pub guard_id: Option<Uuid>,
    /// The guard's selected operations (empty without a guard).
    pub guarded: Vec<String>,
}

/// A vault's settings, its row locked until the transaction ends (a change and the
/// operations it governs take turns).
pub async fn safety_lock(
    conn: &mut PgConnection,
    vault_id: Uuid,
) -> sqlx::Result<Option<SafetyRow>> {
    sqlx::query_as!(
        SafetyRow,
        r#"select v.soft_delete as "soft_delete: SoftDelete", v.soft_delete_days,
                  v.immutability as "immutability: Immutability", v.locked_at, v.min_retention_days,
                  v.max_retention_days, v.guard_id,
                  coalesce((select g.operations from guards g where g.id = v.guard_id), '{}') as "guarded!"
           from vaults v where v.id = $1 for update of v"#,
        vault_id,
    )
    .fetch_optional(conn)
    .await
}

pub struct SafetyWrite {
    pub soft_delete: SoftDelete,
    pub soft_delete_days: i32,
    pub immutability: Immutability,
    pub locked_at: Option<DateTime<Utc>>,
    pub min_retention_days: Option<i32>,
    pub max_retention_days: Option<i32>,
    pub guard_id: Option<Uuid>,
}

pub async fn safety_set(
    conn: &mut PgConnection,
    vault_id: Uuid,
    s: &SafetyWrite,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update vaults set soft_delete = $2, soft_delete_days = $3, immutability = $4, locked_at = $5,
                           min_retention_days = $6, max_retention_days = $7, guard_id = $8,
                           version = version + 1, updated_at = now()
         where id = $1",
        vault_id,
        s.soft_delete as SoftDelete,
        s.soft_delete_days,
        s.immutability as Immutability,
        s.locked_at,
        s.min_retention_days,
        s.max_retention_days,
        s.guard_id,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether the policy's vault is immutable (its points' expiries only ever move later).
pub async fn policy_vault_immutable(
    db: impl PgExecutor<'_>,
    policy_id: Uuid,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select v.immutability <> 'disabled' as "immutable!" from policies p join vaults v on v.id = p.vault_id
           where p.id = $1"#,
        policy_id,
    )
    .fetch_one(db)
    .await
}

#[derive(Debug, Clone)]
pub struct GuardRow {
    pub id: Uuid,
    pub subscription_id: String,
    pub name: String,
    pub operations: Vec<String>,
    pub created_at: DateTime<Utc>,
}

pub async fn guard_insert(
    conn: &mut PgConnection,
    id: Uuid,
    subscription_id: &str,
    name: &str,
    operations: &[GuardedOperation],
) -> sqlx::Result<GuardRow> {
    sqlx::query_as!(
        GuardRow,
        "insert into guards (id, subscription_id, name, operations) values ($1, $2, $3, $4)
         returning id, subscription_id, name, operations, created_at",
        id,
        subscription_id,
        name,
        operations as &[GuardedOperation],
    )
    .fetch_one(conn)
    .await
}

pub async fn guard_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<GuardRow>> {
    sqlx::query_as!(
        GuardRow,
        "select id, subscription_id, name, operations, created_at from guards where id = $1",
        id,
    )
    .fetch_optional(db)
    .await
}

pub async fn guard_list(
    db: impl PgExecutor<'_>,
    subscriptions: Option<&[String]>,
) -> sqlx::Result<Vec<GuardRow>> {
    sqlx::query_as!(
        GuardRow,
        "select id, subscription_id, name, operations, created_at from guards
         where $1::text[] is null or subscription_id = any($1) order by id",
        subscriptions,
    )
    .fetch_all(db)
    .await
}

/// Deletes a guard no vault is bound to; a bound one fails on the foreign key.
pub async fn guard_delete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query!("delete from guards where id = $1", id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[derive(Debug, Clone)]
pub struct ApprovalRow {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub guard_id: Uuid,
    pub operation: GuardedOperation,
    pub resource_id: Uuid,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub reason: String,
    pub status: ApprovalStatus,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

pub struct NewApproval<'a> {
    pub id: Uuid,
    pub vault_id: Uuid,
    pub guard_id: Uuid,
    pub operation: GuardedOperation,
    pub resource_id: Uuid,
    pub requested_by: &'a str,
    pub reason: &'a str,
    pub lapses_after_hours: i32,
}

pub async fn approval_insert(
    conn: &mut PgConnection,
    a: NewApproval<'_>,
) -> sqlx::Result<ApprovalRow> {
    sqlx::query_as!(
        ApprovalRow,
        r#"insert into approvals (id, vault_id, guard_id, operation, resource_id, requested_by, reason, expires_at)
           values ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(hours => $8))
           returning id, vault_id, guard_id, operation as "operation: GuardedOperation", resource_id, requested_by,
                     requested_at, reason, status as "status: ApprovalStatus", decided_by, decided_at, expires_at,
                     used_at"#,
        a.id,
        a.vault_id,
        a.guard_id,
        a.operation as GuardedOperation,
        a.resource_id,
        a.requested_by,
        a.reason,
        a.lapses_after_hours,
    )
    .fetch_one(conn)
    .await
}

/// An approval of the vault, locked until the transaction ends (using or deciding it
/// happens once).
pub async fn approval_lock(
    conn: &mut PgConnection,
    vault_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<ApprovalRow>> {
    sqlx::query_as!(
        ApprovalRow,
        r#"select id, vault_id, guard_id, operation as "operation: GuardedOperation", resource_id, requested_by,
                  requested_at, reason, status as "status: ApprovalStatus", decided_by, decided_at, expires_at, used_at
           from approvals where id = $1 and vault_id = $2 for update"#,
        id,
        vault_id,
    )
    .fetch_optional(conn)
    .await
}

pub async fn approval_list(
    db: impl PgExecutor<'_>,
    vault_id: Uuid,
) -> sqlx::Result<Vec<ApprovalRow>> {
    sqlx::query_as!(
        ApprovalRow,
        r#"select id, vault_id, guard_id, operation as "operation: GuardedOperation", resource_id, requested_by,
                  requested_at, reason, status as "status: ApprovalStatus", decided_by, decided_at, expires_at, used_at
           from approvals where vault_id = $1 order by id desc limit 500"#,
        vault_id,
    )
    .fetch_all(db)
    .await
}

/// Records a decision: granted for `minutes` from now, or denied.
pub async fn approval_decide(
    conn: &mut PgConnection,
    id: Uuid,
    status: ApprovalStatus,
    decided_by: &str,
    minutes: i32,
) -> sqlx::Result<ApprovalRow> {
    sqlx::query_as!(
        ApprovalRow,
        r#"update approvals set status = $2, decided_by = $3, decided_at = now(),
                  expires_at = case when $2 = 'granted' then now() + make_interval(mins => $4) else expires_at end
           where id = $1
           returning id, vault_id, guard_id, operation as "operation: GuardedOperation", resource_id, requested_by,
                     requested_at, reason, status as "status: ApprovalStatus", decided_by, decided_at, expires_at,
                     used_at"#,
        id,
        status as ApprovalStatus,
        decided_by,
        minutes,
    )
    .fetch_one(conn)
    .await
}

pub async fn approval_use(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "update approvals set status = 'used', used_at = now() where id = $1 and status = 'granted'",
        id
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Soft-deletes an item: protection stopped, points kept (and not swept) until
/// `purge_after`.
pub async fn item_soft_delete(
    conn: &mut PgConnection,
    id: Uuid,
    purge_after: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update protected_items set state = 'soft_deleted', deleted_at = now(), purge_after = $2,
                version = version + 1, updated_at = now()
         where id = $1",
        id,
        purge_after,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Brings a soft-deleted item back as stopped with its data retained.
pub async fn item_undelete(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "update protected_items set state = 'stopped_retain', policy_id = null, deleted_at = null,
                purge_after = null, version = version + 1, updated_at = now()
         where id = $1 and state = 'soft_deleted'",
        id,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// When a soft-deleted item is purged, and its vault.
#[derive(Debug, Clone)]
pub struct SoftDeleted {
    pub id: Uuid,
    pub purge_after: Option<DateTime<Utc>>,
}

pub async fn soft_deleted_state(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<SoftDeleted>> {
    sqlx::query_as!(
        SoftDeleted,
        "select id, purge_after from protected_items where id = $1",
        id
    )
    .fetch_optional(db)
    .await
}

/// Whether the item was purged from the vault (soft-deleted, then its period ran out).
pub async fn item_purged(db: impl PgExecutor<'_>, vault_id: Uuid, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from purged_items where id = $1 and vault_id = $2) as "purged!""#,
        id,
        vault_id,
    )
    .fetch_one(db)
    .await
}

/// Purges up to `limit` soft-deleted items whose period is over, with all their points
/// (together, so no live point is left without its full). An item of a vault that turned
/// immutable meanwhile waits until its last point expired. Returns the purged items and
/// their vaults; running it again purges nothing twice.
pub async fn items_purge_due(
    conn: &mut PgConnection,
    limit: i64,
) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    let rows = sqlx::query!(
        r#"with due as (
               select p.id, p.vault_id from protected_items p join vaults v on v.id = p.vault_id
               where p.state = 'soft_deleted' and p.purge_after <= now()
                 and (v.immutability = 'disabled'
                      or not exists (select 1 from recovery_points r where r.protected_item_id = p.id
                                     and (r.delete_after is null or r.delete_after > now())))
               order by p.purge_after limit $1
               for update of p skip locked
           ), gone as (
               delete from protected_items p using due where p.id = due.id returning p.id, p.vault_id
           ), recorded as (
               insert into purged_items (id, vault_id) select id, vault_id from gone on conflict (id) do nothing
           )
           select id as "id!", vault_id as "vault_id!" from gone"#,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.vault_id)).collect())
}
