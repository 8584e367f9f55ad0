//! An availability group of three real agents (one primary, two secondaries, preference
//! `prefer_secondary`) through a rehearsed week: fulls and differentials on the primary,
//! logs on the secondary of highest priority, a failover half way that moves them, one
//! unbroken log chain across both sides, and restores that span the failover.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{AgSpec, Api, Inventories, Server, TestDb, ag_replica_inventory_toml, fail_over};
use serde_json::{Value, json};

const VMS: [&str; 3] = ["sqlvm-a", "sqlvm-b", "sqlvm-c"];

fn utc(s: &str) -> chrono::DateTime<chrono::Utc> {
    s.parse().unwrap()
}

/// Runs a tick at `now` and waits for every job it made; returns them, finished.
async fn tick(api: &Api, now: &str) -> Vec<Value> {
    let (status, run) = api
        .post("/v1/scheduler/run", json!({"now": utc(now)}))
        .await;
    assert_eq!(status, 200, "{run}");
    let made = run["jobs_enqueued"].as_u64().unwrap() as usize;
    let (_, newest) = api.get(&format!("/v1/jobs?limit={}", made.max(1))).await;
    let mut jobs = Vec::new();
    for job in newest["items"].as_array().unwrap().iter().take(made) {
        let done = api.finished_job(job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "at {now}: {done}");
        jobs.push(done);
    }
    jobs
}

/// The kind and VM of each job, sorted.
fn placed(jobs: &[Value], vm_names: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            (
                j["kind"].as_str().unwrap().to_owned(),
                vm_names[j["vm_id"].as_str().unwrap()].clone(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Rediscovers every VM of `vms` (name → id) and waits for the discoveries.
async fn rediscover_all(api: &Api, vault: &str, vms: &BTreeMap<String, String>) {
    for vm in vms.values() {
        let job = api
            .post_expecting(
                &format!("/v1/vaults/{vault}/vms/{vm}/rediscover"),
                json!({}),
                202,
            )
            .await;
        api.completed_job(job["id"].as_str().unwrap()).await;
    }
}

#[tokio::test]
async fn an_availability_group_backs_up_on_the_right_replicas_across_a_failover() {
    let db = TestDb::new();
    let server = Server::start(&db, &["--dev"], &[("BACKVAULT_SCHEDULER_INTERVAL", "1h")]);
    let api = server.dev_api();
    let inventories = Inventories::new("ag");
    let shared = inventories.shared_state("ag-orders");
    let ag = AgSpec {
        name: "ag-orders",
        group_id: uuid::Uuid::from_u128(0x0a6_0de5),
        backup_preference: "prefer_secondary",
        resource_group: "rg-sql",
        replicas: &VMS,
        databases: &["orders"],
    };
    let files: Vec<(&str, String)> = [
        ("sqlvm-a", "primary", 50),
        ("sqlvm-b", "secondary", 60),
        ("sqlvm-c", "secondary", 40),
    ]
    .into_iter()
    .map(|(vm, role, priority)| {
        (
            vm,
            ag_replica_inventory_toml(vm, &ag, role, priority, &shared, 10),
        )
    })
    .collect();
    let enrollment = api.enrollment_token("sub-1").await;
    let agents = api
        .start_agents(
            &enrollment,
            inventories,
            &files,
            &["--backup-time", "schedule"],
        )
        .await;
    // VM id → name, and name → id.
    let vm_names: BTreeMap<String, String> = agents
        .vms
        .iter()
        .map(|(name, id)| (id.clone(), name.clone()))
        .collect();
    let vault = api.create_vault("ag-vault").await;
    api.create_policy(
        &vault,
        "Gold",
        json!({"time_zone": "UTC",
               "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:30"},
               "differential": {"days": ["monday", "tuesday"], "time": "12:00", "retention_days": 14},
               "log": {"frequency_minutes": 60, "retention_days": 30},
               "retention": {"weekly": {"weeks": 4}}}),
    )
    .await;
    let ids: Vec<String> = VMS.iter().map(|vm| agents.vm(vm)).collect();
    api.register(&vault, &ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let items = api.protect_all(&vault, "Gold").await;
    assert_eq!(items.len(), 1, "one item for the group database: {items:?}");
    assert_eq!(items[0]["database"], "orders");
    let item = items[0]["id"].as_str().unwrap().to_owned();
    let item_path = format!("/v1/vaults/{vault}/protected-items/{item}");

    // Before the failover: a is primary; b (60) outranks c (40) among the secondaries.
    assert!(
        tick(&api, "2031-11-16T00:15:00Z").await.is_empty(),
        "the schedule starts"
    );
    let full = tick(&api, "2031-11-16T00:30:00Z").await;
    assert_eq!(
        placed(&full, &vm_names),
        [("backup_full".to_owned(), "sqlvm-a".to_owned())]
    );
    for hour in ["01", "02", "03"] {
        let logs = tick(&api, &format!("2031-11-16T{hour}:00:00Z")).await;
        assert_eq!(
            placed(&logs, &vm_names),
            [("backup_log".to_owned(), "sqlvm-b".to_owned())]
        );
    }
    let monday = tick(&api, "2031-11-17T12:00:00Z").await;
    assert_eq!(
        placed(&monday, &vm_names),
        [
            ("backup_differential".to_owned(), "sqlvm-a".to_owned()),
            ("backup_log".to_owned(), "sqlvm-b".to_owned())
        ]
    );
    let failover_at = utc("2031-11-17T13:00:00Z");
    let logs = tick(&api, "2031-11-17T13:00:00Z").await;
    assert_eq!(
        placed(&logs, &vm_names),
        [("backup_log".to_owned(), "sqlvm-b".to_owned())]
    );

    // The failover: b becomes primary. Each replica's next discovery tells the server.
    fail_over(&agents.inventories, &ag, "sqlvm-b");
    rediscover_all(&api, &vault, &agents.vms).await;
    let (_, got) = api.get(&item_path).await;
    assert_eq!(
        got["vm_name"], "sqlvm-b",
        "the item follows the primary: {got}"
    );
    assert_eq!(got["id"], item.as_str());
    for hour in ["14", "15"] {
        let logs = tick(&api, &format!("2031-11-17T{hour}:00:00Z")).await;
        assert_eq!(
            placed(&logs, &vm_names),
            [("backup_log".to_owned(), "sqlvm-a".to_owned())],
            "a (50) is now the best secondary"
        );
    }
    let tuesday = tick(&api, "2031-11-18T12:00:00Z").await;
    assert_eq!(
        placed(&tuesday, &vm_names),
        [
            ("backup_differential".to_owned(), "sqlvm-b".to_owned()),
            ("backup_log".to_owned(), "sqlvm-a".to_owned())
        ]
    );
    let logs = tick(&api, "2031-11-18T13:00:00Z").await;
    assert_eq!(
        placed(&logs, &vm_names),
        [("backup_log".to_owned(), "sqlvm-a".to_owned())]
    );
    let (_, got) = api.get(&item_path).await;
    let last_on = &got["last_backup_vm_ids"];
    assert_eq!(last_on["full"], agents.vm("sqlvm-a").as_str(), "{got}");
    assert_eq!(last_on["differential"], agents.vm("sqlvm-b").as_str());
    assert_eq!(last_on["log"], agents.vm("sqlvm-a").as_str());

    // One chain across both sides: every log continues the last, whoever took it.
    let (_, points) = api.get(&format!("{item_path}/recovery-points")).await;
    let list = points["items"].as_array().unwrap();
    assert!(list.iter().all(|p| p["chain_gap"] == false), "{points}");
    let logs: Vec<&Value> = list.iter().filter(|p| p["backup_type"] == "log").collect();
    assert_eq!(logs.len(), 9);
    for pair in logs.windows(2) {
        assert_eq!(pair[1]["first_lsn"], pair[0]["last_lsn"], "{pair:?}");
    }
    let taken_by: BTreeSet<String> = logs
        .iter()
        .map(|p| vm_names[p["vm_id"].as_str().unwrap()].clone())
        .collect();
    assert_eq!(
        taken_by,
        ["sqlvm-a".to_owned(), "sqlvm-b".to_owned()].into()
    );
    let ranges = points["restorable_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "one unbroken range: {points}");

    // A restore to an instant after the failover: the full from a, the differential from
    // b, logs from a.
    let target = utc("2031-11-18T12:30:00Z");
    let (status, plan) = api
        .post(
            &format!("{item_path}/restore-plan"),
            json!({"point_in_time": target}),
        )
        .await;
    assert_eq!(status, 200, "{plan}");
    let vm_of_point: BTreeMap<&str, &str> = list
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["vm_id"].as_str().unwrap()))
        .collect();
    let steps: Vec<(String, String)> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["backup_type"].as_str().unwrap().to_owned(),
                vm_names[vm_of_point[s["recovery_point_id"].as_str().unwrap()]].clone(),
            )
        })
        .collect();
    // Which of the two 12:00 backups (differential, log) ran first decides whether the
    // 12:00 log is needed too: either way, every log comes from a.
    assert_eq!(
        steps[0],
        ("full".to_owned(), "sqlvm-a".to_owned()),
        "{plan}"
    );
    assert_eq!(
        steps[1],
        ("differential".to_owned(), "sqlvm-b".to_owned()),
        "{plan}"
    );
    assert!(steps.len() > 2, "{plan}");
    assert!(
        steps[2..]
            .iter()
            .all(|s| *s == ("log".to_owned(), "sqlvm-a".to_owned())),
        "{plan}"
    );
    // An instant before the failover restores from the other side's logs.
    let (_, before) = api
        .post(
            &format!("{item_path}/restore-plan"),
            json!({"point_in_time": failover_at - chrono::Duration::minutes(30)}),
        )
        .await;
    let before_vms: Vec<(&str, &str)> = before["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["backup_type"].as_str().unwrap(),
                vm_names[vm_of_point[s["recovery_point_id"].as_str().unwrap()]].as_str(),
            )
        })
        .collect();
    assert_eq!(
        before_vms[..2],
        [("full", "sqlvm-a"), ("differential", "sqlvm-a")],
        "{before}"
    );
    assert!(before_vms.len() > 2, "{before}");
    assert!(
        before_vms[2..].iter().all(|s| *s == ("log", "sqlvm-b")),
        "{before}"
    );

    // Restored on the replica of c, under another name: c's agent reads backup sets the
    // other replicas took, as SQL Server reads them from the shared backup location.
    let (status, restore) = api
        .post(
            &format!("{item_path}/restore"),
            json!({"point_in_time": target, "target_vm_id": agents.vm("sqlvm-c"),
                   "target_database": "orders_copy"}),
        )
        .await;
    assert_eq!(status, 202, "{restore}");
    assert_eq!(restore["vm_id"], agents.vm("sqlvm-c").as_str());
    let done = api.finished_job(restore["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["restored_database"], "orders_copy");
    assert_eq!(done["payload"]["target_instance"], "MSSQLSERVER");
}
