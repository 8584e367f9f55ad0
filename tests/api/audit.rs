//! The audit log: every change and every refused request is recorded with who, what, from
//! where and how it ended; reads that succeed and the agents' routine traffic are not; no
//! token or secret is ever written; only admins and auditors read it back.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use backvault_api::transport::PeerAddr;
use backvault_service::Role;
use base64::Engine;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

use crate::helpers::sql::{
    audit_log_text, forge_audit_events_aged, forge_audit_writes_failing,
    sessions_waiting_for_a_lock,
};
use crate::helpers::{
    TestApp, all_pages, claim, dispatch, enroll, enrollment_token, facts, vault_body, wait_until,
    weekly_spec,
};

/// The events `GET /v1/audit-events?{filter}` lists, newest first, across its pages of
/// two (so that every list here pages).
async fn events(app: &TestApp, filter: &str) -> Vec<Value> {
    all_pages(app, &format!("/v1/audit-events?{filter}"), 2).await
}

/// The one event of `operation`.
async fn only_event(app: &TestApp, operation: &str) -> Value {
    let found = events(app, &format!("operation={operation}")).await;
    assert_eq!(found.len(), 1, "{operation}: {found:?}");
    found[0].clone()
}

/// The token's id (`jti`), as the log records it.
fn jti(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_change_records_who_what_from_where_and_the_fields_it_changed(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let created = app
        .post("/v1/vaults", &admin, vault_body("audited", "sub-1"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let vault = created.body["id"].as_str().unwrap().to_owned();
    let mut update = Request::builder()
        .method(Method::PATCH)
        .uri(format!("/v1/vaults/{vault}"))
        .header("authorization", format!("Bearer {admin}"))
        .header("content-type", "application/json")
        .header("user-agent", "backvault-cli/1.2 (audit test)")
        .header("x-request-id", "req-audit-1")
        .body(Body::from(json!({"description": "payroll"}).to_string()))
        .unwrap();
    let peer: SocketAddr = "192.0.2.7:50123".parse().unwrap();
    update.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
    let updated = app.send(update).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);

    let all = events(&app, "").await;
    let operations: Vec<&str> = all
        .iter()
        .map(|e| e["operation"].as_str().unwrap())
        .collect();
    assert_eq!(operations, ["update_vault", "create_vault"], "newest first");

    let create = &all[1];
    assert_eq!(create["subject"], "tester");
    assert_eq!(create["role"], "admin");
    assert_eq!(create["token_id"], jti(&admin));
    assert_eq!(create["method"], "POST");
    assert_eq!(create["path"], "/v1/vaults");
    assert_eq!(create["resource"], vault, "the created resource");
    assert_eq!(create["status"], 201);
    assert_eq!(create["problem_code"], Value::Null);
    assert_eq!(create["changes"], Value::Null);

    let update = &all[0];
    assert_eq!(update["token_id"], jti(&admin));
    assert_eq!(update["method"], "PATCH");
    assert_eq!(
        update["path"], "/v1/vaults/{vault_id}",
        "the route, not the path"
    );
    assert_eq!(update["resource"], vault);
    assert_eq!(update["details"]["path_params"], json!({"vault_id": vault}));
    assert_eq!(update["status"], 200);
    assert_eq!(update["request_id"], "req-audit-1");
    assert_eq!(update["user_agent"], "backvault-cli/1.2 (audit test)");
    assert_eq!(update["client_addr"], "192.0.2.7");
    let changes = update["changes"].as_object().unwrap();
    assert_eq!(
        changes["description"],
        json!({"before": "", "after": "payroll"})
    );
    assert_eq!(
        changes["version"]["after"],
        changes["version"]["before"].as_i64().unwrap() + 1
    );
    assert!(
        !changes.contains_key("name") && !changes.contains_key("region"),
        "only what changed: {changes:?}"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_policy_replace_records_its_spec_before_and_after(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let created = app
        .post(
            &format!("/v1/vaults/{vault}/policies"),
            &app.admin(),
            json!({"name": "Weekly", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let mut spec = weekly_spec();
    spec["log"]["frequency_minutes"] = json!(30);
    crate::helpers::replace_policy(&app, &vault, "Weekly", spec.clone()).await;

    let replace = only_event(&app, "replace_policy").await;
    assert_eq!(replace["resource"], "Weekly");
    assert_eq!(
        replace["details"]["path_params"],
        json!({"vault_id": vault, "policy_name": "Weekly"})
    );
    let changes = &replace["changes"];
    assert_eq!(changes["spec"]["before"]["log"]["frequency_minutes"], 60);
    assert_eq!(changes["spec"]["after"]["log"]["frequency_minutes"], 30);
    assert!(changes.get("name").is_none(), "{changes}");
    assert_eq!(
        only_event(&app, "create_policy").await["resource"],
        "Weekly"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn refused_tokens_are_recorded_with_their_code(pool: PgPool) {
    let app = TestApp::new(pool);
    let bad = app.get("/v1/vaults", "not-a-jwt").await;
    assert_eq!(bad.code(), "invalid_token");
    let none = app.call(Method::GET, "/v1/vms", None, None, &[]).await;
    assert_eq!(none.code(), "missing_token");

    let refused = events(&app, "status=401").await;
    let seen: Vec<(&str, &str)> = refused
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap(),
                e["problem_code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("list_vms", "missing_token"),
            ("list_vaults", "invalid_token")
        ]
    );
    for event in &refused {
        assert_eq!(event["subject"], Value::Null, "no verified caller");
        assert_eq!(event["token_id"], Value::Null);
        assert_eq!(event["method"], "GET");
    }
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_denied_permission_is_recorded_with_the_caller(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reader = app.token(Role::Reader, &["*"]);
    let denied = app
        .call(
            Method::PATCH,
            &format!("/v1/vaults/{vault}"),
            Some(&reader),
            Some(json!({"description": "x"})),
            &[],
        )
        .await;
    assert_eq!(
        (denied.status, denied.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    let event = only_event(&app, "update_vault").await;
    assert_eq!(event["subject"], "tester");
    assert_eq!(event["role"], "reader");
    assert_eq!(event["token_id"], jti(&reader));
    assert_eq!(event["resource"], vault);
    assert_eq!(event["status"], 403);
    assert_eq!(event["problem_code"], "forbidden");
    assert_eq!(event["changes"], Value::Null, "nothing changed");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn reads_that_succeed_are_not_recorded(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin = app.admin();
    for path in [
        "/v1/vaults".to_owned(),
        format!("/v1/vaults/{vault}"),
        format!("/v1/vaults/{vault}/policies"),
        "/v1/jobs".to_owned(),
    ] {
        assert_eq!(
            app.get(&path, &admin).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let missing = app
        .get("/v1/vaults/00000000-0000-7000-8000-000000000000", &admin)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let all = events(&app, "").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["operation"], "create_vault");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn agents_routine_calls_are_recorded_only_when_refused_and_enrollment_always(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, agent) = enroll(&app, "sqlvm-audit").await;
    let enrolled = only_event(&app, "enroll_agent").await;
    assert_eq!(enrolled["role"], "enrollment");
    assert_eq!(enrolled["resource"], vm, "the VM that joined");
    assert_eq!(enrolled["status"], 200);
    assert_eq!(
        only_event(&app, "create_enrollment_token").await["status"],
        201
    );

    dispatch(&app, &vm, "discovery").await;
    let claimed = claim(&app, &agent, 1).await;
    assert_eq!(claimed.len(), 1);
    let heartbeat = app
        .post(
            "/v1/agent/heartbeat",
            &agent,
            json!({"facts": facts("sqlvm-audit")}),
        )
        .await;
    assert_eq!(heartbeat.status, StatusCode::OK, "{}", heartbeat.body);
    assert!(events(&app, "operation=claim_jobs").await.is_empty());
    assert!(events(&app, "operation=agent_heartbeat").await.is_empty());

    // A user token on the agent protocol, and a token that is none.
    let denied = app
        .post(
            "/v1/agent/claim",
            &app.admin(),
            json!({"max_jobs": 1, "wait_seconds": 0}),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let bad = app
        .post(
            "/v1/agent/claim",
            "forged",
            json!({"max_jobs": 1, "wait_seconds": 0}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    let refused = events(&app, "operation=claim_jobs").await;
    let statuses: Vec<&Value> = refused.iter().map(|e| &e["status"]).collect();
    assert_eq!(statuses, [&json!(401), &json!(403)]);
    assert_eq!(refused[1]["role"], "admin");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn no_token_or_secret_is_ever_written(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let admin = app.admin();
    let (_, enrollment) = enrollment_token(&app, json!({"subscription_id": "sub-1"})).await;
    let enrolled = app
        .post(
            "/v1/agent/enroll",
            &enrollment,
            json!({"facts": facts("sqlvm-secret")}),
        )
        .await;
    assert_eq!(enrolled.status, StatusCode::OK, "{}", enrolled.body);
    let agent = enrolled.body["agent_token"].as_str().unwrap().to_owned();
    // Used again: refused, and recorded.
    let reused = app
        .post(
            "/v1/agent/enroll",
            &enrollment,
            json!({"facts": facts("sqlvm-other")}),
        )
        .await;
    assert_eq!(reused.status, StatusCode::UNAUTHORIZED, "{}", reused.body);
    // A credential sent where it does not belong, and one that is no token.
    let misused = app
        .post("/v1/vaults", &agent, vault_body("vault-v", "sub-1"))
        .await;
    assert_eq!(misused.status, StatusCode::FORBIDDEN);
    let guessed = "s3cr3t-password-guess";
    assert_eq!(
        app.get("/v1/vaults", guessed).await.status,
        StatusCode::UNAUTHORIZED
    );

    let stored = audit_log_text(&pool).await;
    assert!(
        stored.contains("enroll_agent") && stored.contains("create_vault"),
        "the events are there: {stored}"
    );
    for (what, secret) in [
        ("the enrollment token", enrollment.as_str()),
        ("the agent token", agent.as_str()),
        ("the admin token", admin.as_str()),
        ("a guessed token", guessed),
        (
            "the signing key",
            std::str::from_utf8(crate::helpers::SECRET).unwrap(),
        ),
    ] {
        // A JWT's signature alone would be enough to leak.
        let tail = &secret[secret.len() - 20..];
        assert!(!stored.contains(tail), "{what} is in the audit log");
    }
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_list_filters_and_pages_newest_first(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let mut vaults = Vec::new();
    for name in ["vault-a", "vault-b", "vault-c"] {
        vaults.push(
            app.post("/v1/vaults", &admin, vault_body(name, "sub-1"))
                .await
                .body["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let reader = app.token(Role::Reader, &["*"]);
    app.post("/v1/vaults", &reader, vault_body("vault-d", "sub-1"))
        .await;
    app.get("/v1/vaults", "forged").await;

    let all = events(&app, "").await;
    assert_eq!(all.len(), 5);
    let ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut newest_first = ids.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, newest_first);
    assert_eq!(all[0]["operation"], "list_vaults", "the last one first");

    let count = |filter: &'static str| {
        let app = &app;
        async move { events(app, filter).await.len() }
    };
    assert_eq!(count("operation=create_vault").await, 4);
    assert_eq!(count("status=201").await, 3);
    assert_eq!(count("outcome=success").await, 3);
    assert_eq!(count("outcome=failure").await, 2);
    assert_eq!(count("problem_code=forbidden").await, 1);
    assert_eq!(
        count("subject=tester").await,
        4,
        "the forged token has none"
    );
    assert_eq!(count("subject=nobody").await, 0);
    assert_eq!(count("operation=create_vault&status=403").await, 1);
    assert_eq!(count("from=2999-01-01T00:00:00Z").await, 0);
    assert_eq!(count("to=2000-01-01T00:00:00Z").await, 0);
    assert_eq!(
        count("from=2000-01-01T00:00:00Z&to=2999-01-01T00:00:00Z").await,
        5
    );
    let of_b = events(&app, &format!("resource={}", vaults[1])).await;
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0]["resource"], vaults[1]);
    let by_reader = events(&app, &format!("token_id={}", jti(&reader))).await;
    assert_eq!(by_reader.len(), 1);
    assert_eq!(by_reader[0]["role"], "reader");

    for (query, code) in [
        ("cursor=nope", "invalid_cursor"),
        ("limit=0", "invalid_limit"),
        ("outcome=maybe", "invalid_query"),
        ("status=abc", "invalid_query"),
        ("verb=POST", "unknown_query_parameter"),
    ] {
        let res = app.get(&format!("/v1/audit-events?{query}"), &admin).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::BAD_REQUEST, code),
            "{query}"
        );
    }
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn only_admins_and_auditors_for_every_subscription_read_the_log(pool: PgPool) {
    let app = TestApp::new(pool);
    app.vault("vault-a", "sub-1").await;
    for role in Role::ALL {
        let res = app.get("/v1/audit-events", &app.token(role, &["*"])).await;
        if matches!(role, Role::Admin | Role::Auditor) {
            assert_eq!(res.status, StatusCode::OK, "{role:?}: {}", res.body);
            let items = res.body["items"].as_array().unwrap();
            assert!(
                items.iter().any(|e| e["operation"] == "create_vault"),
                "{role:?}: {items:?}"
            );
        } else {
            assert_eq!(
                (res.status, res.code()),
                (StatusCode::FORBIDDEN, "forbidden"),
                "{role:?}"
            );
        }
    }
    // The log spans every subscription: a token scoped to some would see the others'.
    for role in [Role::Admin, Role::Auditor] {
        let res = app
            .get("/v1/audit-events", &app.token(role, &["sub-1"]))
            .await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::FORBIDDEN, "subscription_forbidden"),
            "{role:?}"
        );
    }
    // Auditors read; they change nothing.
    let auditor = app.token(Role::Auditor, &["*"]);
    let write = app
        .post("/v1/vaults", &auditor, vault_body("vault-w", "sub-1"))
        .await;
    assert_eq!(write.status, StatusCode::FORBIDDEN);
}

/// A change whose answer never went out (the client went away while it ran) is still
/// recorded, without a status: its effect is unknown to whoever reads the log.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn an_unanswered_change_is_recorded_without_a_status(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from vaults where id = $1::uuid for update")
        .bind(&vault)
        .execute(&mut *holder)
        .await
        .unwrap();
    let request = Request::builder()
        .method(Method::PATCH)
        .uri(format!("/v1/vaults/{vault}"))
        .header("authorization", format!("Bearer {}", app.admin()))
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"description": "never answered"}).to_string(),
        ))
        .unwrap();
    let router = app.router.clone();
    let client = tokio::spawn(router.oneshot(request));
    let pool_ref = &pool;
    wait_until(
        std::time::Duration::from_secs(10),
        "the update to wait for the vault's row",
        || async move { sessions_waiting_for_a_lock(pool_ref).await > 0 },
    )
    .await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    holder.rollback().await.unwrap();

    let app = &app;
    wait_until(
        std::time::Duration::from_secs(10),
        "the unanswered update to be recorded",
        || async move { !events(app, "operation=update_vault").await.is_empty() },
    )
    .await;
    let event = only_event(app, "update_vault").await;
    assert_eq!(event["status"], Value::Null);
    assert_eq!(event["subject"], "tester");
    assert_eq!(event["resource"], vault);
    assert_eq!(events(app, "outcome=failure").await.len(), 1);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_failed_audit_write_leaves_the_answer_alone(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let vault = app.vault("vault-a", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    forge_audit_writes_failing(&pool).await;
    let updated = app
        .call(
            Method::PATCH,
            &format!("/v1/vaults/{vault}"),
            Some(&app.admin()),
            Some(json!({"description": "still saved"})),
            &[],
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["description"], "still saved");
    let denied = app
        .post(
            "/v1/vaults",
            &app.token(Role::Reader, &["*"]),
            vault_body("vault-x", "sub-1"),
        )
        .await;
    assert_eq!(
        (denied.status, denied.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(events(&app, "").await.len(), 1, "only the create before");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_purge_keeps_the_retention_and_records_itself(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    app.vault("old", "sub-1").await;
    forge_audit_events_aged(&pool, 401).await;
    app.vault("recent", "sub-1").await;
    forge_audit_events_aged(&pool, 380).await;
    app.vault("today", "sub-1").await;

    // Another replica leads the purge: this one leaves it.
    let mut leader = pool.begin().await.unwrap();
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(backvault_service::audit::AUDIT_PURGE_LOCK)
        .fetch_one(&mut *leader)
        .await
        .unwrap();
    assert!(locked);
    assert_eq!(app.service.purge_audit_events().await.unwrap(), 0);
    leader.rollback().await.unwrap();

    // The default retention, 400 days: the event aged 781 days goes, the one of 380 stays.
    assert_eq!(app.service.purge_audit_events().await.unwrap(), 1);
    assert_eq!(events(&app, "operation=create_vault").await.len(), 2);
    let purge = only_event(&app, "audit_log.purge").await;
    assert_eq!(
        purge["details"],
        json!({"deleted": 1, "retention_days": 400})
    );
    assert_eq!(purge["subject"], Value::Null);
    assert_eq!(purge["method"], Value::Null);
    assert_eq!(app.service.purge_audit_events().await.unwrap(), 0);
}
