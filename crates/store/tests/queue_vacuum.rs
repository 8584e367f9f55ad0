//! The queue's vacuum leaves its empty pages in place (migration 20261206000002): cutting
//! them off needs the table's exclusive lock, which stops every claim and completion while
//! it is held. A table without the setting, vacuumed the same way, shrinks: that is what
//! the queue no longer does.

use sqlx::PgPool;

const BACKLOG: &str = "
insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg', 'sqlvm-a', 'westeurope', 'resource_manager');
insert into jobs (id, vm_id, subscription_id, kind, status, priority, max_attempts)
select gen_random_uuid(), '00000000-0000-0000-0000-00000000000a', 'sub-1', 'backup_full', 'queued', 1, 3
from generate_series(1, 5000);
insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts)
select id, vm_id, kind, priority, now(), max_attempts from jobs;
-- The yardstick: the same rows in a table that vacuum may cut short.
create table queue_as_it_was as select * from job_queue;
";

async fn pages(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar("select pg_relation_size($1::regclass) / current_setting('block_size')::int")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("the table's size")
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn vacuum_keeps_the_queue_pages_a_drained_backlog_left(pool: PgPool) {
    sqlx::raw_sql(BACKLOG)
        .execute(&pool)
        .await
        .expect("a backlog of 5,000 jobs");
    let (queue_before, yardstick_before) = (
        pages(&pool, "job_queue").await,
        pages(&pool, "queue_as_it_was").await,
    );
    assert!(
        queue_before > 20 && yardstick_before > 20,
        "{queue_before} and {yardstick_before} pages"
    );

    sqlx::raw_sql("delete from job_queue; delete from queue_as_it_was")
        .execute(&pool)
        .await
        .expect("the backlog drained");
    backvault_store::jobs::queue_vacuum(&pool)
        .await
        .expect("the queue vacuumed");
    sqlx::raw_sql("vacuum (skip_locked) queue_as_it_was")
        .execute(&pool)
        .await
        .expect("the yardstick vacuumed");

    assert_eq!(
        pages(&pool, "queue_as_it_was").await,
        0,
        "vacuum cuts the empty pages off a table that allows it"
    );
    assert_eq!(
        pages(&pool, "job_queue").await,
        queue_before,
        "the queue keeps its pages for the next backlog"
    );
}
