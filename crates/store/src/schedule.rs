//! The scheduler's statements: slots claimed per policy and backup type, and the set-based
//! statement that turns a fired slot into the policy's backup jobs.

use backvault_domain::jobs::JobKind;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

/// A policy that protects something, with where its schedules stand.
#[derive(Debug, Clone, FromRow)]
pub struct PolicySchedule {
    pub id: Uuid,
    pub spec: Json<serde_json::Value>,
    /// The policy's version the spec is of: a claim with an older one does nothing.
    pub version: i64,
    /// The next slot of each type; `None` until the schedule starts.
    pub next_full_at: Option<DateTime<Utc>>,
    pub next_differential_at: Option<DateTime<Utc>>,
    pub next_log_at: Option<DateTime<Utc>>,
}

impl PolicySchedule {
    /// The next slot of a scheduled kind (`JobKind::as_str`); `None` for any other.
    pub fn next_at(&self, kind: JobKind) -> Option<DateTime<Utc>> {
        match kind {
            JobKind::BackupFull => self.next_full_at,
            JobKind::BackupDifferential => self.next_differential_at,
            JobKind::BackupLog => self.next_log_at,
            JobKind::Discovery | JobKind::ConfigureProtection | JobKind::Restore => None,
        }
    }
}

/// The policies that protect something and their next slots, in one statement: a tick
/// with nothing due costs this read and no write.
pub async fn schedules_in_use(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<PolicySchedule>> {
    sqlx::query_as!(
        PolicySchedule,
        r#"select pol.id, pol.spec as "spec: Json<serde_json::Value>", pol.version,
                (select next_at from schedule_slots s where s.policy_id = pol.id and s.kind = 'backup_full'
                 order by slot_at desc limit 1) as next_full_at,
                (select next_at from schedule_slots s where s.policy_id = pol.id and s.kind = 'backup_differential'
                 order by slot_at desc limit 1) as next_differential_at,
                (select next_at from schedule_slots s where s.policy_id = pol.id and s.kind = 'backup_log'
                 order by slot_at desc limit 1) as next_log_at
         from policies pol
         where exists (select 1 from protected_items p where p.policy_id = pol.id and p.state = 'protected')"#,
    )
    .fetch_all(db)
    .await
}

/// Claims the due slot of a policy's `kind` at `now`, if any, and records `next` as the
/// slot after it; returns the slot claimed. A policy seen for the first time only starts
/// its schedule (nothing fires). Two replicas racing for one slot insert the same key: one
/// gets it, the other conflicts and gets nothing.
///
/// The policy row is held `for share` until the caller's transaction ends, so a change
/// of the policy or of which databases it protects ([`policies_lock_members`]) waits for
/// the slot's jobs; a claim made with `version` older than the policy's does nothing (its
/// `next` came from an older spec).
pub async fn schedule_claim_slot(
    conn: &mut PgConnection,
    policy_id: Uuid,
    version: i64,
    kind: JobKind,
    now: DateTime<Utc>,
    next: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    let current: Option<i64> = sqlx::query_scalar!(
        "select version from policies where id = $1 for share",
        policy_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    if current != Some(version) {
        return Ok(None);
    }
    let claimed: Option<Option<DateTime<Utc>>> = sqlx::query_scalar!(
        "with latest as (
             select next_at from schedule_slots where policy_id = $1 and kind = $2
             order by slot_at desc limit 1
         )
         insert into schedule_slots (policy_id, kind, slot_at, next_at)
         select $1, $2, coalesce((select next_at from latest), '-infinity'), $4
         where coalesce((select next_at from latest) <= $3, true)
         on conflict do nothing
         returning nullif(slot_at, '-infinity')",
        policy_id,
        kind as JobKind,
        now,
        next,
    )
    .fetch_optional(conn)
    .await?;
    Ok(claimed.flatten())
}

/// Removes the slot cursors a `--dev` rehearsal left (ticks at a chosen future instant):
/// a real tick fires a slot when it is due, so its slot is never after the moment it was
/// fired, and a schedule it starts waits at most a week for its next slot. A cursor
/// beyond that was rehearsed; left in place it would hold real ticks back until the
/// rehearsed instant. Returns how many were removed.
pub async fn schedule_forget_rehearsals(db: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from schedule_slots
         where slot_at > fired_at + interval '5 minutes'
            or next_at > fired_at + interval '8 days'",
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Before databases move between policies: waits for any tick making jobs from these
/// policies and keeps new ticks out until the caller's transaction ends, so a database
/// cannot get a job of the same slot from its old and its new policy.
pub async fn policies_lock_members(
    conn: &mut PgConnection,
    policy_ids: &[Uuid],
) -> sqlx::Result<()> {
    sqlx::query!(
        // Named: the macros make a field of every column.
        "select 1 as locked from policies where id = any($1) order by id for no key update",
        policy_ids,
    )
    // The rows are not read; a query with columns has no `execute`.
    .fetch_all(conn)
    .await?;
    Ok(())
}

/// Before databases join policies: the schedules of those that protect nothing now start
/// afresh, so the databases' first run is the next slot, not slots that passed while the
/// policy was idle.
pub async fn schedule_restart_idle(
    conn: &mut PgConnection,
    policy_ids: &[Uuid],
) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from schedule_slots s
         where s.policy_id = any($1)
           and not exists (select 1 from protected_items p
                           where p.policy_id = s.policy_id and p.state = 'protected')",
        policy_ids,
    )
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct SlotJobs {
    /// The scheduled jobs' priority rank; also what tells them from on-demand jobs when
    /// coalescing.
    pub priority: i16,
    pub max_attempts: i32,
    pub max_items_per_job: i32,
    /// The policy takes differentials: a log slot of an item whose log chain broke (with
    /// its differential base intact) runs as a differential.
    pub heal_with_differential: bool,
}

#[derive(Debug, Clone, FromRow)]
pub struct Enqueued {
    pub jobs: i64,
    pub items: i64,
    pub vm_ids: Vec<Uuid>,
}

/// Turns the claimed `slot` of a policy's `kind` into jobs, in one statement, with `slot`
/// and the scheduler's `now` in their payload (`ScheduledBackup`): the policy's
/// protected databases, per VM in jobs of at most `max_items_per_job` split as the domain's
/// `batch` does. Skipped: databases whose scheduled job of that type is still queued or
/// running (coalesced), backup types the database does not take at all
/// (`backvault_backup_type_allowed`, the twin of `domain::configure::backup_type_allowed`:
/// no log in the simple recovery model, fulls only for `master`), differentials of
/// databases with a full queued, running or taken since the slot; a database with no usable full in its chain gets a full instead,
/// one whose log chain broke a differential instead of a log (where the policy has them).
/// A group database's backup goes to the VM its group's route names, in jobs of its group
/// alone; where the route has none, the job is recorded failed with
/// `domain::availability::NO_REPLICA_CODE` and the route's reason, and the next slot tries
/// again.
pub async fn schedule_enqueue(
    conn: &mut PgConnection,
    policy_id: Uuid,
    kind: JobKind,
    slot: DateTime<Utc>,
    now: DateTime<Utc>,
    jobs: SlotJobs,
) -> sqlx::Result<Enqueued> {
    sqlx::query_as!(
        Enqueued,
        r#"with active as materialized (
             select (e.item ->> 'protected_item_id')::uuid as item_id, q.kind
             from job_queue q
             join jobs j on j.id = q.job_id
             cross join lateral jsonb_array_elements(j.items) as e (item)
             where q.priority = $4 and q.kind in ($2, 'backup_full')
               and j.vault_id = (select vault_id from policies where id = $1)
         ), due as (
             select p.id, p.vault_id, d.vm_id, v.subscription_id, i.name as instance, d.name as database,
                    case when d.ag_database_id is not null then d.availability_group_id end as ag_id,
                    case when p.needs_full then 'backup_full'
                         when p.needs_differential and $2 = 'backup_log' and $8 then 'backup_differential'
                         else $2 end as kind
             from protected_items p
             join sql_databases d on d.id = p.database_id
             join sql_instances i on i.id = d.instance_id
             join vms v on v.id = d.vm_id
             where p.policy_id = $1 and p.state = 'protected' and d.gone_at is null
               and (p.needs_full
                    or backvault_backup_type_allowed(d.name, d.recovery_model, $2)
                       and ($2 <> 'backup_differential' or p.last_full_at is null or p.last_full_at < $3))
         ), routed as (
             -- A group database's backup runs where its group's route says
             -- (`domain::availability::route`, kept on the group), under that replica's
             -- instance name; with no route, it becomes a failed job saying why.
             select due.id, due.vault_id, due.subscription_id, due.database, due.ag_id, due.kind,
                    coalesce(case when due.ag_id is null then due.vm_id
                                  when backvault_backup_placement(due.kind, false) = 'primary_only'
                                  then ag.primary_vm_id else ag.preferred_vm_id end,
                             due.vm_id) as vm_id,
                    coalesce(ri.name, due.instance) as instance,
                    case when due.ag_id is null then null
                         when backvault_backup_placement(due.kind, false) = 'primary_only'
                         then case when ag.primary_vm_id is null
                                   then coalesce(ag.primary_unroutable, 'no route was computed yet') end
                         else case when ag.preferred_vm_id is null
                                   then coalesce(ag.preferred_unroutable, 'no route was computed yet') end
                    end as unroutable
             from due
             left join availability_groups ag on ag.id = due.ag_id
             left join ag_replicas rr
               on rr.availability_group_id = due.ag_id
              and rr.vm_id = case when backvault_backup_placement(due.kind, false) = 'primary_only'
                                  then ag.primary_vm_id else ag.preferred_vm_id end
             left join sql_instances ri on ri.id = rr.instance_id
         ), runs as materialized (
             select routed.*, row_number() over per_job - 1 as position, count(*) over per_job as of
             from routed
             -- Coalesced: the same type still queued or running; a differential also
             -- yields to a full (never both on one day, even when catching up).
             where not exists (select 1 from active a
                               where a.item_id = routed.id
                                 and (a.kind = routed.kind
                                      or routed.kind = 'backup_differential' and a.kind = 'backup_full'))
             window per_job as (partition by vm_id, kind, ag_id, unroutable order by id
                                rows between unbounded preceding and unbounded following)
         ), grouped as materialized (
             select backvault_uuid_v7() as id, vm_id, kind, subscription_id, vault_id, ag_id, unroutable,
                    count(*) as size,
                    jsonb_agg(jsonb_build_object('instance', instance, 'database', database, 'protected_item_id', id)
                              order by position) as items
             from runs
             group by vm_id, kind, subscription_id, vault_id, ag_id, unroutable, backvault_batch_of(position, of, $6)
         ), history as (
             insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, payload,
                               max_attempts, availability_group_id, error_code, error_message, finished_at)
             select id, vm_id, subscription_id, vault_id, kind,
                    case when unroutable is null then 'queued' else 'failed' end, $4, items,
                    jsonb_build_object('slot_at', $3::timestamptz, 'scheduled_at', $7::timestamptz), $5, ag_id,
                    case when unroutable is not null then $9 end, unroutable,
                    case when unroutable is not null then now() end
             from grouped
         ), queued as (
             insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts)
             select id, vm_id, kind, $4, now(), $5 from grouped where unroutable is null
         ), counted as (
             update schedule_slots
             set jobs = (select count(*) from grouped), items = (select coalesce(sum(size), 0) from grouped)
             where policy_id = $1 and kind = $2 and slot_at = $3
         )
         select count(*) filter (where unroutable is null) as "jobs!",
                coalesce(sum(size) filter (where unroutable is null), 0)::int8 as "items!",
                coalesce(array_agg(distinct vm_id) filter (where unroutable is null), '{}') as "vm_ids!"
         from grouped"#,
        policy_id,
        kind as JobKind,
        slot,
        jobs.priority,
        jobs.max_attempts,
        jobs.max_items_per_job,
        now,
        jobs.heal_with_differential,
        backvault_domain::availability::NO_REPLICA_CODE,
    )
    .fetch_one(conn)
    .await
}

/// Forgets a policy's slots of `kinds`, so that the next tick starts those schedules afresh
/// (after they changed).
pub async fn schedule_reset(
    db: impl PgExecutor<'_>,
    policy_id: Uuid,
    kinds: &[JobKind],
) -> sqlx::Result<()> {
    sqlx::query!(
        "delete from schedule_slots where policy_id = $1 and kind = any($2)",
        policy_id,
        // A domain type for `text[]` (the macros expect `&[String]`).
        kinds as &[JobKind],
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Removes fired slots older than `age`, keeping the newest of each policy and type (it
/// holds the next slot).
pub async fn schedule_prune(db: impl PgExecutor<'_>, age: chrono::Duration) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from schedule_slots s
         where s.fired_at < now() - $1::interval
           and exists (select 1 from schedule_slots n
                       where n.policy_id = s.policy_id and n.kind = s.kind and n.slot_at > s.slot_at)",
        // sqlx maps `interval` to `PgInterval`; chrono's duration encodes as one too.
        age as chrono::Duration,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
