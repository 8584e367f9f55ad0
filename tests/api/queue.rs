//! The queue under concurrency, through the store layer the service uses.

use std::collections::HashMap;
use std::sync::Arc;

use backvault_store::jobs::{self as store, ClaimLimits, Completion, NewJob};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, enroll};

fn job(vm: Uuid) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        vm_id: vm,
        subscription_id: "sub-1".into(),
        vault_id: None,
        kind: backvault_domain::jobs::JobKind::BackupLog,
        priority: 1,
        items: json!([]),
        payload: json!({}),
        max_attempts: 3,
        run_at: chrono::Utc::now(),
        availability_group_id: None,
    }
}

const LIMITS: ClaimLimits = ClaimLimits {
    max_running_backups: 20,
    max_running_restores: 15,
    lease: chrono::Duration::seconds(60),
};

/// 16 claimers race over 1,000 jobs on 10 VMs: every job is claimed exactly once and all
/// complete.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn sixteen_claimers_claim_each_job_exactly_once(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let mut vms = Vec::new();
    for i in 0..10 {
        vms.push(
            enroll(&app, &format!("vm-{i}"))
                .await
                .0
                .parse::<Uuid>()
                .unwrap(),
        );
    }
    let jobs: Vec<NewJob> = (0..1000).map(|i| job(vms[i % vms.len()])).collect();
    let mut tx = pool.begin().await.unwrap();
    store::jobs_enqueue(&mut tx, &jobs).await.unwrap();
    tx.commit().await.unwrap();

    let vms = Arc::new(vms);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let pool = pool.clone();
            let vms = vms.clone();
            tokio::spawn(async move {
                let mut claimed = Vec::new();
                let mut idle_rounds = 0;
                while idle_rounds < 3 {
                    let wants = vec![7; vms.len()];
                    let mut tx = pool.begin().await.unwrap();
                    let rows = store::queue_claim(&mut tx, &vms, &wants, LIMITS)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    if rows.is_empty() {
                        idle_rounds += 1;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle_rounds = 0;
                    let completions: Vec<Completion> = rows
                        .iter()
                        .map(|r| Completion {
                            job_id: r.job_id,
                            vm_id: r.vm_id,
                            lease: r.lease,
                            kind_like: "backup_%",
                            status: backvault_domain::jobs::JobStatus::Completed,
                            result: json!({"kind": "backup", "recovery_points": []}),
                            warnings: json!([]),
                        })
                        .collect();
                    let mut tx = pool.begin().await.unwrap();
                    let done = store::queue_complete(&mut tx, &completions).await.unwrap();
                    tx.commit().await.unwrap();
                    assert_eq!(
                        done.len(),
                        rows.len(),
                        "a claimed lease is held until completion"
                    );
                    claimed.extend(rows.into_iter().map(|r| r.job_id));
                }
                claimed
            })
        })
        .collect();
    let mut times_claimed: HashMap<Uuid, usize> = HashMap::new();
    for w in workers {
        for id in w.await.unwrap() {
            *times_claimed.entry(id).or_default() += 1;
        }
    }
    assert_eq!(times_claimed.len(), 1000);
    assert!(times_claimed.values().all(|n| *n == 1));
    let (completed, attempts, queued): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs where status = 'completed'),
                (select count(*) from job_attempts),
                (select count(*) from job_queue)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((completed, attempts, queued), (1000, 1000, 0));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_rolled_back_enqueue_leaves_nothing(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let vm: Uuid = enroll(&app, "vm").await.0.parse().unwrap();
    let mut tx = pool.begin().await.unwrap();
    store::jobs_enqueue(&mut tx, &[job(vm), job(vm)])
        .await
        .unwrap();
    let inside: i64 = sqlx::query_scalar("select count(*) from job_queue")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 2);
    tx.rollback().await.unwrap();
    let (jobs, queue): (i64, i64) =
        sqlx::query_as("select (select count(*) from jobs), (select count(*) from job_queue)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((jobs, queue), (0, 0));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn on_demand_goes_before_scheduled(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let vm: Uuid = enroll(&app, "vm").await.0.parse().unwrap();
    let scheduled = job(vm);
    let mut on_demand = job(vm);
    on_demand.priority = 0;
    let (first_id, urgent_id) = (scheduled.id, on_demand.id);
    let mut tx = pool.begin().await.unwrap();
    store::jobs_enqueue(&mut tx, &[scheduled]).await.unwrap();
    store::jobs_enqueue(&mut tx, &[on_demand]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let rows = store::queue_claim(&mut tx, &[vm], &[1], LIMITS)
        .await
        .unwrap();
    assert_eq!(rows[0].job_id, urgent_id);
    let rows = store::queue_claim(&mut tx, &[vm], &[1], LIMITS)
        .await
        .unwrap();
    assert_eq!(rows[0].job_id, first_id);
}
