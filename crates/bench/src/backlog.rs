//! The setup `queue`, `http`, `steady` and `wakeup` share: VMs, a backlog of jobs enqueued
//! through `backvault_store::jobs::jobs_enqueue`, the server the agents drain it from, and
//! the completions of jobs done at once.

use std::time::{Duration, Instant};

use std::path::Path;

use anyhow::Context;
use backvault_bench::server::{Launch, Server};
use backvault_domain::agent::JobResult;
use backvault_domain::agent::protocol::{ClaimedJob, JobCompletion};
use backvault_store::jobs::{NewJob, jobs_enqueue};
use sqlx::PgPool;
use uuid::Uuid;

/// Inserts `n` VMs of subscription `sub-1` directly (setup, not measured); returns their ids.
pub async fn seed_vms(pool: &PgPool, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let names: Vec<String> = (0..n).map(|i| format!("bench-vm-{i:05}")).collect();
    // Set-based: no store function inserts VMs in bulk (`vm_enroll` takes one at a time).
    sqlx::query!(
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model,
                          agent_installed, agent_version, dotnet_version, sql_iaas_extension)
         select id, 'sub-1', 'rg-bench', name, 'westeurope', 'resource_manager', true, '1.0.0', '4.8', true
         from unnest($1::uuid[], $2::text[]) as v(id, name)",
        &ids,
        &names,
    )
    .execute(pool)
    .await
    .context("seeding VMs")?;
    Ok(ids)
}

/// One scheduled full backup of one database, as the scheduler would enqueue it.
pub fn backup_job(vm_id: Uuid) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        vm_id,
        subscription_id: "sub-1".to_owned(),
        vault_id: None,
        kind: backvault_domain::jobs::JobKind::BackupFull,
        priority: 1,
        items: serde_json::json!([{"instance": "MSSQLSERVER", "database": "sales"}]),
        payload: serde_json::json!({}),
        max_attempts: 3,
        // A second in the past so that `run_at <= now()` holds on the first claim.
        run_at: chrono::Utc::now() - chrono::Duration::seconds(1),
        availability_group_id: None,
    }
}

/// Enqueues `jobs` jobs spread round-robin over `vms`, `batch` per transaction, through
/// `jobs_enqueue`. Returns how many each VM got and how long it took.
pub async fn enqueue_backlog(
    pool: &PgPool,
    vms: &[Uuid],
    jobs: usize,
    batch: usize,
) -> anyhow::Result<(Vec<usize>, Duration)> {
    let started = Instant::now();
    let mut per_vm = vec![0usize; vms.len()];
    let mut next = 0usize;
    while next < jobs {
        let end = (next + batch.max(1)).min(jobs);
        let batch: Vec<NewJob> = (next..end)
            .map(|i| {
                per_vm[i % vms.len()] += 1;
                backup_job(vms[i % vms.len()])
            })
            .collect();
        let mut tx = pool.begin().await?;
        jobs_enqueue(&mut tx, &batch).await?;
        tx.commit().await?;
        next = end;
    }
    let took = started.elapsed();
    // Autovacuum would analyze the freshly loaded tables within a minute; do it now so
    // the measurement does not depend on when it happens to run.
    sqlx::query!("analyze vms, jobs, job_queue, job_attempts")
        .execute(pool)
        .await?;
    Ok((per_vm, took))
}

/// The real server, with room for `max_running_backups` running backups per VM so that
/// the per-VM cap does not throttle a drain.
pub fn drain_server(bin: &Path, url: &str, max_running_backups: u32) -> anyhow::Result<Server> {
    Server::start(
        bin,
        url,
        &Launch {
            args: vec![
                "--max-running-backups-per-vm".into(),
                max_running_backups.to_string(),
            ],
            ..Launch::default()
        },
    )
}

/// The completions of claimed jobs done at once, as no-op backups: what a benchmark agent
/// reports in its next claim.
pub fn done_at_once(jobs: Vec<ClaimedJob>) -> Vec<JobCompletion> {
    jobs.into_iter()
        .map(|job| JobCompletion {
            job_id: job.job_id,
            lease: job.lease,
            result: JobResult::Backup {
                recovery_points: vec![],
            },
            warnings: vec![],
        })
        .collect()
}
