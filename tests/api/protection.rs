use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{Response, TestApp, claim, enroll, facts, jobs, sql};

pub fn db(instance: &str, name: &str) -> Value {
    json!({"instance": instance, "name": name, "recovery_model": "full", "size_bytes": 1024})
}

pub fn inventory(databases: Vec<Value>) -> Value {
    json!({"instances": [{"name": "MSSQLSERVER", "version": "2019"}, {"name": "OLD", "version": "2012"}],
           "databases": databases})
}

/// Runs the agent side of every pending discovery job of this agent with `inv`.
pub async fn run_discovery(app: &TestApp, agent: &str, inv: &Value) {
    for job in claim(app, agent, 50).await {
        assert_eq!(job["kind"], "discovery");
        let res = app
            .post(
                &format!(
                    "/v1/agent/jobs/{}/complete",
                    job["job_id"].as_str().unwrap()
                ),
                agent,
                json!({"lease": job["lease"], "result": {"kind": "discovery", "inventory": inv}}),
            )
            .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    }
}

/// Completes (or fails) the pending configure-protection jobs; returns their item counts.
pub async fn run_configure(app: &TestApp, agent: &str, fail: bool) -> Vec<usize> {
    let mut sizes = Vec::new();
    for job in claim(app, agent, 50).await {
        assert_eq!(job["kind"], "configure_protection");
        sizes.push(job["items"].as_array().unwrap().len());
        let id = job["job_id"].as_str().unwrap();
        let res = if fail {
            app.post(&format!("/v1/agent/jobs/{id}/fail"), agent, json!({"lease": job["lease"], "code": "UserErrorSQLPODoesNotExist", "message": "gone", "retryable": false})).await
        } else {
            app.post(
                &format!("/v1/agent/jobs/{id}/complete"),
                agent,
                json!({"lease": job["lease"], "result": {"kind": "configure_protection"}}),
            )
            .await
        };
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    }
    sizes.sort();
    sizes
}

pub struct Setup {
    pub vault: String,
    pub vm: String,
    pub agent: String,
}

pub async fn registered(app: &TestApp, vault_name: &str, vm_name: &str, inv: &Value) -> Setup {
    let vault = app.vault(vault_name, "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (vm, agent) = enroll(app, vm_name).await;
    let res = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{vm}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    assert_eq!(
        res.header("location"),
        format!("/v1/jobs/{}", res.body["id"].as_str().unwrap())
    );
    run_discovery(app, &agent, inv).await;
    Setup { vault, vm, agent }
}

pub async fn protectable(app: &TestApp, vault: &str) -> Value {
    let res = app
        .get(
            &format!("/v1/vaults/{vault}/protectable-items"),
            &app.admin(),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body
}

/// Turns auto-protection on for an instance with the vault's default policy.
pub async fn auto_protect_instance(
    app: &TestApp,
    admin: &str,
    vault: &str,
    instance: &str,
) -> Response {
    app.post(
        &format!("/v1/vaults/{vault}/auto-protection"),
        admin,
        json!({"instance_id": instance, "policy": "HourlyLogBackup"}),
    )
    .await
}

pub fn db_id(containers: &Value, name: &str) -> String {
    containers
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["databases"].as_array().unwrap())
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {containers}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn start_discovery_lists_unregistered_vms_with_their_issues(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok_vm, _) = enroll(&app, "sqlvm-ok").await;
    let enrollment = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1", "max_uses": 2}),
        )
        .await;
    let token = enrollment.body["token"].as_str().unwrap();
    let mut old = facts("sqlvm-old");
    old["dotnet_version"] = json!("4.0");
    old["region"] = json!("eastus");
    old["other_backup_product"] = json!(true);
    let old_vm = app
        .post("/v1/agent/enroll", token, json!({"facts": old}))
        .await
        .body["vm_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Same name, other resource group: a different VM.
    let mut twin = facts("sqlvm-ok");
    twin["resource_group"] = json!("rg-other");
    app.post("/v1/agent/enroll", token, json!({"facts": twin}))
        .await;

    let list = app
        .get(&format!("/v1/vaults/{vault}/discovery"), &app.admin())
        .await;
    let rows = list.body.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let issues_of = |id: &str| -> Vec<String> {
        rows.iter().find(|r| r["vm"]["id"] == id).unwrap()["issues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["code"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(issues_of(&ok_vm).is_empty());
    assert_eq!(
        issues_of(&old_vm),
        [
            "vm_region_mismatch",
            "vm_dotnet_too_old",
            "vm_other_backup_product"
        ]
    );

    let refused = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{old_vm}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "prerequisites_failed")
    );
    assert_eq!(refused.violations().len(), 3);

    let ok = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{ok_vm}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED);
    assert_eq!(ok.body["kind"], "discovery");
    let after = app
        .get(&format!("/v1/vaults/{vault}/discovery"), &app.admin())
        .await;
    assert_eq!(
        after.body.as_array().unwrap().len(),
        2,
        "a registered VM is not listed"
    );

    let other_vault = app.vault("vault-b", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let elsewhere = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{other_vault}/vms/{ok_vm}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(
        elsewhere.violations(),
        [("/vault_id".to_owned(), "vm_registered_elsewhere".to_owned())]
    );
    let reader = app.token(backvault_service::Role::Reader, &["*"]);
    let denied = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{ok_vm}/rediscover"),
            Some(&reader),
            None,
            &[],
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn protectable_items_flag_names_and_old_versions(pool: PgPool) {
    let app = TestApp::new(pool);
    let inv = inventory(vec![
        db("MSSQLSERVER", "sales"),
        db("MSSQLSERVER", "Sales"),
        db("MSSQLSERVER", "bad;name"),
        db("MSSQLSERVER", "R&D"),
        db("MSSQLSERVER", "hr"),
        db("OLD", "legacy"),
    ]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let containers = protectable(&app, &s.vault).await;
    let main = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "MSSQLSERVER")
        .unwrap();
    let by_name = |n: &str| {
        main["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_name("sales")["issue"]["code"],
        "database_name_case_collision"
    );
    assert_eq!(
        by_name("Sales")["issue"]["code"],
        "database_name_case_collision"
    );
    assert_eq!(
        by_name("bad;name")["issue"]["code"],
        "database_name_unsupported"
    );
    assert_eq!(
        by_name("R&D")["issue"]["code"],
        "database_name_needs_auto_protection"
    );
    assert_eq!(by_name("hr")["protectable"], true);
    assert_eq!(by_name("hr")["issue"], Value::Null);
    assert_eq!(main["vm_name"], "sqlvm-01");
    assert_eq!(main["resource_group"], "rg-sql");
    let old = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "OLD")
        .unwrap();
    assert!(old["warning"].as_str().unwrap().contains("KB2697983"));
    assert_eq!(main["warning"], Value::Null);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn configure_protection_batches_and_reports_every_violation(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut dbs: Vec<Value> = (0..120)
        .map(|i| db("MSSQLSERVER", &format!("db{i:03}")))
        .collect();
    dbs.extend([db("MSSQLSERVER", "x;y"), db("MSSQLSERVER", "a+b")]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inventory(dbs)).await;
    let containers = protectable(&app, &s.vault).await;
    let ids: Vec<String> = (0..120)
        .map(|i| db_id(&containers, &format!("db{i:03}")))
        .collect();
    let base = format!("/v1/vaults/{}/protected-items", s.vault);

    let bad = app
        .post(&base, &app.admin(), json!({"policy": "Nope", "databases": [ids[0], db_id(&containers, "x;y"), db_id(&containers, "a+b"), "0b9d2c3e-0000-4000-8000-000000000000"]}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut codes: Vec<String> = bad
        .violations()
        .into_iter()
        .map(|v| format!("{} {}", v.0, v.1))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "/databases/1 database_name_unsupported",
            "/databases/2 database_name_needs_auto_protection",
            "/databases/3 database_not_found",
            "/policy policy_not_found",
        ]
    );

    let res = app
        .post(
            &base,
            &app.admin(),
            json!({"policy": "HourlyLogBackup", "databases": ids}),
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    assert_eq!(res.body["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(res.body["items"].as_array().unwrap().len(), 120);
    assert_eq!(res.body["items"][0]["state"], "protecting");
    assert_eq!(run_configure(&app, &s.agent, false).await, [40, 40, 40]);
    let list = app
        .get(&format!("{base}?state=protected&limit=200"), &app.admin())
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 120);
    let item = &list.body["items"][0];
    assert_eq!(item["vm_name"], "sqlvm-01");
    assert_eq!(item["resource_group"], "rg-sql");
    assert_eq!(item["instance"], "MSSQLSERVER");
    assert_eq!(item["policy"], "HourlyLogBackup");

    let again = app
        .post(
            &base,
            &app.admin(),
            json!({"policy": "HourlyLogBackup", "databases": [ids[5]]}),
        )
        .await;
    assert_eq!(
        again.violations(),
        [(
            "/databases/0".to_owned(),
            "database_already_protected".to_owned()
        )]
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_database_is_protected_in_one_vault_and_failures_leave_it_unprotected(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let s = registered(
        &app,
        "vault-a",
        "sqlvm-01",
        &inventory(vec![db("MSSQLSERVER", "sales")]),
    )
    .await;
    let sales = db_id(&protectable(&app, &s.vault).await, "sales");
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    app.post(
        &base,
        &app.admin(),
        json!({"policy": "HourlyLogBackup", "databases": [sales]}),
    )
    .await;
    assert_eq!(run_configure(&app, &s.agent, true).await, [1]);
    let list = app.get(&base, &app.admin()).await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        0,
        "a failed configure job leaves it unprotected"
    );

    let other = app.vault("vault-b", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong_vault = app
        .post(
            &format!("/v1/vaults/{other}/protected-items"),
            &app.admin(),
            json!({"policy": "HourlyLogBackup", "databases": [sales]}),
        )
        .await;
    assert_eq!(wrong_vault.violations()[0].1, "database_not_in_vault");
    let dup = sql::insert_two_protections(&pool, &other, &sales).await;
    assert!(
        dup.is_err(),
        "the database refuses two protections of one database"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn protected_items_lifecycle_and_what_they_block(pool: PgPool) {
    let app = TestApp::new(pool);
    let inv = inventory(vec![
        db("MSSQLSERVER", "sales"),
        json!({"instance": "MSSQLSERVER", "name": "archive", "recovery_model": "simple", "read_only": true, "size_bytes": 1}),
    ]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let containers = protectable(&app, &s.vault).await;
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    let admin = app.admin();
    let res = app.post(&base, &admin, json!({"policy": "HourlyLogBackup", "databases": [db_id(&containers, "sales"), db_id(&containers, "archive")]})).await;
    run_configure(&app, &s.agent, false).await;
    let items = res.body["items"].as_array().unwrap();
    let sales = items.iter().find(|i| i["database"] == "sales").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let archive = items.iter().find(|i| i["database"] == "archive").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // What protection blocks: the policy, the VM's registration, the vault.
    let del_policy = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}/policies/HourlyLogBackup", s.vault),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (del_policy.status, del_policy.code()),
        (StatusCode::CONFLICT, "policy_in_use")
    );
    let unregister = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}/vms/{}", s.vault, s.vm),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (unregister.status, unregister.code()),
        (StatusCode::CONFLICT, "vm_has_protected_items")
    );
    let del_vault = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}", s.vault),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (del_vault.status, del_vault.code()),
        (StatusCode::CONFLICT, "vault_not_empty")
    );

    // Change policy with If-Match.
    app.post(
        &format!("/v1/vaults/{}/policies", s.vault),
        &admin,
        json!({"name": "Weekly", "spec": crate::helpers::weekly_spec()}),
    )
    .await;
    let item = app.get(&format!("{base}/{sales}"), &admin).await;
    let etag = item.header("etag").to_owned();
    let changed = app
        .call(
            Method::PATCH,
            &format!("{base}/{sales}"),
            Some(&admin),
            Some(json!({"policy": "Weekly"})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(changed.body["policy"], "Weekly", "{}", changed.body);
    let stale = app
        .call(
            Method::PATCH,
            &format!("{base}/{sales}"),
            Some(&admin),
            Some(json!({"policy": "HourlyLogBackup"})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let filtered = app.get(&format!("{base}?policy=Weekly"), &admin).await;
    assert_eq!(filtered.body["items"].as_array().unwrap().len(), 1);

    // On-demand backups.
    let backup = |id: &str, body: Value| {
        let path = format!("{base}/{id}/backup");
        let app = &app;
        let admin = admin.clone();
        async move { app.post(&path, &admin, body).await }
    };
    let no_retention = backup(&sales, json!({"type": "full"})).await;
    assert_eq!(
        no_retention.violations()[0].1,
        "on_demand_retention_required"
    );
    for _ in 0..3 {
        let ok = backup(&sales, json!({"type": "full", "retention_days": 45})).await;
        assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.body);
        assert_eq!(ok.body["kind"], "backup_full");
    }
    let fourth = backup(&sales, json!({"type": "full", "retention_days": 45})).await;
    assert_eq!(fourth.violations()[0].1, "on_demand_full_limit");
    assert_eq!(
        backup(
            &sales,
            json!({"type": "copy_only_full", "retention_days": 3})
        )
        .await
        .status,
        StatusCode::ACCEPTED
    );
    let ro_log = backup(&archive, json!({"type": "log"})).await;
    let ro_codes: Vec<String> = ro_log.violations().into_iter().map(|v| v.1).collect();
    assert_eq!(
        ro_codes,
        [
            "read_only_database",
            "UserErrorSQLPODoesNotSupportBackupType"
        ]
    );

    // Stop (retain), resume, stop (delete).
    let stopped = app
        .post(
            &format!("{base}/{sales}/stop"),
            &admin,
            json!({"mode": "retain_data"}),
        )
        .await;
    assert_eq!(stopped.body["state"], "stopped_retain");
    let refused = backup(&sales, json!({"type": "log"})).await;
    assert_eq!(refused.code(), "item_not_protected");
    let resumed = app
        .post(
            &format!("{base}/{sales}/resume"),
            &admin,
            json!({"policy": "HourlyLogBackup"}),
        )
        .await;
    assert_eq!(resumed.body["state"], "protected");
    // With soft delete off, deleting the data deletes it at once (soft delete has its
    // own tests).
    let off = app
        .call(
            Method::PATCH,
            &format!("/v1/vaults/{}/safety", s.vault),
            Some(&admin),
            Some(json!({"soft_delete": "disabled"})),
            &[],
        )
        .await;
    assert_eq!(off.status, StatusCode::OK, "{}", off.body);
    for id in [&sales, &archive] {
        let gone = app
            .post(
                &format!("{base}/{id}/stop"),
                &admin,
                json!({"mode": "delete_data"}),
            )
            .await;
        assert_eq!(gone.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        app.get(&format!("{base}/{sales}"), &admin).await.status,
        StatusCode::NOT_FOUND
    );
    let unregister = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}/vms/{}", s.vault, s.vm),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(unregister.status, StatusCode::NO_CONTENT);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn auto_protection_protects_existing_and_newly_discovered_databases(pool: PgPool) {
    let app = TestApp::new(pool);
    let inv = inventory(vec![
        db("MSSQLSERVER", "sales"),
        db("MSSQLSERVER", "R&D"),
        db("MSSQLSERVER", "bad;"),
        db("MSSQLSERVER", "kept"),
    ]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let admin = app.admin();
    let containers = protectable(&app, &s.vault).await;
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    app.post(
        &format!("/v1/vaults/{}/policies", s.vault),
        &admin,
        json!({"name": "Weekly", "spec": crate::helpers::weekly_spec()}),
    )
    .await;
    // Already protected with another policy: keeps it.
    app.post(
        &base,
        &admin,
        json!({"policy": "Weekly", "databases": [db_id(&containers, "kept")]}),
    )
    .await;
    run_configure(&app, &s.agent, false).await;

    let instance = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "MSSQLSERVER")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let intent = auto_protect_instance(&app, &admin, &s.vault, &instance).await;
    assert_eq!(intent.status, StatusCode::CREATED, "{}", intent.body);
    assert_eq!(intent.body["jobs"].as_array().unwrap().len(), 1);
    let dup = auto_protect_instance(&app, &admin, &s.vault, &instance).await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "auto_protection_exists")
    );
    let both = app
        .post(
            &format!("/v1/vaults/{}/auto-protection", s.vault),
            &admin,
            json!({"policy": "Nope"}),
        )
        .await;
    let codes: Vec<String> = both.violations().into_iter().map(|v| v.1).collect();
    assert_eq!(
        codes,
        ["policy_not_found", "auto_protection_target_invalid"]
    );
    assert_eq!(
        run_configure(&app, &s.agent, false).await,
        [2],
        "sales and R&D; not bad;"
    );

    // A new database appears; the re-discovery protects it in its own transaction.
    let rediscover = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{}/vms/{}/rediscover", s.vault, s.vm),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(rediscover.status, StatusCode::ACCEPTED);
    let mut grown = inv.clone();
    grown["databases"]
        .as_array_mut()
        .unwrap()
        .push(db("MSSQLSERVER", "new_db"));
    run_discovery(&app, &s.agent, &grown).await;
    let protecting = app.get(&format!("{base}?state=protecting"), &admin).await;
    assert_eq!(protecting.body["items"][0]["database"], "new_db");
    assert_eq!(protecting.body["items"][0]["auto_protected"], true);
    run_configure(&app, &s.agent, false).await;

    let all = app
        .get(&format!("{base}?auto_protected=true"), &admin)
        .await;
    let mut names: Vec<&str> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["database"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["R&D", "new_db", "sales"]);
    let kept = app.get(&format!("{base}?policy=Weekly"), &admin).await;
    assert_eq!(kept.body["items"][0]["database"], "kept");

    let id = intent.body["id"].as_str().unwrap();
    let listed = app
        .get(&format!("/v1/vaults/{}/auto-protection", s.vault), &admin)
        .await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    let off = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}/auto-protection/{id}", s.vault),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(off.status, StatusCode::NO_CONTENT);
    let still = app
        .get(&format!("{base}?auto_protected=true"), &admin)
        .await;
    assert_eq!(
        still.body["items"].as_array().unwrap().len(),
        3,
        "disabling keeps existing protection"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn rediscovery_flags_recased_and_keeps_gone_protected_databases(pool: PgPool) {
    let app = TestApp::new(pool);
    let inv = inventory(vec![
        db("MSSQLSERVER", "Sales"),
        db("MSSQLSERVER", "temp"),
        db("MSSQLSERVER", "orders"),
    ]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let admin = app.admin();
    let containers = protectable(&app, &s.vault).await;
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    let res = app.post(&base, &admin, json!({"policy": "HourlyLogBackup", "databases": [db_id(&containers, "Sales"), db_id(&containers, "orders")]})).await;
    run_configure(&app, &s.agent, false).await;
    let sales_item = res.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["database"] == "Sales")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    app.call(
        Method::POST,
        &format!("/v1/vaults/{}/vms/{}/rediscover", s.vault, s.vm),
        Some(&admin),
        None,
        &[],
    )
    .await;
    run_discovery(&app, &s.agent, &inventory(vec![db("MSSQLSERVER", "SALES")])).await;

    let item = app.get(&format!("{base}/{sales_item}"), &admin).await;
    assert_eq!(item.body["casing_changed"], true);
    assert_eq!(item.body["database"], "SALES");
    assert_eq!(item.body["protected_name"], "Sales");
    let items = app.get(&base, &admin).await;
    let orders = items.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["database"] == "orders")
        .unwrap()
        .clone();
    assert_eq!(
        orders["database_gone"], true,
        "a protected database that disappeared is kept, marked gone"
    );
    let after = protectable(&app, &s.vault).await;
    let names: Vec<&str> = after[0]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["SALES"],
        "unprotected vanished databases are dropped; gone ones are not protectable"
    );
}

/// Two replicas run the periodic discovery against one database: each VM once per period.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn periodic_discovery_runs_once_per_period_across_replicas(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..30 {
        let (vm, _) = enroll(&app, &format!("vm-{i}")).await;
        app.call(
            Method::POST,
            &format!("/v1/vaults/{vault}/vms/{vm}/discover"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    }
    sql::forge_discovery_due(&pool).await;
    let replica_a = app.service.clone();
    let replica_b = TestApp::new(pool.clone()).service;
    let mut total = 0;
    for _ in 0..5 {
        let (a, b) = tokio::join!(replica_a.discover_due_vms(), replica_b.discover_due_vms());
        total += a.unwrap() + b.unwrap();
    }
    assert_eq!(total, 30);
    let scheduled = jobs(&app, "kind=discovery")
        .await
        .into_iter()
        .filter(|j| j["priority"] == "scheduled")
        .count();
    assert_eq!(scheduled, 30);
}

/// A database discovery no longer finds is nobody's sibling: once `Sales` (protected) is
/// gone, `sales` no longer collides with it — for protectable items, configure protection
/// and auto-protection alike (one rule, `vm_name_issues`).
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_gone_database_is_no_sibling(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let s = registered(
        &app,
        "vault-a",
        "sqlvm-01",
        &inventory(vec![db("MSSQLSERVER", "Sales")]),
    )
    .await;
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    let containers = protectable(&app, &s.vault).await;
    let res = app
        .post(
            &base,
            &admin,
            json!({"policy": "HourlyLogBackup", "databases": [db_id(&containers, "Sales")]}),
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    run_configure(&app, &s.agent, false).await;

    let rediscover = |inv: Value| {
        let app = &app;
        let admin = admin.clone();
        let path = format!("/v1/vaults/{}/vms/{}/rediscover", s.vault, s.vm);
        let agent = s.agent.clone();
        async move {
            let res = app.call(Method::POST, &path, Some(&admin), None, &[]).await;
            assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
            run_discovery(app, &agent, &inv).await;
        }
    };
    let issue_of = |containers: &Value, name: &str| {
        containers[0]["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()["issue"]
            .clone()
    };
    // Both present: `sales` collides with the protected `Sales`.
    rediscover(inventory(vec![
        db("MSSQLSERVER", "Sales"),
        db("MSSQLSERVER", "sales"),
    ]))
    .await;
    let both = protectable(&app, &s.vault).await;
    assert_eq!(
        issue_of(&both, "sales")["code"],
        "database_name_case_collision"
    );
    let refused = app
        .post(
            &base,
            &admin,
            json!({"policy": "HourlyLogBackup", "databases": [db_id(&both, "sales")]}),
        )
        .await;
    assert_eq!(refused.violations()[0].1, "database_name_case_collision");

    // `Sales` dropped: kept as a gone protected item, and `sales` is protectable now.
    rediscover(inventory(vec![db("MSSQLSERVER", "sales")])).await;
    let after = protectable(&app, &s.vault).await;
    assert_eq!(issue_of(&after, "sales"), Value::Null);
    let items = app.get(&base, &admin).await;
    assert_eq!(
        items.body["items"][0]["database_gone"], true,
        "{}",
        items.body
    );

    // Auto-protection judges it the same way: it protects `sales`.
    let instance = after[0]["id"].as_str().unwrap();
    let intent = auto_protect_instance(&app, &admin, &s.vault, instance).await;
    assert_eq!(intent.status, StatusCode::CREATED, "{}", intent.body);
    assert_eq!(run_configure(&app, &s.agent, false).await, [1]);
    let protected = app
        .get(&format!("{base}?auto_protected=true"), &admin)
        .await;
    assert_eq!(protected.body["items"][0]["database"], "sales");
}

/// The limit of three on-demand fulls counts the UTC day of the service's clock: pinned
/// just before midnight the fourth is refused, a minute after midnight it runs.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_on_demand_full_limit_resets_at_midnight_utc(pool: PgPool) {
    let now = chrono::Utc::now();
    let today = now.date_naive();
    let at = |day: chrono::NaiveDate, h, m| day.and_hms_opt(h, m, 0).unwrap().and_utc();
    // Registration judges the agent's last heartbeat (the database's time) by this clock.
    let clock = backvault_service::ManualClock::at(now);
    let app = TestApp::with_clock(pool, clock.clone());
    let s = registered(
        &app,
        "vault-a",
        "sqlvm-01",
        &inventory(vec![db("MSSQLSERVER", "sales")]),
    )
    .await;
    let containers = protectable(&app, &s.vault).await;
    let base = format!("/v1/vaults/{}/protected-items", s.vault);
    let admin = app.admin();
    let res = app
        .post(
            &base,
            &admin,
            json!({"policy": "HourlyLogBackup", "databases": [db_id(&containers, "sales")]}),
        )
        .await;
    run_configure(&app, &s.agent, false).await;
    let sales = res.body["items"][0]["id"].as_str().unwrap().to_owned();
    let full = json!({"type": "full", "retention_days": 45});
    let backup_path = format!("{base}/{sales}/backup");
    clock.set(at(today, 23, 59));
    for _ in 0..3 {
        let ok = app.post(&backup_path, &admin, full.clone()).await;
        assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.body);
    }
    let fourth = app.post(&backup_path, &admin, full.clone()).await;
    assert_eq!(fourth.violations()[0].1, "on_demand_full_limit");

    clock.set(at(today.succ_opt().unwrap(), 0, 1));
    let next_day = app.post(&backup_path, &admin, full).await;
    assert_eq!(next_day.status, StatusCode::ACCEPTED, "{}", next_day.body);
}
