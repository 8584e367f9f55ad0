//! `ingest`: recovery points recorded per second through the agent protocol of the real
//! server (claim + complete), for a full slot and then log slots of 200 agents × 50
//! databases, optionally on chains already a week of logs long (`--preload-logs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use backvault_bench::db::{BenchDb, jobs_queued};
use backvault_bench::server::{Launch, Server, enroll_agents, http_client, server_bin};
use chrono::{DateTime, Utc};
use clap::Parser;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::agents::{AgentSim, Http, Lsns, drain_all, for_each_concurrent};
use crate::quiet::wait_quiet;
use crate::{CpuMeter, Ctx, DB_PREFIX, cpu_line, points_count, secs, vacuum_analyze};

#[derive(Parser, Clone)]
pub struct IngestArgs {
    /// Enrolled agents (VMs).
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Databases per VM.
    #[arg(long, default_value_t = 50)]
    databases: usize,
    /// Log slots measured after the full.
    #[arg(long, default_value_t = 3)]
    log_rounds: usize,
    /// The server binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// After the full, this many logs per database are inserted directly (zero-length,
    /// at the chain's end), as if the chain had run that long (672: a week of 15-minute
    /// logs on a weekly full), before the log slots are measured.
    #[arg(long, default_value_t = 0)]
    preload_logs: u32,
}

/// The next instant on a whole hour strictly after `t`.
fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    DateTime::from_timestamp((s / 3600 + 1) * 3600, 0).expect("a valid instant")
}

pub async fn run(ctx: &Ctx, args: &IngestArgs) -> anyhow::Result<String> {
    let bin = server_bin(args.server_bin.as_deref())?;
    let db = BenchDb::create(&ctx.admin_url, DB_PREFIX, "ingest", None).await?;
    let outcome = ingest_on(ctx, args, &bin, &db).await;
    db.drop_db().await;
    outcome
}

async fn ingest_on(
    ctx: &Ctx,
    args: &IngestArgs,
    bin: &Path,
    db: &BenchDb,
) -> anyhow::Result<String> {
    let server = Server::start(
        bin,
        &db.url,
        &Launch {
            // The admin token of --dev, and the clock of `POST /v1/scheduler/run`.
            dev: true,
            // The periodic scheduler ticks at the real time; the benchmark ticks at chosen
            // instants (`POST /v1/scheduler/run`), so the periodic one stays out of the way.
            env: vec![
                ("BACKVAULT_SCHEDULER_INTERVAL", "1h".into()),
                ("BACKVAULT_LOG", "warn,backvault=info".into()),
            ],
            ..Launch::default()
        },
    )?;
    let pool = db.pool(2).await?;
    // Every connection kept, as reqwest does by default.
    let http = Http {
        client: http_client(usize::MAX)?,
        base: Arc::new(server.base.clone()),
    };
    let admin = server.admin.clone();
    let setup = Instant::now();

    // A vault (with its default policy HourlyLogBackup) and the enrolled agents.
    let vault = http
        .post(
            "/v1/vaults",
            &admin,
            &json!({"name": "ingest-vault", "subscription_id": "sub-1", "resource_group": "rg-bench", "region": "westeurope"}),
            201,
        )
        .await?["id"]
        .as_str()
        .context("vault id")?
        .to_owned();
    let mut agents: Vec<AgentSim> = enroll_agents(&http.client, &server, args.agents, 16)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, agent)| AgentSim {
            vm_id: agent.vm_id,
            token: agent.token,
            databases: args.databases,
            lsns: Lsns::starting_at((i as u128 + 1) * 1_000_000_000_000),
        })
        .collect();

    // Registration: a discovery job per VM, completed with an inventory of N databases.
    {
        let vms: Arc<Vec<Uuid>> = Arc::new(agents.iter().map(|a| a.vm_id).collect());
        let (http, admin, vault) = (http.clone(), admin.clone(), vault.clone());
        for_each_concurrent(vms.len(), 16, move |i| {
            let (http, admin, vault, vms) =
                (http.clone(), admin.clone(), vault.clone(), vms.clone());
            async move {
                http.post(
                    &format!("/v1/vaults/{vault}/vms/{}/discover", vms[i]),
                    &admin,
                    &json!({}),
                    202,
                )
                .await?;
                Ok(())
            }
        })
        .await?;
    }
    let (back, stats, _) = drain_all(&http, agents, Utc::now()).await?;
    agents = back;
    ensure!(
        stats.jobs == agents.len(),
        "{} discovery jobs completed, expected {}",
        stats.jobs,
        agents.len()
    );

    // Protection of every database with HourlyLogBackup, then the configure jobs.
    let containers = http
        .get(&format!("/v1/vaults/{vault}/protectable-items"), &admin)
        .await?;
    let ids: Vec<Value> = containers
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c["databases"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["protectable"] == true)
        .map(|d| d["id"].clone())
        .collect();
    let total_dbs = args.agents * args.databases;
    ensure!(
        ids.len() == total_dbs,
        "{} protectable databases, expected {total_dbs}",
        ids.len()
    );
    for chunk in ids.chunks(1000) {
        http.post(
            &format!("/v1/vaults/{vault}/protected-items"),
            &admin,
            &json!({"policy": "HourlyLogBackup", "databases": chunk}),
            202,
        )
        .await?;
    }
    let (back, _, _) = drain_all(&http, agents, Utc::now()).await?;
    agents = back;
    let protected = sqlx::query_scalar!(
        r#"select count(*) as "n!" from protected_items where state = 'protected'"#
    )
    .fetch_one(&pool)
    .await?;
    ensure!(
        protected as usize == total_dbs,
        "{protected} items protected, expected {total_dbs}"
    );
    eprintln!(
        "ingest: {} agents, {total_dbs} databases protected in {:.1} s",
        agents.len(),
        secs(setup.elapsed())
    );

    // The scheduler: the first tick only sets the cursors; the next slot is promoted to
    // a full (no full in the chain yet); later slots are logs.
    // Tomorrow 00:01 UTC: the slots measured below (01:00, 02:00, ...) stay clear of the
    // policy's daily full at 22:00, so each round is one kind of backup.
    let t0 = DateTime::from_timestamp((Utc::now().timestamp() / 86_400 + 1) * 86_400 + 60, 0)
        .context("tomorrow")?;
    let first = http
        .post("/v1/scheduler/run", &admin, &json!({"now": t0}), 200)
        .await?;
    ensure!(
        first["jobs_enqueued"] == 0,
        "the first tick enqueued jobs: {first}"
    );
    let mut slot = next_hour(t0);
    let mut rounds = Vec::new();
    for round in 0..=args.log_rounds {
        let label = if round == 0 {
            "full slot".to_owned()
        } else {
            format!("log slot {round}")
        };
        let t = Instant::now();
        let run = http
            .post("/v1/scheduler/run", &admin, &json!({"now": slot}), 200)
            .await?;
        let tick = t.elapsed();
        if round == 1 && args.preload_logs > 0 {
            preload_logs(&pool, args.preload_logs).await?;
        }
        let enqueued = run["jobs_enqueued"].as_u64().unwrap_or(0);
        ensure!(enqueued > 0, "the {label} slot enqueued no jobs: {run}");
        let before = points_count(&pool).await?;
        let conditions = wait_quiet(ctx, "ingest").await;
        let cpu = CpuMeter::start(Some(server.pid));
        let (back, stats, wall) =
            drain_all(&http, agents, slot + chrono::Duration::minutes(5)).await?;
        let used = cpu.stop();
        let cores = used.busy_cores();
        let split = cpu_line(&used);
        agents = back;
        let points = sqlx::query!(
            r#"select count(*) as "after!", count(*) filter (where chain_gap) as "gaps!" from recovery_points"#
        )
        .fetch_one(&pool)
        .await?;
        let (after, gaps) = (points.after, points.gaps);
        let left = jobs_queued(&pool).await?;
        let recorded = (after - before) as usize;
        ensure!(
            recorded == stats.points,
            "{recorded} points recorded, {} reported",
            stats.points
        );
        ensure!(gaps == 0, "{gaps} points with a chain gap");
        let want = if round == 0 {
            "backup_full"
        } else {
            "backup_log"
        };
        ensure!(
            stats.kinds.keys().all(|k| k == want),
            "the {label} ran {:?}, expected only {want}",
            stats.kinds
        );
        ensure!(left == 0, "{left} jobs left in the queue");
        let rate = recorded as f64 / secs(wall);
        let line = format!(
            "ingest {label} ({slot}): {recorded} points in {} jobs {:?} in {:.2} s = {rate:.0} points/s (goal ≥ 5000: {}); mean claim {:.1} ms, mean complete {:.1} ms, max complete {:.0} ms; scheduler run {:.2} s; {conditions}, {cores:.1} cores busy ({split})",
            stats.jobs,
            stats.kinds,
            secs(wall),
            if rate >= 5000.0 { "met" } else { "not met" },
            secs(stats.claim_time) * 1000.0 / stats.claims.max(1) as f64,
            secs(stats.complete_time) * 1000.0 / stats.jobs.max(1) as f64,
            secs(stats.complete_max) * 1000.0,
            secs(tick),
        );
        eprintln!("{line}");
        rounds.push((label, recorded, wall, rate));
        slot += chrono::Duration::hours(1);
    }
    let logs: Vec<&(String, usize, Duration, f64)> = rounds.iter().skip(1).collect();
    let log_points: usize = logs.iter().map(|r| r.1).sum();
    let log_wall: f64 = logs.iter().map(|r| secs(r.2)).sum();
    let full = &rounds[0];
    let log_rate = log_points as f64 / log_wall.max(f64::MIN_POSITIVE);
    pool.close().await;
    drop(server);
    Ok(format!(
        "ingest ({} agents × {} databases): full slot {} points in {:.2} s = {:.0} points/s; log slots {} points in {:.2} s = {log_rate:.0} points/s; goal ≥ 5000 points/s: {}",
        args.agents,
        args.databases,
        full.1,
        secs(full.2),
        full.3,
        log_points,
        log_wall,
        if full.3 >= 5000.0 && log_rate >= 5000.0 {
            "met"
        } else {
            "not met"
        }
    ))
}

/// `per_item` logs on every item's full, as if its chain had run that long: zero-length
/// (first = last = the chain's end), so the agents' next logs still chain; the fulls'
/// chain_until raised as `fulls_extend_chain` would have. Right after the full, the
/// chain's end is its anchor (the full's last LSN): the chain state has no `log_end` until
/// a log is recorded.
async fn preload_logs(pool: &PgPool, per_item: u32) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::query!("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    // Set-based: `points_insert` takes points one by one from the agents' reports.
    let n = sqlx::query!(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, log_from, first_lsn,
                                      last_lsn, database_backup_lsn, size_bytes, full_id, expires_at)
         select gen_random_uuid(), p.id, 'log', f.backup_time + k * interval '1 second',
                f.backup_time + k * interval '1 second', f.backup_time + (k - 1) * interval '1 second',
                coalesce(p.chain ->> 'log_end', p.chain ->> 'anchor')::numeric,
                coalesce(p.chain ->> 'log_end', p.chain ->> 'anchor')::numeric,
                (p.chain -> 'base' ->> 'first_lsn')::numeric, 1048576, f.id,
                f.backup_time + k * interval '1 second' + interval '30 days'
         from generate_series(1, $1::int8) k, protected_items p join recovery_points f on f.id = p.last_full_id
         order by k, p.id",
        i64::from(per_item),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query!(
        "update recovery_points f set chain_until = f.backup_time + $1::float8 * interval '1 second' + interval '30 days'
         where f.backup_type = 'full'",
        f64::from(per_item),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(pool).await?;
    eprintln!(
        "ingest: preloaded {n} logs ({per_item} per database) in {:.1} s",
        secs(t.elapsed())
    );
    Ok(())
}
