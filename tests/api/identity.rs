//! Identities: enrollment tokens on record (use limits, binding, listing, revocation), no
//! takeover of an enrolled VM, agent token refresh, the deny list and key rotation.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use backvault_service::{AuthConfig, Role};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{
    SECRET, TestApp, enroll, enroll_bound, enrollment_token, facts, listening, sql, wait_until,
};

/// The claims of a token, unverified.
fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

async fn delete(app: &TestApp, path: &str, token: &str) -> crate::helpers::Response {
    app.call(Method::DELETE, path, Some(token), None, &[]).await
}

async fn outstanding(app: &TestApp) -> Vec<Value> {
    let res = app.get("/v1/enrollment-tokens", &app.admin()).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body["items"].as_array().unwrap().clone()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_single_use_token_enrolls_exactly_one_of_many_racing_vms(pool: PgPool) {
    let app = Arc::new(TestApp::new(pool));
    let (id, token) = enrollment_token(&app, json!({"subscription_id": "sub-1"})).await;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move {
                app.post(
                    "/v1/agent/enroll",
                    &token,
                    json!({"facts": facts(&format!("racer-{i}"))}),
                )
                .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        let res = racer.await.unwrap();
        outcomes.push((res.status, res.code().to_owned()));
    }
    let won = outcomes.iter().filter(|o| o.0 == StatusCode::OK).count();
    assert_eq!(won, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter(|o| o.0 != StatusCode::OK)
            .all(|o| *o == (StatusCode::UNAUTHORIZED, "enrollment_token_used".to_owned())),
        "{outcomes:?}"
    );
    let vms = app.get("/v1/vms", &app.admin()).await;
    assert_eq!(vms.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(sql::enrollment_token_uses(&app.pool, &id).await, 1);
    assert!(
        outstanding(&app).await.is_empty(),
        "a used token is not outstanding"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn enrollment_tokens_carry_an_id_are_listed_without_the_token_and_not_cached(pool: PgPool) {
    let app = TestApp::new(pool);
    let created = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1", "max_uses": 3, "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.header("cache-control"), "no-store");
    assert_eq!(created.body["max_uses"], 3);
    let token = created.body["token"].as_str().unwrap().to_owned();
    assert_eq!(claims(&token)["jti"], created.body["id"]);
    assert_eq!(claims(&token)["role"], "enrollment");

    for i in 0..3 {
        let res = app
            .post(
                "/v1/agent/enroll",
                &token,
                json!({"facts": facts(&format!("vm-{i}"))}),
            )
            .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
        assert_eq!(res.header("cache-control"), "no-store");
        if i < 2 {
            let listed = outstanding(&app).await;
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0]["id"], created.body["id"]);
            assert_eq!(listed[0]["uses"], i + 1);
            assert_eq!(listed[0]["created_by"], "tester");
            assert!(listed[0].get("token").is_none(), "{}", listed[0]);
        }
    }
    let fourth = app
        .post("/v1/agent/enroll", &token, json!({"facts": facts("vm-3")}))
        .await;
    assert_eq!(
        (fourth.status, fourth.code()),
        (StatusCode::UNAUTHORIZED, "enrollment_token_used")
    );
    assert_eq!(fourth.header("www-authenticate"), "Bearer");

    // Pages, like every list.
    for _ in 0..3 {
        enrollment_token(&app, json!({"subscription_id": "sub-1"})).await;
    }
    enrollment_token(&app, json!({"subscription_id": "sub-2"})).await;
    let first = app.get("/v1/enrollment-tokens?limit=2", &app.admin()).await;
    assert_eq!(first.body["items"].as_array().unwrap().len(), 2);
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(
            &format!("/v1/enrollment-tokens?limit=2&cursor={cursor}"),
            &app.admin(),
        )
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 2);
    assert!(rest.body["next_cursor"].is_null());
    let scoped = app.token(Role::Admin, &["sub-2"]);
    let theirs = app.get("/v1/enrollment-tokens", &scoped).await;
    assert_eq!(theirs.body["items"].as_array().unwrap().len(), 1);
    let reader = app.token(Role::Reader, &["*"]);
    assert_eq!(
        app.get("/v1/enrollment-tokens", &reader).await.status,
        StatusCode::FORBIDDEN
    );

    let invalid = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1", "max_uses": 101, "vm_name": "sqlvm-01", "ttl_seconds": 86_401}),
        )
        .await;
    assert_eq!(
        invalid.violations(),
        [
            ("/ttl_seconds".to_owned(), "ttl_out_of_range".to_owned()),
            (
                "/resource_group".to_owned(),
                "identifier_invalid".to_owned()
            ),
            ("/max_uses".to_owned(), "max_uses_out_of_range".to_owned()),
        ]
    );
    let zero = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1", "max_uses": 0}),
        )
        .await;
    assert_eq!(zero.violations()[0].1, "max_uses_out_of_range");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn revoked_and_unknown_enrollment_tokens_enroll_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    let (id, token) = enrollment_token(&app, json!({"subscription_id": "sub-1"})).await;
    let path = format!("/v1/enrollment-tokens/{id}");
    let reader = app.token(Role::Reader, &["*"]);
    assert_eq!(
        delete(&app, &path, &reader).await.status,
        StatusCode::FORBIDDEN
    );
    let elsewhere = app.token(Role::Admin, &["sub-2"]);
    let hidden = delete(&app, &path, &elsewhere).await;
    assert_eq!(
        (hidden.status, hidden.code()),
        (StatusCode::NOT_FOUND, "enrollment_token_not_found")
    );
    assert_eq!(
        delete(&app, &path, &app.admin()).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        delete(&app, &path, &app.admin()).await.status,
        StatusCode::NO_CONTENT,
        "revoking twice is harmless"
    );
    let missing = delete(
        &app,
        &format!("/v1/enrollment-tokens/{}", uuid::Uuid::now_v7()),
        &app.admin(),
    )
    .await;
    assert_eq!(missing.code(), "enrollment_token_not_found");
    let res = app
        .post("/v1/agent/enroll", &token, json!({"facts": facts("vm-1")}))
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "enrollment_token_revoked")
    );
    assert!(outstanding(&app).await.is_empty());

    // Signed with the right key but never recorded (as a pre-upgrade token would be).
    let unrecorded = app.token(Role::Enrollment, &["sub-1"]);
    let res = app
        .post(
            "/v1/agent/enroll",
            &unrecorded,
            json!({"facts": facts("vm-1")}),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    assert!(
        res.body["detail"]
            .as_str()
            .unwrap()
            .contains("not on record")
    );
}

/// "VM takeover by re-enrollment": a subscription-wide enrollment token that leaked cannot
/// replace the agent of a VM that has one; the real agent keeps working.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_leaked_enrollment_token_cannot_take_over_an_enrolled_vm(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, real_agent) = enroll(&app, "sqlvm-01").await;
    let (leaked_id, leaked) =
        enrollment_token(&app, json!({"subscription_id": "sub-1", "max_uses": 5})).await;
    for name in ["sqlvm-01", "SQLVM-01"] {
        let res = app
            .post("/v1/agent/enroll", &leaked, json!({"facts": facts(name)}))
            .await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::CONFLICT, "vm_already_enrolled"),
            "{name}"
        );
    }
    let hb = app
        .post("/v1/agent/heartbeat", &real_agent, json!({}))
        .await;
    assert_eq!(hb.status, StatusCode::OK, "the real agent keeps its token");
    assert_eq!(
        sql::enrollment_token_uses(&app.pool, &leaked_id).await,
        0,
        "a refused enrollment uses nothing up"
    );

    // A VM that inventory automation added, with no agent yet, is a first enrollment.
    let added = app
        .call(
            Method::PUT,
            "/v1/vms",
            Some(&app.admin()),
            Some(
                json!({"name": "sqlvm-02", "resource_group": "rg-sql", "subscription_id": "sub-1",
                        "region": "westeurope", "deployment_model": "resource_manager"}),
            ),
            &[],
        )
        .await;
    let first = app
        .post(
            "/v1/agent/enroll",
            &leaked,
            json!({"facts": facts("sqlvm-02")}),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["vm_id"], added.body["id"]);

    // A token bound to another VM enrolls only that one.
    let (_, bound_elsewhere) = enrollment_token(
        &app,
        json!({"subscription_id": "sub-1", "vm_name": "sqlvm-03", "resource_group": "rg-sql"}),
    )
    .await;
    let res = app
        .post(
            "/v1/agent/enroll",
            &bound_elsewhere,
            json!({"facts": facts("sqlvm-01")}),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::FORBIDDEN, "enrollment_token_vm_mismatch")
    );

    // An admin who means it (a reinstalled agent) binds a token to the VM.
    let (again, replacement) = enroll_bound(&app, "SQLVM-01").await;
    assert_eq!(again, vm);
    let old = app
        .post("/v1/agent/heartbeat", &real_agent, json!({}))
        .await;
    assert_eq!(
        (old.status, old.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    assert_eq!(
        app.post("/v1/agent/heartbeat", &replacement, json!({}))
            .await
            .status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn an_agent_refreshes_its_token_with_the_current_one(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, first) = enroll(&app, "sqlvm-01").await;
    let mut newer = facts("sqlvm-01");
    newer["dotnet_version"] = json!("4.8.1");
    let refreshed = app
        .post("/v1/agent/enroll", &first, json!({"facts": newer}))
        .await;
    assert_eq!(refreshed.status, StatusCode::OK, "{}", refreshed.body);
    assert_eq!(refreshed.header("cache-control"), "no-store");
    assert_eq!(refreshed.body["vm_id"], vm.as_str());
    let second = refreshed.body["agent_token"].as_str().unwrap().to_owned();
    let got = app.get(&format!("/v1/vms/{vm}"), &app.admin()).await;
    assert_eq!(got.body["dotnet_version"], "4.8.1");
    // A lost answer costs nothing: the presented token still works too.
    for token in [&first, &second] {
        assert_eq!(
            app.post("/v1/agent/heartbeat", token, json!({}))
                .await
                .status,
            StatusCode::OK
        );
    }

    // An agent token reaches its own VM only.
    let (_, other_agent) = enroll(&app, "sqlvm-02").await;
    let res = app
        .post(
            "/v1/agent/enroll",
            &other_agent,
            json!({"facts": facts("sqlvm-01")}),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::CONFLICT, "vm_identity_mismatch")
    );
    let admin = app
        .post(
            "/v1/agent/enroll",
            &app.admin(),
            json!({"facts": facts("sqlvm-01")}),
        )
        .await;
    assert_eq!(
        (admin.status, admin.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    // Replaced agents cannot refresh their way back.
    enroll_bound(&app, "sqlvm-01").await;
    let res = app
        .post(
            "/v1/agent/enroll",
            &second,
            json!({"facts": facts("sqlvm-01")}),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
}

/// A revoked token answers 401 at once on the replica that revoked it, and within moments
/// on the others (NOTIFY); a replica started later reads the list.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn revoked_tokens_answer_401_on_every_replica(pool: PgPool) {
    let replica_a = TestApp::new(pool.clone());
    let replica_b = TestApp::new(pool.clone());
    let reader = replica_a.token(Role::Reader, &["*"]);
    let bystander = replica_a.token(Role::Reader, &["*"]);
    let jti = claims(&reader)["jti"].as_str().unwrap().to_owned();
    // B's listener has loaded the list, so that B learns by notification.
    listening(&replica_b).await;
    assert_eq!(
        replica_b.get("/v1/vaults", &reader).await.status,
        StatusCode::OK
    );

    let operator = replica_a.token(Role::Operator, &["*"]);
    let denied = replica_a
        .post("/v1/tokens/revoke", &operator, json!({"jti": jti}))
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let malformed = replica_a
        .post(
            "/v1/tokens/revoke",
            &replica_a.admin(),
            json!({"jti": "nope"}),
        )
        .await;
    assert_eq!(malformed.code(), "malformed_body");
    for _ in 0..2 {
        let revoked = replica_a
            .post("/v1/tokens/revoke", &replica_a.admin(), json!({"jti": jti}))
            .await;
        assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{}", revoked.body);
    }
    let res = replica_a.get("/v1/vaults", &reader).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    let (b, revoked) = (&replica_b, reader.as_str());
    wait_until(
        std::time::Duration::from_secs(2),
        "replica B to refuse the revoked token (it learns within 2 s)",
        || async move { b.get("/v1/vaults", revoked).await.status == StatusCode::UNAUTHORIZED },
    )
    .await;
    let replica_c = TestApp::new(pool);
    assert_eq!(
        replica_c.get("/v1/vaults", &reader).await.code(),
        "token_revoked",
        "before its listener loaded the list, a replica asks the database"
    );
    assert_eq!(
        replica_b.get("/v1/vaults", &bystander).await.status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn pruning_forgets_expired_revocations_and_enrollment_tokens(pool: PgPool) {
    let app = TestApp::new(pool);
    enrollment_token(&app, json!({"subscription_id": "sub-1"})).await;
    sql::forge_expired_enrollment_token(&app.pool, chrono::Duration::days(91)).await;
    let now = chrono::Utc::now();
    sql::forge_revocation(&app.pool, now - chrono::Duration::seconds(1)).await;
    sql::forge_revocation(&app.pool, now + chrono::Duration::days(1)).await;
    assert_eq!(app.service.prune_history().await.unwrap(), 2);
    assert_eq!(sql::token_rows(&app.pool).await, (1, 1));
}

/// Key rotation: the new key signs, the previous one still verifies what it signed (agent
/// tokens above all, which live for months) until it is removed from the configuration.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_key_rotation_keeps_tokens_of_the_previous_key_until_it_is_removed(pool: PgPool) {
    const NEW: &[u8] = b"the-next-integration-test-secret-0123";
    let config = |secret: &[u8], previous: &[&[u8]]| AuthConfig {
        secret: secret.to_vec(),
        previous_secrets: previous.iter().map(|p| p.to_vec()).collect(),
        issuer: None,
        audience: None,
    };
    let before = TestApp::new(pool.clone());
    let (_, old_agent) = enroll(&before, "sqlvm-01").await;
    let old_admin = before.admin();
    assert_eq!(kid(&old_agent), backvault_service::keys::key_id(SECRET));

    let rotating = TestApp::with_auth(pool.clone(), config(NEW, &[SECRET]));
    assert_eq!(
        rotating
            .post("/v1/agent/heartbeat", &old_agent, json!({}))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        rotating.get("/v1/vaults", &old_admin).await.status,
        StatusCode::OK
    );
    let refreshed = rotating
        .post(
            "/v1/agent/enroll",
            &old_agent,
            json!({"facts": facts("sqlvm-01")}),
        )
        .await;
    let new_agent = refreshed.body["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(kid(&new_agent), backvault_service::keys::key_id(NEW));
    assert_eq!(
        before
            .post("/v1/agent/heartbeat", &new_agent, json!({}))
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "the new key is not the old one"
    );

    let rotated = TestApp::with_auth(pool, config(NEW, &[]));
    let res = rotated
        .post("/v1/agent/heartbeat", &old_agent, json!({}))
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    assert!(res.body["detail"].as_str().unwrap().contains("kid"));
    assert_eq!(
        rotated.get("/v1/vaults", &old_admin).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        rotated
            .post("/v1/agent/heartbeat", &new_agent, json!({}))
            .await
            .status,
        StatusCode::OK
    );
}
