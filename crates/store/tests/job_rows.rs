//! A job's queue row and attempt rows go with it (a trigger since migration
//! 20261205000002 dropped their foreign keys): when jobs are pruned, and when their VM is
//! deleted, which cascades to its jobs.

use sqlx::PgPool;

const FIXTURE: &str = "
insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg', 'sqlvm-a', 'westeurope', 'resource_manager'),
       ('00000000-0000-0000-0000-00000000000b', 'sub-1', 'rg', 'sqlvm-b', 'westeurope', 'resource_manager');
insert into jobs (id, vm_id, subscription_id, kind, status, priority, max_attempts, created_at, finished_at)
select ('00000000-0000-0000-0000-0000000001' || lpad(n::text, 2, '0'))::uuid,
       case when n <= 10 then '00000000-0000-0000-0000-00000000000a'::uuid
            else '00000000-0000-0000-0000-00000000000b'::uuid end,
       'sub-1', 'discovery', case when n % 2 = 0 then 'completed' else 'queued' end, 0, 3,
       now() - interval '100 days', case when n % 2 = 0 then now() - interval '99 days' end
from generate_series(1, 20) n;
insert into job_attempts (job_id, attempt, lease, started_at, ended_at, outcome)
select id, 1, 1, now() - interval '99 days', now() - interval '99 days', 'failed' from jobs;
insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts)
select id, vm_id, kind, priority, now(), max_attempts from jobs where status = 'queued';
";

async fn left(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "select (select count(*) from jobs), (select count(*) from job_queue), (select count(*) from job_attempts)",
    )
    .fetch_one(pool)
    .await
    .expect("counts")
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn pruned_and_cascaded_jobs_take_their_queue_and_attempt_rows(pool: PgPool) {
    sqlx::raw_sql(FIXTURE)
        .execute(&pool)
        .await
        .expect("the fixture");
    assert_eq!(left(&pool).await, (20, 10, 20));

    let pruned = backvault_store::jobs::jobs_prune(&pool, chrono::Duration::days(30), 1_000)
        .await
        .expect("pruned");
    assert_eq!(pruned, 10, "the finished jobs");
    assert_eq!(
        left(&pool).await,
        (10, 10, 10),
        "their attempts went with them"
    );

    sqlx::query("delete from vms where id = '00000000-0000-0000-0000-00000000000a'")
        .execute(&pool)
        .await
        .expect("the VM deleted");
    assert_eq!(
        left(&pool).await,
        (5, 5, 5),
        "its queued jobs, their queue rows and attempts went with it"
    );
    let strays: i64 = sqlx::query_scalar(
        "select (select count(*) from job_queue q where not exists (select 1 from jobs j where j.id = q.job_id))
              + (select count(*) from job_attempts a where not exists (select 1 from jobs j where j.id = a.job_id))",
    )
    .fetch_one(&pool)
    .await
    .expect("strays");
    assert_eq!(strays, 0);
}
