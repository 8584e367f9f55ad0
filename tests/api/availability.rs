//! Availability groups as protectable and protected items: one item per group database,
//! whatever number of replicas report it; a vault protects a group only with every
//! replica's VM; backups go where the group's routes say, and follow a failover.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::sql::{ForgedKey, database_copies, forget_protected_items, insert_item_beside};
use crate::helpers::{Response, TestApp, claim, enroll, protected_items};
use crate::protection::{protectable, run_configure, run_discovery};

const GROUP_ID: &str = "7d7c0c52-3f43-4c35-9a4f-8a1f7d0e9b11";
const VMS: [&str; 3] = ["sqlvm-a", "sqlvm-b", "sqlvm-c"];

/// What `vm` reports: instance `SQL_<vm>`, group `ag-orders` (with `orders`) in which it
/// has `role` and `priority`, and a standalone `local_<vm>`.
fn replica_inventory(vm: &str, role: &str, priority: u8, preference: &str) -> Value {
    let instance = format!("SQL_{}", vm.replace('-', "_"));
    json!({
        "instances": [{"name": instance, "version": "2019"}],
        "availability_groups": [{
            "name": "ag-orders",
            "group_id": GROUP_ID,
            "backup_preference": preference,
            "replicas": VMS.iter().map(|v| json!({
                "vm_name": v, "resource_group": "rg-sql",
                "instance": format!("SQL_{}", v.replace('-', "_"))
            })).collect::<Vec<_>>(),
            "local": {"instance": instance, "role": role, "synchronization_health": "healthy",
                      "backup_priority": priority}
        }],
        "databases": [
            {"instance": instance, "name": "orders", "recovery_model": "full", "size_bytes": 1024,
             "availability_group": "ag-orders"},
            {"instance": instance, "name": format!("local_{}", vm.replace('-', "_")),
             "recovery_model": "full", "size_bytes": 1024}
        ]
    })
}

/// Configure Protection of `databases` with the vault's default policy.
async fn configure(app: &TestApp, vault: &str, databases: Value) -> Response {
    app.post(
        &format!("/v1/vaults/{vault}/protected-items"),
        &app.admin(),
        json!({"policy": "HourlyLogBackup", "databases": databases}),
    )
    .await
}

struct Group {
    vault: String,
    /// By VM name: (vm id, agent token).
    vms: Vec<(String, String)>,
}

/// Registers VMs with a vault and discovers each with its replica's report.
async fn discover_into(app: &TestApp, vault: &str, vm: &str, inv: &Value) -> (String, String) {
    let (vm_id, agent) = enroll(app, vm).await;
    let res = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{vm_id}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    run_discovery(app, &agent, inv).await;
    (vm_id, agent)
}

/// A vault with the three replica VMs registered: `sqlvm-a` primary, `b` priority 60,
/// `c` priority 40.
async fn three_replicas(app: &TestApp, preference: &str) -> Group {
    let vault = app.vault("vault-ag", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut vms = Vec::new();
    for (vm, role, priority) in [
        ("sqlvm-a", "primary", 50),
        ("sqlvm-b", "secondary", 60),
        ("sqlvm-c", "secondary", 40),
    ] {
        vms.push(
            discover_into(
                app,
                &vault,
                vm,
                &replica_inventory(vm, role, priority, preference),
            )
            .await,
        );
    }
    Group { vault, vms }
}

async fn rediscover(app: &TestApp, group: &Group, vm: usize, inv: &Value) {
    let (vm_id, agent) = &group.vms[vm];
    rediscover_vm(app, &group.vault, vm_id, agent, inv).await;
}

/// Rediscovers a VM of `vault`, its agent reporting `inv`.
async fn rediscover_vm(app: &TestApp, vault: &str, vm_id: &str, agent: &str, inv: &Value) {
    let res = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{vm_id}/rediscover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    run_discovery(app, agent, inv).await;
}

fn group_container(containers: &Value) -> &Value {
    let groups: Vec<&Value> = containers
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "availability_group")
        .collect();
    assert_eq!(groups.len(), 1, "{containers}");
    groups[0]
}

/// Protects `orders` through the group container; returns the item.
async fn protect_orders(app: &TestApp, group: &Group) -> Value {
    let containers = protectable(app, &group.vault).await;
    let ag = group_container(&containers);
    let orders = ag["databases"][0]["id"].as_str().unwrap().to_owned();
    let res = configure(app, &group.vault, json!([orders])).await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    assert_eq!(run_configure(app, &group.vms[0].1, false).await, [1]);
    res.body["items"][0].clone()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_group_database_is_one_protectable_item_whatever_number_of_replicas_report_it(
    pool: PgPool,
) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "prefer_secondary").await;
    let containers = protectable(&app, &group.vault).await;
    let ag = group_container(&containers);
    assert_eq!(ag["name"], "ag-orders");
    assert_eq!(ag["protectable"], true);
    assert_eq!(ag["vm_id"], group.vms[0].0.as_str(), "the primary's VM");
    let detail = &ag["availability_group"];
    assert_eq!(detail["group_id"], GROUP_ID);
    assert_eq!(detail["backup_preference"], "prefer_secondary");
    let replicas: Vec<(String, String, u64)> = detail["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["vm_name"].as_str().unwrap().to_owned(),
                r["role"].as_str().unwrap().to_owned(),
                r["backup_priority"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        replicas,
        [
            ("sqlvm-a".to_owned(), "primary".to_owned(), 50),
            ("sqlvm-b".to_owned(), "secondary".to_owned(), 60),
            ("sqlvm-c".to_owned(), "secondary".to_owned(), 40),
        ]
    );
    assert_eq!(detail["primary_vm_id"], group.vms[0].0.as_str());
    assert_eq!(
        detail["preferred_vm_id"],
        group.vms[1].0.as_str(),
        "prefer_secondary: the highest priority secondary"
    );
    let names: Vec<&str> = ag["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders"], "one entry for three copies");
    // The instances list their standalone databases only.
    for c in containers
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "instance")
    {
        let dbs: Vec<&str> = c["databases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(dbs.len(), 1, "{c}");
        assert!(dbs[0].starts_with("local_"), "{c}");
    }
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_group_database_cannot_be_protected_twice(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let group = three_replicas(&app, "primary").await;
    let item = protect_orders(&app, &group).await;
    assert_eq!(item["availability_group"], "ag-orders");
    assert_eq!(item["vm_name"], "sqlvm-a", "the primary's copy");
    // Each replica's own copy, by the id a client of the old API could still hold.
    let copies = database_copies(&pool, "orders").await;
    assert_eq!(copies.len(), 3);
    for copy in &copies {
        let res = configure(&app, &group.vault, json!([copy])).await;
        assert_eq!(
            res.violations(),
            [(
                "/databases/0".to_owned(),
                "database_already_protected".to_owned()
            )],
            "{}",
            res.body
        );
    }
    // The group database and a copy of it in one request: the same database twice.
    let containers = protectable(&app, &group.vault).await;
    let orders = group_container(&containers)["databases"][0]["id"].clone();
    assert_eq!(
        group_container(&containers)["databases"][0]["protected_item_id"],
        item["id"]
    );
    forget_protected_items(&pool).await;
    let res = configure(&app, &group.vault, json!([orders, copies[2]])).await;
    assert_eq!(
        res.violations(),
        [("/databases/1".to_owned(), "database_duplicate".to_owned())],
        "{}",
        res.body
    );
    // Below the API: the database refuses a second item for another replica's copy.
    let res = configure(&app, &group.vault, json!([copies[1]])).await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    let forged = insert_item_beside(&pool, copies[0], ForgedKey::Its).await;
    assert!(
        forged.to_string().contains("protected_items_item_key"),
        "{forged}"
    );
    let standalone_key = insert_item_beside(&pool, copies[2], ForgedKey::RowId).await;
    assert!(
        standalone_key
            .to_string()
            .contains("protected_items_database_item_key"),
        "a copy in a group cannot be protected as a standalone database: {standalone_key}"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn auto_protection_on_a_group_protects_each_database_once(pool: PgPool) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "primary").await;
    let containers = protectable(&app, &group.vault).await;
    let ag_id = group_container(&containers)["id"].clone();
    let res = app
        .post(
            &format!("/v1/vaults/{}/auto-protection", group.vault),
            &app.admin(),
            json!({"availability_group_id": ag_id, "policy": "HourlyLogBackup"}),
        )
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
    assert_eq!(res.body["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(run_configure(&app, &group.vms[0].1, false).await, [1]);
    // A database added to the group, found by a secondary's discovery first.
    let mut inv = replica_inventory("sqlvm-c", "secondary", 40, "primary");
    inv["databases"].as_array_mut().unwrap().push(json!({
        "instance": "SQL_sqlvm_c", "name": "payments", "recovery_model": "full",
        "size_bytes": 1024, "availability_group": "ag-orders"}));
    rediscover(&app, &group, 2, &inv).await;
    let mut inv_b = replica_inventory("sqlvm-b", "secondary", 60, "primary");
    inv_b["databases"] = inv["databases"].clone();
    for d in inv_b["databases"].as_array_mut().unwrap() {
        d["instance"] = json!("SQL_sqlvm_b");
    }
    rediscover(&app, &group, 1, &inv_b).await;
    assert!(
        claim(&app, &group.vms[2].1, 10).await.is_empty(),
        "the new database's configure job goes to the primary, not the replica that found it"
    );
    assert_eq!(run_configure(&app, &group.vms[0].1, false).await, [1]);
    let items = protected_items(&app, &group.vault, "").await;
    let mut names: Vec<&str> = items
        .iter()
        .map(|i| i["database"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["orders", "payments"], "each group database once");
    let filtered = protected_items(
        &app,
        &group.vault,
        &format!("availability_group_id={}", ag_id.as_str().unwrap()),
    )
    .await;
    assert_eq!(filtered.len(), 2);
    let detail = &filtered[0]["availability_group_detail"];
    assert_eq!(detail["replicas"].as_array().unwrap().len(), 3, "{detail}");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_vault_protects_a_group_only_with_every_replicas_vm(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = app.vault("vault-b", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    discover_into(
        &app,
        &vault,
        "sqlvm-a",
        &replica_inventory("sqlvm-a", "primary", 50, "primary"),
    )
    .await;
    discover_into(
        &app,
        &vault,
        "sqlvm-b",
        &replica_inventory("sqlvm-b", "secondary", 50, "primary"),
    )
    .await;
    // sqlvm-c is not registered at all yet.
    let containers = protectable(&app, &vault).await;
    let ag = group_container(&containers);
    assert_eq!(ag["protectable"], false);
    assert_eq!(
        ag["issue"]["code"],
        "availability_group_replica_not_registered"
    );
    assert_eq!(ag["databases"][0]["protectable"], false);
    let orders = ag["databases"][0]["id"].clone();
    let ag_id = ag["id"].clone();
    let res = configure(&app, &vault, json!([orders])).await;
    assert_eq!(
        res.violations(),
        [(
            "/databases/0".to_owned(),
            "availability_group_replica_not_registered".to_owned()
        )]
    );
    // Registered with another vault: the graver reason.
    discover_into(
        &app,
        &other,
        "sqlvm-c",
        &replica_inventory("sqlvm-c", "secondary", 50, "primary"),
    )
    .await;
    let res = app
        .post(
            &format!("/v1/vaults/{vault}/auto-protection"),
            &app.admin(),
            json!({"availability_group_id": ag_id, "policy": "HourlyLogBackup"}),
        )
        .await;
    assert_eq!(res.status, StatusCode::CONFLICT, "{}", res.body);
    assert_eq!(res.code(), "availability_group_replica_in_other_vault");
    // Vault B sees the group too, and cannot protect it either.
    let seen_from_b = protectable(&app, &other).await;
    assert_eq!(
        group_container(&seen_from_b)["issue"]["code"],
        "availability_group_replica_in_other_vault"
    );
    let res = configure(&app, &other, json!([orders])).await;
    assert_eq!(
        res.violations(),
        [(
            "/databases/0".to_owned(),
            "availability_group_replica_in_other_vault".to_owned()
        )]
    );
}

/// The jobs `agent` can claim now.
async fn claimed(app: &TestApp, agent: &str) -> Vec<Value> {
    claim(app, agent, 10).await
}

async fn backup_now(app: &TestApp, group: &Group, item: &str, kind: &str) -> (StatusCode, Value) {
    let body = if kind == "full" {
        json!({"type": kind, "retention_days": 45})
    } else if kind == "copy_only_full" {
        json!({"type": kind, "retention_days": 10})
    } else {
        json!({"type": kind})
    };
    let res = app
        .post(
            &format!("/v1/vaults/{}/protected-items/{item}/backup", group.vault),
            &app.admin(),
            body,
        )
        .await;
    (res.status, res.body)
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn backups_go_where_the_group_routes_them_and_follow_a_failover(pool: PgPool) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "prefer_secondary").await;
    let item = protect_orders(&app, &group).await;
    let item = item["id"].as_str().unwrap().to_owned();
    let (a, b, c) = (&group.vms[0].1, &group.vms[1].1, &group.vms[2].1);

    let (status, full) = backup_now(&app, &group, &item, "full").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{full}");
    assert_eq!(
        full["vm_id"],
        group.vms[0].0.as_str(),
        "a full runs on the primary"
    );
    let (status, log) = backup_now(&app, &group, &item, "log").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{log}");
    assert_eq!(
        log["vm_id"],
        group.vms[1].0.as_str(),
        "a log on the best secondary"
    );
    let (status, copy) = backup_now(&app, &group, &item, "copy_only_full").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{copy}");
    assert_eq!(copy["vm_id"], group.vms[1].0.as_str());
    assert!(
        claimed(&app, c).await.is_empty(),
        "nothing for the lowest priority"
    );
    let on_b = claimed(&app, b).await;
    assert_eq!(on_b.len(), 2);
    for job in &on_b {
        assert_eq!(
            job["items"][0]["instance"], "SQL_sqlvm_b",
            "the replica's own instance name"
        );
        assert_eq!(job["items"][0]["database"], "orders");
    }

    // Failover: b becomes primary, a secondary. The queued full follows the primary.
    rediscover(
        &app,
        &group,
        1,
        &replica_inventory("sqlvm-b", "primary", 60, "prefer_secondary"),
    )
    .await;
    let moved = claimed(&app, b).await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0]["job_id"], full["id"]);
    assert_eq!(moved[0]["kind"], "backup_full");
    assert_eq!(moved[0]["items"][0]["instance"], "SQL_sqlvm_b");
    assert!(
        claimed(&app, a).await.is_empty(),
        "the old primary lost its queued full"
    );
    let got = app
        .get(
            &format!("/v1/vaults/{}/protected-items/{item}", group.vault),
            &app.admin(),
        )
        .await;
    assert_eq!(
        got.body["vm_name"], "sqlvm-b",
        "the item follows the primary: {}",
        got.body
    );
    assert_eq!(got.body["id"], item.as_str(), "same item, same history");
    let detail = &got.body["availability_group_detail"];
    assert_eq!(detail["primary_vm_id"], group.vms[1].0.as_str());
    // a still says primary until its own discovery: it is resolving meanwhile.
    let roles: Vec<&str> = detail["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["resolving", "primary", "secondary"]);
    assert_eq!(
        detail["preferred_vm_id"],
        group.vms[2].0.as_str(),
        "c is the only secondary left"
    );
    rediscover(
        &app,
        &group,
        0,
        &replica_inventory("sqlvm-a", "secondary", 50, "prefer_secondary"),
    )
    .await;
    let (_, log) = backup_now(&app, &group, &item, "log").await;
    assert_eq!(
        log["vm_id"],
        group.vms[0].0.as_str(),
        "a (50) outranks c (40) again"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn secondary_only_with_no_usable_secondary_refuses_with_the_reason(pool: PgPool) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "secondary_only").await;
    let item = protect_orders(&app, &group).await;
    let item = item["id"].as_str().unwrap().to_owned();
    for (vm, n) in [("sqlvm-b", 1), ("sqlvm-c", 2)] {
        rediscover(
            &app,
            &group,
            n,
            &replica_inventory(vm, "secondary", 0, "secondary_only"),
        )
        .await;
    }
    let (status, body) = backup_now(&app, &group, &item, "log").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "availability_group_no_replica");
    assert!(
        body["detail"].as_str().unwrap().contains("secondary_only"),
        "{body}"
    );
    let (status, full) = backup_now(&app, &group, &item, "full").await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "fulls still run on the primary: {full}"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn agents_that_predate_group_ids_still_report_their_groups(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Every replica lists the same replicas; only the `primary` flags say who is primary.
    let legacy = json!({
        "instances": [{"name": "MSSQLSERVER", "version": "2019"}],
        "availability_groups": [{"name": "ag1", "backup_preference": "secondary",
            "replicas": [{"vm_name": "sqlvm-a", "resource_group": "rg-sql", "instance": "MSSQLSERVER", "primary": true},
                         {"vm_name": "sqlvm-b", "resource_group": "rg-sql", "instance": "MSSQLSERVER"}]}],
        "databases": [{"instance": "MSSQLSERVER", "name": "sales", "recovery_model": "full",
                       "size_bytes": 1, "availability_group": "ag1"}]
    });
    discover_into(&app, &vault, "sqlvm-a", &legacy).await;
    discover_into(&app, &vault, "sqlvm-b", &legacy).await;
    let containers = protectable(&app, &vault).await;
    let ag = group_container(&containers);
    assert_eq!(
        ag["availability_group"]["backup_preference"],
        "prefer_secondary"
    );
    assert_eq!(ag["databases"].as_array().unwrap().len(), 1);
    let roles: Vec<&str> = ag["availability_group"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["primary", "secondary"]);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_full_running_on_a_replica_that_stopped_being_primary_runs_again_on_the_new_one(
    pool: PgPool,
) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "primary").await;
    let item = protect_orders(&app, &group).await;
    let item = item["id"].as_str().unwrap().to_owned();
    let (a, b) = (&group.vms[0].1, &group.vms[1].1);
    let (status, full) = backup_now(&app, &group, &item, "full").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{full}");
    let running = claimed(&app, a).await;
    assert_eq!(running.len(), 1);
    // The failover while a runs the full: a running job stays where it runs.
    rediscover(
        &app,
        &group,
        1,
        &replica_inventory("sqlvm-b", "primary", 60, "primary"),
    )
    .await;
    assert!(
        claimed(&app, b).await.is_empty(),
        "the running job is not taken away"
    );
    // a is a secondary now: SQL Server refuses the full there (Msg 3059), retryably.
    let res = app
        .post(
            &format!("/v1/agent/jobs/{}/fail", full["id"].as_str().unwrap()),
            a,
            json!({"lease": running[0]["lease"], "code": "UserErrorSQLPODoesNotSupportBackupType",
                   "message": "Msg 3059: not supported on a secondary replica", "retryable": true}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(res.body["status"], "queued");
    let again = claimed(&app, b).await;
    assert_eq!(
        again.len(),
        1,
        "at once on the new primary, not after the backoff"
    );
    assert_eq!(again[0]["job_id"], full["id"]);
    assert_eq!(again[0]["attempt"], 2);
    assert_eq!(again[0]["items"][0]["instance"], "SQL_sqlvm_b");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_scheduled_backup_no_replica_can_take_is_a_failed_job_saying_why(pool: PgPool) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "prefer_secondary").await;
    protect_orders(&app, &group).await;
    // Mid-failover: the old primary resolving, no new primary reported yet.
    rediscover(
        &app,
        &group,
        0,
        &replica_inventory("sqlvm-a", "resolving", 50, "prefer_secondary"),
    )
    .await;
    let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert_eq!(
        app.service
            .schedule_tick(at("2031-01-06T10:05:00Z"))
            .await
            .unwrap(),
        0
    );
    // The first slot is a full (the chain has none): it needs the primary.
    assert_eq!(
        app.service
            .schedule_tick(at("2031-01-06T11:05:00Z"))
            .await
            .unwrap(),
        0,
        "nothing is queued"
    );
    let failed = crate::helpers::jobs(&app, "status=failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["kind"], "backup_full");
    assert_eq!(
        failed[0]["error"]["code"],
        "FabricSvcBackupPreferenceCheckFailedUserError"
    );
    assert!(
        failed[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("primary"),
        "{}",
        failed[0]
    );
    for (_, agent) in &group.vms {
        assert!(claim(&app, agent, 10).await.is_empty());
    }
    // The new primary reports: the next slot's full runs there.
    rediscover(
        &app,
        &group,
        1,
        &replica_inventory("sqlvm-b", "primary", 60, "prefer_secondary"),
    )
    .await;
    assert_eq!(
        app.service
            .schedule_tick(at("2031-01-06T12:05:00Z"))
            .await
            .unwrap(),
        1
    );
    let jobs = claim(&app, &group.vms[1].1, 10).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["kind"], "backup_full");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_replica_added_in_another_vault_never_takes_the_groups_backups(pool: PgPool) {
    let app = TestApp::new(pool);
    let group = three_replicas(&app, "prefer_secondary").await;
    let item = protect_orders(&app, &group).await;
    let item = item["id"].as_str().unwrap().to_owned();
    let other = app.vault("vault-other", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A fourth replica, of the highest priority, on a VM registered with another vault.
    let mut inv = replica_inventory("sqlvm-d", "secondary", 100, "prefer_secondary");
    inv["availability_groups"][0]["replicas"]
        .as_array_mut()
        .unwrap()
        .push(json!({"vm_name": "sqlvm-d", "resource_group": "rg-sql", "instance": "SQL_sqlvm_d"}));
    let (d_vm, d_agent) = discover_into(&app, &other, "sqlvm-d", &inv).await;
    let (status, log) = backup_now(&app, &group, &item, "log").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{log}");
    assert_eq!(
        log["vm_id"],
        group.vms[1].0.as_str(),
        "b, not d of the other vault"
    );
    assert!(claim(&app, &d_agent, 10).await.is_empty());
    // d claiming the primary role takes nothing either: fulls wait for a primary in the vault.
    let mut primary = inv.clone();
    primary["availability_groups"][0]["local"]["role"] = json!("primary");
    rediscover_vm(&app, &other, &d_vm, &d_agent, &primary).await;
    let got = app
        .get(
            &format!("/v1/vaults/{}/protected-items/{item}", group.vault),
            &app.admin(),
        )
        .await;
    assert_eq!(
        got.body["vm_name"], "sqlvm-a",
        "the item stays in its vault: {}",
        got.body
    );
    let (status, full) = backup_now(&app, &group, &item, "full").await;
    assert_eq!(status, StatusCode::CONFLICT, "{full}");
    assert_eq!(full["code"], "availability_group_no_replica");
}
