//! A page of jobs filtered by status is read from the status index, even where the
//! statistics say nearly every job has that status and the newest jobs have another: left
//! to costs, Postgres walked the creation-time index back from the newest job and filtered
//! its way past the whole backlog of queued jobs (see `job_list`).

use backvault_domain::jobs::JobStatus;
use backvault_store::Page;
use backvault_store::jobs::{JobFilter, job_list};
use sqlx::PgPool;

/// 19,000 completed jobs, then the 1,000 newest queued: most jobs are completed, but none
/// of the newest.
const HISTORY: &str = "
insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg', 'sqlvm-a', 'westeurope', 'resource_manager');
insert into jobs (id, vm_id, subscription_id, kind, status, priority, max_attempts, created_at)
select gen_random_uuid(), '00000000-0000-0000-0000-00000000000a', 'sub-1', 'backup_log',
       case when n > 19000 then 'queued' else 'completed' end, 1, 3,
       timestamptz '2026-11-01 00:00:00+00' + n * interval '1 minute'
from generate_series(1, 20000) as n;
analyze jobs;
";

async fn scans_in_transaction(tx: &mut sqlx::PgConnection, index: &str) -> i64 {
    sqlx::query_scalar("select pg_stat_get_xact_numscans($1::regclass)")
        .bind(index)
        .fetch_one(tx)
        .await
        .expect("the index's scans in this transaction")
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn completed_jobs_are_read_from_the_status_index(pool: PgPool) {
    sqlx::raw_sql(HISTORY)
        .execute(&pool)
        .await
        .expect("the job history");
    let mut tx = pool.begin().await.expect("a transaction");
    let filter = JobFilter {
        status: Some(JobStatus::Completed),
        ..JobFilter::default()
    };
    let page = job_list(
        &mut *tx,
        &filter,
        Page {
            after: None,
            limit: 51,
        },
    )
    .await
    .expect("a page of completed jobs");

    assert_eq!(page.len(), 51);
    assert!(page.iter().all(|j| j.status == JobStatus::Completed));
    assert!(
        page.windows(2).all(|w| w[0].created_at > w[1].created_at),
        "newest first"
    );
    assert_eq!(
        page[0].created_at.to_rfc3339(),
        "2026-11-14T04:40:00+00:00",
        "the newest completed job (the 19,000th minute) heads the page"
    );
    let next = job_list(
        &mut *tx,
        &filter,
        Page {
            after: Some(page[50].id),
            limit: 51,
        },
    )
    .await
    .expect("the next page");
    assert_eq!(next.len(), 51);
    assert!(next.iter().all(|j| j.status == JobStatus::Completed));
    assert_eq!(
        (next[0].created_at - page[50].created_at).num_minutes(),
        -1,
        "the next page goes on from the cursor"
    );

    assert!(scans_in_transaction(&mut tx, "jobs_status_created_id").await >= 2);
    assert_eq!(
        scans_in_transaction(&mut tx, "jobs_created").await,
        0,
        "the creation-time index, filtered by status, is not walked"
    );
}
