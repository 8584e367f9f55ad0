//! End to end with the real server and real `backvault-agent` processes.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{Agents, Api, Inventories, Server, TestDb, inventory_toml};
use serde_json::{Value, json};

fn names(values: &[Value], key: &str) -> BTreeSet<String> {
    values
        .iter()
        .map(|v| v[key].as_str().unwrap().to_owned())
        .collect()
}

/// Two agents each run only their own VM's jobs; an agent killed mid-job loses its lease,
/// the job is retried and completes once the agent is back.
#[tokio::test]
async fn agents_run_their_own_jobs_and_a_killed_agents_job_is_retried() {
    let db = TestDb::new();
    let server = Server::start(
        &db,
        &["--dev"],
        &[
            ("BACKVAULT_LEASE_SECONDS", "3"),
            ("BACKVAULT_RESCUE_INTERVAL", "300ms"),
        ],
    );
    let api = server.dev_api();
    // One use per VM: the restarted agent below must get by with its saved agent token.
    let enrollment = api.enrollment_token_for("sub-1", 2).await;
    let mut agents = api
        .start_agents(
            &enrollment,
            Inventories::new("e2e"),
            &[
                (
                    "vm-a",
                    inventory_toml("vm-a", "4.8", true, &["sales_a", "hr_a"], 50),
                ),
                (
                    "vm-b",
                    inventory_toml("vm-b", "4.8", true, &["sales_b"], 50),
                ),
            ],
            &[],
        )
        .await;
    let (a, b) = (agents.vm("vm-a"), agents.vm("vm-b"));

    let mut jobs = Vec::new();
    for (vm, dbs) in [(&a, vec!["sales_a", "hr_a"]), (&b, vec!["sales_b"])] {
        let (_, job) = api
            .post("/v1/jobs", json!({"vm_id": vm, "kind": "discovery"}))
            .await;
        jobs.push((
            vm.clone(),
            job["id"].as_str().unwrap().to_owned(),
            dbs.clone(),
        ));
        let items: Vec<Value> = dbs
            .iter()
            .map(|d| json!({"instance": "MSSQLSERVER", "database": d}))
            .collect();
        let (status, job) = api
            .post(
                "/v1/jobs",
                json!({"vm_id": vm, "kind": "backup_full", "items": items}),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        jobs.push((vm.clone(), job["id"].as_str().unwrap().to_owned(), dbs));
    }
    for (vm, id, dbs) in &jobs {
        let job = api.finished_job(id).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["vm_id"], vm.as_str());
        let reported: BTreeSet<String> = match job["kind"].as_str().unwrap() {
            "discovery" => names(
                job["result"]["inventory"]["databases"].as_array().unwrap(),
                "name",
            ),
            _ => names(
                job["result"]["recovery_points"].as_array().unwrap(),
                "database",
            ),
        };
        let expected: BTreeSet<String> = dbs.iter().map(|d| d.to_string()).collect();
        assert_eq!(reported, expected, "the job ran on its own VM's agent");
    }

    // Slow the next backup down, then kill the agent while it runs.
    agents.inventories.write(
        "vm-a",
        &inventory_toml("vm-a", "4.8", true, &["sales_a", "hr_a"], 3000),
    );
    let (_, job) = api
        .post("/v1/jobs", json!({"vm_id": a, "kind": "backup_log", "items": [{"instance": "MSSQLSERVER", "database": "sales_a"}]}))
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    api.job_until(&id, |j| j["status"] == "in_progress").await;
    agents.processes[0].kill_hard();
    let requeued = api
        .job_until(&id, |j| {
            j["attempt_history"][0]["outcome"] == "lease_expired"
        })
        .await;
    assert_eq!(requeued["status"], "queued");
    agents.inventories.write(
        "vm-a",
        &inventory_toml("vm-a", "4.8", true, &["sales_a", "hr_a"], 50),
    );
    agents.processes[0].restart(&enrollment);
    let done = api.finished_job(&id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["attempt_history"][1]["outcome"], "completed");
    // The log chains on the full taken before the crash (the agent kept its state file).
    let full = api.finished_job(&jobs[1].1).await;
    let full_point = full["result"]["recovery_points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["database"] == "sales_a")
        .unwrap()
        .clone();
    let log_point = &done["result"]["recovery_points"][0];
    // SQL Server's rule: a log's database_backup_lsn is its latest full's checkpoint.
    assert_eq!(
        log_point["database_backup_lsn"],
        full_point["checkpoint_lsn"]
    );
}

/// The seed document's flow, start to finish.
#[tokio::test]
async fn the_seed_flow_from_start_discovery_to_auto_protection() {
    let db = TestDb::new();
    let server = Server::start(&db, &["--dev"], &[]);
    let api = server.dev_api();
    let enrollment = api.enrollment_token("sub-1").await;
    let vault = api.create_vault("seed-vault").await;

    let mut databases: Vec<String> = (0..120).map(|i| format!("db{i:03}")).collect();
    databases.extend(["bad;name".to_owned(), "R&D".to_owned()]);
    let db_refs: Vec<&str> = databases.iter().map(String::as_str).collect();
    let agents = api
        .start_agents(
            &enrollment,
            Inventories::new("seed"),
            &[
                (
                    "sqlvm-01",
                    inventory_toml("sqlvm-01", "4.8", true, &db_refs, 10),
                ),
                ("oldvm", inventory_toml("oldvm", "4.0", true, &["x"], 10)),
                ("nosa", inventory_toml("nosa", "4.8", false, &["y"], 10)),
            ],
            &[],
        )
        .await;

    // Start discovery: the unregistered VMs of the subscription, with their issues.
    let (_, candidates) = api.get(&format!("/v1/vaults/{vault}/discovery")).await;
    let candidates = candidates.as_array().unwrap();
    assert_eq!(candidates.len(), 3);
    let vm = |name: &str| {
        candidates
            .iter()
            .find(|c| c["vm"]["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(vm("oldvm")["issues"][0]["code"], "vm_dotnet_too_old");
    let (main, old, nosa) = (
        vm("sqlvm-01")["vm"]["id"].as_str().unwrap().to_owned(),
        vm("oldvm")["vm"]["id"].as_str().unwrap().to_owned(),
        vm("nosa")["vm"]["id"].as_str().unwrap().to_owned(),
    );

    let (status, refused) = api
        .post(&format!("/v1/vaults/{vault}/vms/{old}/discover"), json!({}))
        .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (422, Some("prerequisites_failed"))
    );

    let (status, job) = api
        .post(
            &format!("/v1/vaults/{vault}/vms/{main}/discover"),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(
        api.finished_job(job["id"].as_str().unwrap()).await["status"],
        "completed"
    );

    let (_, containers) = api
        .get(&format!("/v1/vaults/{vault}/protectable-items"))
        .await;
    let instance = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "MSSQLSERVER")
        .unwrap()
        .clone();
    let dbs = instance["databases"].as_array().unwrap();
    let issue =
        |name: &str| dbs.iter().find(|d| d["name"] == name).unwrap()["issue"]["code"].clone();
    assert_eq!(issue("bad;name"), "database_name_unsupported");
    assert_eq!(issue("R&D"), "database_name_needs_auto_protection");

    let ids: Vec<&str> = dbs
        .iter()
        .filter(|d| d["protectable"] == true)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 120);
    let (status, configured) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items"),
            json!({"policy": "HourlyLogBackup", "databases": ids}),
        )
        .await;
    assert_eq!(status, 202, "{configured}");
    let configure_jobs = configured["jobs"].as_array().unwrap();
    assert_eq!(configure_jobs.len(), 3);
    for job in configure_jobs {
        assert_eq!(
            api.finished_job(job.as_str().unwrap()).await["status"],
            "completed"
        );
    }
    let (_, protected) = api
        .get(&format!(
            "/v1/vaults/{vault}/protected-items?state=protected&limit=200"
        ))
        .await;
    assert_eq!(protected["items"].as_array().unwrap().len(), 120);

    // AUTOPROTECT ON: R&D now, and a database added later at the next discovery.
    let (status, intent) = api
        .post(
            &format!("/v1/vaults/{vault}/auto-protection"),
            json!({"instance_id": instance["id"], "policy": "HourlyLogBackup"}),
        )
        .await;
    assert_eq!(status, 201, "{intent}");
    for job in intent["jobs"].as_array().unwrap() {
        assert_eq!(
            api.finished_job(job.as_str().unwrap()).await["status"],
            "completed"
        );
    }
    let mut grown = db_refs.clone();
    grown.push("added_later");
    agents.inventories.write(
        "sqlvm-01",
        &inventory_toml("sqlvm-01", "4.8", true, &grown, 10),
    );
    let (_, job) = api
        .post(
            &format!("/v1/vaults/{vault}/vms/{main}/rediscover"),
            json!({}),
        )
        .await;
    assert_eq!(
        api.finished_job(job["id"].as_str().unwrap()).await["status"],
        "completed"
    );
    let (_, auto) = api
        .get(&format!(
            "/v1/vaults/{vault}/protected-items?auto_protected=true"
        ))
        .await;
    let auto_names = names(auto["items"].as_array().unwrap(), "database");
    assert_eq!(
        auto_names,
        BTreeSet::from(["R&D".to_owned(), "added_later".to_owned()])
    );

    // An agent without sysadmin: discovery fails with Azure's code.
    let (_, job) = api
        .post(
            &format!("/v1/vaults/{vault}/vms/{nosa}/discover"),
            json!({}),
        )
        .await;
    let failed = api.finished_job(job["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "UserErrorSQLNoSysAdminMembership");
}

/// A `--dev` server whose periodic scheduler stays out of the way, and one agent playing
/// `sqlvm-01` with `databases`, all protected by policy `Gold` of `spec` in a new vault.
struct ProtectedVm {
    api: Api,
    vault: String,
    vm: String,
    /// Protected item id by database name.
    items: std::collections::HashMap<String, String>,
    agents: Agents,
    _server: Server,
}

async fn protected_vm(
    db: &TestDb,
    tag: &str,
    spec: Value,
    databases: &[&str],
    agent_args: &[&str],
) -> ProtectedVm {
    let inventory = inventory_toml("sqlvm-01", "4.8", true, databases, 10);
    protected_vm_with(db, tag, spec, &inventory, agent_args).await
}

/// As [`protected_vm`], with the agent's inventory file as given.
async fn protected_vm_with(
    db: &TestDb,
    tag: &str,
    spec: Value,
    inventory: &str,
    agent_args: &[&str],
) -> ProtectedVm {
    let server = Server::start(db, &["--dev"], &[("BACKVAULT_SCHEDULER_INTERVAL", "1h")]);
    let api = server.dev_api();
    let enrollment = api.enrollment_token("sub-1").await;
    let agents = api
        .start_agents(
            &enrollment,
            Inventories::new(tag),
            &[("sqlvm-01", inventory.to_owned())],
            agent_args,
        )
        .await;
    let vm = agents.vm("sqlvm-01");
    let vault = api.create_vault(&format!("{tag}-vault")).await;
    api.create_policy(&vault, "Gold", spec).await;
    api.register(&vault, &[&vm]).await;
    let items = api
        .protect_all(&vault, "Gold")
        .await
        .iter()
        .map(|i| {
            (
                i["database"].as_str().unwrap().to_owned(),
                i["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ProtectedVm {
        api,
        vault,
        vm,
        items,
        agents,
        _server: server,
    }
}

/// Scheduled backups through real agents, recovery points chaining, a restore plan for an
/// instant and a restore to another database name. The schedule is rehearsed with ticks at
/// chosen instants (a `--dev` server allows that), so nothing waits for a slot.
#[tokio::test]
async fn scheduled_backups_recovery_points_and_a_restore() {
    let db = TestDb::new();
    let spec = json!({"time_zone": "UTC", "full": {"frequency": "daily", "time": "00:00"},
        "log": {"frequency_minutes": 15, "retention_days": 7}, "retention": {"daily": {"days": 7}}});
    let vm = protected_vm(&db, "sched", spec, &["sales", "hr"], &[]).await;
    let (api, vault) = (&vm.api, &vm.vault);

    // Rehearse three slots: the first becomes the initial full, then two log slots.
    // Ticks at fixed instants away from the daily full's midnight (the agent stamps the
    // points with its own clock: the ticks only decide which jobs run).
    let slot = |n: i64| {
        "2031-01-06T10:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
            + chrono::Duration::minutes(15 * n)
    };
    let (_, first) = api.post("/v1/scheduler/run", json!({"now": slot(0)})).await;
    assert_eq!(
        first["jobs_enqueued"], 0,
        "protection starting fires nothing: {first}"
    );
    for n in 1..=3 {
        let (status, run) = api.post("/v1/scheduler/run", json!({"now": slot(n)})).await;
        assert_eq!(status, 200, "{run}");
        assert_eq!(
            run["jobs_enqueued"], 1,
            "one job for both databases per slot"
        );
        let (_, jobs) = api.get("/v1/jobs?status=queued").await;
        for job in jobs["items"].as_array().unwrap() {
            assert_eq!(
                api.finished_job(job["id"].as_str().unwrap()).await["status"],
                "completed"
            );
        }
        let (_, running) = api.get("/v1/jobs?status=in_progress").await;
        for job in running["items"].as_array().unwrap() {
            api.finished_job(job["id"].as_str().unwrap()).await;
        }
    }
    let (_, kinds) = api.get("/v1/jobs?limit=200").await;
    let scheduled: Vec<&str> = kinds["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["priority"] == "scheduled")
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        scheduled,
        ["backup_log", "backup_log", "backup_full"],
        "newest first"
    );

    let sales = &vm.items["sales"];
    let (_, points) = api
        .get(&format!(
            "/v1/vaults/{vault}/protected-items/{sales}/recovery-points"
        ))
        .await;
    let list = points["items"].as_array().unwrap();
    let types: Vec<&str> = list
        .iter()
        .map(|p| p["backup_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["full", "log", "log"]);
    assert!(
        list.iter().all(|p| p["chain_gap"] == false),
        "the agent's LSNs chain: {points}"
    );
    assert_eq!(list[1]["full_id"], list[0]["id"]);
    let ranges = points["restorable_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1);
    let from: chrono::DateTime<chrono::Utc> = ranges[0]["from"].as_str().unwrap().parse().unwrap();
    let to: chrono::DateTime<chrono::Utc> = ranges[0]["to"].as_str().unwrap().parse().unwrap();
    let middle = from + (to - from) / 2;

    let (status, plan) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items/{sales}/restore-plan"),
            json!({"point_in_time": middle}),
        )
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["steps"][0]["backup_type"], "full");
    let (status, restore) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items/{sales}/restore"),
            json!({"point_in_time": middle, "target_database": "sales_restored"}),
        )
        .await;
    assert_eq!(status, 202, "{restore}");
    let done = api.finished_job(restore["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["restored_database"], "sales_restored");
    let (_, rpo) = api.get(&format!("/v1/vaults/{vault}/rpo")).await;
    assert_eq!(rpo["protected"], 2);
}

/// The seed's example, with recovery points written by the real agent: a weekly full on
/// Sunday Nov 16 kept 4 weeks, hourly logs until Nov 22 kept 30 days. The full would expire
/// on Dec 14, but the logs need it, so it stays until the last of them expires (Dec 22).
/// The week is rehearsed: the server ticks at chosen instants and the agent stamps each
/// backup with the instant its job was scheduled.
#[tokio::test]
async fn the_seeds_recovery_chain_through_the_real_agent() {
    let db = TestDb::new();
    let spec = json!({"time_zone": "UTC",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:30"},
        "log": {"frequency_minutes": 60, "retention_days": 30},
        "retention": {"weekly": {"weeks": 4}}});
    let vm = protected_vm(
        &db,
        "seed",
        spec,
        &["sales"],
        &["--backup-time", "schedule"],
    )
    .await;
    let (api, vault, sales) = (&vm.api, &vm.vault, &vm.items["sales"]);
    let utc = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();

    // Each tick's job runs before the next tick, as on a healthy VM.
    let tick = |now: chrono::DateTime<chrono::Utc>| async move {
        let (status, run) = api.post("/v1/scheduler/run", json!({"now": now})).await;
        assert_eq!(status, 200, "{run}");
        let enqueued = run["jobs_enqueued"].as_u64().unwrap();
        if enqueued > 0 {
            let (_, newest) = api.get("/v1/jobs?limit=1").await;
            let job = api
                .finished_job(newest["items"][0]["id"].as_str().unwrap())
                .await;
            assert_eq!(job["status"], "completed", "{job}");
        }
        enqueued
    };
    assert_eq!(
        tick(utc("2031-11-16T00:15:00Z")).await,
        0,
        "the schedule starts"
    );
    assert_eq!(
        tick(utc("2031-11-16T00:30:00Z")).await,
        1,
        "the weekly full"
    );
    let mut now = utc("2031-11-16T01:00:00Z");
    while now <= utc("2031-11-22T23:00:00Z") {
        assert_eq!(tick(now).await, 1, "the log at {now}");
        now += chrono::Duration::hours(1);
    }

    let (_, points) = api
        .get(&format!(
            "/v1/vaults/{vault}/protected-items/{sales}/recovery-points"
        ))
        .await;
    let list = points["items"].as_array().unwrap();
    assert_eq!(list.len(), 1 + 6 * 24 + 23, "one full and hourly logs");
    let full = &list[0];
    assert_eq!(full["backup_type"], "full");
    assert_eq!(full["backup_time"], "2031-11-16T00:30:00Z");
    assert_eq!(full["expires_at"], "2031-12-14T00:30:00Z", "4 weeks");
    assert_eq!(
        full["chain_until"], "2031-12-22T23:00:00Z",
        "its last log's expiry"
    );
    assert_eq!(full["delete_after"], "2031-12-22T23:00:00Z");
    let last = list.last().unwrap();
    assert_eq!(
        (
            &last["backup_type"],
            &last["backup_time"],
            &last["expires_at"]
        ),
        (
            &json!("log"),
            &json!("2031-11-22T23:00:00Z"),
            &json!("2031-12-22T23:00:00Z")
        )
    );
    assert!(
        list[1..]
            .iter()
            .all(|p| p["full_id"] == full["id"] && p["chain_gap"] == false),
        "every log chains onto the full: {points}"
    );
    assert_eq!(
        points["restorable_ranges"],
        json!([{"from": "2031-11-16T00:30:00Z", "to": "2031-11-22T23:00:00Z"}])
    );

    let (status, plan) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items/{sales}/restore-plan"),
            json!({"point_in_time": "2031-11-20T12:10:00Z"}),
        )
        .await;
    assert_eq!(status, 200, "{plan}");
    let steps = plan["steps"].as_array().unwrap();
    assert_eq!(steps[0]["backup_type"], "full");
    // Logs Nov 16 01:00–23:00, all of Nov 17–19, Nov 20 00:00–13:00 (covers 12:10).
    assert_eq!(
        steps.len(),
        1 + 23 + 3 * 24 + 14,
        "the full and the logs up to 13:00"
    );
    assert_eq!(steps.last().unwrap()["backup_time"], "2031-11-20T13:00:00Z");
    let (status, restore) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items/{sales}/restore"),
            json!({"point_in_time": "2031-11-20T12:10:00Z", "target_database": "sales_nov20"}),
        )
        .await;
    assert_eq!(status, 202, "{restore}");
    let done = api.finished_job(restore["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["result"]["restored_database"], "sales_nov20");
}

/// A SQL Server instance with a case-sensitive collation can hold `Sales` and `sales`;
/// backvault flags both as a case collision and refuses to protect either, end to end
/// through the real agent's discovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_differing_only_by_case_are_flagged_end_to_end() {
    let db = TestDb::new();
    let server = Server::start(&db, &["--dev"], &[]);
    let api = server.dev_api();
    let enrollment = api.enrollment_token("sub-1").await;
    let toml = inventory_toml("sqlvm-cs", "4.8", true, &["Sales", "sales", "hr"], 10).replace(
        "version = \"2019\"\n",
        "version = \"2019\"\ncase_sensitive = true\n",
    );
    let agents = api
        .start_agents(
            &enrollment,
            Inventories::new("case"),
            &[("sqlvm-cs", toml)],
            &[],
        )
        .await;
    let vault = api.create_vault("case-vault").await;
    api.register(&vault, &[&agents.vm("sqlvm-cs")]).await;

    let (_, containers) = api
        .get(&format!("/v1/vaults/{vault}/protectable-items"))
        .await;
    let dbs = containers[0]["databases"].as_array().unwrap().clone();
    let issue = |name: &str| {
        dbs.iter().find(|d| d["name"] == name).unwrap()["issue"]["code"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(
        issue("Sales").as_deref(),
        Some("database_name_case_collision")
    );
    assert_eq!(
        issue("sales").as_deref(),
        Some("database_name_case_collision")
    );
    assert_eq!(issue("hr"), None);

    let id = |name: &str| {
        dbs.iter().find(|d| d["name"] == name).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (status, refused) = api
        .post(
            &format!("/v1/vaults/{vault}/protected-items"),
            json!({"policy": "HourlyLogBackup", "databases": [id("Sales"), id("hr")]}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["errors"][0]["code"], "database_name_case_collision");
    assert_eq!(refused["errors"].as_array().unwrap().len(), 1, "hr is fine");
}

/// `sales` on a busy database as the reference agent simulates SQL Server, with what the
/// test says of its recovery model, bulk operations and another tool's backups.
fn chain_inventory(model: &str, bulk: bool, external: &[(&str, &str)]) -> String {
    let external: Vec<String> = external
        .iter()
        .map(|(id, kind)| format!("{{ id = \"{id}\", type = \"{kind}\" }}"))
        .collect();
    inventory_toml("sqlvm-01", "4.8", true, &[], 10)
        + &format!(
            "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"sales\"\nrecovery_model = \"{model}\"\n\
             size_bytes = 1048576\nbusy = true\ntextual_lsns = true\nbulk_operations = {bulk}\n\
             external_backups = [{}]\n",
            external.join(", ")
        )
}

impl ProtectedVm {
    fn sales(&self) -> String {
        format!(
            "/v1/vaults/{}/protected-items/{}",
            self.vault, self.items["sales"]
        )
    }

    /// Runs an on-demand backup of `sales` to its end.
    async fn backup(&self, kind: &str) -> Value {
        let body = match kind {
            "full" => json!({"type": kind, "retention_days": 60}),
            _ => json!({"type": kind}),
        };
        let (status, job) = self
            .api
            .post(&format!("{}/backup", self.sales()), body)
            .await;
        assert_eq!(status, 202, "{job}");
        self.api.finished_job(job["id"].as_str().unwrap()).await
    }

    /// The inventory says `inventory` now, and the server has discovered it.
    async fn rediscover(&self, inventory: String) {
        self.agents.inventories.write("sqlvm-01", &inventory);
        self.api.register(&self.vault, &[&self.vm]).await;
    }

    async fn points(&self) -> Value {
        self.api
            .get(&format!("{}/recovery-points", self.sales()))
            .await
            .1
    }

    /// Every range the server shows is restorable at its start, middle and end: each
    /// plan, run by the agent's simulation of SQL Server, completes.
    async fn restore_every_range(&self, runs: &mut u32) {
        let points = self.points().await;
        let ranges = points["restorable_ranges"].as_array().unwrap().clone();
        assert!(!ranges.is_empty(), "{points}");
        for range in ranges {
            let at = |k: &str| -> chrono::DateTime<chrono::Utc> {
                range[k].as_str().unwrap().parse().unwrap()
            };
            let (from, to) = (at("from"), at("to"));
            for instant in [from, from + (to - from) / 2, to] {
                *runs += 1;
                let (status, restore) = self
                    .api
                    .post(
                        &format!("{}/restore", self.sales()),
                        json!({"point_in_time": instant, "target_database": format!("sales_r{runs}")}),
                    )
                    .await;
                assert_eq!(status, 202, "{instant}: {restore}");
                let done = self.api.finished_job(restore["id"].as_str().unwrap()).await;
                assert_eq!(done["status"], "completed", "{instant}: {done}");
            }
        }
    }
}

fn break_of(points: &Value, index: usize) -> Value {
    points["items"][index]["chain_break"].clone()
}

/// Issue 11's proof: a busy database, another tool's backups, FULL → SIMPLE → FULL, a
/// bulk-logged window and an overwrite with a tail-log backup, through the real server
/// and agent. Every range the server shows is restored at its start, middle and end by
/// the agent, which replays the steps as SQL Server would and refuses what it refuses.
#[tokio::test]
async fn recovery_chains_that_sql_server_accepts() {
    let db = TestDb::new();
    let spec = json!({"time_zone": "UTC",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:00"},
        "differential": {"days": ["monday"], "time": "12:00", "retention_days": 14},
        "log": {"frequency_minutes": 15, "retention_days": 14},
        "retention": {"weekly": {"weeks": 4}}});
    let vm = protected_vm_with(
        &db,
        "chain",
        spec,
        &chain_inventory("full", false, &[]),
        &[],
    )
    .await;
    let mut runs = 0;

    // A busy database: checkpoints trail open transactions, and the differential still
    // matches its full.
    assert_eq!(vm.backup("full").await["status"], "completed");
    vm.backup("log").await;
    assert_eq!(vm.backup("differential").await["status"], "completed");
    vm.backup("log").await;
    let points = vm.points().await;
    let full = &points["items"][0];
    assert_ne!(full["checkpoint_lsn"], full["first_lsn"], "{full}");
    assert_eq!(points["items"][2]["full_id"], full["id"]);
    assert!(
        points["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["chain_gap"] == false),
        "{points}"
    );

    // Another tool: a differential (harmless), then a log the server never sees.
    vm.rediscover(chain_inventory(
        "full",
        false,
        &[("x1", "differential"), ("x2", "log")],
    ))
    .await;
    vm.backup("log").await;
    let points = vm.points().await;
    assert_eq!(break_of(&points, 4), "log_chain_broken", "{points}");
    let (_, item) = vm.api.get(&vm.sales()).await;
    assert_eq!(item["health"], "chain_broken");
    // The full is intact: a differential heals the chain, the next log holds its end.
    vm.backup("differential").await;
    vm.backup("log").await;
    let points = vm.points().await;
    assert_eq!(break_of(&points, 6), Value::Null, "{points}");

    // Another tool's full moves the differential base: ours no longer fits.
    vm.rediscover(chain_inventory(
        "full",
        false,
        &[("x1", "differential"), ("x2", "log"), ("x3", "full")],
    ))
    .await;
    vm.backup("differential").await;
    let points = vm.points().await;
    assert_eq!(
        break_of(&points, 7),
        "differential_base_unknown",
        "{points}"
    );
    assert_eq!(vm.backup("full").await["status"], "completed");
    vm.backup("log").await;
    vm.restore_every_range(&mut runs).await;

    // FULL → SIMPLE → FULL: no log until a differential (SQL Server's Msg 4214).
    vm.rediscover(chain_inventory("simple", false, &[])).await;
    vm.rediscover(chain_inventory("full", false, &[])).await;
    let refused = vm.backup("log").await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "UserErrorParentFullBackupMissing");
    vm.backup("differential").await;
    vm.backup("log").await;

    // A bulk-logged window: its logs restore to their ends only.
    vm.rediscover(chain_inventory("bulk_logged", true, &[]))
        .await;
    vm.backup("log").await;
    vm.backup("log").await;
    vm.rediscover(chain_inventory("full", false, &[])).await;
    vm.backup("log").await;
    let points = vm.points().await;
    let bulk: Vec<&Value> = points["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["has_bulk_logged_data"] == true)
        .collect();
    assert_eq!(bulk.len(), 2, "{points}");
    let inside: chrono::DateTime<chrono::Utc> = {
        let end: chrono::DateTime<chrono::Utc> =
            bulk[1]["backup_time"].as_str().unwrap().parse().unwrap();
        let start: chrono::DateTime<chrono::Utc> =
            bulk[0]["backup_time"].as_str().unwrap().parse().unwrap();
        start + (end - start) / 2
    };
    let (status, plan) = vm
        .api
        .post(
            &format!("{}/restore-plan", vm.sales()),
            json!({"point_in_time": inside}),
        )
        .await;
    assert_eq!(status, 409, "no instant inside bulk-logged changes: {plan}");
    vm.restore_every_range(&mut runs).await;

    // Overwrite the database itself: its tail is backed up first, and its chain restarts.
    let ranges = vm.points().await["restorable_ranges"].clone();
    let last = ranges.as_array().unwrap().last().unwrap();
    let (status, restore) = vm
        .api
        .post(
            &format!("{}/restore", vm.sales()),
            json!({"point_in_time": last["to"], "overwrite": true}),
        )
        .await;
    assert_eq!(status, 202, "{restore}");
    assert_eq!(restore["payload"]["tail_log_backup"], true);
    let done = vm.api.finished_job(restore["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    let tail = &done["result"]["tail_log_backup"];
    let points = vm.points().await;
    let recorded = points["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (&recorded["backup_type"], &recorded["backup_set_uuid"]),
        (&json!("log"), &tail["backup_set_uuid"]),
        "{points}"
    );
    let (_, item) = vm.api.get(&vm.sales()).await;
    assert_eq!(
        item["health"], "chain_broken",
        "a new fork: the next backup is a full"
    );
    // On the new fork: a full, logs, and everything restorable again.
    assert_eq!(vm.backup("full").await["status"], "completed");
    vm.backup("log").await;
    let points = vm.points().await;
    let newest = points["items"].as_array().unwrap().last().unwrap();
    assert_eq!(newest["chain_gap"], false, "{points}");
    assert_ne!(newest["recovery_fork_guid"], full["recovery_fork_guid"]);
    vm.restore_every_range(&mut runs).await;
}
