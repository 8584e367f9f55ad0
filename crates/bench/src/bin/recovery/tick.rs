//! `tick`: how long one scheduler tick (`Service::schedule_tick`) takes to enqueue the log
//! slot of N protected items over 20,000 VMs, against a lower bound (one `INSERT ...
//! SELECT` of the same jobs), with the tick's steps timed one by one and an idle tick.

use std::time::{Duration, Instant};

use anyhow::ensure;
use backvault_bench::db::{BenchDb, jobs_queued};
use backvault_bench::fixture::{Block, seed_inventory};
use backvault_domain::jobs::JobKind;
use backvault_domain::policy::PolicySpec;
use backvault_service::scheduler::slot_jobs;
use backvault_store::jobs::{notify, notify_payload};
use backvault_store::schedule;
use chrono::{DateTime, Utc};
use clap::Parser;
use sqlx::PgPool;
use uuid::Uuid;

use crate::quiet::wait_quiet;
use crate::{CpuMeter, Ctx, DB_PREFIX, bench_service, cpu_line, secs, vacuum_analyze};

#[derive(Parser, Clone)]
pub struct TickArgs {
    /// Protected items, one fixture (and measurement) each.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    items: Vec<u64>,
    /// VMs the items are spread over (one SQL instance each).
    #[arg(long, default_value_t = 20_000)]
    vms: u64,
    /// Only run the tick with the session settings `backvault serve` gives its pool
    /// (statement_timeout 30s, idle_in_transaction_session_timeout 60s), and say whether
    /// it succeeds.
    #[arg(long)]
    server_timeouts: bool,
}

/// The scheduler's instant: the log slot of 10:15 is due, the next one is 10:30; the
/// daily full is due next at midnight.
fn tick_now() -> DateTime<Utc> {
    "2027-01-04T10:15:00Z".parse().expect("a valid instant")
}

struct TickFixture {
    db: BenchDb,
    policy_id: Uuid,
    expected_jobs: i64,
    build: Duration,
    size: String,
}

/// One vault, one policy, `items` protected items over `vms` VMs (one instance each),
/// protected, with a full in the chain, the log slot due and the others in the future.
async fn tick_fixture(ctx: &Ctx, items: u64, vms: u64) -> anyhow::Result<TickFixture> {
    let started = Instant::now();
    let db = BenchDb::create(&ctx.admin_url, DB_PREFIX, &format!("tick_fx_{items}"), None).await?;
    let pool = db.pool(2).await?;
    backvault_store::MIGRATOR.run(&pool).await?;
    let now = tick_now();
    let (items, vms) = (items as i64, vms as i64);
    let mut tx = pool.begin().await?;
    sqlx::query!("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let (vault_id, policy_id) = crate::vault_and_policy(&mut tx).await?;
    seed_inventory(
        &mut tx,
        Block {
            vault_id,
            first_vm: 1,
            vms,
            first_db: 0,
            databases: items,
        },
        now,
    )
    .await?;
    sqlx::query!(
        "insert into protected_items (id, vault_id, database_id, item_key, policy_id, state, protected_name,
                                      last_full_id, chain, last_full_at, last_log_at)
         select ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, $2::uuid,
                ('00000003-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                ('00000003-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, $3::uuid, 'protected',
                'db' || lpad(s::text, 7, '0'),
                ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                jsonb_build_object('base', jsonb_build_object('point_id',
                                                              ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                                                              'checkpoint_lsn', '1000', 'first_lsn', '1000',
                                                              'last_lsn', '1000', 'guid', null),
                                   'log_end', '1100', 'log_anchored', true, 'anchor', '1000', 'fork', null,
                                   'needs', 'nothing'),
                $4::timestamptz - interval '1 day', $4::timestamptz - interval '15 minutes'
         from generate_series(0, $1::int8 - 1) s",
        items,
        vault_id,
        policy_id,
        now,
    )
    .execute(&mut *tx)
    .await?;
    // The policy's schedule, started earlier: the log slot due now, the next full tomorrow
    // at midnight.
    sqlx::query!(
        "insert into schedule_slots (policy_id, kind, slot_at, next_at)
         values ($1, 'backup_log', '-infinity', $2), ($1, 'backup_full', '-infinity', $3)",
        policy_id,
        now,
        now + chrono::Duration::hours(14) - chrono::Duration::minutes(15),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(&pool).await?;
    let expected_jobs = sqlx::query_scalar!(
        r#"select coalesce(sum(ceil(n / 50.0)), 0)::int8 as "jobs!"
           from (select vm_id, count(*) n from sql_databases group by vm_id) x"#
    )
    .fetch_one(&pool)
    .await?;
    let size = sqlx::query_scalar!(
        r#"select pg_size_pretty(pg_database_size(current_database())) as "size!""#
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok(TickFixture {
        db,
        policy_id,
        expected_jobs,
        build: started.elapsed(),
        size,
    })
}

/// Jobs, items in them and queue rows of kind `backup_log`.
async fn tick_verify(pool: &PgPool, fx: &TickFixture, items: u64) -> anyhow::Result<()> {
    let jobs = sqlx::query!(
        r#"select count(*) as "jobs!", coalesce(sum(jsonb_array_length(items)), 0)::int8 as "items!",
                  count(*) filter (where kind <> 'backup_log') as "other_kinds!"
           from jobs"#
    )
    .fetch_one(pool)
    .await?;
    let queued = jobs_queued(pool).await?;
    let (jobs, total, other_kinds) = (jobs.jobs, jobs.items, jobs.other_kinds);
    ensure!(
        jobs == fx.expected_jobs,
        "{jobs} jobs, expected {} (sum over VMs of ceil(dbs/50))",
        fx.expected_jobs
    );
    ensure!(
        total == items as i64,
        "{total} items in the jobs, expected {items}"
    );
    ensure!(queued == jobs, "{queued} queue rows for {jobs} jobs");
    ensure!(other_kinds == 0, "{other_kinds} jobs are not backup_log");
    Ok(())
}

/// What `Service::schedule_tick` does, step by step with the same store functions, to
/// see where the time goes (the service does not expose its steps).
async fn tick_steps(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<Vec<(String, Duration)>> {
    let mut steps: Vec<(String, Duration)> = Vec::new();
    let t = Instant::now();
    let policies = schedule::schedules_in_use(pool).await?;
    steps.push(("schedules_in_use".to_owned(), t.elapsed()));
    for schedules in policies {
        let policy_id = schedules.id;
        let spec: PolicySpec = serde_json::from_value(schedules.spec.0.clone())?;
        let policy = spec
            .validate("")
            .map_err(|v| anyhow::anyhow!("invalid policy: {v:?}"))?;
        let next_at = |kind: JobKind| schedules.next_at(kind);
        for (kind, next) in policy.slots_to_claim(now, next_at) {
            let short = kind.as_str().trim_start_matches("backup_");
            let mut tx = pool.begin().await?;
            let t = Instant::now();
            let slot = schedule::schedule_claim_slot(
                &mut tx,
                policy_id,
                schedules.version,
                kind,
                now,
                next,
            )
            .await?;
            steps.push((format!("{short}: schedule_claim_slot"), t.elapsed()));
            if let Some(slot) = slot {
                let t = Instant::now();
                let jobs = slot_jobs(kind, None);
                let done =
                    schedule::schedule_enqueue(&mut tx, policy_id, kind, slot, now, jobs).await?;
                steps.push((
                    format!(
                        "{short}: schedule_enqueue ({} jobs, {} items)",
                        done.jobs, done.items
                    ),
                    t.elapsed(),
                ));
                let t = Instant::now();
                notify(&mut *tx, &notify_payload('v', done.vm_ids)).await?;
                steps.push((format!("{short}: notify"), t.elapsed()));
            }
            let t = Instant::now();
            tx.commit().await?;
            steps.push((format!("{short}: commit"), t.elapsed()));
        }
    }
    Ok(steps)
}

/// The lower bound: one statement producing the same job rows (per VM, chunks of at most
/// 50 items as even as `batch` makes them) and their queue rows, with nothing else.
async fn tick_lower_bound(pool: &PgPool, policy_id: Uuid) -> anyhow::Result<(u64, Duration)> {
    let t = Instant::now();
    let mut tx = pool.begin().await?;
    let done = sqlx::query!(
        "with due as materialized (
             select p.id, p.vault_id, d.vm_id, v.subscription_id, i.name as instance, d.name as database,
                    row_number() over w as rn, count(*) over (partition by d.vm_id) as n
             from protected_items p
             join sql_databases d on d.id = p.database_id
             join sql_instances i on i.id = d.instance_id
             join vms v on v.id = d.vm_id
             where p.policy_id = $1 and p.state = 'protected'
               and not p.needs_full and d.gone_at is null and d.recovery_model <> 'simple'
             window w as (partition by d.vm_id order by p.id)
         ), grouped as materialized (
             select gen_random_uuid() as id, vm_id, min(subscription_id) as subscription_id,
                    (array_agg(vault_id))[1] as vault_id,
                    jsonb_agg(jsonb_build_object('instance', instance, 'database', database, 'protected_item_id', id)
                              order by rn) as items
             from due
             group by vm_id, (rn - 1) * ceil(n / 50.0)::int8 / n
         ), history as (
             insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, payload, max_attempts)
             select id, vm_id, subscription_id, vault_id, 'backup_log', 'queued', 1, items, '{}', $2::int4 from grouped
         )
         insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts)
         select id, vm_id, 'backup_log', 1, now(), $2::int4 from grouped",
        policy_id,
        JobKind::BackupLog.max_attempts(),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((done.rows_affected(), t.elapsed()))
}

struct TickResult {
    items: u64,
    tick: Duration,
    idle_tick: Duration,
    lower: Duration,
}

pub async fn run(ctx: &Ctx, args: &TickArgs) -> anyhow::Result<Vec<String>> {
    let mut results: Vec<TickResult> = Vec::new();
    let mut lines = Vec::new();
    let now = tick_now();
    for &items in &args.items {
        eprintln!("tick N={items}: building the fixture ({} VMs)", args.vms);
        let fx = tick_fixture(ctx, items, args.vms).await?;
        eprintln!(
            "tick N={items}: fixture built in {:.1} s ({}); {} jobs expected",
            secs(fx.build),
            fx.size,
            fx.expected_jobs
        );
        if args.server_timeouts {
            let settings = [
                ("statement_timeout", "30s"),
                ("idle_in_transaction_session_timeout", "60s"),
            ];
            let outcome = measure_tick(ctx, &fx, items, now, &settings).await;
            fx.db.drop_db().await;
            let line = match outcome {
                Ok((tick, _, conditions, _)) => format!(
                    "tick N={items} with the server's statement_timeout 30s: succeeded in {:.2} s; {conditions}",
                    secs(tick)
                ),
                Err(e) => {
                    format!("tick N={items} with the server's statement_timeout 30s: FAILED: {e:#}")
                }
            };
            println!("{line}");
            lines.push(line);
            continue;
        }
        let outcome = tick_one(ctx, &fx, items, now).await;
        fx.db.drop_db().await;
        let (r, line) = outcome?;
        println!("{line}");
        lines.push(line);
        results.push(r);
    }
    if let (Some(a), Some(b)) = (results.first(), results.last())
        && results.len() > 1
    {
        let line = format!(
            "tick growth N={}→{} (x{:.0} items): schedule_tick x{:.1}, lower bound x{:.1}, idle tick x{:.1}",
            a.items,
            b.items,
            b.items as f64 / a.items as f64,
            secs(b.tick) / secs(a.tick),
            secs(b.lower) / secs(a.lower),
            secs(b.idle_tick) / secs(a.idle_tick),
        );
        println!("{line}");
        lines.push(line);
    }
    Ok(lines)
}

/// `Service::schedule_tick` on a fresh copy of the fixture, then an idle tick (nothing
/// due).
async fn measure_tick(
    ctx: &Ctx,
    fx: &TickFixture,
    items: u64,
    now: DateTime<Utc>,
    settings: &[(&str, &str)],
) -> anyhow::Result<(Duration, Duration, String, f64)> {
    let copy = fx.db.copy("tick_run").await?;
    let measured = async {
        let pool = copy.pool_with(4, settings).await?;
        let service = bench_service(pool.clone());
        let conditions = wait_quiet(ctx, "tick").await;
        let cpu = CpuMeter::start(None);
        let t = Instant::now();
        let enqueued = service.schedule_tick(now).await?;
        let tick = t.elapsed();
        let split = cpu.stop();
        let cores = split.busy_cores();
        let conditions = format!("{conditions}; {}", cpu_line(&split));
        ensure!(
            enqueued as i64 == fx.expected_jobs,
            "schedule_tick enqueued {enqueued} jobs, expected {}",
            fx.expected_jobs
        );
        tick_verify(&pool, fx, items).await?;
        let t = Instant::now();
        let idle = service
            .schedule_tick(now + chrono::Duration::minutes(1))
            .await?;
        let idle_tick = t.elapsed();
        ensure!(idle == 0, "the idle tick enqueued {idle} jobs");
        eprintln!(
            "tick N={items}: schedule_tick {:.2} s ({enqueued} jobs, {cores:.1} cores busy; {conditions}); idle tick {:.3} s",
            secs(tick),
            secs(idle_tick)
        );
        pool.close().await;
        Ok::<_, anyhow::Error>((tick, idle_tick, conditions, cores))
    }
    .await;
    copy.drop_db().await;
    measured
}

async fn tick_one(
    ctx: &Ctx,
    fx: &TickFixture,
    items: u64,
    now: DateTime<Utc>,
) -> anyhow::Result<(TickResult, String)> {
    // 1. The real tick, then an idle one (nothing due).
    let (tick, idle_tick, conditions, cores) = measure_tick(ctx, fx, items, now, &[]).await?;

    // 2. The same tick step by step (where the time goes).
    let copy = fx.db.copy("tick_steps").await?;
    let steps = async {
        let pool = copy.pool(2).await?;
        wait_quiet(ctx, "tick steps").await;
        let steps = tick_steps(&pool, now).await?;
        tick_verify(&pool, fx, items).await?;
        pool.close().await;
        Ok::<_, anyhow::Error>(steps)
    }
    .await;
    copy.drop_db().await;
    for (name, d) in &steps? {
        eprintln!("tick N={items}:   step {name}: {:.3} s", secs(*d));
    }

    // 3. The lower bound: the same jobs from one INSERT ... SELECT.
    let copy = fx.db.copy("tick_lower").await?;
    let lower = async {
        let pool = copy.pool(2).await?;
        let conditions = wait_quiet(ctx, "tick lower bound").await;
        let (rows, took) = tick_lower_bound(&pool, fx.policy_id).await?;
        ensure!(rows as i64 == fx.expected_jobs, "lower bound: {rows} rows");
        tick_verify(&pool, fx, items).await?;
        eprintln!(
            "tick N={items}: lower bound {:.2} s ({conditions})",
            secs(took)
        );
        pool.close().await;
        Ok::<_, anyhow::Error>(took)
    }
    .await;
    copy.drop_db().await;
    let lower = lower?;
    let ratio = secs(tick) / secs(lower);
    let line = format!(
        "tick N={items}: schedule_tick {:.2} s, {} jobs verified; lower bound (INSERT ... SELECT of the jobs) {:.2} s → {ratio:.2}x ({}; goal ≤ 2x); idle tick {:.3} s; {conditions}, {cores:.1} cores busy",
        secs(tick),
        fx.expected_jobs,
        secs(lower),
        if ratio <= 2.0 { "met" } else { "not met" },
        secs(idle_tick),
    );
    Ok((
        TickResult {
            items,
            tick,
            idle_tick,
            lower,
        },
        line,
    ))
}
