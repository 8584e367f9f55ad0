use axum::http::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestApp, sql, vault_body};

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn create_get_and_default_policy(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let res = app
        .post(
            "/v1/vaults",
            &admin,
            json!({"name": "Prod-Vault", "subscription_id": "sub-1", "resource_group": "rg-sql",
                   "region": "westeurope", "description": "SQL VMs"}),
        )
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
    let id = res.body["id"].as_str().unwrap().to_owned();
    assert_eq!(res.header("location"), format!("/v1/vaults/{id}"));
    assert!(
        res.header("etag").starts_with("\"1-"),
        "the version, then a digest"
    );
    assert_eq!(res.body["description"], "SQL VMs");

    let got = app.get(&format!("/v1/vaults/{id}"), &admin).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, res.body);

    let policies = app.get(&format!("/v1/vaults/{id}/policies"), &admin).await;
    let items = policies.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "HourlyLogBackup");
    assert_eq!(items[0]["spec"]["full"]["frequency"], "daily");
    assert_eq!(items[0]["spec"]["log"]["frequency_minutes"], 60);
    assert_eq!(items[0]["spec"]["log"]["retention_days"], 30);
    assert_eq!(items[0]["spec"]["retention"]["daily"]["days"], 30);
    assert_eq!(items[0]["spec"]["compression"], false);
    assert!(items[0]["spec"].get("differential").is_none());
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn invalid_vaults_report_every_violation(pool: PgPool) {
    let app = TestApp::new(pool);
    let res = app
        .post(
            "/v1/vaults",
            &app.admin(),
            json!({"name": "9_bad-", "subscription_id": "", "resource_group": "a/b", "region": "westeurope"}),
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    let v = res.violations();
    for expected in [
        ("/name", "vault_name_first_character"),
        ("/name", "vault_name_characters"),
        ("/name", "vault_name_trailing_hyphen"),
        ("/subscription_id", "identifier_invalid"),
        ("/resource_group", "identifier_invalid"),
    ] {
        assert!(
            v.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?} in {v:?}"
        );
    }
    assert_eq!(v.len(), 5);
    let short = app
        .post("/v1/vaults", &app.admin(), vault_body("v", "sub-1"))
        .await;
    assert_eq!(
        short.violations(),
        [("/name".to_owned(), "vault_name_length".to_owned())]
    );
    let long = app
        .post(
            "/v1/vaults",
            &app.admin(),
            json!({"name": "ok", "subscription_id": "s", "resource_group": "r", "region": "x", "description": "d".repeat(1025)}),
        )
        .await;
    assert_eq!(
        long.violations(),
        [("/description".to_owned(), "description_too_long".to_owned())]
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn malformed_bodies_are_problems(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let unknown_field = app
        .post("/v1/vaults", &admin, json!({"name": "ok", "subscription_id": "s", "resource_group": "r", "region": "x", "colour": "red"}))
        .await;
    assert_eq!(
        (unknown_field.status, unknown_field.code()),
        (StatusCode::BAD_REQUEST, "malformed_body")
    );
    assert!(
        unknown_field.body["detail"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let missing = app.post("/v1/vaults", &admin, json!({"name": "ok"})).await;
    assert_eq!(missing.code(), "malformed_body");
    let not_json = app
        .send(
            axum::http::Request::post("/v1/vaults")
                .header("authorization", format!("Bearer {admin}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(not_json.code(), "malformed_body");
    let no_type = app
        .send(
            axum::http::Request::post("/v1/vaults")
                .header("authorization", format!("Bearer {admin}"))
                .body(axum::body::Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(
        (no_type.status, no_type.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let mut huge = vault_body("huge", "sub-1");
    huge["description"] = json!("d".repeat(3 << 20));
    let huge = app.post("/v1/vaults", &admin, huge).await;
    assert_eq!(
        (huge.status, huge.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    let bad_id = app.get("/v1/vaults/not-a-uuid", &admin).await;
    assert_eq!(
        (bad_id.status, bad_id.code()),
        (StatusCode::BAD_REQUEST, "invalid_path")
    );
    let bad_query = app.get("/v1/vaults?limit=many", &admin).await;
    assert_eq!(
        (bad_query.status, bad_query.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn names_are_unique_per_resource_group_ignoring_case(pool: PgPool) {
    let app = TestApp::new(pool);
    app.vault("prod", "sub-1").await;
    let admin = app.admin();
    let dup = app
        .post(
            "/v1/vaults",
            &admin,
            json!({"name": "PROD", "subscription_id": "sub-1", "resource_group": "RG-SQL", "region": "westeurope"}),
        )
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "vault_name_taken")
    );
    let other_rg = app
        .post(
            "/v1/vaults",
            &admin,
            json!({"name": "prod", "subscription_id": "sub-1", "resource_group": "rg-other", "region": "westeurope"}),
        )
        .await;
    assert_eq!(other_rg.status, StatusCode::CREATED);
    assert_eq!(
        app.post("/v1/vaults", &admin, vault_body("prod", "sub-2"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn lists_page_with_opaque_cursors(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(app.vault(&format!("vault-{i}"), "sub-1").await["id"].clone());
    }
    let mut seen = Vec::new();
    let mut path = "/v1/vaults?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let page = app.get(&path, &admin).await;
        assert_eq!(page.status, StatusCode::OK);
        pages += 1;
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|v| v["id"].clone()));
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/vaults?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);

    let bad = app.get("/v1/vaults?cursor=garbage", &admin).await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_cursor")
    );
    for limit in ["0", "201"] {
        let bad = app.get(&format!("/v1/vaults?limit={limit}"), &admin).await;
        assert_eq!(
            (bad.status, bad.code()),
            (StatusCode::BAD_REQUEST, "invalid_limit")
        );
    }
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn updates_honour_if_match(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let id = app.vault("etag-vault", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/vaults/{id}");
    let patch = |etag: &'static str, text: &'static str| {
        let headers: Vec<(&str, &str)> = if etag.is_empty() {
            vec![]
        } else {
            vec![("if-match", etag)]
        };
        let app = &app;
        let path = path.clone();
        let admin = admin.clone();
        async move {
            app.call(
                Method::PATCH,
                &path,
                Some(&admin),
                Some(json!({"description": text})),
                &headers,
            )
            .await
        }
    };
    let ok = patch("\"1\"", "first").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.header("etag").starts_with("\"2-"));
    assert_eq!(ok.body["description"], "first");
    let stale = patch("\"1\"", "lost update").await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::PRECONDITION_FAILED, "precondition_failed")
    );
    let garbage = patch("\"abc\"", "lost update").await;
    assert_eq!(garbage.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(patch("*", "any").await.status, StatusCode::OK);
    assert_eq!(patch("", "unconditional").await.body["version"], 4);
    let got = app.get(&path, &admin).await;
    assert_eq!(got.body["description"], "unconditional");

    let missing = app
        .call(
            Method::PATCH,
            &format!("/v1/vaults/{}", uuid_v4()),
            Some(&admin),
            Some(json!({"description": "x"})),
            &[],
        )
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "vault_not_found")
    );
}

/// How many vaults the admin sees (every subscription).
async fn vault_count(app: &TestApp) -> usize {
    let res = app.get("/v1/vaults?limit=200", &app.admin()).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body["items"].as_array().unwrap().len()
}

fn uuid_v4() -> String {
    "7c0cf7b5-30b8-4c69-9d1a-7c8f3b0c3f11".into()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn delete_honours_if_match_and_removes_policies(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let admin = app.admin();
    let id = app.vault("doomed", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v1/vaults/{id}");
    let stale = app
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            None,
            &[("if-match", "\"7\"")],
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let ok = app
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            None,
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&path, &admin).await.status, StatusCode::NOT_FOUND);
    assert_eq!(sql::policies_kept(&pool).await, 0);
}

/// Registered VMs and protected items (a later issue) reference vaults with `on delete
/// restrict`; the delete must then answer 409, not 500. A stand-in table proves the mapping.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn delete_is_refused_while_something_references_the_vault(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let id = app.vault("busy", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sql::forge_restricting_reference(&pool, "vaults", &id).await;
    let res = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{id}"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::CONFLICT, "vault_not_empty")
    );
    assert_eq!(
        app.get(&format!("/v1/vaults/{id}"), &app.admin())
            .await
            .status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn idempotent_create_returns_the_first_response(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let admin = app.admin();
    let body = vault_body("once", "sub-1");
    let key = [("idempotency-key", "create-once-1")];
    let first = app
        .call(
            Method::POST,
            "/v1/vaults",
            Some(&admin),
            Some(body.clone()),
            &key,
        )
        .await;
    let second = app
        .call(
            Method::POST,
            "/v1/vaults",
            Some(&admin),
            Some(body.clone()),
            &key,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(first.body, second.body);
    assert_eq!(vault_count(&app).await, 1);

    let different = app
        .call(
            Method::POST,
            "/v1/vaults",
            Some(&admin),
            Some(vault_body("twice", "sub-1")),
            &key,
        )
        .await;
    assert_eq!(
        (different.status, different.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );

    // Without a key, a retry is a second create and collides on the name.
    let retry = app.post("/v1/vaults", &admin, body).await;
    assert_eq!(retry.code(), "vault_name_taken");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn concurrent_creates_with_one_key_make_one_vault(pool: PgPool) {
    let app = std::sync::Arc::new(TestApp::new(pool.clone()));
    let admin = app.admin();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            app.call(
                Method::POST,
                "/v1/vaults",
                Some(&admin),
                Some(vault_body("raced", "sub-1")),
                &[("idempotency-key", "race-key")],
            )
            .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let res = t.await.unwrap();
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
        ids.insert(res.body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(vault_count(&app).await, 1);
}
