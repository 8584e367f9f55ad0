//! No decay: enqueue, claim and complete together at a fixed offered rate for minutes,
//! agents over HTTP against the real server, reported per 10 s window; optionally a
//! session holds a snapshot for a while in the middle (a forgotten `BEGIN` in a psql
//! window, a long report) and the queue must not sink under the dead rows it keeps.
//!
//! Latency is measured per job from the moment its enqueue transaction commits to the
//! moment the agent has the response of its completion, so it includes the wait in the
//! queue, the claim's long-poll wake-up and both HTTP round trips.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backvault_domain::agent::protocol::{
    ClaimRequest, ClaimV2Request, ClaimV2Response, JobCompletion,
};
use backvault_store::jobs::jobs_enqueue;
use clap::Parser;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use backvault_bench::db::with_db;
use backvault_bench::server::{enroll_agents, http_client, server_bin};
use backvault_bench::sys::{CpuSnapshot, CpuSplit};

use crate::DB_PREFIX;
use crate::backlog::{backup_job, done_at_once, drain_server, enqueue_backlog};

#[derive(Debug, Clone, Parser)]
pub struct SteadyArgs {
    /// Length of the steady run.
    #[arg(long, default_value_t = 300)]
    pub seconds: u64,
    /// Offered rate (jobs/s). Default: half the maximum measured by a drain of
    /// `--probe-jobs` first.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Jobs of the drain that measures the maximum (when `--rate` is not given).
    #[arg(long, default_value_t = 30_000)]
    pub probe_jobs: usize,
    /// Agents (VMs) enrolled, one task each.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// `max_jobs` of each claim.
    #[arg(long, default_value_t = 20)]
    pub max_jobs: u32,
    /// `wait_seconds` of each claim (a long-poll woken by the enqueue's notification).
    #[arg(long, default_value_t = 5)]
    pub wait_seconds: u32,
    /// `--max-running-backups-per-vm` of the server.
    #[arg(long, default_value_t = 1_000)]
    pub max_running_backups_per_vm: u32,
    /// Width of a reporting window.
    #[arg(long, default_value_t = 10)]
    pub window_seconds: u64,
    /// Enqueue transactions per second (the offered rate is split evenly over them).
    #[arg(long, default_value_t = 50)]
    pub enqueues_per_sec: u32,
    /// Do not hold a snapshot during the run.
    #[arg(long)]
    pub no_snapshot: bool,
    /// When the snapshot is taken, from the start of the steady run.
    #[arg(long, default_value_t = 120)]
    pub snapshot_at_seconds: u64,
    /// How long the snapshot is held (its transaction idle) before it commits.
    #[arg(long, default_value_t = 60)]
    pub snapshot_hold_seconds: u64,
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 32)]
    pub enroll_concurrency: usize,
}

impl Default for SteadyArgs {
    fn default() -> Self {
        Self::parse_from(["steady"])
    }
}

/// One reporting window of the steady run.
#[derive(Debug, Clone)]
pub struct Window {
    pub start_s: f64,
    pub enqueued_per_sec: f64,
    pub completed_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// `n_dead_tup` of `job_queue` and `jobs` at the window's end (from the statistics
    /// collector, which lags by up to a second).
    pub queue_dead: i64,
    pub jobs_dead: i64,
    /// `pg_total_relation_size('job_queue')` at the window's end.
    pub queue_bytes: i64,
    /// Jobs enqueued and not yet completed at the window's end.
    pub backlog: i64,
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Before,
    /// A snapshot was held during (part of) this window.
    Held,
    After,
}

/// Size and churn of one table, from `pg_stat_user_tables` and the size functions.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TableStats {
    pub table: String,
    pub live: i64,
    pub dead: i64,
    pub updated: i64,
    pub hot_updated: i64,
    pub heap_bytes: i64,
    pub index_bytes: i64,
    pub total_bytes: i64,
    pub autovacuums: i64,
    pub autoanalyzes: i64,
}

/// Whether the queue kept going while a snapshot was held, and came back after.
#[derive(Debug, Clone)]
pub struct SnapshotVerdict {
    pub before_per_sec: f64,
    pub min_during_per_sec: f64,
    /// First window that starts after the release and reaches 90 % of before: seconds
    /// from the release to that window's end.
    pub recovered_after_s: Option<f64>,
}

impl SnapshotVerdict {
    pub fn held_up(&self) -> bool {
        self.min_during_per_sec >= 0.5 * self.before_per_sec
    }

    pub fn recovered(&self) -> bool {
        self.recovered_after_s.is_some_and(|s| s <= 60.0)
    }
}

/// A stretch of the run judged as one: the jobs completed in it, per second, and the p99
/// of their latencies.
#[derive(Debug, Clone, Copy)]
pub struct Stretch {
    pub from_s: f64,
    pub to_s: f64,
    pub per_sec: f64,
    pub p99_ms: f64,
}

/// How long the beginning and the end of the run are each judged over. A steady run swings
/// with a period of a minute or two (the history's autovacuum, checkpoints every half
/// minute on this server's 1 GB `max_wal_size`): one 10 s window's p99 moved between 290
/// and 630 ms within a run whose first and last minutes differed by a fifth. Decay is a
/// trend, so a minute at each end is compared, with every latency in it.
const JUDGED_SECONDS: f64 = 60.0;

/// The beginning and the end judged, as (from, to) seconds of a run of `measured` seconds:
/// a minute each, after the warm-up window, or half of what the warm-up leaves when the run
/// is shorter.
fn judged_stretches(measured: f64, window: f64) -> ((f64, f64), (f64, f64)) {
    let judged = JUDGED_SECONDS.min((measured - window) / 2.0).max(window);
    ((window, window + judged), (measured - judged, measured))
}

#[derive(Debug, Clone)]
pub struct SteadyResult {
    pub args: SteadyArgs,
    pub rate: f64,
    /// The drain that set the rate (jobs/s), when `--rate` was not given.
    pub probe_jobs_per_sec: Option<f64>,
    pub windows: Vec<Window>,
    /// The first minute after the warm-up window, and the last minute.
    pub began: Stretch,
    pub ended: Stretch,
    pub tables_start: Vec<TableStats>,
    pub tables_end: Vec<TableStats>,
    /// The server's `autovacuum` setting.
    pub autovacuum: String,
    pub snapshot: Option<SnapshotVerdict>,
    pub completed: u64,
    pub claims: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cpu: CpuSplit,
}

fn within_30_percent(first: f64, last: f64) -> bool {
    first > 0.0 && (last - first).abs() <= 0.3 * first
}

impl SteadyResult {
    /// The second window (the first one is the warm-up, with the agents' connections being
    /// opened) and the last one: shown beside the verdict, which judges minutes.
    fn end_windows(&self) -> Option<(&Window, &Window)> {
        let began = self.windows.get(1).or(self.windows.first())?;
        Some((began, self.windows.last()?))
    }

    pub fn throughput_kept(&self) -> bool {
        within_30_percent(self.began.per_sec, self.ended.per_sec)
    }

    pub fn latency_kept(&self) -> bool {
        let (b, e) = (self.began.p99_ms, self.ended.p99_ms);
        within_30_percent(b, e) || e <= b
    }

    pub fn summary(&self) -> String {
        let (first, last) = (self.began.to_string(), self.ended.to_string());
        let snapshot = self.snapshot.as_ref().map_or(String::new(), |s| {
            format!(
                "; snapshot held {} s: before {:.0} jobs/s, min during {:.0} ({}), recovered to 90 % {} ({})",
                self.args.snapshot_hold_seconds,
                s.before_per_sec,
                s.min_during_per_sec,
                if s.held_up() { "met" } else { "not met" },
                s.recovered_after_s
                    .map_or("never".into(), |t| format!("{t:.0} s after release")),
                if s.recovered() { "met" } else { "not met" },
            )
        });
        format!(
            "steady: {:.0} jobs/s offered{} for {} s, {} agents; began {first}, ended {last} (throughput {}, p99 {}){snapshot}; {} completed, {} claims, {} errors; autovacuum={} [{}]",
            self.rate,
            self.probe_jobs_per_sec
                .map_or(String::new(), |m| format!(" (half of {m:.0} measured)")),
            self.args.seconds,
            self.args.agents,
            if self.throughput_kept() {
                "within 30 %"
            } else {
                "NOT within 30 %"
            },
            if self.latency_kept() {
                "within 30 %"
            } else {
                "NOT within 30 %"
            },
            self.completed,
            self.claims,
            self.errors,
            self.autovacuum,
            self.cpu
        )
    }

    /// The per-window table, the tables' sizes at start and end, and the verdicts.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Offered {:.0} jobs/s{} for {} s by {} enqueue transactions/s; {} agents over HTTP, claims of at most {} with a {} s long-poll; latency = enqueue commit → completion response. Server `autovacuum` = {}.\n",
            self.rate,
            self.probe_jobs_per_sec.map_or(String::new(), |m| format!(
                " (half the {m:.0} jobs/s a drain of {} jobs reached first)",
                self.args.probe_jobs
            )),
            self.args.seconds,
            self.args.enqueues_per_sec,
            self.args.agents,
            self.args.max_jobs,
            self.args.wait_seconds,
            self.autovacuum
        );
        let _ = writeln!(
            s,
            "| window (s) | phase | enqueued/s | completed/s | p50 ms | p99 ms | backlog | job_queue dead | jobs dead | job_queue size |"
        );
        let _ = writeln!(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for w in &self.windows {
            let _ = writeln!(
                s,
                "| {:.0}–{:.0} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
                w.start_s,
                w.start_s + self.args.window_seconds as f64,
                match w.phase {
                    Phase::Before => "",
                    Phase::Held => "snapshot held",
                    Phase::After => "after",
                },
                w.enqueued_per_sec,
                w.completed_per_sec,
                w.p50_ms,
                w.p99_ms,
                w.backlog,
                w.queue_dead,
                w.jobs_dead,
                bytes(w.queue_bytes)
            );
        }
        let _ = writeln!(
            s,
            "\n| table | live start → end | dead start → end | heap | indexes | total | updates (HOT) | autovacuum / autoanalyze runs |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
        for end in &self.tables_end {
            let start = self.tables_start.iter().find(|t| t.table == end.table);
            let get = |f: fn(&TableStats) -> i64| start.map_or(0, f);
            let _ = writeln!(
                s,
                "| `{}` | {} → {} | {} → {} | {} → {} | {} → {} | {} → {} | {} ({}) | {} / {} |",
                end.table,
                get(|t| t.live),
                end.live,
                get(|t| t.dead),
                end.dead,
                bytes(get(|t| t.heap_bytes)),
                bytes(end.heap_bytes),
                bytes(get(|t| t.index_bytes)),
                bytes(end.index_bytes),
                bytes(get(|t| t.total_bytes)),
                bytes(end.total_bytes),
                end.updated - get(|t| t.updated),
                end.hot_updated - get(|t| t.hot_updated),
                end.autovacuums - get(|t| t.autovacuums),
                end.autoanalyzes - get(|t| t.autoanalyzes),
            );
        }
        let _ = writeln!(
            s,
            "\n- Began {}; ended {}: throughput {}, p99 {} (goal: within 30 %).",
            self.began,
            self.ended,
            met(self.throughput_kept()),
            met(self.latency_kept()),
        );
        if let Some((f, l)) = self.end_windows() {
            let _ = writeln!(
                s,
                "- The second 10 s window alone (after the warm-up): {:.0} jobs/s, p99 {:.1} ms; the last: {:.0} jobs/s, p99 {:.1} ms.",
                f.completed_per_sec, f.p99_ms, l.completed_per_sec, l.p99_ms,
            );
        }
        if let Some(v) = &self.snapshot {
            let _ = writeln!(
                s,
                "- Snapshot held from {} s to {} s: {:.0} jobs/s before, at least {:.0} during ({:.0} %, goal ≥ 50 %: {}); back to ≥ 90 % {} (goal within 60 s: {}).",
                self.args.snapshot_at_seconds,
                self.args.snapshot_at_seconds + self.args.snapshot_hold_seconds,
                v.before_per_sec,
                v.min_during_per_sec,
                100.0 * v.min_during_per_sec / v.before_per_sec.max(1e-9),
                met(v.held_up()),
                v.recovered_after_s
                    .map_or("never".into(), |t| format!("by {t:.0} s after the release")),
                met(v.recovered()),
            );
        }
        let _ = writeln!(
            s,
            "- {} jobs completed, {} claims, {} errors{}. CPU: {}.",
            self.completed,
            self.claims,
            self.errors,
            self.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            self.cpu
        );
        s
    }
}

impl std::fmt::Display for Stretch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0}–{:.0} s: {:.0} jobs/s, p99 {:.1} ms",
            self.from_s, self.to_s, self.per_sec, self.p99_ms
        )
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

fn bytes(b: i64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{} kB", b / 1024)
    }
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    claims: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("error lock");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

struct Ctx {
    client: reqwest::Client,
    base: String,
    claim: ClaimRequest,
    counters: Counters,
    /// When each job's enqueue committed (set just before the commit, then moved to just
    /// after it, so a completion that races the commit's return measures a little more).
    enqueued_at: Mutex<HashMap<Uuid, Instant>>,
    /// (completion instant, latency) of every job completed.
    done: Mutex<Vec<(Instant, Duration)>>,
    stop: AtomicBool,
}

/// The agent protocol's claim, version 2 (as the reference agent speaks it): one
/// long-poll for this agent's jobs, carrying the completions of the jobs it finished.
async fn claim_v2(
    ctx: &Ctx,
    token: &str,
    body: &ClaimV2Request,
) -> anyhow::Result<ClaimV2Response> {
    let res = ctx
        .client
        .post(format!("{}/v2/agent/claim", ctx.base))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = res.status();
    if !status.is_success() {
        bail!("claim: {status} {}", res.text().await.unwrap_or_default());
    }
    Ok(res.json::<ClaimV2Response>().await?)
}

/// Claims and completes (each claim reporting the jobs the previous one returned, done at
/// once) until told to stop; then reports what it still holds.
async fn agent(ctx: Arc<Ctx>, token: String) {
    let mut finished: Vec<JobCompletion> = Vec::new();
    loop {
        let stopping = ctx.stop.load(Ordering::Relaxed);
        if stopping && finished.is_empty() {
            return;
        }
        let body = ClaimV2Request {
            max_jobs: if stopping { 0 } else { ctx.claim.max_jobs },
            // As the reference agent: a claim that reports does not wait.
            wait_seconds: if finished.is_empty() {
                ctx.claim.wait_seconds
            } else {
                0
            },
            completions: std::mem::take(&mut finished),
            failures: Vec::new(),
        };
        let response = match claim_v2(&ctx, &token, &body).await {
            Ok(response) => response,
            Err(e) => {
                ctx.counters.error(format!("{e:#}"));
                finished = body.completions;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        ctx.counters.claims.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut accepted = Vec::new();
        for outcome in response.completions {
            match outcome.refused {
                None => accepted.push(outcome.job_id),
                Some(refused) => ctx.counters.error(format!(
                    "complete: {} {} {}",
                    refused.status, refused.code, refused.detail
                )),
            }
        }
        ctx.counters
            .completed
            .fetch_add(accepted.len() as u64, Ordering::Relaxed);
        let started: Vec<Option<Instant>> = {
            let mut map = ctx.enqueued_at.lock().expect("enqueue map");
            accepted.iter().map(|id| map.remove(id)).collect()
        };
        ctx.done
            .lock()
            .expect("done list")
            .extend(started.into_iter().flatten().map(|t| (now, now - t)));
        finished = done_at_once(response.jobs);
    }
}

/// Enqueues at `rate` jobs/s round-robin over `vms`, `per_sec` transactions a second,
/// until `until`; returns the enqueue instants (after commit) with their job counts.
async fn enqueuer(
    ctx: Arc<Ctx>,
    pool: PgPool,
    vms: Vec<Uuid>,
    rate: f64,
    per_sec: u32,
    until: Instant,
) -> anyhow::Result<Vec<(Instant, usize)>> {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1))));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0usize;
    let mut next_vm = 0usize;
    let mut log = Vec::new();
    while Instant::now() < until {
        ticks.tick().await;
        // Whatever is due by now, so that a slow transaction does not lower the rate.
        let due = (rate * started.elapsed().as_secs_f64()) as usize;
        if due <= sent {
            continue;
        }
        let batch: Vec<_> = (sent..due)
            .map(|_| {
                next_vm = (next_vm + 1) % vms.len();
                backup_job(vms[next_vm])
            })
            .collect();
        let mut tx = pool.begin().await?;
        jobs_enqueue(&mut tx, &batch).await?;
        {
            let now = Instant::now();
            let mut map = ctx.enqueued_at.lock().expect("enqueue map");
            map.extend(batch.iter().map(|j| (j.id, now)));
        }
        tx.commit().await?;
        let committed = Instant::now();
        {
            let mut map = ctx.enqueued_at.lock().expect("enqueue map");
            for j in &batch {
                if let Some(t) = map.get_mut(&j.id) {
                    *t = committed;
                }
            }
        }
        log.push((committed, batch.len()));
        sent = due;
    }
    Ok(log)
}

async fn table_stats(pool: &PgPool) -> sqlx::Result<Vec<TableStats>> {
    // Every table the run writes: backvault's hot tables and whatever else changed.
    sqlx::query_as(
        "select relname::text as \"table\", n_live_tup as live, n_dead_tup as dead, n_tup_upd as updated,
                n_tup_hot_upd as hot_updated,
                pg_relation_size(relid) as heap_bytes, pg_indexes_size(relid) as index_bytes,
                pg_total_relation_size(relid) as total_bytes, autovacuum_count as autovacuums,
                autoanalyze_count as autoanalyzes
         from pg_stat_user_tables
         where relname in ('jobs', 'job_queue', 'job_attempts', 'vms', 'audit_events')
            or n_tup_ins + n_tup_upd + n_tup_del > 0
         order by relname",
    )
    .fetch_all(pool)
    .await
}

/// Holds `begin isolation level repeatable read; select 1;` idle from `at` for `hold`.
async fn hold_snapshot(url: String, at: Instant, hold: Duration) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&url).await?;
    tokio::time::sleep_until(at.into()).await;
    sqlx::query("begin isolation level repeatable read")
        .execute(&mut conn)
        .await?;
    sqlx::query("select 1").execute(&mut conn).await?;
    tokio::time::sleep(hold).await;
    sqlx::query("commit").execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub async fn run(admin_url: &str, args: &SteadyArgs) -> anyhow::Result<SteadyResult> {
    let args = args.clone();
    let bin = server_bin(args.server_bin.as_deref())?;
    with_db(admin_url, DB_PREFIX, "steady", move |db| async move {
        let result = async {
            let server = drain_server(&bin, &db.url, args.max_running_backups_per_vm)?;
            let pool = db.pool(4).await?;
            let client = http_client(4_000)?;
            let agents =
                enroll_agents(&client, &server, args.agents, args.enroll_concurrency).await?;
            let vms: Vec<Uuid> = agents.iter().map(|a| a.vm_id).collect();
            let autovacuum: String = sqlx::query_scalar("select current_setting('autovacuum')")
                .fetch_one(&pool)
                .await?;
            let ctx = Arc::new(Ctx {
                client: client.clone(),
                base: server.base.clone(),
                claim: ClaimRequest {
                    max_jobs: args.max_jobs,
                    wait_seconds: args.wait_seconds,
                },
                counters: Counters::default(),
                enqueued_at: Mutex::new(HashMap::new()),
                done: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            });
            // The probe's backlog is in the queue before the agents start, so that they
            // drain it at full speed.
            let probe = args.rate.is_none().then_some(args.probe_jobs);
            if let Some(n) = probe {
                enqueue_backlog(&pool, &vms, n, 5_000).await?;
            }
            backvault_bench::sys::wait_until_quiet().await;
            let mut agent_tasks = tokio::task::JoinSet::new();
            for a in agents {
                agent_tasks.spawn(agent(ctx.clone(), a.token));
            }
            let probe_jobs_per_sec = match probe {
                Some(n) => {
                    let started = Instant::now();
                    let deadline = started + Duration::from_secs(600);
                    while ctx.counters.completed.load(Ordering::Relaxed) < n as u64 {
                        if Instant::now() > deadline {
                            bail!("the probe's {n} jobs were not drained within 600 s");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some(n as f64 / started.elapsed().as_secs_f64())
                }
                None => None,
            };
            let rate = args
                .rate
                .or(probe_jobs_per_sec.map(|m| m / 2.0))
                .context("an offered rate")?;
            let base_completed = ctx.counters.completed.load(Ordering::Relaxed);
            ctx.done.lock().expect("done list").clear();

            let tables_start = table_stats(&pool).await?;
            let cpu_before = CpuSnapshot::take(DB_PREFIX, Some(server.pid));
            let started = Instant::now();
            let until = started + Duration::from_secs(args.seconds);
            let enqueue = tokio::spawn(enqueuer(
                ctx.clone(),
                pool.clone(),
                vms.clone(),
                rate,
                args.enqueues_per_sec,
                until,
            ));
            let snapshot = (!args.no_snapshot).then(|| {
                tokio::spawn(hold_snapshot(
                    db.url.clone(),
                    started + Duration::from_secs(args.snapshot_at_seconds),
                    Duration::from_secs(args.snapshot_hold_seconds),
                ))
            });
            // What the statistics say at each window's end.
            let window = Duration::from_secs(args.window_seconds.max(1));
            let mut samples = Vec::new();
            let mut next = started + window;
            while next <= until {
                tokio::time::sleep_until(next.into()).await;
                let row: (i64, i64, i64) = sqlx::query_as(
                    "select coalesce((select n_dead_tup from pg_stat_user_tables where relname = 'job_queue'), 0),
                            coalesce((select n_dead_tup from pg_stat_user_tables where relname = 'jobs'), 0),
                            pg_total_relation_size('job_queue')",
                )
                .fetch_one(&pool)
                .await?;
                samples.push(row);
                next += window;
            }
            let enqueued = enqueue.await??;
            if let Some(s) = snapshot {
                s.await??;
            }
            let cpu = CpuSnapshot::take(DB_PREFIX, Some(server.pid)).since(&cpu_before);
            let tables_end = table_stats(&pool).await?;
            ctx.stop.store(true, Ordering::Relaxed);
            while let Some(r) = agent_tasks.join_next().await {
                r?;
            }
            drop(server);
            pool.close().await;

            let done = std::mem::take(&mut *ctx.done.lock().expect("done list"));
            let w = window.as_secs_f64();
            let held = (!args.no_snapshot).then(|| {
                (
                    args.snapshot_at_seconds as f64,
                    (args.snapshot_at_seconds + args.snapshot_hold_seconds) as f64,
                )
            });
            let mut windows = Vec::new();
            let mut enqueued_total = 0i64;
            let mut completed_total = 0i64;
            for (i, (queue_dead, jobs_dead, queue_bytes)) in samples.into_iter().enumerate() {
                let from = i as f64 * w;
                let to = from + w;
                let in_window = |t: Instant| {
                    let s = t.duration_since(started).as_secs_f64();
                    s >= from && s < to
                };
                let enq: usize = enqueued
                    .iter()
                    .filter(|(t, _)| in_window(*t))
                    .map(|(_, n)| n)
                    .sum();
                let mut lat: Vec<f64> = done
                    .iter()
                    .filter(|(t, _)| in_window(*t))
                    .map(|(_, l)| l.as_secs_f64() * 1000.0)
                    .collect();
                lat.sort_by(f64::total_cmp);
                enqueued_total += enq as i64;
                completed_total += lat.len() as i64;
                windows.push(Window {
                    start_s: from,
                    enqueued_per_sec: enq as f64 / w,
                    completed_per_sec: lat.len() as f64 / w,
                    p50_ms: percentile(&lat, 0.50),
                    p99_ms: percentile(&lat, 0.99),
                    queue_dead,
                    jobs_dead,
                    queue_bytes,
                    backlog: enqueued_total - completed_total,
                    phase: match held {
                        Some((a, b)) if to > a && from < b => Phase::Held,
                        Some((_, b)) if from >= b => Phase::After,
                        _ => Phase::Before,
                    },
                });
            }
            let stretch = |from: f64, to: f64| {
                let mut lat: Vec<f64> = done
                    .iter()
                    .filter(|(t, _)| (from..to).contains(&t.duration_since(started).as_secs_f64()))
                    .map(|(_, l)| l.as_secs_f64() * 1000.0)
                    .collect();
                lat.sort_by(f64::total_cmp);
                Stretch {
                    from_s: from,
                    to_s: to,
                    per_sec: lat.len() as f64 / (to - from).max(1e-9),
                    p99_ms: percentile(&lat, 0.99),
                }
            };
            let ((b0, b1), (e0, e1)) = judged_stretches(windows.len() as f64 * w, w);
            let (began, ended) = (stretch(b0, b1), stretch(e0, e1));
            let snapshot = held.map(|(_, release)| {
                let rate_of = |p: Phase| windows.iter().filter(move |x| x.phase == p);
                let before: Vec<f64> = rate_of(Phase::Before).map(|x| x.completed_per_sec).collect();
                let before_per_sec = before.iter().sum::<f64>() / before.len().max(1) as f64;
                SnapshotVerdict {
                    before_per_sec,
                    min_during_per_sec: rate_of(Phase::Held)
                        .map(|x| x.completed_per_sec)
                        .fold(f64::INFINITY, f64::min),
                    recovered_after_s: rate_of(Phase::After)
                        .find(|x| x.completed_per_sec >= 0.9 * before_per_sec)
                        .map(|x| x.start_s + w - release),
                }
            });
            let c = &ctx.counters;
            Ok(SteadyResult {
                rate,
                probe_jobs_per_sec,
                windows,
                began,
                ended,
                tables_start,
                tables_end,
                autovacuum,
                snapshot,
                completed: c.completed.load(Ordering::Relaxed) - base_completed,
                claims: c.claims.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                first_error: c.first_error.lock().expect("error lock").clone(),
                cpu,
                args,
            })
        }
        .await;
        (db, result)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::judged_stretches;

    #[test]
    fn a_minute_at_each_end_after_the_warm_up() {
        assert_eq!(
            judged_stretches(300.0, 10.0),
            ((10.0, 70.0), (240.0, 300.0))
        );
    }

    #[test]
    fn a_short_run_is_split_after_the_warm_up() {
        assert_eq!(judged_stretches(60.0, 10.0), ((10.0, 35.0), (35.0, 60.0)));
        assert_eq!(judged_stretches(30.0, 10.0), ((10.0, 20.0), (20.0, 30.0)));
    }
}
