//! State the API cannot produce or show, in SQL: one helper per thing a test means, each
//! saying why no API call or `backvault_store` function does it. Everything else a test
//! sets up or reads goes through the API.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

// ----------------------------------------------------------------------------------------
// Chains and recovery points
// ----------------------------------------------------------------------------------------

/// As if every protected database had its full already: the scheduler runs the other
/// types. Forged because a full taken through an agent would record a job and a point,
/// which the scheduler tests count.
pub async fn forge_fulls_taken(pool: &PgPool) {
    sqlx::query("update protected_items set chain = jsonb_set(chain, '{needs}', '\"nothing\"')")
        .execute(pool)
        .await
        .unwrap();
}

/// The point expires at `at`. Forged: expiry follows retention from the backup time, and
/// a test of the sweep needs points that expired at chosen instants relative to now.
pub async fn forge_expiry(pool: &PgPool, point: &str, at: DateTime<Utc>) {
    let updated = sqlx::query("update recovery_points set expires_at = $2 where id = $1::uuid")
        .bind(point)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1, "recovery point {point}");
}

/// The full no longer records how long its chain needs it (`chain_until`), so only its
/// dependents can keep it: forged to show the sweep looks at them, not at that field.
pub async fn forge_no_chain_until(pool: &PgPool, full: &str) {
    let updated = sqlx::query(
        "update recovery_points set chain_until = null where id = $1::uuid and backup_type = 'full'",
    )
    .bind(full)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "full {full}");
}

/// Every recorded point claims `bytes`. Forged: the API bounds what an agent reports per
/// point, and a test of overflow needs sizes past those bounds.
pub async fn forge_point_sizes(pool: &PgPool, bytes: i64) {
    sqlx::query("update recovery_points set size_bytes = $1")
        .bind(bytes)
        .execute(pool)
        .await
        .unwrap();
}

/// How many recovery points are recorded, for every item at once (to show that nothing
/// was recorded anywhere, which listing one item's points cannot).
pub async fn recovery_points_recorded(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from recovery_points")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The protected items' protection began `ago`, for those of `names`. Forged: protection
/// begins when it is configured, and an RPO test needs items unprotected for days.
pub async fn forge_protection_began(pool: &PgPool, names: &[String], ago: Duration) {
    let updated = sqlx::query(
        "update protected_items set created_at = now() - $2::interval where protected_name = any($1)",
    )
    .bind(names)
    .bind(ago)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), names.len() as u64, "{names:?}");
}

/// Tries to protect `database` twice more in `vault` behind the API's back, to show the
/// database itself refuses two protections of one database.
pub async fn insert_two_protections(
    pool: &PgPool,
    vault: &str,
    database: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "insert into protected_items (id, vault_id, database_id, policy_id, state, protected_name)
         select gen_random_uuid(), $1::uuid, $2::uuid,
                (select id from policies where vault_id = $1::uuid limit 1), 'protected', 'x'
         from generate_series(1, 2)",
    )
    .bind(vault)
    .bind(database)
    .execute(pool)
    .await
    .map(drop)
}

// ----------------------------------------------------------------------------------------
// Jobs and the queue
// ----------------------------------------------------------------------------------------

/// The queued jobs leave the queue completed, as if they had run, recording nothing.
/// Forged: running them through an agent would record points and move the chains the
/// scheduler decides by.
pub async fn drain_queue(pool: &PgPool) {
    sqlx::query(
        "with drained as (delete from job_queue returning job_id)
         update jobs set status = 'completed', finished_at = now(), updated_at = now()
         where id in (select job_id from drained)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// How many jobs the hot queue holds (finished jobs must leave it; the API shows a job's
/// status, not whether its row left the queue).
pub async fn queue_len(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from job_queue")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The `kind` jobs keep only `database`'s item, as if the others' part were done. Forged:
/// an agent completes a job whole.
pub async fn forge_jobs_left_with(pool: &PgPool, kind: &str, database: &str) {
    sqlx::query(
        "update jobs set items = (select jsonb_agg(i) from jsonb_array_elements(items) i
                                  where i ->> 'database' = $2)
         where kind = $1",
    )
    .bind(kind)
    .bind(database)
    .execute(pool)
    .await
    .unwrap();
}

/// The running jobs' leases ran out a second ago. Forged: waiting out a real lease takes a
/// minute.
pub async fn forge_leases_expired(pool: &PgPool) {
    sqlx::query(
        "update job_queue set lease_expires_at = now() - interval '1 second' where running",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Whether `job_queue` was vacuumed, and its dead rows, as Postgres's statistics say.
pub async fn queue_vacuum_stats(pool: &PgPool) -> (bool, i64) {
    sqlx::query_as(
        "select last_vacuum is not null, n_dead_tup from pg_stat_user_tables where relname = 'job_queue'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// How each attempt at the job ended, in order (`running` while it runs).
pub async fn attempt_outcomes(pool: &PgPool, job: &str) -> Vec<String> {
    sqlx::query_scalar(
        // A running attempt is the queue row's until it ends.
        "select outcome from (
             select attempt, outcome from job_attempts where job_id = $1::uuid
             union all
             select attempt, 'running' from job_queue q
             where job_id = $1::uuid and running
               and not exists (select 1 from job_attempts a where a.job_id = q.job_id and a.attempt = q.attempt)
         ) a order by attempt",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The queued jobs backing off may run now. Forged: waiting out the backoff takes seconds.
pub async fn forge_retries_due(pool: &PgPool) {
    sqlx::query("update job_queue set run_at = now() where not running")
        .execute(pool)
        .await
        .unwrap();
}

/// The job's payload says `retention_days`, as a job enqueued before the bound on it
/// existed. Forged: the API refuses such a retention today.
pub async fn forge_retention_days(pool: &PgPool, job: &str, days: i64) {
    let updated = sqlx::query(
        "update jobs set payload = jsonb_set(payload, '{retention_days}', to_jsonb($2::int8))
         where id = $1::uuid",
    )
    .bind(job)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "job {job}");
}

/// The finished job finished `ago` (and was created no later). Forged: pruning keeps months
/// of history.
pub async fn forge_finished_ago(pool: &PgPool, job: &str, ago: Duration) {
    let updated = sqlx::query(
        "update jobs set finished_at = now() - $2::interval, created_at = least(created_at, now() - $2::interval)
         where id = $1::uuid and finished_at is not null",
    )
    .bind(job)
    .bind(ago)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "finished job {job}");
}

/// Tries to enqueue a job of 51 items on `vm` behind the API's back, to show the database
/// itself refuses more than 50.
pub async fn insert_job_of_51_items(pool: &PgPool, vm: &str) -> sqlx::Result<()> {
    sqlx::query(
        "insert into jobs (id, vm_id, subscription_id, kind, status, priority, items, max_attempts)
         values (gen_random_uuid(), $1::uuid, 'sub-1', 'backup_full', 'queued', 0,
                 (select jsonb_agg(x) from generate_series(1, 51) x), 3)",
    )
    .bind(vm)
    .execute(pool)
    .await
    .map(drop)
}

// ----------------------------------------------------------------------------------------
// Schedules and discovery
// ----------------------------------------------------------------------------------------

/// How many `kind` slots the scheduler has fired (the slots' cursors are not in the API).
pub async fn slots_fired(pool: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from schedule_slots where kind = $1 and slot_at > '-infinity'",
    )
    .bind(kind)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The scheduler's cursors (not in the API): how many there are, and the latest next
/// slot among those that have one.
pub async fn schedule_cursors(pool: &PgPool) -> (i64, Option<DateTime<Utc>>) {
    sqlx::query_as(
        "select count(*), max(next_at) filter (where next_at > '-infinity') from schedule_slots",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// `backvault_batch_of(i, n, max)` for every item `i` of every size `n` up to `sizes`:
/// the SQL twin of the domain's split into jobs, which a test compares with it.
pub async fn batch_of_in_sql(pool: &PgPool, sizes: i64, max: i32) -> Vec<(i64, i64, i64)> {
    sqlx::query_as(
        "select n, i, backvault_batch_of(i, n, $2)
         from generate_series(1::int8, $1) n cross join lateral generate_series(0::int8, n - 1) i",
    )
    .bind(sizes)
    .bind(max)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every registered VM's periodic discovery is due. Forged: the period is hours.
pub async fn forge_discovery_due(pool: &PgPool) {
    sqlx::query("update vms set next_discovery_at = now() - interval '1 minute'")
        .execute(pool)
        .await
        .unwrap();
}

// ----------------------------------------------------------------------------------------
// Tokens
// ----------------------------------------------------------------------------------------

/// How many uses the enrollment token has had (the API lists outstanding tokens only).
pub async fn enrollment_token_uses(pool: &PgPool, id: &str) -> i32 {
    backvault_store::tokens::enrollment_token_get(pool, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("enrollment token {id}"))
        .uses
}

/// An enrollment token that expired `ago`. Forged: the API mints tokens valid from now.
pub async fn forge_expired_enrollment_token(pool: &PgPool, ago: Duration) {
    backvault_store::tokens::enrollment_token_insert(
        pool,
        &backvault_store::tokens::NewEnrollmentToken {
            id: Uuid::now_v7(),
            subscription_id: "sub-1",
            bound_to: None,
            created_by: "x",
            expires_at: Utc::now() - ago,
            max_uses: 1,
        },
    )
    .await
    .unwrap();
}

/// A revoked token that expires at `expires_at` (in the past: its entry is of no use any
/// more). Forged: the API revokes tokens that are still valid.
pub async fn forge_revocation(pool: &PgPool, expires_at: DateTime<Utc>) {
    backvault_store::tokens::token_revoke(pool, Uuid::now_v7(), expires_at, "x")
        .await
        .unwrap();
}

/// How many enrollment tokens and revocations are kept, used, expired or not (the API
/// lists neither whole).
pub async fn token_rows(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "select (select count(*) from enrollment_tokens), (select count(*) from revoked_tokens)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

// ----------------------------------------------------------------------------------------
// The schema
// ----------------------------------------------------------------------------------------

/// A table of a later feature whose rows reference `table`'s row `id` with `on delete
/// restrict`, and such a row: deleting the referenced row must then be refused with a
/// problem, not fail.
pub async fn forge_restricting_reference(pool: &PgPool, table: &str, id: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create table if not exists {table}_probe (referrer uuid not null references {table}(id) on delete restrict)"
    )))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into {table}_probe values ($1::uuid)"
    )))
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

/// How many policies exist in all vaults (a deleted vault's are not in the API at all).
pub async fn policies_kept(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from policies")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The migrations recorded as applied are forgotten, as on a database a deployment never
/// migrated (their table stays).
pub async fn forge_migrations_unapplied(pool: &PgPool) {
    sqlx::query("delete from _sqlx_migrations")
        .execute(pool)
        .await
        .unwrap();
}

/// The migrations' own table is gone, as on a database no migration ever touched.
pub async fn forge_migrations_never_run(pool: &PgPool) {
    sqlx::query("drop table _sqlx_migrations")
        .execute(pool)
        .await
        .unwrap();
}

// ----------------------------------------------------------------------------------------
// The audit log
// ----------------------------------------------------------------------------------------

/// Every audit event as if recorded `days` earlier. Forged: the database stamps events
/// with its own clock and refuses to change one; only a superuser (as the tests run) can,
/// with the table's triggers off for its transaction.
pub async fn forge_audit_events_aged(pool: &PgPool, days: i32) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set local session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update audit_events set at = at - make_interval(days => $1)")
        .bind(days)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Every audit write fails from now on, as a full disk or a revoked grant would make it:
/// nothing a client sends can.
pub async fn forge_audit_writes_failing(pool: &PgPool) {
    sqlx::query(
        "alter table audit_events add constraint audit_writes_fail check (false) not valid",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Every stored audit event as text, each column included: what a leak would show in.
pub async fn audit_log_text(pool: &PgPool) -> String {
    sqlx::query_scalar("select coalesce(string_agg(e::text, E'\n'), '') from audit_events e")
        .fetch_one(pool)
        .await
        .unwrap()
}

// ----------------------------------------------------------------------------------------
// Postgres itself
// ----------------------------------------------------------------------------------------

/// How many sessions of this test's database wait for a lock another holds: the event a
/// test of lock-based ordering waits for.
pub async fn sessions_waiting_for_a_lock(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

// ----------------------------------------------------------------------------------------
// Data safety: time passing
// ----------------------------------------------------------------------------------------

/// The item's soft-delete period ended. Forged: the period is 14 days at least, and no API
/// moves time.
pub async fn forge_soft_delete_period_over(pool: &PgPool, item: &str) {
    let updated = sqlx::query(
        "update protected_items set purge_after = now() - interval '1 second' where id = $1::uuid",
    )
    .bind(item)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "protected item {item}");
}

/// The vault was locked `hours` ago. Forged: the cooling-off window is 72 hours.
pub async fn forge_locked_ago(pool: &PgPool, vault: &str, hours: i64) {
    let updated = sqlx::query(
        "update vaults set locked_at = now() - make_interval(hours => $2) where id = $1::uuid",
    )
    .bind(vault)
    .bind(i32::try_from(hours).unwrap())
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "vault {vault}");
}

/// The approval's grant ran out. Forged: a grant lasts at least a minute.
pub async fn forge_approval_lapsed(pool: &PgPool, approval: &str) {
    let updated = sqlx::query(
        "update approvals set expires_at = now() - interval '1 second' where id = $1::uuid",
    )
    .bind(approval)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(updated.rows_affected(), 1, "approval {approval}");
}

// ----------------------------------------------------------------------------------------
// Availability groups and data safety: below the API
// ----------------------------------------------------------------------------------------

/// Every replica's copy of database `name`, by VM. Read here: the API shows a group
/// database once, under the group database's id, never its copies.
pub async fn database_copies(pool: &PgPool, name: &str) -> Vec<Uuid> {
    sqlx::query_scalar("select id from sql_databases where name = $1 order by vm_id")
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Forgets every protected item and its points. No API deletes them outright: stopping
/// protection soft-deletes, and the test needs the databases unprotected again.
pub async fn forget_protected_items(pool: &PgPool) {
    sqlx::query("delete from protected_items")
        .execute(pool)
        .await
        .unwrap();
}

/// What key a forged second item of a database row claims to protect.
pub enum ForgedKey {
    /// The row's own item key (for a copy in a group: its group database).
    Its,
    /// The row's id, as if the copy were a standalone database.
    RowId,
}

/// Inserts a second item, next to an existing one, for the database row `database`,
/// bypassing the service: what the database's constraints must refuse.
pub async fn insert_item_beside(pool: &PgPool, database: Uuid, key: ForgedKey) -> sqlx::Error {
    let key = match key {
        ForgedKey::Its => "d.item_key",
        ForgedKey::RowId => "d.id",
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "insert into protected_items (id, vault_id, database_id, item_key, policy_id, state, protected_name)
         select gen_random_uuid(), p.vault_id, d.id, {key}, p.policy_id, 'protected', d.name
         from protected_items p, sql_databases d where d.id = $1"
    )))
    .bind(database)
    .execute(pool)
    .await
    .unwrap_err()
}

/// Every recovery point expired a day ago. Forged: expiry follows retention, days away.
pub async fn forge_all_points_expired(pool: &PgPool) {
    sqlx::query("update recovery_points set expires_at = now() - interval '1 day'")
        .execute(pool)
        .await
        .unwrap();
}

/// Each recovery point's expiry, by point id.
pub async fn point_expiries(pool: &PgPool) -> Vec<Option<DateTime<Utc>>> {
    sqlx::query_scalar("select expires_at from recovery_points order by id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Deletes every recovery point, as a compromised application could try to: what the
/// immutability trigger must refuse.
pub async fn try_delete_all_points(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("delete from recovery_points")
        .execute(pool)
        .await
        .map(drop)
}

/// Brings every point's expiry forward to now, bypassing the service.
pub async fn try_expire_all_points_now(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("update recovery_points set expires_at = now()")
        .execute(pool)
        .await
        .map(drop)
}

/// Unlocks every vault, bypassing the service: what the lock trigger must refuse.
pub async fn try_unlock_vaults(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("update vaults set immutability = 'disabled', locked_at = null")
        .execute(pool)
        .await
        .map(drop)
}
