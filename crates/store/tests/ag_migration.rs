//! The availability-group migration on data of the schema before it: rows that stood for
//! one group database on several VMs collapse into one protected item, whose history is
//! the sum of theirs.

mod support;

use sqlx::PgPool;
use support::migrate;
use uuid::Uuid;

const AG_MIGRATION: i64 = 20261202000001;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// Two VMs report group `ag1` with `orders` (both protected, each with points: the double
/// protection the old schema allowed) and a standalone `hr` on the first.
const FIXTURE: &str = "
insert into vaults (id, subscription_id, resource_group, name, region)
values ('00000000-0000-0000-0000-000000000001', 'sub-1', 'rg', 'vault', 'westeurope');
insert into policies (id, vault_id, name, spec)
values ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000001', 'Gold', '{}');
insert into vms (id, subscription_id, resource_group, name, region, deployment_model, vault_id)
values ('00000000-0000-0000-0000-00000000000a', 'sub-1', 'rg-sql', 'sqlvm-a', 'westeurope', 'resource_manager',
        '00000000-0000-0000-0000-000000000001'),
       ('00000000-0000-0000-0000-00000000000b', 'sub-1', 'rg-sql', 'sqlvm-b', 'westeurope', 'resource_manager',
        '00000000-0000-0000-0000-000000000001');
insert into sql_instances (id, vm_id, name, version)
values ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-00000000000a', 'MSSQLSERVER', '2019'),
       ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000b', 'MSSQLSERVER', '2019');
insert into availability_groups (id, subscription_id, name, backup_preference, replicas)
values ('00000000-0000-0000-0000-0000000000ff', 'sub-1', 'ag1', 'secondary',
        '[{\"vm_name\": \"sqlvm-a\", \"resource_group\": \"rg-sql\", \"instance\": \"MSSQLSERVER\", \"primary\": false},
          {\"vm_name\": \"sqlvm-b\", \"resource_group\": \"rg-sql\", \"instance\": \"MSSQLSERVER\", \"primary\": true}]');
insert into sql_databases (id, vm_id, instance_id, availability_group_id, name, recovery_model)
values ('00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-00000000000a',
        '00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-0000000000ff', 'orders', 'full'),
       ('00000000-0000-0000-0000-0000000000d2', '00000000-0000-0000-0000-00000000000b',
        '00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000ff', 'orders', 'full'),
       ('00000000-0000-0000-0000-0000000000d3', '00000000-0000-0000-0000-00000000000a',
        '00000000-0000-0000-0000-0000000000a1', null, 'hr', 'full');
insert into protected_items (id, vault_id, database_id, policy_id, state, protected_name, created_at)
values ('00000000-0000-0000-0000-0000000000e1', '00000000-0000-0000-0000-000000000001',
        '00000000-0000-0000-0000-0000000000d1', '00000000-0000-0000-0000-000000000002', 'protected', 'orders',
        '2026-11-01T00:00:00Z'),
       ('00000000-0000-0000-0000-0000000000e2', '00000000-0000-0000-0000-000000000001',
        '00000000-0000-0000-0000-0000000000d2', '00000000-0000-0000-0000-000000000002', 'protected', 'orders',
        '2026-11-02T00:00:00Z'),
       ('00000000-0000-0000-0000-0000000000e3', '00000000-0000-0000-0000-000000000001',
        '00000000-0000-0000-0000-0000000000d3', '00000000-0000-0000-0000-000000000002', 'protected', 'hr',
        '2026-11-01T00:00:00Z');
-- e1 (on a) backed up until Nov 20, e2 (on b) until Nov 25; one backup set both recorded.
insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                             database_backup_lsn, size_bytes, backup_set_uuid)
values ('00000000-0000-0000-0000-000000000101', '00000000-0000-0000-0000-0000000000e1', 'full',
        '2026-11-20T00:00:00Z', '2026-11-20T00:00:00Z', 100, 110, 0, 1, '00000000-0000-0000-0000-00000000aaa1'),
       ('00000000-0000-0000-0000-000000000102', '00000000-0000-0000-0000-0000000000e1', 'log',
        '2026-11-20T01:00:00Z', '2026-11-20T01:00:00Z', 90, 200, 100, 1, '00000000-0000-0000-0000-00000000aaa9'),
       ('00000000-0000-0000-0000-000000000201', '00000000-0000-0000-0000-0000000000e2', 'full',
        '2026-11-25T00:00:00Z', '2026-11-25T00:00:00Z', 300, 310, 100, 1, '00000000-0000-0000-0000-00000000bbb1'),
       ('00000000-0000-0000-0000-000000000202', '00000000-0000-0000-0000-0000000000e2', 'log',
        '2026-11-25T01:00:00Z', '2026-11-25T01:00:00Z', 200, 400, 300, 1, '00000000-0000-0000-0000-00000000aaa9');
insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, max_attempts)
values ('00000000-0000-0000-0000-000000000301', '00000000-0000-0000-0000-00000000000a', 'sub-1',
        '00000000-0000-0000-0000-000000000001', 'backup_log', 'queued', 1,
        '[{\"instance\": \"MSSQLSERVER\", \"database\": \"orders\", \"protected_item_id\": \"00000000-0000-0000-0000-0000000000e1\"},
          {\"instance\": \"MSSQLSERVER\", \"database\": \"hr\", \"protected_item_id\": \"00000000-0000-0000-0000-0000000000e3\"}]',
        3);
";

#[sqlx::test(migrations = false)]
async fn rows_of_one_group_database_collapse_into_one_item_with_all_its_history(pool: PgPool) {
    migrate(&pool, |v| v < AG_MIGRATION).await;
    sqlx::raw_sql(FIXTURE)
        .execute(&pool)
        .await
        .expect("the fixture fits the schema before the migration");
    migrate(&pool, |v| v >= AG_MIGRATION).await;

    let items: Vec<(Uuid, Uuid, Uuid)> =
        sqlx::query_as("select id, database_id, item_key from protected_items order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let group_db: Uuid = sqlx::query_scalar("select id from ag_databases where name = 'orders'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        items,
        [
            // The item with the latest point survives, on the primary's copy (b).
            (id(0xe2), id(0xd2), group_db),
            (id(0xe3), id(0xd3), id(0xd3)),
        ]
    );
    let points: Vec<(Uuid, Uuid)> =
        sqlx::query_as("select id, protected_item_id from recovery_points order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        points,
        [
            (id(0x101), id(0xe2)),
            (id(0x201), id(0xe2)),
            (id(0x202), id(0xe2)),
        ],
        "the loser's points move; the backup set both recorded is kept once"
    );
    let copies: Vec<Option<Uuid>> =
        sqlx::query_scalar("select ag_database_id from sql_databases order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(copies, [Some(group_db), Some(group_db), None]);
    let replicas: Vec<(Uuid, String, i16)> =
        sqlx::query_as("select vm_id, role, backup_priority from ag_replicas order by vm_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        replicas,
        [
            (id(0xa), "secondary".to_owned(), 50),
            (id(0xb), "primary".to_owned(), 50)
        ]
    );
    let (preference, group_id): (String, Uuid) =
        sqlx::query_as("select backup_preference, group_id from availability_groups")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (preference.as_str(), group_id),
        ("prefer_secondary", id(0xff))
    );
    let job_items: serde_json::Value = sqlx::query_scalar(
        "select items from jobs where id = '00000000-0000-0000-0000-000000000301'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        job_items,
        serde_json::json!([
            {"instance": "MSSQLSERVER", "database": "orders", "protected_item_id": id(0xe2)},
            {"instance": "MSSQLSERVER", "database": "hr", "protected_item_id": id(0xe3)}
        ]),
        "an unfinished job names the surviving item"
    );
}
