//! The migration after which a claim writes only the queue row, on a job an older server
//! claimed: it still reads as running, with its first start and its attempts, and a newer
//! server ends its attempt into the row the older claim inserted.

mod support;

use backvault_domain::jobs::{AttemptOutcome, JobStatus};
use backvault_store::jobs::{Completion, job_attempts, job_get, queue_complete};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use support::migrate;
use uuid::Uuid;

const CLAIM_MIGRATION: i64 = 20261205000001;

const VM: &str = "00000000-0000-0000-0000-00000000000a";
const RUNNING: &str = "00000000-0000-0000-0000-0000000000b1";
const WAITING: &str = "00000000-0000-0000-0000-0000000000b2";
const FIRST_CLAIM: &str = "2026-12-01T10:00:00Z";
const SECOND_CLAIM: &str = "2026-12-01T10:05:00Z";

/// What an older server left: a job on its second attempt (the first failed), and a job
/// never claimed.
const FIXTURE: &str = "
insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg', 'sqlvm-a', 'westeurope', 'resource_manager');
insert into jobs (id, vm_id, subscription_id, kind, status, priority, max_attempts, attempts, started_at, created_at)
values ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000a', 'sub-1', 'discovery',
        'in_progress', 0, 3, 2, '2026-12-01T10:00:00Z', '2026-12-01T09:59:00Z'),
       ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-00000000000a', 'sub-1', 'discovery',
        'queued', 0, 3, 0, null, '2026-12-01T09:59:30Z');
insert into job_attempts (job_id, attempt, lease, started_at, ended_at, outcome, error_code, error_message)
values ('00000000-0000-0000-0000-0000000000b1', 1, 6, '2026-12-01T10:00:00Z', '2026-12-01T10:01:00Z', 'failed',
        'UserErrorOpeningSQLConnection', 'cannot connect'),
       ('00000000-0000-0000-0000-0000000000b1', 2, 7, '2026-12-01T10:05:00Z', null, null, null, null);
insert into job_queue (job_id, vm_id, kind, priority, run_at, running, lease, lease_expires_at, attempt, max_attempts)
values ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000a', 'discovery', 0,
        '2026-12-01T10:02:00Z', true, 7, now() + interval '1 hour', 2, 3),
       ('00000000-0000-0000-0000-0000000000b2', '00000000-0000-0000-0000-00000000000a', 'discovery', 0,
        '2026-12-01T09:59:30Z', false, 0, null, 0, 3);
";

fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("an instant")
}

#[sqlx::test(migrations = false)]
async fn a_job_claimed_before_the_migration_reads_and_ends_as_it_would_have(pool: PgPool) {
    migrate(&pool, |v| v < CLAIM_MIGRATION).await;
    sqlx::raw_sql(FIXTURE)
        .execute(&pool)
        .await
        .expect("the fixture fits the schema before the migration");
    migrate(&pool, |v| v >= CLAIM_MIGRATION).await;
    let (running, waiting): (Uuid, Uuid) = (RUNNING.parse().unwrap(), WAITING.parse().unwrap());

    let job = job_get(&pool, running).await.unwrap().expect("the job");
    assert_eq!(
        (job.status, job.attempts, job.started_at),
        (JobStatus::InProgress, 2, Some(at(FIRST_CLAIM)))
    );
    let stored: String = sqlx::query_scalar("select status from jobs where id = $1")
        .bind(running)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, "queued", "the history of a running job says queued");
    let attempts = job_attempts(&pool, running).await.unwrap();
    let seen: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.lease, a.started_at, a.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            (1, 6, at(FIRST_CLAIM), Some(AttemptOutcome::Failed)),
            (2, 7, at(SECOND_CLAIM), None),
        ],
        "the running attempt once, as the older claim recorded it"
    );
    let untouched = job_get(&pool, waiting).await.unwrap().expect("the job");
    assert_eq!(
        (untouched.status, untouched.attempts, untouched.started_at),
        (JobStatus::Queued, 0, None)
    );

    let mut conn = pool.acquire().await.unwrap();
    let done = queue_complete(
        &mut conn,
        &[Completion {
            job_id: running,
            vm_id: VM.parse().unwrap(),
            lease: 7,
            kind_like: "discovery",
            status: JobStatus::Completed,
            result: serde_json::json!({}),
            warnings: serde_json::json!([]),
        }],
    )
    .await
    .unwrap();
    let done: Vec<_> = done.iter().map(|j| (j.job_id, j.started_at)).collect();
    // The claim time the completion reports is the first claim's, kept by the old row.
    assert_eq!(done, [(running, Some(at(FIRST_CLAIM)))]);
    let job = job_get(&pool, running).await.unwrap().expect("the job");
    assert_eq!(
        (job.status, job.attempts, job.started_at),
        (JobStatus::Completed, 2, Some(at(FIRST_CLAIM)))
    );
    let attempts = job_attempts(&pool, running).await.unwrap();
    let seen: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.started_at, a.outcome, a.ended_at.is_some()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, at(FIRST_CLAIM), Some(AttemptOutcome::Failed), true),
            (2, at(SECOND_CLAIM), Some(AttemptOutcome::Completed), true),
        ]
    );
}
