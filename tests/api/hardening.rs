//! No request can hurt another: hostile input gets a clear 4xx, a poisoned request fails
//! alone, a database outage is a prompt 503. Each test here failed before the fix it
//! guards.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, chain_needs, claim, enroll, facts, job_outcome, sql};
use crate::protection::db;
use crate::recovery::{Protected, protect, weekly_dst_policy};

async fn backup_now(p: &Protected, database: &str, body: Value) -> crate::helpers::Response {
    let path = format!("{}/backup", p.item_path(database));
    p.app.post(&path, &p.app.admin(), body).await
}

fn copy_only_point(database: &str, first_lsn: &str) -> Value {
    backup_point(database, "copy_only_full", first_lsn)
}

fn backup_point(database: &str, backup_type: &str, first_lsn: &str) -> Value {
    let at = chrono::Utc::now();
    json!({"instance": "MSSQLSERVER", "database": database, "backup_type": backup_type,
           "started_at": at, "backup_time": at, "first_lsn": first_lsn, "last_lsn": "9000",
           "database_backup_lsn": "0", "size_bytes": 100})
}

/// A retention past what time can hold used to panic the completion batcher, after which
/// every agent's completions failed with 500. Now the request is refused, a job enqueued
/// with such a retention earlier fails alone, and every other completion of the same
/// moment commits.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_poisoned_completion_fails_alone_and_the_batcher_survives(pool: PgPool) {
    let names: Vec<String> = (0..8).map(|i| format!("db{i}")).collect();
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        names.iter().map(|n| db("MSSQLSERVER", n)).collect(),
    )
    .await;

    for days in [4_294_967_295u64, 100_000_000, 36_160, 0] {
        let res = backup_now(
            &p,
            "db0",
            json!({"type": "copy_only_full", "retention_days": days}),
        )
        .await;
        assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{days}");
        assert_eq!(
            res.violations(),
            [(
                "/retention_days".to_owned(),
                "on_demand_retention_out_of_range".to_owned()
            )]
        );
    }

    let mut jobs = Vec::new();
    for name in &names {
        let res = backup_now(
            &p,
            name,
            json!({"type": "copy_only_full", "retention_days": 30}),
        )
        .await;
        assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
        jobs.push(res.body["id"].as_str().unwrap().to_owned());
    }
    // db0's job as one enqueued before the bound existed.
    sql::forge_retention_days(&pool, &jobs[0], 4_294_967_295).await;

    let claimed = claim(&p.app, &p.agent, 50).await;
    assert_eq!(claimed.len(), names.len());
    let completions = claimed.iter().map(|job| {
        let database = job["items"][0]["database"].as_str().unwrap().to_owned();
        // db1 reports an LSN that is not one.
        let lsn = if database == "db1" { "not-a-number" } else { "1000" };
        let body = json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": [copy_only_point(&database, lsn)]}});
        let path = format!(
            "/v1/agent/jobs/{}/complete",
            job["job_id"].as_str().unwrap()
        );
        let app = &p.app;
        let agent = p.agent.clone();
        async move { (database, app.post(&path, &agent, body).await) }
    });
    let answers = futures_util::future::join_all(completions).await;
    for (database, res) in &answers {
        match database.as_str() {
            "db0" => assert_eq!(
                (res.status, res.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "retention_out_of_range"),
                "{}",
                res.body
            ),
            "db1" => {
                assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
                assert_eq!(
                    res.violations(),
                    [(
                        "/result/recovery_points/0/first_lsn".to_owned(),
                        "lsn_invalid".to_owned()
                    )]
                );
            }
            _ => assert_eq!(res.status, StatusCode::OK, "{database}: {}", res.body),
        }
    }
    // The bad jobs end with a code instead of being retried forever.
    assert_eq!(
        job_outcome(&p.app, &jobs[0]).await,
        ("failed".to_owned(), "JobResultNotRecorded".to_owned())
    );
    assert_eq!(
        job_outcome(&p.app, &jobs[1]).await,
        ("failed".to_owned(), "JobResultInvalid".to_owned())
    );
    assert_eq!(p.point_count().await, names.len() - 2);

    // Still serving: readiness and a later completion.
    assert_eq!(
        p.app.get("/readyz", "").await.status,
        StatusCode::OK,
        "the batchers run"
    );
    let res = backup_now(
        &p,
        "db2",
        json!({"type": "copy_only_full", "retention_days": 30}),
    )
    .await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    let job = &claim(&p.app, &p.agent, 1).await[0];
    let res = p
        .app
        .post(
            &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
            &p.agent,
            json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": [copy_only_point("db2", "2000")]}}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

/// Postgres cannot store U+0000; every text that reaches it used to answer 500.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn nul_and_control_characters_are_refused_everywhere(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut body = crate::helpers::vault_body("vault-b", "sub-1");
    body["description"] = json!("evil\u{0}");
    let res = app.post("/v1/vaults", &admin, body).await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        res.violations(),
        [("/description".to_owned(), "control_character".to_owned())]
    );

    let res = app
        .post(
            "/v1/enrollment-tokens",
            &admin,
            json!({"subscription_id": "sub\u{0}"}),
        )
        .await;
    assert_eq!(
        res.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not 201: {}",
        res.body
    );

    let res = app
        .post(
            "/v1/vaults",
            &admin,
            json!({"name": "vault-c", "subscription_id": "sub-1", "resource_group": "rg\u{1b}[31m", "region": "westeurope"}),
        )
        .await;
    assert_eq!(
        res.violations(),
        [("/resource_group".to_owned(), "control_character".to_owned())]
    );

    for path in [
        format!("/v1/vaults/{vault}/policies/a%00b"),
        format!("/v1/vaults/{vault}/protected-items?policy=a%00b"),
        "/v1/vms?subscription_id=a%00b".to_owned(),
        "/v1/vms?resource_group=a%07b".to_owned(),
    ] {
        let res = app.get(&path, &admin).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{path}: {}", res.body);
        assert!(
            ["invalid_path", "invalid_query"].contains(&res.code()),
            "{path}: {}",
            res.body
        );
    }

    // The agent protocol: enrollment, heartbeats, failures, completions.
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let mut bad_facts = facts("sqlvm-02");
    bad_facts["agent_version"] = json!("1.0\u{0}");
    let token = app
        .post(
            "/v1/enrollment-tokens",
            &admin,
            json!({"subscription_id": "sub-1"}),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = app
        .post("/v1/agent/enroll", &token, json!({"facts": bad_facts}))
        .await;
    assert_eq!(
        res.violations(),
        [(
            "/facts/agent_version".to_owned(),
            "control_character".to_owned()
        )]
    );
    let res = app
        .post(
            "/v1/agent/heartbeat",
            &agent,
            json!({"facts": bad_facts, "jobs": []}),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);

    crate::helpers::dispatch(&app, &vm, "discovery").await;
    let job = &claim(&app, &agent, 1).await[0];
    let id = job["job_id"].as_str().unwrap();
    for (path, body) in [
        (
            format!("/v1/agent/jobs/{id}/heartbeat"),
            json!({"lease": job["lease"], "progress": {"note": "\u{0}"}}),
        ),
        (
            format!("/v1/agent/jobs/{id}/fail"),
            json!({"lease": job["lease"], "code": "X\u{0}", "message": "m", "retryable": false}),
        ),
        (
            format!("/v1/agent/jobs/{id}/fail"),
            json!({"lease": job["lease"], "code": "X", "message": "m\u{0}", "retryable": false}),
        ),
        (
            format!("/v1/agent/jobs/{id}/complete"),
            json!({"lease": job["lease"], "result": crate::helpers::discovery_result(), "warnings": ["\u{0}"]}),
        ),
    ] {
        let res = app.post(&path, &agent, body).await;
        assert_eq!(
            (res.status, res.violations()[0].1.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "control_character"),
            "{path}: {}",
            res.body
        );
    }
    // Line breaks and tabs are text, not controls: an agent's multi-line message is fine.
    let res = app
        .post(
            &format!("/v1/agent/jobs/{id}/fail"),
            &agent,
            json!({"lease": job["lease"], "code": "X", "message": "line 1\r\n\tline 2", "retryable": false}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

/// serde reads a struct from its sequence form; a body must be an object.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn bodies_are_objects(pool: PgPool) {
    let app = TestApp::new(pool);
    for body in [
        json!(["name", "sub-1", "rg", "westeurope"]),
        json!("vault"),
        json!(7),
    ] {
        let res = app.post("/v1/vaults", &app.admin(), body).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::BAD_REQUEST, "body_not_object")
        );
    }
    let vaults = app.get("/v1/vaults", &app.admin()).await;
    assert_eq!(vaults.body["items"], json!([]), "nothing was created");
    // Nested objects too: a policy whose `full` is the sequence form of its struct.
    let mut spec = crate::helpers::weekly_spec();
    spec["full"] = json!(["weekly", ["sunday"], "22:00"]);
    let res = app.post("/v1/policies/preview", &app.admin(), spec).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::BAD_REQUEST, "malformed_body"),
        "{}",
        res.body
    );
    assert!(
        res.body["detail"]
            .as_str()
            .unwrap()
            .contains("a JSON object")
    );
}

/// Filters are validated, unknown parameters refused, instants bounded, long URIs 414.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn queries_and_uris_are_strict(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let typo = app
        .get(
            &format!("/v1/vaults/{vault}/protected-items?state=protectd"),
            &admin,
        )
        .await;
    assert_eq!(
        (typo.status, typo.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let good = app
        .get(
            &format!("/v1/vaults/{vault}/protected-items?state=protected"),
            &admin,
        )
        .await;
    assert_eq!(good.status, StatusCode::OK);

    for path in [
        "/v1/jobs?staus=failed".to_owned(),
        format!("/v1/vaults/{vault}?expand=all"),
        "/v1/vaults?limit=5&sort=name".to_owned(),
    ] {
        let res = app.get(&path, &admin).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::BAD_REQUEST, "unknown_query_parameter"),
            "{path}"
        );
    }

    for path in [
        "/v1/jobs?created_after=%2B10017-01-01T00:00:00Z",
        "/v1/jobs?created_before=-0001-01-01T00:00:00Z",
    ] {
        let res = app.get(path, &admin).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{path}: {}",
            res.body
        );
        assert_eq!(res.violations()[0].1, "instant_out_of_range", "{path}");
    }
    let preview = app
        .post(
            "/v1/policies/preview?from=-262143-01-01T00:00:00Z",
            &app.token(backvault_service::Role::Reader, &["*"]),
            crate::helpers::weekly_spec(),
        )
        .await;
    assert_eq!(
        preview.violations(),
        [("/from".to_owned(), "instant_out_of_range".to_owned())],
        "not a panic"
    );

    // Past 64 KiB hyper answers itself; tests/e2e.rs checks that answer on the real server.
    let long = format!("/v1/vaults?cursor={}", "a".repeat(20_000));
    let res = app.get(&long, &admin).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::URI_TOO_LONG, "uri_too_long")
    );
}

/// Invented methods and paths never add series to `/metrics`.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn metrics_labels_are_bounded(pool: PgPool) {
    let app = TestApp::new(pool);
    let series = |body: &Value| {
        body.as_str()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("backvault_http_request_duration_seconds_count"))
            .count()
    };
    let probe = |method: String, path: String| {
        let app = &app;
        async move {
            let req = Request::builder()
                .method(Method::from_bytes(method.as_bytes()).unwrap())
                .uri(path)
                .body(Body::empty())
                .unwrap();
            app.send(req).await
        }
    };
    probe("ZZPROBE0".into(), "/v1/vaults".into()).await;
    probe("GET".into(), "/nowhere-0".into()).await;
    // A scrape is a request too: scrape once so that its own series exists.
    app.get("/metrics", "").await;
    let before = series(&app.get("/metrics", "").await.body);
    for i in 1..50 {
        probe(format!("ZZPROBE{i}"), "/v1/vaults".into()).await;
        probe("GET".into(), format!("/nowhere-{i}")).await;
    }
    let metrics = app.get("/metrics", "").await.body;
    assert_eq!(series(&metrics), before, "no new series");
    assert!(!metrics.as_str().unwrap().contains("ZZPROBE"));
    assert!(metrics.as_str().unwrap().contains("method=\"other\""));
}

/// Restores never write over system databases, never over an existing database without
/// `overwrite`, only to an instance the target VM has, and under a valid name; an
/// overwrite of a protected database breaks its chain, so its next backup is a full.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn restore_targets_are_safe_by_rule(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    // One full of sales to restore from.
    let res = backup_now(&p, "sales", json!({"type": "full", "retention_days": 45})).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    let job = &claim(&p.app, &p.agent, 1).await[0];
    let res = p
        .app
        .post(
            &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
            &p.agent,
            json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": [backup_point("sales", "full", "1000")]}}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    sql::forge_fulls_taken(&pool).await;
    let points = p.points("sales").await;
    let point = points["items"][0]["id"].as_str().unwrap().to_owned();
    let restore = |body: Value| {
        let mut body = body;
        body["recovery_point_id"] = json!(point);
        let path = format!("{}/restore", p.item_path("sales"));
        let app = &p.app;
        async move { app.post(&path, &app.admin(), body).await }
    };

    for (body, pointer, code) in [
        (
            json!({"target_database": "msdb", "overwrite": true}),
            "/target_database",
            "restore_target_system_database",
        ),
        (
            json!({"target_database": "x]; DROP DATABASE y; --"}),
            "/target_database",
            "restore_target_name_invalid",
        ),
        (
            json!({"target_database": "d".repeat(129)}),
            "/target_database",
            "restore_target_name_invalid",
        ),
        (
            json!({"target_database": "hr"}),
            "/overwrite",
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
        ),
        (
            json!({"target_database": "HR"}),
            "/overwrite",
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
        ),
        (
            json!({"target_database": "sales_copy", "target_instance": "NOPE"}),
            "/target_instance",
            "restore_target_instance_not_found",
        ),
    ] {
        let res = restore(body.clone()).await;
        assert_eq!(
            res.violations(),
            [(pointer.to_owned(), code.to_owned())],
            "{body}: {}",
            res.body
        );
    }

    // Agents report sizes; a plan's total cannot overflow however large they are.
    let res = backup_now(&p, "sales", json!({"type": "log"})).await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    let job = &claim(&p.app, &p.agent, 1).await[0];
    let mut log = backup_point("sales", "log", "9000");
    log["last_lsn"] = json!("9500");
    let res = p
        .app
        .post(
            &format!(
                "/v1/agent/jobs/{}/complete",
                job["job_id"].as_str().unwrap()
            ),
            &p.agent,
            json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": [log]}}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let log_id = p.points("sales").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|point| point["backup_type"] == "log")
        .unwrap()["id"]
        .clone();
    sql::forge_point_sizes(&pool, i64::MAX).await;
    let plan = p
        .app
        .post(
            &format!("{}/restore-plan", p.item_path("sales")),
            &p.app.admin(),
            json!({"recovery_point_id": log_id}),
        )
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    assert_eq!(plan.body["steps"].as_array().unwrap().len(), 2);
    assert_eq!(plan.body["total_size_bytes"], i64::MAX);

    let copy =
        restore(json!({"target_database": "sales_copy", "target_instance": "mssqlserver"})).await;
    assert_eq!(copy.status, StatusCode::ACCEPTED, "{}", copy.body);
    assert_eq!(copy.body["payload"]["target_instance"], "mssqlserver");

    let over = restore(json!({"target_database": "hr", "overwrite": true})).await;
    assert_eq!(over.status, StatusCode::ACCEPTED, "{}", over.body);
    assert_eq!(
        over.body["payload"]["replace"], true,
        "not the item's own database"
    );
    // The overwritten database's chain restarts once the restore has run.
    for job in claim(&p.app, &p.agent, 10).await {
        let target = job["payload"]["target_database"]
            .as_str()
            .unwrap()
            .to_owned();
        let res = p
            .app
            .post(
                &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
                &p.agent,
                json!({"lease": job["lease"], "result": {"kind": "restore", "restored_database": target}}),
            )
            .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    }
    let mut needs_full = Vec::new();
    for name in ["hr", "sales"] {
        needs_full.push((name, chain_needs(&p.app, &p.items[name]).await.0));
    }
    assert_eq!(
        needs_full,
        [("hr", true), ("sales", false)],
        "the overwritten database starts a new chain"
    );
}

/// A database that cannot be reached answers 503 with Retry-After, within about the
/// acquire timeout, on the API and on `/readyz`.
#[tokio::test]
async fn an_unreachable_database_is_a_prompt_503() {
    // Nothing listens on port 1; every connection attempt is refused.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/backvault")
        .unwrap();
    let app = TestApp::new(pool);
    for path in ["/v1/vaults", "/readyz"] {
        let started = std::time::Instant::now();
        let res = app.get(path, &app.admin()).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            "{path}: {}",
            res.body
        );
        assert_eq!(res.header("retry-after"), "1");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{path} took {:?}",
            started.elapsed()
        );
    }
}
