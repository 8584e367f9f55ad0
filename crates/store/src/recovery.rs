//! Recovery points and the chain state of protected items.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use backvault_domain::agent::{RecoveryModel, RecoveryPointType};
use backvault_domain::chain::{self, ChainBreak, ChainState};
use backvault_domain::lsn::Lsn;
use backvault_domain::protection::ProtectionState;

use crate::Page;

/// The chain state of a protected item, locked while points are recorded.
#[derive(Debug, Clone, FromRow)]
pub struct ChainRow {
    pub id: Uuid,
    pub state: ProtectionState,
    pub spec: Option<Json<serde_json::Value>>,
    pub chain: Json<ChainState>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

pub async fn chain_lock(conn: &mut PgConnection, item_ids: &[Uuid]) -> sqlx::Result<Vec<ChainRow>> {
    sqlx::query_as!(
        ChainRow,
        r#"select p.id, p.state as "state: ProtectionState", pol.spec as "spec?: Json<serde_json::Value>",
                  p.chain as "chain: Json<ChainState>",
                  p.last_full_at, p.last_log_at
           from protected_items p left join policies pol on pol.id = p.policy_id
           where p.id = any($1) order by p.id for update of p"#,
        item_ids,
    )
    .fetch_all(conn)
    .await
}

/// A backup set recorded for a protected item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, FromRow)]
pub struct RecordedSet {
    pub protected_item_id: Uuid,
    pub backup_set_uuid: Uuid,
}

/// The backup sets of `item_ids` already recorded, among `backup_sets`.
pub async fn points_recorded(
    db: impl PgExecutor<'_>,
    item_ids: &[Uuid],
    backup_sets: &[Uuid],
) -> sqlx::Result<Vec<RecordedSet>> {
    sqlx::query_as!(
        RecordedSet,
        // `backup_set_uuid!`: the filter only matches rows that have one.
        r#"select protected_item_id, backup_set_uuid as "backup_set_uuid!" from recovery_points
           where protected_item_id = any($1) and backup_set_uuid = any($2)"#,
        item_ids,
        backup_sets,
    )
    .fetch_all(db)
    .await
}

/// A recovery point to record: the chain's view of the backup (`point`, with its id,
/// type, time and LSNs) and what the catalogue keeps beside it.
pub struct NewPoint {
    pub point: chain::Point,
    pub protected_item_id: Uuid,
    pub job_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub log_from: Option<DateTime<Utc>>,
    pub database_backup_lsn: Lsn,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    pub fork_point_lsn: Option<Lsn>,
    pub database_guid: Option<Uuid>,
    pub size_bytes: i64,
    pub full_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    pub fixed_retention: bool,
    pub chain_break: Option<ChainBreak>,
    pub unverified: Vec<&'static str>,
}

pub async fn points_insert(conn: &mut PgConnection, points: &[NewPoint]) -> sqlx::Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let lsn = |f: fn(&NewPoint) -> Option<Lsn>| points.iter().map(f).collect::<Vec<_>>();
    let uuid = |f: fn(&NewPoint) -> Option<Uuid>| points.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<Uuid> = points.iter().map(|p| p.point.id).collect();
    let item_ids: Vec<Uuid> = points.iter().map(|p| p.protected_item_id).collect();
    let job_ids: Vec<Uuid> = points.iter().map(|p| p.job_id).collect();
    let kinds: Vec<RecoveryPointType> = points.iter().map(|p| p.point.backup_type).collect();
    let started: Vec<DateTime<Utc>> = points.iter().map(|p| p.started_at).collect();
    let at: Vec<DateTime<Utc>> = points.iter().map(|p| p.point.backup_time).collect();
    let log_from: Vec<Option<DateTime<Utc>>> = points.iter().map(|p| p.log_from).collect();
    let begins: Vec<Option<bool>> = points.iter().map(|p| p.begins_log_chain).collect();
    let bulk: Vec<bool> = points
        .iter()
        .map(|p| p.point.has_bulk_logged_data)
        .collect();
    let models: Vec<Option<RecoveryModel>> =
        points.iter().map(|p| p.point.recovery_model).collect();
    let sizes: Vec<i64> = points.iter().map(|p| p.size_bytes).collect();
    let expires: Vec<Option<DateTime<Utc>>> = points.iter().map(|p| p.expires_at).collect();
    let fixed: Vec<bool> = points.iter().map(|p| p.fixed_retention).collect();
    let breaks: Vec<Option<ChainBreak>> = points.iter().map(|p| p.chain_break).collect();
    let unverified: Vec<String> = points.iter().map(|p| p.unverified.join(",")).collect();
    // Arrays of domain types and with null elements are given their Rust type (`as`): the
    // macros' expected types are `&[T]` of owned, non-null `String`s and such.
    sqlx::query!(
        "with inserted as (
         insert into recovery_points (id, protected_item_id, job_id, backup_type, started_at, backup_time, log_from,
                                      first_lsn, last_lsn, database_backup_lsn, checkpoint_lsn, differential_base_lsn,
                                      differential_base_guid, backup_set_uuid, begins_log_chain, has_bulk_logged_data,
                                      recovery_model, recovery_fork_guid, fork_point_lsn, database_guid, size_bytes,
                                      full_id, expires_at, fixed_retention, chain_break, unverified, vm_id)
         select id, item, job, kind, started, at, log_from, first, last, base, checkpoint, diff_base, diff_guid,
                backup_set, begins, bulk, model, fork, fork_point, db_guid, size, full_id, expires, fixed,
                chain_break, string_to_array(unverified, ','), (select j.vm_id from jobs j where j.id = job)
         from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                     $7::timestamptz[], $8::numeric[], $9::numeric[], $10::numeric[], $11::numeric[],
                     $12::numeric[], $13::uuid[], $14::uuid[], $15::bool[], $16::bool[], $17::text[], $18::uuid[],
                     $19::numeric[], $20::uuid[], $21::int8[], $22::uuid[], $23::timestamptz[], $24::bool[],
                     $25::text[], $26::text[])
              as p(id, item, job, kind, started, at, log_from, first, last, base, checkpoint, diff_base, diff_guid,
                   backup_set, begins, bulk, model, fork, fork_point, db_guid, size, full_id, expires, fixed,
                   chain_break, unverified)
         on conflict (protected_item_id, backup_set_uuid) where backup_set_uuid is not null do nothing
         returning protected_item_id, backup_type, backup_time, vm_id
         ), latest as (
             select distinct on (protected_item_id, backup_type) protected_item_id, backup_type, vm_id
             from inserted where vm_id is not null
             order by protected_item_id, backup_type, backup_time desc
         )
         -- Where each type last ran: for a group database, which replica took it.
         update protected_items p set last_backup_vms = p.last_backup_vms || l.vms
         from (select protected_item_id, jsonb_object_agg(backup_type, vm_id) as vms
               from latest group by protected_item_id) l
         where p.id = l.protected_item_id",
        &ids,
        &item_ids,
        &job_ids,
        &kinds as &[RecoveryPointType],
        &started,
        &at,
        &log_from as &[Option<DateTime<Utc>>],
        &lsn(|p| Some(p.point.first_lsn)) as &[Option<Lsn>],
        &lsn(|p| Some(p.point.last_lsn)) as &[Option<Lsn>],
        &lsn(|p| Some(p.database_backup_lsn)) as &[Option<Lsn>],
        &lsn(|p| p.point.checkpoint_lsn) as &[Option<Lsn>],
        &lsn(|p| p.point.differential_base_lsn) as &[Option<Lsn>],
        &uuid(|p| p.point.differential_base_guid) as &[Option<Uuid>],
        &uuid(|p| p.backup_set_uuid) as &[Option<Uuid>],
        &begins as &[Option<bool>],
        &bulk,
        &models as &[Option<RecoveryModel>],
        &uuid(|p| p.point.recovery_fork_guid) as &[Option<Uuid>],
        &lsn(|p| p.fork_point_lsn) as &[Option<Lsn>],
        &uuid(|p| p.database_guid) as &[Option<Uuid>],
        &sizes,
        &uuid(|p| p.full_id) as &[Option<Uuid>],
        &expires as &[Option<DateTime<Utc>>],
        &fixed,
        &breaks as &[Option<ChainBreak>],
        &unverified,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The chain state after recording points.
pub struct ChainUpdate {
    pub id: Uuid,
    pub chain: ChainState,
    pub last_full_id: Option<Uuid>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

pub async fn chain_update(conn: &mut PgConnection, updates: &[ChainUpdate]) -> sqlx::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = updates.iter().map(|u| u.id).collect();
    let chains: Vec<Json<ChainState>> = updates.iter().map(|u| Json(u.chain)).collect();
    let full_ids: Vec<Option<Uuid>> = updates.iter().map(|u| u.last_full_id).collect();
    let full_at: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.last_full_at).collect();
    let diff_at: Vec<Option<DateTime<Utc>>> =
        updates.iter().map(|u| u.last_differential_at).collect();
    let log_at: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.last_log_at).collect();
    // Arrays of JSON and with null elements are given their Rust type (`as`).
    sqlx::query!(
        "update protected_items p set
             chain = u.chain,
             last_full_id = coalesce(u.full_id, p.last_full_id),
             last_full_at = greatest(u.full_at, p.last_full_at),
             last_differential_at = greatest(u.diff_at, p.last_differential_at),
             last_log_at = greatest(u.log_at, p.last_log_at),
             updated_at = now()
         from unnest($1::uuid[], $2::jsonb[], $3::uuid[], $4::timestamptz[], $5::timestamptz[], $6::timestamptz[])
              as u(id, chain, full_id, full_at, diff_at, log_at)
         where p.id = u.id",
        &ids,
        &chains as &[Json<ChainState>],
        &full_ids as &[Option<Uuid>],
        &full_at as &[Option<DateTime<Utc>>],
        &diff_at as &[Option<DateTime<Utc>>],
        &log_at as &[Option<DateTime<Utc>>],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A protected item's chain state with its policy's spec.
#[derive(Debug, Clone, FromRow)]
pub struct ItemChain {
    pub id: Uuid,
    pub chain: Json<ChainState>,
    pub spec: Option<Json<serde_json::Value>>,
}

/// The chain states of `item_ids`, locked, with their policies' specs, for a change that
/// does not come with points (a recovery model switch).
pub async fn chains_of_items(
    conn: &mut PgConnection,
    item_ids: &[Uuid],
) -> sqlx::Result<Vec<ItemChain>> {
    sqlx::query_as!(
        ItemChain,
        r#"select p.id, p.chain as "chain: Json<ChainState>", pol.spec as "spec?: Json<serde_json::Value>"
           from protected_items p left join policies pol on pol.id = p.policy_id
           where p.id = any($1) order by p.id for update of p"#,
        item_ids,
    )
    .fetch_all(conn)
    .await
}

pub async fn chains_set(
    db: impl PgExecutor<'_>,
    item_ids: &[Uuid],
    chains: &[ChainState],
) -> sqlx::Result<()> {
    let chains: Vec<Json<ChainState>> = chains.iter().map(|c| Json(*c)).collect();
    sqlx::query!(
        "update protected_items p set chain = u.chain, updated_at = now()
         from unnest($1::uuid[], $2::jsonb[]) as u(id, chain) where p.id = u.id",
        item_ids,
        &chains as &[Json<ChainState>],
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Keeps fulls at least as long as their dependents: raises each full's `chain_until` to
/// the expiry of new points that depend on it (only the new points are read, so the cost
/// does not grow with the chain).
pub async fn fulls_extend_chain(
    db: impl PgExecutor<'_>,
    full_ids: &[Uuid],
    expires: &[DateTime<Utc>],
) -> sqlx::Result<()> {
    if full_ids.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "update recovery_points f set chain_until = greatest(f.chain_until, d.until)
         from (select full_id, max(expires) as until from unnest($1::uuid[], $2::timestamptz[]) as n(full_id, expires)
               group by full_id) d
         where f.id = d.full_id and (f.chain_until is null or f.chain_until < d.until)",
        full_ids,
        expires,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The next backup of these items must be a full (an agent found their chain broken).
pub async fn needs_full_set(db: impl PgExecutor<'_>, item_ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query!(
        r#"update protected_items set chain = jsonb_set(chain, '{needs}', '"full"') where id = any($1)"#,
        item_ids,
    )
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct PointRow {
    pub id: Uuid,
    pub protected_item_id: Uuid,
    pub job_id: Option<Uuid>,
    pub backup_type: RecoveryPointType,
    pub started_at: DateTime<Utc>,
    pub backup_time: DateTime<Utc>,
    pub log_from: Option<DateTime<Utc>>,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub database_backup_lsn: Lsn,
    pub checkpoint_lsn: Option<Lsn>,
    pub differential_base_lsn: Option<Lsn>,
    pub differential_base_guid: Option<Uuid>,
    pub backup_set_uuid: Option<Uuid>,
    pub begins_log_chain: Option<bool>,
    pub has_bulk_logged_data: bool,
    pub recovery_model: Option<RecoveryModel>,
    pub recovery_fork_guid: Option<Uuid>,
    pub fork_point_lsn: Option<Lsn>,
    pub database_guid: Option<Uuid>,
    pub chain_break: Option<ChainBreak>,
    pub unverified: Vec<String>,
    pub size_bytes: i64,
    pub full_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    pub chain_until: Option<DateTime<Utc>>,
    pub delete_after: Option<DateTime<Utc>>,
    pub fixed_retention: bool,
    pub chain_gap: bool,
    pub vm_id: Option<Uuid>,
}

pub async fn points_of_item(db: impl PgExecutor<'_>, item_id: Uuid) -> sqlx::Result<Vec<PointRow>> {
    sqlx::query_as!(
        PointRow,
        // The generated `chain_gap` (`chain_break is not null`) is never null (`!`).
        r#"select id, protected_item_id, job_id, backup_type as "backup_type: RecoveryPointType", started_at,
                  backup_time, log_from, first_lsn as "first_lsn: Lsn", last_lsn as "last_lsn: Lsn",
                  database_backup_lsn as "database_backup_lsn: Lsn", checkpoint_lsn as "checkpoint_lsn: Lsn",
                  differential_base_lsn as "differential_base_lsn: Lsn", differential_base_guid, backup_set_uuid,
                  begins_log_chain, has_bulk_logged_data, recovery_model as "recovery_model: RecoveryModel",
                  recovery_fork_guid, fork_point_lsn as "fork_point_lsn: Lsn", database_guid,
                  chain_break as "chain_break: ChainBreak", unverified, size_bytes, full_id, expires_at, chain_until,
                  delete_after, fixed_retention, chain_gap as "chain_gap!", vm_id
           from recovery_points where protected_item_id = $1 order by backup_time, id"#,
        item_id,
    )
    .fetch_all(db)
    .await
}

/// A point whose expiry follows its policy.
#[derive(Debug, Clone, FromRow)]
pub struct PolicyPoint {
    pub id: Uuid,
    pub backup_type: RecoveryPointType,
    pub backup_time: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Points of items under a policy whose expiry follows it (for a retention change).
pub async fn points_following_policy(
    db: impl PgExecutor<'_>,
    policy_id: Uuid,
) -> sqlx::Result<Vec<PolicyPoint>> {
    sqlx::query_as!(
        PolicyPoint,
        r#"select r.id, r.backup_type as "backup_type: RecoveryPointType", r.backup_time, r.expires_at
           from recovery_points r
           join protected_items p on p.id = r.protected_item_id
           where p.policy_id = $1 and not r.fixed_retention and r.expires_at is not null"#,
        policy_id,
    )
    .fetch_all(db)
    .await
}

pub async fn points_set_expiry(
    conn: &mut PgConnection,
    ids: &[Uuid],
    expires: &[DateTime<Utc>],
) -> sqlx::Result<()> {
    sqlx::query!(
        "update recovery_points r set expires_at = u.expires
         from unnest($1::uuid[], $2::timestamptz[]) as u(id, expires) where r.id = u.id",
        ids,
        expires,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update recovery_points f set chain_until = (select max(d.expires_at) from recovery_points d where d.full_id = f.id)
         where f.id in (select distinct full_id from recovery_points where id = any($1) and full_id is not null)
            or (f.id = any($1) and f.backup_type = 'full')",
        ids,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Retain the data of a stopped item: its points no longer expire.
pub async fn points_retain_forever(db: impl PgExecutor<'_>, item_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "update recovery_points set expires_at = null, chain_until = null where protected_item_id = $1",
        item_id,
    )
    .execute(db)
        .await?;
    Ok(())
}

/// Deletes up to `limit` expired points on which no point depends, oldest first: a full
/// goes only once its expired dependents went in an earlier batch, so a batch never cuts a
/// full from its chain. One statement, so the `delete_after` index serves every kind;
/// the ids go in as an array (`id in (subquery)` makes a hash join over the whole table).
pub async fn points_sweep(conn: &mut PgConnection, limit: i64) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from recovery_points where id = any(array(
             select r.id from recovery_points r
             where r.delete_after < now()
               and not exists (select 1 from recovery_points d where d.full_id = r.id)
               -- A soft-deleted item's points wait for its purge, all together.
               and not exists (select 1 from protected_items p
                               where p.id = r.protected_item_id and p.state = 'soft_deleted')
             order by r.delete_after limit $1))",
        limit,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

#[derive(Debug, Clone, FromRow)]
pub struct RpoRow {
    pub id: Uuid,
    pub policy_id: Option<Uuid>,
    pub database: String,
    pub vm_name: String,
    pub created_at: DateTime<Utc>,
    pub last_full_at: Option<DateTime<Utc>>,
    pub last_differential_at: Option<DateTime<Utc>>,
    pub last_log_at: Option<DateTime<Utc>>,
}

/// A page of protected items (of a vault, or of all) in id order, for the RPO report.
pub async fn rpo_rows(
    db: impl PgExecutor<'_>,
    vault_id: Option<Uuid>,
    page: Page,
) -> sqlx::Result<Vec<RpoRow>> {
    sqlx::query_as!(
        RpoRow,
        "select p.id, p.policy_id, d.name as database, v.name as vm_name, p.created_at, p.last_full_at,
                p.last_differential_at, p.last_log_at
         from protected_items p join sql_databases d on d.id = p.database_id join vms v on v.id = d.vm_id
         where p.state = 'protected' and ($1::uuid is null or p.vault_id = $1) and ($2::uuid is null or p.id > $2)
         order by p.id limit $3",
        vault_id,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

#[derive(Debug, Clone, Copy)]
pub struct RpoTotals {
    pub protected: i64,
    pub breached: i64,
}

/// Protected items (of a vault, or of all) and those whose latest backup (or start of
/// protection) is older than the instant given for their policy (`before[i]` for
/// `policies[i]`, `otherwise` for a policy not listed): [`items_stale`] per vault.
///
/// In a transaction of its own: the count runs without parallel workers. Under concurrent readers
/// the two workers Postgres gives a count of 100,000 items doubled its CPU (about 90 ms
/// against 40 ms on the `scale` fixture) to save one reader some milliseconds.
pub async fn rpo_totals(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    vault_id: Option<Uuid>,
    policies: &[Uuid],
    before: &[DateTime<Utc>],
    otherwise: DateTime<Utc>,
) -> sqlx::Result<RpoTotals> {
    sqlx::query!("set local max_parallel_workers_per_gather = 0")
        .execute(&mut **tx)
        .await?;
    sqlx::query_as!(
        RpoTotals,
        r#"select count(*) as "protected!",
                  count(*) filter (where coalesce(greatest(p.last_full_at, p.last_differential_at, p.last_log_at),
                                                  p.created_at) < coalesce(s.before, $4)) as "breached!"
           from protected_items p
           left join unnest($2::uuid[], $3::timestamptz[]) as s(policy_id, before) on s.policy_id = p.policy_id
           where p.state = 'protected' and ($1::uuid is null or p.vault_id = $1)"#,
        vault_id,
        policies,
        before,
        otherwise,
    )
    .fetch_one(&mut **tx)
    .await
}

/// Protected items whose latest backup (or start of protection) is older than the instant
/// given for their policy (`before[i]` for `policies[i]`), counted in one statement
/// however many policies there are.
pub async fn items_stale(
    db: impl PgExecutor<'_>,
    policies: &[Uuid],
    before: &[DateTime<Utc>],
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from protected_items p
             join unnest($1::uuid[], $2::timestamptz[]) as s(policy_id, before) on s.policy_id = p.policy_id
           where p.state = 'protected'
             and coalesce(greatest(p.last_full_at, p.last_differential_at, p.last_log_at), p.created_at) < s.before"#,
        policies,
        before,
    )
    .fetch_one(db)
    .await
}
