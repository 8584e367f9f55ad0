//! Throughput of the store layer alone: workers claim for many VMs at once with
//! `queue_claim` (one transaction) and complete everything they got with `queue_complete`
//! (one transaction), as the server's batchers do, until the backlog is drained. Neither
//! notifies anyone: the server tells the jobs' waiters after the commit (`job_events.rs`),
//! so figures from before that change (`BENCHMARKS.md`, fifth pass and earlier) include a
//! NOTIFY per transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use backvault_store::jobs::{ClaimLimits, Completion, queue_claim, queue_complete};
use clap::Parser;
use rand::seq::IndexedRandom;
use sqlx::PgPool;
use uuid::Uuid;

use backvault_bench::db::{jobs_queued, with_db};
use backvault_bench::sys::{CpuSnapshot, CpuSplit};

use crate::DB_PREFIX;
use crate::backlog::{enqueue_backlog, seed_vms};

#[derive(Debug, Clone, Parser)]
pub struct QueueArgs {
    /// Jobs in the backlog.
    #[arg(long, default_value_t = 200_000)]
    pub jobs: usize,
    /// VMs the jobs are spread over (round-robin).
    #[arg(long, default_value_t = 1_000)]
    pub vms: usize,
    /// Concurrent workers, each with its own connection.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// VMs one claim asks for (a random sample of the VMs that still have jobs).
    #[arg(long, default_value_t = 50)]
    pub vms_per_claim: usize,
    /// Let a worker sample VMs another worker is claiming or completing right now. By
    /// default a VM is in at most one worker's hands at a time, as it is in production,
    /// where each VM's agent has one claim in flight; overlapping samples instead queue
    /// up on the per-VM advisory locks of `queue_claim`.
    #[arg(long)]
    pub overlapping_claims: bool,
    /// Diagnostic: plan every statement for its actual parameters
    /// (`plan_cache_mode = force_custom_plan`) instead of letting Postgres switch a
    /// prepared statement to its generic plan after five runs.
    #[arg(long)]
    pub force_custom_plans: bool,
    /// Jobs wanted per VM in a claim.
    #[arg(long, default_value_t = 20)]
    pub want: i32,
    #[arg(long, default_value_t = 20)]
    pub max_running_backups: i32,
    #[arg(long, default_value_t = 15)]
    pub max_running_restores: i32,
    #[arg(long, default_value_t = 60)]
    pub lease_seconds: i64,
    /// Jobs per enqueue transaction while loading the backlog.
    #[arg(long, default_value_t = 5_000)]
    pub enqueue_batch: usize,
    /// Give up after this many seconds of draining.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Compare with this baseline instead of the cached or a fresh one.
    #[arg(long)]
    pub baseline_jobs_per_sec: Option<f64>,
}

impl Default for QueueArgs {
    fn default() -> Self {
        Self::parse_from(["queue"])
    }
}

#[derive(Debug, Clone)]
pub struct QueueResult {
    pub args: QueueArgs,
    pub jobs_per_sec: f64,
    pub completed: u64,
    pub seconds: f64,
    pub claim_txs: u64,
    pub empty_claims: u64,
    pub claim_ms: f64,
    pub complete_ms: f64,
    pub enqueue_jobs_per_sec: f64,
    pub cpu: CpuSplit,
}

impl QueueResult {
    pub fn rows_per_claim(&self) -> f64 {
        self.completed as f64 / (self.claim_txs - self.empty_claims).max(1) as f64
    }

    pub fn summary(&self, baseline: Option<f64>) -> String {
        let ratio = baseline
            .map(|b| format!(" = {:.1}x baseline (goal 4x)", self.jobs_per_sec / b))
            .unwrap_or_default();
        format!(
            "queue: {:.0} jobs/s{ratio} ({} jobs over {} VMs, {} workers, {} VM samples, {:.1} s; {:.0} jobs per claim; claim tx {:.1} ms, complete tx {:.1} ms avg) [{}]",
            self.jobs_per_sec,
            self.completed,
            self.args.vms,
            self.args.workers,
            if self.args.overlapping_claims {
                "overlapping"
            } else {
                "disjoint"
            },
            self.seconds,
            self.rows_per_claim(),
            self.claim_ms,
            self.complete_ms,
            self.cpu
        )
    }
}

/// VMs that still have jobs not yet completed, to sample claims from.
struct Backlog {
    remaining: Vec<usize>,
    active: Vec<usize>,
    position: Vec<usize>,
    /// In some worker's claim or completion right now.
    busy: Vec<bool>,
    busy_count: usize,
}

impl Backlog {
    fn new(per_vm: &[usize]) -> Self {
        let active: Vec<usize> = (0..per_vm.len()).filter(|&i| per_vm[i] > 0).collect();
        let mut position = vec![usize::MAX; per_vm.len()];
        for (p, &i) in active.iter().enumerate() {
            position[i] = p;
        }
        Self {
            remaining: per_vm.to_vec(),
            active,
            position,
            busy: vec![false; per_vm.len()],
            busy_count: 0,
        }
    }

    /// Up to `n` random VMs with jobs left; unless `overlap`, only ones no other worker
    /// holds, and they are held until [`Backlog::release`].
    fn checkout(&mut self, n: usize, overlap: bool) -> Vec<usize> {
        if overlap {
            return self
                .active
                .choose_multiple(&mut rand::rng(), n)
                .copied()
                .collect();
        }
        let picked: Vec<usize> = self
            .active
            .choose_multiple(&mut rand::rng(), n + self.busy_count)
            .copied()
            .filter(|&vm| !self.busy[vm])
            .take(n)
            .collect();
        for &vm in &picked {
            self.busy[vm] = true;
        }
        self.busy_count += picked.len();
        picked
    }

    fn release(&mut self, vms: &[usize], overlap: bool) {
        if overlap {
            return;
        }
        for &vm in vms {
            self.busy[vm] = false;
        }
        self.busy_count -= vms.len();
    }

    fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    fn completed(&mut self, vm: usize) {
        self.remaining[vm] = self.remaining[vm].saturating_sub(1);
        if self.remaining[vm] == 0 && self.position[vm] != usize::MAX {
            let p = self.position[vm];
            self.active.swap_remove(p);
            if let Some(&moved) = self.active.get(p) {
                self.position[moved] = p;
            }
            self.position[vm] = usize::MAX;
        }
    }
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    claim_txs: AtomicU64,
    empty_claims: AtomicU64,
    claim_micros: AtomicU64,
    complete_txs: AtomicU64,
    complete_micros: AtomicU64,
}

struct Shared {
    pool: PgPool,
    vms: Vec<Uuid>,
    index: HashMap<Uuid, usize>,
    backlog: Mutex<Backlog>,
    counters: Counters,
    limits: ClaimLimits,
    args: QueueArgs,
    deadline: Instant,
}

async fn worker(shared: Arc<Shared>) -> anyhow::Result<()> {
    let overlap = shared.args.overlapping_claims;
    loop {
        let picked = {
            let mut backlog = shared.backlog.lock().expect("backlog lock");
            if backlog.is_empty() {
                return Ok(());
            }
            backlog.checkout(shared.args.vms_per_claim, overlap)
        };
        if Instant::now() > shared.deadline {
            bail!("the backlog was not drained within the timeout");
        }
        if picked.is_empty() {
            // The VMs left are all in other workers' hands.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let outcome = claim_and_complete(&shared, &picked).await;
        shared
            .backlog
            .lock()
            .expect("backlog lock")
            .release(&picked, overlap);
        outcome?;
    }
}

/// One claim transaction for `picked`, then one completion transaction for all it got.
async fn claim_and_complete(shared: &Shared, picked: &[usize]) -> anyhow::Result<()> {
    let result = serde_json::json!({"kind": "backup", "recovery_points": []});
    {
        let vm_ids: Vec<Uuid> = picked.iter().map(|&i| shared.vms[i]).collect();
        let wants = vec![shared.args.want; vm_ids.len()];
        let started = Instant::now();
        let mut tx = shared.pool.begin().await?;
        let claimed = queue_claim(&mut tx, &vm_ids, &wants, shared.limits).await?;
        tx.commit().await?;
        let c = &shared.counters;
        c.claim_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.claim_txs.fetch_add(1, Ordering::Relaxed);
        if claimed.is_empty() {
            // Every sampled VM is at its cap (or, with overlap, skip-locked by another
            // worker's claim).
            c.empty_claims.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Ok(());
        }
        let completions: Vec<Completion> = claimed
            .iter()
            .map(|row| Completion {
                job_id: row.job_id,
                vm_id: row.vm_id,
                lease: row.lease,
                kind_like: "backup_%",
                status: backvault_domain::jobs::JobStatus::Completed,
                result: result.clone(),
                warnings: serde_json::json!([]),
            })
            .collect();
        let started = Instant::now();
        let mut tx = shared.pool.begin().await?;
        let done = queue_complete(&mut tx, &completions).await?;
        tx.commit().await?;
        c.complete_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.complete_txs.fetch_add(1, Ordering::Relaxed);
        if done.len() != completions.len() {
            bail!(
                "{} of {} completions lost their lease",
                completions.len() - done.len(),
                completions.len()
            );
        }
        c.completed.fetch_add(done.len() as u64, Ordering::Relaxed);
        let mut backlog = shared.backlog.lock().expect("backlog lock");
        for row in &claimed {
            backlog.completed(shared.index[&row.vm_id]);
        }
    }
    Ok(())
}

pub async fn run(admin_url: &str, args: &QueueArgs) -> anyhow::Result<QueueResult> {
    let args = args.clone();
    with_db(admin_url, DB_PREFIX, "queue", move |db| async move {
        let result = async {
            let settings: &[(&str, &str)] = if args.force_custom_plans {
                &[("plan_cache_mode", "force_custom_plan")]
            } else {
                &[]
            };
            let pool = db.migrated_pool(args.workers as u32 + 2, settings).await?;
            let vms = seed_vms(&pool, args.vms).await?;
            let (per_vm, enqueue_took) =
                enqueue_backlog(&pool, &vms, args.jobs, args.enqueue_batch).await?;
            let shared = Arc::new(Shared {
                pool: pool.clone(),
                index: vms.iter().enumerate().map(|(i, v)| (*v, i)).collect(),
                vms,
                backlog: Mutex::new(Backlog::new(&per_vm)),
                counters: Counters::default(),
                limits: ClaimLimits {
                    max_running_backups: args.max_running_backups,
                    max_running_restores: args.max_running_restores,
                    lease: chrono::Duration::seconds(args.lease_seconds),
                },
                args: args.clone(),
                deadline: Instant::now() + Duration::from_secs(args.timeout_seconds),
            });
            // Open every worker's connection before the clock starts.
            let warm: Vec<_> = {
                let mut conns = Vec::new();
                for _ in 0..args.workers {
                    conns.push(pool.acquire().await?);
                }
                conns
            };
            drop(warm);

            backvault_bench::sys::wait_until_quiet().await;
            let cpu_before = CpuSnapshot::take(DB_PREFIX, None);
            let started = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..args.workers {
                set.spawn(worker(shared.clone()));
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            let seconds = started.elapsed().as_secs_f64();
            let cpu = CpuSnapshot::take(DB_PREFIX, None).since(&cpu_before);

            let left = jobs_queued(&pool).await?;
            let completed_in_history = sqlx::query_scalar!(
                r#"select count(*) as "n!" from jobs where status = 'completed'"#
            )
            .fetch_one(&pool)
            .await?;
            if left != 0 || completed_in_history != args.jobs as i64 {
                bail!(
                    "after the drain: {left} jobs still queued, {completed_in_history} of {} completed",
                    args.jobs
                );
            }
            pool.close().await;
            let c = &shared.counters;
            let completed = c.completed.load(Ordering::Relaxed);
            let claim_txs = c.claim_txs.load(Ordering::Relaxed);
            let complete_txs = c.complete_txs.load(Ordering::Relaxed);
            Ok(QueueResult {
                jobs_per_sec: completed as f64 / seconds,
                completed,
                seconds,
                claim_txs,
                empty_claims: c.empty_claims.load(Ordering::Relaxed),
                claim_ms: c.claim_micros.load(Ordering::Relaxed) as f64 / 1000.0 / claim_txs.max(1) as f64,
                complete_ms: c.complete_micros.load(Ordering::Relaxed) as f64
                    / 1000.0
                    / complete_txs.max(1) as f64,
                enqueue_jobs_per_sec: args.jobs as f64 / enqueue_took.as_secs_f64(),
                cpu,
                args,
            })
        }
        .await;
        (db, result)
    })
    .await
}
