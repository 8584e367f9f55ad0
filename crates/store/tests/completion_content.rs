//! A completion batch is judged from what `queue_complete` returns and, when it has to be
//! decided the careful way, from what `queue_lock_completing` returns: the two statements
//! read a job's content and claim time each in their own SQL, and must agree, or a result
//! would be judged one way when it completes at once and another when it is rechecked.

use backvault_domain::jobs::JobStatus;
use backvault_store::jobs::{CompletingJob, Completion, queue_complete, queue_lock_completing};
use sqlx::PgPool;
use uuid::Uuid;

const VM: &str = "00000000-0000-0000-0000-00000000000a";
/// Claimed by this server: its history row has no start yet, the queue row has.
const FRESH: &str = "00000000-0000-0000-0000-0000000000c1";
/// Claimed first by an older server, which wrote the start into the history row; its
/// retry claimed by this one, which started the queue row's clock anew.
const OLDER: &str = "00000000-0000-0000-0000-0000000000c2";

const FIXTURE: &str = "
insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg', 'sqlvm-a', 'westeurope', 'resource_manager');
insert into jobs (id, vm_id, subscription_id, kind, status, priority, max_attempts, items, payload, started_at)
values ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-00000000000a', 'sub-1', 'backup_full',
        'queued', 0, 3, '[{\"instance\": \"MSSQLSERVER\", \"database\": \"sales\"}]', '{\"retention_days\": 30}', null),
       ('00000000-0000-0000-0000-0000000000c2', '00000000-0000-0000-0000-00000000000a', 'sub-1', 'backup_log',
        'in_progress', 0, 3, '[{\"instance\": \"MSSQLSERVER\", \"database\": \"hr\"}]', '{}',
        '2026-12-01T09:00:00Z');
insert into job_queue (job_id, vm_id, kind, priority, run_at, running, lease, lease_expires_at, attempt,
                       max_attempts, started_at, attempt_started_at)
values ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-00000000000a', 'backup_full', 0, now(),
        true, 3, now() + interval '1 hour', 1, 3, '2026-12-01T10:00:00Z', '2026-12-01T10:00:00Z'),
       ('00000000-0000-0000-0000-0000000000c2', '00000000-0000-0000-0000-00000000000a', 'backup_log', 0, now(),
        true, 5, now() + interval '1 hour', 2, 3, '2026-12-01T10:05:00Z', '2026-12-01T10:05:00Z');
";

fn completion(job: &str, lease: i64) -> Completion {
    Completion {
        job_id: job.parse().expect("a job id"),
        vm_id: VM.parse().expect("a VM id"),
        lease,
        kind_like: "backup_%",
        status: JobStatus::Completed,
        result: serde_json::json!({"kind": "backup", "recovery_points": []}),
        warnings: serde_json::json!([]),
    }
}

type Content = (
    Uuid,
    String,
    serde_json::Value,
    serde_json::Value,
    Option<String>,
);

fn content(mut jobs: Vec<CompletingJob>) -> Vec<Content> {
    jobs.sort_by_key(|j| j.job_id);
    jobs.into_iter()
        .map(|j| {
            (
                j.job_id,
                j.kind.as_str().to_owned(),
                j.items.0,
                j.payload.0,
                j.started_at.map(|t| t.to_rfc3339()),
            )
        })
        .collect()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_locked_and_the_completed_job_read_alike(pool: PgPool) {
    sqlx::raw_sql(FIXTURE)
        .execute(&pool)
        .await
        .expect("the fixture");
    let batch = [completion(FRESH, 3), completion(OLDER, 5)];
    let mut tx = pool.begin().await.unwrap();
    let locked = queue_lock_completing(&mut tx, &batch).await.unwrap();
    let completed = queue_complete(&mut tx, &batch).await.unwrap();
    let instants: Vec<_> = locked.iter().chain(&completed).map(|j| j.now).collect();
    assert!(
        instants.windows(2).all(|w| w[0] == w[1]),
        "one transaction, one instant: {instants:?}"
    );
    let (locked, completed) = (content(locked), content(completed));
    assert_eq!(locked.len(), 2, "both leases are held");
    assert_eq!(locked, completed);
    let starts: Vec<_> = completed.iter().map(|c| c.4.clone()).collect();
    assert_eq!(
        starts,
        [
            Some("2026-12-01T10:00:00+00:00".to_owned()),
            Some("2026-12-01T09:00:00+00:00".to_owned())
        ],
        "the claim time: the queue row's for a fresh claim, the history row's first claim for an older one"
    );
}
