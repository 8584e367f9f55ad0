//! Jobs and the dispatch queue. `jobs` is the history users read; `job_queue` holds only
//! pending and running jobs, the rows agents claim. Every state change of a job updates
//! both in one statement or transaction.

use backvault_domain::jobs::{AttemptOutcome, JobKind, JobStatus, Priority};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

/// The channel every replica listens on. Payloads: `v:<vm id>,...` (jobs became claimable
/// for these VMs), `j:<job id>,...` (these jobs changed state), `v:*` / `j:*` (re-check all).
pub const NOTIFY_CHANNEL: &str = "backvault";
/// Postgres refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;

pub fn notify_payload(prefix: char, ids: impl IntoIterator<Item = Uuid>) -> String {
    let mut payload = format!("{prefix}:");
    for (i, id) in ids.into_iter().enumerate() {
        if payload.len() + 37 > MAX_PAYLOAD {
            return format!("{prefix}:*");
        }
        if i > 0 {
            payload.push(',');
        }
        payload.push_str(&id.to_string());
    }
    payload
}

/// One NOTIFY for a whole batch; delivered when the caller's transaction commits.
pub async fn notify(db: impl PgExecutor<'_>, payload: &str) -> sqlx::Result<()> {
    sqlx::query!("select pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
        .execute(db)
        .await?;
    Ok(())
}

/// Job ids in as few payloads of `prefix` as fit NOTIFY's limit.
pub fn notify_payloads(prefix: char, ids: &[Uuid]) -> Vec<String> {
    // "<prefix>:" then 36 characters and a comma per id.
    let per_payload = (MAX_PAYLOAD - 2) / 37;
    ids.chunks(per_payload)
        .map(|chunk| notify_payload(prefix, chunk.iter().copied()))
        .collect()
}

/// Several NOTIFYs in one statement (and, outside a transaction, one commit).
pub async fn notify_all(db: impl PgExecutor<'_>, payloads: &[String]) -> sqlx::Result<()> {
    sqlx::query!(
        "select count(pg_notify($1, p)) from unnest($2::text[]) as p",
        NOTIFY_CHANNEL,
        payloads,
    )
    .fetch_one(db)
    .await?;
    Ok(())
}

/// The unique index that admits one queued or running restore per target (VM, instance,
/// database, ignoring case).
pub const ONE_RESTORE_PER_TARGET: &str = "job_queue_one_restore_per_target";

/// The queued or running restore of this target on `vm_id`, if any (names ignoring case).
pub async fn restore_of_target(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
    instance: &str,
    database: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar!(
        "select job_id from job_queue
         where vm_id = $1 and kind = 'restore' and lower(target_instance) = lower($2)
           and lower(target_database) = lower($3)",
        vm_id,
        instance,
        database,
    )
    .fetch_optional(db)
    .await
}

pub struct NewJob {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub subscription_id: String,
    pub vault_id: Option<Uuid>,
    pub kind: JobKind,
    pub priority: i16,
    pub items: serde_json::Value,
    pub payload: serde_json::Value,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    /// Set for a job on databases of an availability group: a failover re-routes it.
    pub availability_group_id: Option<Uuid>,
}

/// Inserts jobs into the history and the queue, and notifies the VMs' agents, all in the
/// caller's transaction: a rollback leaves neither job nor wake-up. A restore's queue row
/// names its target; a second restore of a target that has one queued or running breaks
/// [`ONE_RESTORE_PER_TARGET`].
pub async fn jobs_enqueue(conn: &mut PgConnection, jobs: &[NewJob]) -> sqlx::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let vms: Vec<Uuid> = jobs.iter().map(|j| j.vm_id).collect();
    let subs: Vec<&str> = jobs.iter().map(|j| j.subscription_id.as_str()).collect();
    let vaults: Vec<Option<Uuid>> = jobs.iter().map(|j| j.vault_id).collect();
    let kinds: Vec<JobKind> = jobs.iter().map(|j| j.kind).collect();
    let priorities: Vec<i16> = jobs.iter().map(|j| j.priority).collect();
    let items: Vec<Json<&serde_json::Value>> = jobs.iter().map(|j| Json(&j.items)).collect();
    let payloads: Vec<Json<&serde_json::Value>> = jobs.iter().map(|j| Json(&j.payload)).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.max_attempts).collect();
    let run_at: Vec<DateTime<Utc>> = jobs.iter().map(|j| j.run_at).collect();
    let groups: Vec<Option<Uuid>> = jobs.iter().map(|j| j.availability_group_id).collect();
    // Arrays of borrowed strings, of JSON and with null elements are given their Rust type
    // (`as`): the macros' expected types are `&[T]` of owned, non-null elements.
    sqlx::query!(
        "with input as (
             select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::int2[],
                                  $7::jsonb[], $8::jsonb[], $9::int[], $10::timestamptz[], $11::uuid[])
                 as i(id, vm_id, subscription_id, vault_id, kind, priority, items, payload, max_attempts, run_at,
                      availability_group_id)
         ), history as (
             insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, payload, max_attempts,
                               availability_group_id)
             select id, vm_id, subscription_id, vault_id, kind, 'queued', priority, items, payload, max_attempts,
                    availability_group_id
             from input
         )
         insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts, target_instance, target_database)
         select id, vm_id, kind, priority, run_at, max_attempts,
                case when kind = 'restore' then coalesce(payload->>'target_instance', items->0->>'instance') end,
                case when kind = 'restore' then coalesce(payload->>'target_database', items->0->>'database') end
         from input",
        &ids,
        &vms,
        &subs as &[&str],
        &vaults as &[Option<Uuid>],
        &kinds as &[JobKind],
        &priorities,
        &items as &[Json<&serde_json::Value>],
        &payloads as &[Json<&serde_json::Value>],
        &attempts,
        &run_at,
        &groups as &[Option<Uuid>],
    )
    .execute(&mut *conn)
    .await?;
    let mut unique_vms = vms;
    unique_vms.sort();
    unique_vms.dedup();
    notify(conn, &notify_payload('v', unique_vms)).await
}

#[derive(Debug, Clone, FromRow)]
pub struct ClaimedRow {
    pub job_id: Uuid,
    pub vm_id: Uuid,
    pub kind: JobKind,
    pub lease: i64,
    pub lease_expires_at: DateTime<Utc>,
    pub attempt: i32,
    pub items: Json<serde_json::Value>,
    pub payload: Json<serde_json::Value>,
}

#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits {
    pub max_running_backups: i32,
    pub max_running_restores: i32,
    pub lease: chrono::Duration,
}

/// Claims up to `wants[i]` due jobs for each of `vm_ids[i]` (distinct), on-demand before
/// scheduled, oldest first, never beyond a VM's caps of running backups and restores.
/// A restore excludes backups of its target database: a backup naming it is not handed
/// out while the restore is queued or running, and the restore is not handed out while
/// such a backup runs. Claims for one VM are serialized by an advisory lock so that two
/// concurrent claims cannot both fill the same free slot or both pass an exclusion;
/// claims for different VMs run in parallel. Notifies nobody: the caller tells the jobs'
/// waiters after its commit (a NOTIFY would serialize the commit behind every other).
pub async fn queue_claim(
    conn: &mut PgConnection,
    vm_ids: &[Uuid],
    wants: &[i32],
    limits: ClaimLimits,
) -> sqlx::Result<Vec<ClaimedRow>> {
    sqlx::query!(
        "select count(pg_advisory_xact_lock(k))
         from (select distinct hashtextextended(v::text, 1) as k from unnest($1::uuid[]) v order by k) locks",
        vm_ids,
    )
    // One row, the count; `fetch_one` because a query with columns has no `execute`.
    .fetch_one(&mut *conn)
    .await?;
    let claimed: Vec<ClaimedRow> = sqlx::query_as!(
        ClaimedRow,
        // The columns come through data-modifying CTEs, whose nullability Postgres does not
        // report: they are the queue's and the history's `not null` columns (`!`).
        r#"with req as (
             select * from unnest($1::uuid[], $2::int[]) as r(vm_id, want)
         ), room as (
             -- Per VM (lateral), so that the running index is only read for these VMs: a
             -- join was planned as a scan of every running job, which the statistics
             -- (taken when few ran) make look free.
             select r.vm_id, r.want, greatest($3::int4 - n.backups, 0) as backups,
                    greatest($4::int4 - n.restores, 0) as restores
             from req r cross join lateral (
                 select count(*) filter (where q.kind <> 'restore') as backups,
                        count(*) filter (where q.kind = 'restore') as restores
                 from job_queue q where q.vm_id = r.vm_id and q.running) n
         ), candidates as materialized (
             select c.job_id, c.vm_id, c.priority, c.run_at from room,
             lateral (select q.job_id, q.vm_id, q.priority, q.run_at from job_queue q
                      where q.vm_id = room.vm_id and not q.running and q.run_at <= now() and q.kind <> 'restore'
                        -- A backup waits while a restore of one of its databases is queued or running.
                        and (q.kind not like 'backup%' or not exists (
                             select 1 from job_queue r
                             where r.vm_id = q.vm_id and r.kind = 'restore' and r.target_database is not null
                               and exists (
                                   select 1 from jobs j, jsonb_array_elements(j.items) i
                                   where j.id = q.job_id
                                     and lower(i->>'instance') = lower(r.target_instance)
                                     and lower(i->>'database') = lower(r.target_database))))
                      order by q.priority, q.run_at
                      limit least(room.want, room.backups)
                      for no key update skip locked) c
             union all
             select c.job_id, c.vm_id, c.priority, c.run_at from room,
             lateral (select q.job_id, q.vm_id, q.priority, q.run_at from job_queue q
                      where q.vm_id = room.vm_id and not q.running and q.run_at <= now() and q.kind = 'restore'
                        -- A restore waits while a backup of its database runs.
                        and not exists (
                             select 1 from job_queue b join jobs j on j.id = b.job_id,
                                  jsonb_array_elements(j.items) i
                             where b.vm_id = q.vm_id and b.running and b.kind like 'backup%'
                               and lower(i->>'instance') = lower(q.target_instance)
                               and lower(i->>'database') = lower(q.target_database))
                      order by q.priority, q.run_at
                      limit least(room.want, room.restores)
                      for no key update skip locked) c
         ), picked as (
             select x.job_id from (
                 select c.job_id, c.vm_id, row_number() over (partition by c.vm_id order by c.priority, c.run_at) as n
                 from candidates c
             ) x join req on req.vm_id = x.vm_id
             where x.n <= req.want
         ), claimed as (
             -- Only the queue row: the history and the attempt are written when the attempt
             -- ends (migration 20261205000001).
             update job_queue q
             set running = true, lease = q.lease + 1, lease_expires_at = now() + $5::interval,
                 attempt = q.attempt + 1, progress = null, started_at = coalesce(q.started_at, now()),
                 attempt_started_at = now()
             from picked where q.job_id = picked.job_id
             returning q.job_id, q.vm_id, q.kind, q.lease, q.lease_expires_at, q.attempt
         )
         select c.job_id as "job_id!", c.vm_id as "vm_id!", c.kind as "kind!: JobKind", c.lease as "lease!",
                c.lease_expires_at as "lease_expires_at!", c.attempt as "attempt!",
                j.items as "items!: Json<serde_json::Value>", j.payload as "payload!: Json<serde_json::Value>"
         from claimed c join jobs j on j.id = c.job_id"#,
        vm_ids,
        wants,
        limits.max_running_backups,
        limits.max_running_restores,
        limits.lease as chrono::Duration,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(claimed)
}

/// A lease extended.
#[derive(Debug, Clone, FromRow)]
pub struct ExtendedLease {
    pub job_id: Uuid,
    /// A user asked for the job to be cancelled.
    pub cancel_requested: bool,
    pub lease_expires_at: DateTime<Utc>,
}

/// A lease an agent holds: its job and fencing token.
#[derive(Debug, Clone, Copy)]
pub struct HeldToken {
    pub job_id: Uuid,
    pub lease: i64,
}

/// Extends the leases the agent of `vm_id` still holds; returns each lease extended.
pub async fn queue_extend_leases(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
    leases: &[HeldToken],
    duration: chrono::Duration,
) -> sqlx::Result<Vec<ExtendedLease>> {
    let ids: Vec<Uuid> = leases.iter().map(|l| l.job_id).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| l.lease).collect();
    sqlx::query_as!(
        ExtendedLease,
        // `lease_expires_at!`: it was just set.
        r#"update job_queue q set lease_expires_at = now() + $4::interval
           from unnest($2::uuid[], $3::bigint[]) as l(job_id, lease)
           where q.job_id = l.job_id and q.lease = l.lease and q.vm_id = $1 and q.running
           returning q.job_id, q.cancel_requested, q.lease_expires_at as "lease_expires_at!""#,
        vm_id,
        &ids,
        &tokens,
        duration as chrono::Duration,
    )
    .fetch_all(db)
    .await
}

/// One lease extended by a job heartbeat.
#[derive(Debug, Clone, FromRow)]
pub struct JobLeaseExtended {
    pub lease_expires_at: DateTime<Utc>,
    pub cancel_requested: bool,
}

/// Extends one lease and records progress. `None` when the lease is not held.
pub async fn queue_job_heartbeat(
    db: impl PgExecutor<'_>,
    vm_id: Uuid,
    job_id: Uuid,
    lease: i64,
    progress: Option<&serde_json::Value>,
    duration: chrono::Duration,
) -> sqlx::Result<Option<JobLeaseExtended>> {
    sqlx::query_as!(
        JobLeaseExtended,
        // `lease_expires_at!`: it was just set.
        r#"update job_queue set lease_expires_at = now() + $5::interval, progress = coalesce($4, progress)
           where job_id = $2 and vm_id = $1 and lease = $3 and running
           returning lease_expires_at as "lease_expires_at!", cancel_requested"#,
        vm_id,
        job_id,
        lease,
        progress,
        duration as chrono::Duration,
    )
    .fetch_optional(db)
    .await
}

/// A job completion for a group commit.
pub struct Completion {
    pub job_id: Uuid,
    pub vm_id: Uuid,
    pub lease: i64,
    /// `LIKE` pattern the job's kind must match for this result (`backup_%` for backups).
    pub kind_like: &'static str,
    pub status: JobStatus,
    pub result: serde_json::Value,
    pub warnings: serde_json::Value,
}

/// A job a completion holds (or held) the lease of, with what its result must match.
#[derive(Debug, Clone, FromRow)]
pub struct CompletingJob {
    pub job_id: Uuid,
    pub kind: JobKind,
    pub items: Json<serde_json::Value>,
    pub payload: Json<serde_json::Value>,
    /// When an agent first claimed it.
    pub started_at: Option<DateTime<Utc>>,
    /// The server's clock now (the completion's instant).
    pub now: DateTime<Utc>,
}

/// The jobs of these completions whose lease is still held, with their content and claim
/// time, in one statement for the whole batch. Their queue rows are locked (in id order,
/// so that concurrent batches cannot deadlock) until the caller's transaction ends, so a
/// job judged here cannot change hands before it is completed or failed.
pub async fn queue_lock_completing(
    conn: &mut PgConnection,
    completions: &[Completion],
) -> sqlx::Result<Vec<CompletingJob>> {
    let ids: Vec<Uuid> = completions.iter().map(|c| c.job_id).collect();
    let vms: Vec<Uuid> = completions.iter().map(|c| c.vm_id).collect();
    let leases: Vec<i64> = completions.iter().map(|c| c.lease).collect();
    sqlx::query_as!(
        CompletingJob,
        // Driven from the batch by primary key: a row-value `in (select ... unnest)` was
        // planned as a scan of the whole queue per batch (a third of the agent
        // protocol's throughput in the `http` benchmark).
        r#"select q.job_id, j.kind as "kind: JobKind", j.items as "items: Json<serde_json::Value>",
                  j.payload as "payload: Json<serde_json::Value>", coalesce(j.started_at, q.started_at) as started_at,
                  now() as "now!"
           from unnest($1::uuid[], $2::uuid[], $3::bigint[]) as i(job_id, vm_id, lease)
           join job_queue q on q.job_id = i.job_id and q.vm_id = i.vm_id and q.lease = i.lease
           join jobs j on j.id = q.job_id
           where q.running
           order by q.job_id
           for no key update of q"#,
        &ids,
        &vms,
        &leases,
    )
    .fetch_all(conn)
    .await
}

/// Completes every job whose lease is still held, in one statement: the queue rows go,
/// the history rows and attempts record the outcome. Returns the jobs completed now, with
/// their content and claim time as [`queue_lock_completing`] reads them, so that a caller
/// can judge the results after the fact and roll back instead of locking first. Notifies
/// nobody, as [`queue_claim`].
pub async fn queue_complete<C: std::borrow::Borrow<Completion>>(
    conn: &mut PgConnection,
    completions: &[C],
) -> sqlx::Result<Vec<CompletingJob>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let completions: Vec<&Completion> = completions.iter().map(|c| c.borrow()).collect();
    let ids: Vec<Uuid> = completions.iter().map(|c| c.job_id).collect();
    let vms: Vec<Uuid> = completions.iter().map(|c| c.vm_id).collect();
    let leases: Vec<i64> = completions.iter().map(|c| c.lease).collect();
    let kinds: Vec<&str> = completions.iter().map(|c| c.kind_like).collect();
    let statuses: Vec<JobStatus> = completions.iter().map(|c| c.status).collect();
    let results: Vec<Json<&serde_json::Value>> =
        completions.iter().map(|c| Json(&c.result)).collect();
    let warnings: Vec<Json<&serde_json::Value>> =
        completions.iter().map(|c| Json(&c.warnings)).collect();
    // Arrays of borrowed strings and of JSON are given their Rust type (`as`).
    let done: Vec<CompletingJob> = sqlx::query_as!(
        CompletingJob,
        // `!`: the history's `not null` columns, through a data-modifying CTE.
        r#"with input as (
             select * from unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[],
                                  $7::text[])
                 as i(job_id, vm_id, lease, status, result, warnings, kind_like)
         ), held as materialized (
             -- Each completion's queue row by primary key, locked in id order (as
             -- `queue_lock_completing` does) so that concurrent batches cannot deadlock. A
             -- lateral subquery with a locking clause is never flattened into a join, and
             -- `running is true` (not `running`) keeps the partial index of running jobs out
             -- of it: joined, the batch was planned as a scan of every running job (a hash
             -- join over that index, or a nested loop over a sequential scan when the
             -- statistics were taken while few jobs ran).
             select q.job_id, q.attempt, q.lease, q.started_at, q.attempt_started_at, i.status, i.result, i.warnings
             from (select * from input order by job_id) i cross join lateral (
                 select q.job_id, q.attempt, q.lease, q.started_at, q.attempt_started_at from job_queue q
                 where q.job_id = i.job_id and q.vm_id = i.vm_id and q.lease = i.lease and q.running is true
                   and q.kind like i.kind_like
                 for update) q
         ), done as (
             delete from job_queue q where q.job_id = any(array(select job_id from held))
         ), history as (
             -- From `held` alone (its rows are locked, so `done` deletes exactly them and
             -- this returns the jobs completed):
             -- joining it back to `input` lets a generic plan loop over every pair
             -- (quadratic in the batch size).
             update jobs j set status = d.status, result = d.result, warnings = d.warnings, finished_at = now(),
                               updated_at = now(), started_at = coalesce(j.started_at, d.started_at),
                               attempts = d.attempt
             from held d
             where j.id = d.job_id
             returning j.id, j.kind, j.items, j.payload, j.started_at
         ), attempts as (
             insert into job_attempts (job_id, attempt, lease, started_at, ended_at, outcome)
             select job_id, attempt, lease, coalesce(attempt_started_at, now()), now(), 'completed' from held
             -- A claim before migration 20261205000001 inserted the row.
             on conflict (job_id, attempt) do update set ended_at = excluded.ended_at, outcome = excluded.outcome
         )
         select h.id as "job_id!", h.kind as "kind!: JobKind", h.items as "items!: Json<serde_json::Value>",
                h.payload as "payload!: Json<serde_json::Value>", h.started_at, now() as "now!"
         from history h"#,
        &ids,
        &vms,
        &leases,
        &statuses as &[JobStatus],
        &results as &[Json<&serde_json::Value>],
        &warnings as &[Json<&serde_json::Value>],
        &kinds as &[&str],
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(done)
}

/// The queue row of a running job whose lease this agent holds, locked for a decision.
#[derive(Debug, Clone, FromRow)]
pub struct HeldLease {
    pub attempt: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
}

pub async fn queue_lock_held(
    conn: &mut PgConnection,
    vm_id: Uuid,
    job_id: Uuid,
    lease: i64,
) -> sqlx::Result<Option<HeldLease>> {
    sqlx::query_as!(
        HeldLease,
        "select attempt, max_attempts, cancel_requested from job_queue
         where job_id = $1 and vm_id = $2 and lease = $3 and running for update",
        job_id,
        vm_id,
        lease,
    )
    .fetch_optional(conn)
    .await
}

/// What ends an attempt without completing the job.
pub struct AttemptEnd<'a> {
    pub outcome: AttemptOutcome,
    pub code: &'a str,
    pub message: &'a str,
}

/// Puts jobs back in the queue to run at `run_at[i]`, recording why their attempt ended.
pub async fn queue_retry(
    conn: &mut PgConnection,
    job_ids: &[Uuid],
    run_at: &[DateTime<Utc>],
    end: &[AttemptEnd<'_>],
) -> sqlx::Result<()> {
    let outcomes: Vec<AttemptOutcome> = end.iter().map(|e| e.outcome).collect();
    let codes: Vec<&str> = end.iter().map(|e| e.code).collect();
    let messages: Vec<&str> = end.iter().map(|e| e.message).collect();
    sqlx::query!(
        "with input as (
             select * from unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[])
                 as i(job_id, run_at, outcome, code, message)
         ), requeued as (
             update job_queue q set running = false, run_at = i.run_at, lease_expires_at = null
             from input i where q.job_id = i.job_id and q.running
             returning q.job_id, q.attempt, q.lease, q.started_at, q.attempt_started_at, i.outcome, i.code, i.message
         ), history as (
             update jobs j set status = 'queued', error_code = r.code, error_message = r.message, updated_at = now(),
                               started_at = coalesce(j.started_at, r.started_at), attempts = r.attempt
             from requeued r where j.id = r.job_id
         )
         insert into job_attempts (job_id, attempt, lease, started_at, ended_at, outcome, error_code, error_message)
         select job_id, attempt, lease, coalesce(attempt_started_at, now()), now(), outcome, code, message
         from requeued
         on conflict (job_id, attempt) do update
             set ended_at = excluded.ended_at, outcome = excluded.outcome, error_code = excluded.error_code,
                 error_message = excluded.error_message",
        job_ids,
        run_at,
        // Domain types and borrowed strings for `text[]` (the macros expect `&[String]`).
        &outcomes as &[AttemptOutcome],
        &codes as &[&str],
        &messages as &[&str],
    )
    .execute(&mut *conn)
    .await?;
    notify(&mut *conn, &notify_payload('j', job_ids.iter().copied())).await
}

/// Ends jobs for good with `status` (failed or cancelled): out of the queue, outcome in
/// the history and the current attempt.
pub async fn queue_finish(
    conn: &mut PgConnection,
    job_ids: &[Uuid],
    status: JobStatus,
    end: &[AttemptEnd<'_>],
) -> sqlx::Result<()> {
    let outcomes: Vec<AttemptOutcome> = end.iter().map(|e| e.outcome).collect();
    let codes: Vec<&str> = end.iter().map(|e| e.code).collect();
    let messages: Vec<&str> = end.iter().map(|e| e.message).collect();
    sqlx::query!(
        "with input as (
             select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) as i(job_id, outcome, code, message)
         ), done as (
             delete from job_queue q using input i where q.job_id = i.job_id
             returning q.job_id, q.attempt, q.lease, q.running, q.started_at, q.attempt_started_at, i.outcome, i.code,
                       i.message
         ), history as (
             update jobs j set status = $5, error_code = d.code, error_message = d.message, finished_at = now(),
                               updated_at = now(), started_at = coalesce(j.started_at, d.started_at),
                               attempts = d.attempt
             from done d where j.id = d.job_id
         )
         -- A job that never ran has no attempt to end.
         insert into job_attempts (job_id, attempt, lease, started_at, ended_at, outcome, error_code, error_message)
         select job_id, attempt, lease, coalesce(attempt_started_at, now()), now(), outcome, code, message
         from done where running
         on conflict (job_id, attempt) do update
             set ended_at = excluded.ended_at, outcome = excluded.outcome, error_code = excluded.error_code,
                 error_message = excluded.error_message",
        job_ids,
        // Domain types and borrowed strings for `text[]` (the macros expect `&[String]`).
        &outcomes as &[AttemptOutcome],
        &codes as &[&str],
        &messages as &[&str],
        status as JobStatus,
    )
    .execute(&mut *conn)
    .await?;
    notify(&mut *conn, &notify_payload('j', job_ids.iter().copied())).await
}

#[derive(Debug, Clone, FromRow)]
pub struct ExpiredLease {
    pub job_id: Uuid,
    pub attempt: i32,
    pub max_attempts: i32,
}

/// Running jobs whose lease ran out, locked so that one rescuer handles each.
pub async fn queue_lock_expired(
    conn: &mut PgConnection,
    limit: i64,
) -> sqlx::Result<Vec<ExpiredLease>> {
    sqlx::query_as!(
        ExpiredLease,
        "select job_id, attempt, max_attempts from job_queue
         where running and lease_expires_at < now()
         order by lease_expires_at limit $1 for update skip locked",
        limit,
    )
    .fetch_all(conn)
    .await
}

pub enum CancelOutcome {
    /// It was waiting: cancelled now.
    Cancelled,
    /// It is running: the agent sees the request on its next heartbeat.
    Requested,
    /// Not in the queue: finished already (or never existed).
    NotPending,
}

pub async fn queue_cancel(conn: &mut PgConnection, job_id: Uuid) -> sqlx::Result<CancelOutcome> {
    let waiting = sqlx::query_scalar!(
        "select job_id from job_queue where job_id = $1 and not running for no key update",
        job_id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if waiting.is_some() {
        let end = AttemptEnd {
            outcome: AttemptOutcome::Cancelled,
            code: "JobCancelled",
            message: "cancelled by a user before it started",
        };
        queue_finish(conn, &[job_id], JobStatus::Cancelled, &[end]).await?;
        return Ok(CancelOutcome::Cancelled);
    }
    let running = sqlx::query!(
        "with q as (update job_queue set cancel_requested = true where job_id = $1 and running returning job_id)
         update jobs set cancel_requested = true, updated_at = now() from q where jobs.id = q.job_id",
        job_id,
    )
    .execute(&mut *conn)
    .await?;
    if running.rows_affected() == 1 {
        notify(&mut *conn, &notify_payload('j', [job_id])).await?;
        Ok(CancelOutcome::Requested)
    } else {
        Ok(CancelOutcome::NotPending)
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub subscription_id: String,
    pub vault_id: Option<Uuid>,
    pub kind: JobKind,
    pub status: JobStatus,
    pub priority: Priority,
    pub items: Json<serde_json::Value>,
    /// `None` in lists ([`job_list`] does not read the bodies).
    pub payload: Option<Json<serde_json::Value>>,
    pub result: Option<Json<serde_json::Value>>,
    pub warnings: Json<serde_json::Value>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    pub progress: Option<Json<serde_json::Value>>,
    pub run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

// `job_get` reads a job with its queue row (left joined: `progress` and `run_at` are `?`).
// `job_list` and `job_list_running` read the same columns except the agent-supplied bodies
// (`payload`, `result`, `progress` are `null::jsonb`), so a page costs the same whatever
// agents reported. Keep the three column lists alike.

pub async fn job_get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.vm_id, j.subscription_id, j.vault_id, j.kind as "kind: JobKind",
                  backvault_job_status(j.status, q.running) as "status!: JobStatus", j.priority as "priority: Priority",
                  j.items as "items: Json<serde_json::Value>", j.payload as "payload?: Json<serde_json::Value>",
                  j.result as "result?: Json<serde_json::Value>", j.warnings as "warnings: Json<serde_json::Value>",
                  j.error_code, j.error_message, coalesce(q.attempt, j.attempts) as "attempts!", j.max_attempts, j.cancel_requested,
                  q.progress as "progress?: Json<serde_json::Value>", q.run_at as "run_at?", j.created_at,
                  coalesce(j.started_at, q.started_at) as started_at, j.finished_at,
                  greatest(j.updated_at, q.attempt_started_at) as "updated_at!"
           from jobs j left join job_queue q on q.job_id = j.id where j.id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

/// What decides between 404, 409 and an idempotent repeat when a lease check fails.
#[derive(Debug, Clone, FromRow)]
pub struct JobOwnership {
    pub vm_id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    pub result: Option<Json<serde_json::Value>>,
    pub lease: Option<i64>,
    pub running: Option<bool>,
}

pub async fn job_ownership(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<JobOwnership>> {
    sqlx::query_as!(
        JobOwnership,
        r#"select j.vm_id, j.kind as "kind: JobKind", backvault_job_status(j.status, q.running) as "status!: JobStatus",
                  j.result as "result?: Json<serde_json::Value>", q.lease as "lease?",
                  q.running as "running?"
           from jobs j left join job_queue q on q.job_id = j.id where j.id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

#[derive(Debug, Default)]
pub struct JobFilter<'a> {
    pub subscriptions: Option<&'a [String]>,
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub vm_id: Option<Uuid>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// Newest first (creation time, then id); the cursor is the id of the last job of the page
/// before, and a job no longer there still marks its place (UUIDv7: the id's time). Without
/// the bodies (`payload`, `result`, `progress` are `None`).
pub async fn job_list(
    db: impl PgExecutor<'_>,
    f: &JobFilter<'_>,
    page: Page,
) -> sqlx::Result<Vec<JobRow>> {
    // Running jobs are the queue's (their history still says queued): listed from the
    // queue's index of running jobs, which a filter on the history cannot reach.
    if f.status == Some(JobStatus::InProgress) {
        return job_list_running(db, f, page).await;
    }
    // With a status, the page is read from the status index `(status, created_at, id)`,
    // which ordering by the status as well makes the only index that gives the order. Left
    // to costs, Postgres walked `jobs_created` back from the newest job, filtering: the
    // estimate says most jobs are completed, but the newest are often queued, and on the
    // `scale` fixture a page of completed jobs read 31,000 pages behind 40,000 queued
    // jobs (17 ms; 0.06 ms from the status index). The status is compared by `>=` and `<=`
    // because an `=` would let Postgres drop the status from the order again (a column
    // equal to a constant orders nothing).
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.vm_id, j.subscription_id, j.vault_id, j.kind as "kind: JobKind",
                  backvault_job_status(j.status, q.running) as "status!: JobStatus", j.priority as "priority: Priority",
                  j.items as "items: Json<serde_json::Value>", null::jsonb as "payload?: Json<serde_json::Value>",
                  null::jsonb as "result?: Json<serde_json::Value>", j.warnings as "warnings: Json<serde_json::Value>",
                  j.error_code, j.error_message, coalesce(q.attempt, j.attempts) as "attempts!", j.max_attempts, j.cancel_requested,
                  null::jsonb as "progress?: Json<serde_json::Value>", q.run_at as "run_at?", j.created_at,
                  coalesce(j.started_at, q.started_at) as started_at, j.finished_at,
                  greatest(j.updated_at, q.attempt_started_at) as "updated_at!"
           from jobs j left join job_queue q on q.job_id = j.id
           where ($1::text[] is null or j.subscription_id = any($1))
             and ($2::text is null or j.status >= $2 and j.status <= $2 and q.running is not true)
             and ($3::text is null or j.kind = $3)
             and ($4::uuid is null or j.vm_id = $4)
             and ($5::timestamptz is null or j.created_at >= $5)
             and ($6::timestamptz is null or j.created_at < $6)
             and ($7::uuid is null
                  or (j.created_at, j.id) < (coalesce((select c.created_at from jobs c where c.id = $7),
                                                      to_timestamp(('x' || left(replace($7::text, '-', ''), 12))::bit(48)::int8 / 1000.0)),
                                             $7))
           order by case when $2::text is null then null else j.status end desc, j.created_at desc, j.id desc
           limit $8"#,
        f.subscriptions,
        f.status as Option<JobStatus>,
        f.kind as Option<JobKind>,
        f.vm_id,
        f.created_after,
        f.created_before,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

/// [`job_list`] of the running jobs, driven by the queue's `(created_at, job_id)` index of
/// running rows (the queue row's `created_at` is the job's).
async fn job_list_running(
    db: impl PgExecutor<'_>,
    f: &JobFilter<'_>,
    page: Page,
) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.vm_id, j.subscription_id, j.vault_id, j.kind as "kind: JobKind",
                  backvault_job_status(j.status, q.running) as "status!: JobStatus", j.priority as "priority: Priority",
                  j.items as "items: Json<serde_json::Value>", null::jsonb as "payload?: Json<serde_json::Value>",
                  null::jsonb as "result?: Json<serde_json::Value>", j.warnings as "warnings: Json<serde_json::Value>",
                  j.error_code, j.error_message, q.attempt as "attempts!", j.max_attempts, j.cancel_requested,
                  null::jsonb as "progress?: Json<serde_json::Value>", q.run_at as "run_at?", j.created_at,
                  coalesce(j.started_at, q.started_at) as started_at, j.finished_at,
                  greatest(j.updated_at, q.attempt_started_at) as "updated_at!"
           from job_queue q join jobs j on j.id = q.job_id
           where q.running and q.lease > 0
             and ($1::text[] is null or j.subscription_id = any($1))
             and ($2::text is null or j.kind = $2)
             and ($3::uuid is null or j.vm_id = $3)
             and ($4::timestamptz is null or q.created_at >= $4)
             and ($5::timestamptz is null or q.created_at < $5)
             and ($6::uuid is null
                  or (q.created_at, q.job_id) < (coalesce((select c.created_at from jobs c where c.id = $6),
                                                          to_timestamp(('x' || left(replace($6::text, '-', ''), 12))::bit(48)::int8 / 1000.0)),
                                                 $6))
           order by q.created_at desc, q.job_id desc limit $7"#,
        f.subscriptions,
        f.kind as Option<JobKind>,
        f.vm_id,
        f.created_after,
        f.created_before,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

#[derive(Debug, Clone, FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub lease: i64,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: Option<AttemptOutcome>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

pub async fn job_attempts(db: impl PgExecutor<'_>, job_id: Uuid) -> sqlx::Result<Vec<AttemptRow>> {
    sqlx::query_as!(
        AttemptRow,
        // The running attempt is the queue row's until it ends; a claim before migration
        // 20261205000001 inserted its row at once.
        r#"select attempt as "attempt!", lease as "lease!", started_at as "started_at!", ended_at,
                  outcome as "outcome: AttemptOutcome", error_code, error_message
           from (select attempt, lease, started_at, ended_at, outcome, error_code, error_message
                 from job_attempts where job_id = $1
                 union all
                 select q.attempt, q.lease, q.attempt_started_at, null, null, null, null
                 from job_queue q
                 where q.job_id = $1 and q.running
                   and not exists (select 1 from job_attempts a where a.job_id = q.job_id and a.attempt = q.attempt)) a
           order by attempt"#,
        job_id,
    )
    .fetch_all(db)
    .await
}

/// Vacuums the hot queue. Every job inserts, updates and deletes its `job_queue` row, so the
/// table holds many times its live rows in dead ones within seconds, and claims walk their
/// index entries; the table is as small as the backlog, so vacuuming it is cheap. A replica
/// that finds another's vacuum running skips it (`skip_locked`). It leaves the empty pages at
/// the table's end in place (`vacuum_truncate` is off, migration 20261206000002): cutting
/// them off takes the table's exclusive lock, which stops every claim and completion. Not
/// `jobs`: vacuuming the history's indexes costs a scan of each, so it is left to autovacuum.
pub async fn queue_vacuum(db: impl PgExecutor<'_>) -> sqlx::Result<()> {
    sqlx::raw_sql("vacuum (skip_locked) job_queue")
        .execute(db)
        .await
        .map(drop)
}

/// Deletes finished jobs older than `age`, a batch at a time so no statement runs long.
/// A job finished before the cutoff was created before it: the batch walks the creation
/// index (`finished_at` has none, so completing a job changes no index but `status`'s).
pub async fn jobs_prune(
    db: impl PgExecutor<'_>,
    age: chrono::Duration,
    batch: i64,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from jobs where id = any(array(
             select id from jobs where created_at < now() - $1::interval and finished_at < now() - $1::interval
             order by created_at limit $2))",
        // sqlx maps `interval` to `PgInterval`; chrono's duration encodes as one too.
        age as chrono::Duration,
        batch,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

#[derive(Debug, Clone, FromRow)]
pub struct QueueStat {
    pub kind: JobKind,
    pub pending: i64,
    pub running: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

pub async fn queue_stats(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<QueueStat>> {
    sqlx::query_as!(
        QueueStat,
        r#"select kind as "kind: JobKind", count(*) filter (where not running) as "pending!",
                  count(*) filter (where running) as "running!",
                  min(run_at) filter (where not running) as oldest_pending
           from job_queue group by kind"#,
    )
    .fetch_all(db)
    .await
}

/// What a job was asked to do, for the effects of its outcome.
#[derive(Debug, Clone, FromRow)]
pub struct JobContent {
    pub id: Uuid,
    pub kind: JobKind,
    pub items: Json<serde_json::Value>,
    pub payload: Json<serde_json::Value>,
}

pub async fn jobs_content(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<Vec<JobContent>> {
    sqlx::query_as!(
        JobContent,
        r#"select id, kind as "kind: JobKind", items as "items: Json<serde_json::Value>",
                  payload as "payload: Json<serde_json::Value>"
           from jobs where id = any($1)"#,
        ids,
    )
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_split_into_payloads_that_fit_and_keep_every_id() {
        let ids: Vec<Uuid> = (0..500u128).map(Uuid::from_u128).collect();
        let payloads = notify_payloads('j', &ids);
        assert_eq!(payloads.len(), 3);
        assert!(
            payloads
                .iter()
                .all(|p| p.len() < 8000 && p.starts_with("j:"))
        );
        let back: Vec<Uuid> = payloads
            .iter()
            .flat_map(|p| p[2..].split(',').map(|id| id.parse().expect("an id")))
            .collect();
        assert_eq!(back, ids);
        assert!(notify_payloads('j', &[]).is_empty());
    }
}
