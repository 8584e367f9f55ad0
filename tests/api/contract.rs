//! What the OpenAPI document promises about HTTP itself: conditional reads, where
//! `Location` is sent, typed job bodies, CORS and compression.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

/// GET `path` as the client holding `tags` (`If-None-Match`).
async fn get_unless(app: &TestApp, path: &str, token: &str, tags: &str) -> Response {
    app.call(
        Method::GET,
        path,
        Some(token),
        None,
        &[("if-none-match", tags)],
    )
    .await
}

#[sqlx::test]
async fn reads_answer_304_while_the_etag_holds(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let vault = app.vault("etag-vault", "sub-1").await;
    let vault_path = format!("/v1/vaults/{}", vault["id"].as_str().unwrap());
    let (vm_id, _) = enroll(&app, "vm-etag").await;
    let job_id = dispatch(&app, &vm_id, "discovery").await;

    for path in [
        vault_path.clone(),
        format!("/v1/vms/{vm_id}"),
        format!("/v1/jobs/{job_id}"),
        format!("{vault_path}/policies/HourlyLogBackup"),
    ] {
        let first = app.get(&path, &admin).await;
        assert_eq!(first.status, StatusCode::OK, "{path}: {}", first.body);
        let etag = first.header("etag").to_owned();
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "{path}: {etag:?}"
        );
        let again = get_unless(&app, &path, &admin, &etag).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.header("etag"), etag);
        assert_eq!(again.body, serde_json::Value::Null, "a 304 has no body");
        // Weak and listed forms match too (If-None-Match compares weakly).
        let listed = format!("\"other\", W/{etag}");
        let weak = get_unless(&app, &path, &admin, &listed).await;
        assert_eq!(weak.status, StatusCode::NOT_MODIFIED, "{path}");
        let stale = get_unless(&app, &path, &admin, "\"stale\"").await;
        assert_eq!(stale.status, StatusCode::OK, "{path}");
        assert_eq!(stale.body, first.body);
    }

    // A change makes the old tag stale.
    let etag = app.get(&vault_path, &admin).await.header("etag").to_owned();
    let changed = app
        .call(
            Method::PATCH,
            &vault_path,
            Some(&admin),
            Some(json!({"description": "changed"})),
            &[],
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    let after = get_unless(&app, &vault_path, &admin, &etag).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.body["description"], "changed");
}

#[sqlx::test]
async fn location_is_sent_for_what_was_created_only(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let created = app
        .post("/v1/vaults", &admin, vault_body("where-vault", "sub-1"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.body["id"].as_str().unwrap();
    assert_eq!(created.header("location"), format!("/v1/vaults/{id}"));
    let read = app.get(&format!("/v1/vaults/{id}"), &admin).await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(read.headers.get("location").is_none());
    let policy = app
        .get(&format!("/v1/vaults/{id}/policies/HourlyLogBackup"), &admin)
        .await;
    assert!(policy.headers.get("location").is_none());
}

#[sqlx::test]
async fn jobs_show_typed_payloads_and_refuse_unknown_payload_fields(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let (vm_id, _) = enroll(&app, "vm-typed").await;
    let job_id = dispatch(&app, &vm_id, "discovery").await;
    let job = app.get(&format!("/v1/jobs/{job_id}"), &admin).await;
    assert_eq!(job.body["payload"], json!({"kind": "discovery"}));

    let copy_only = app
        .post(
            "/v1/jobs",
            &admin,
            json!({"vm_id": vm_id, "kind": "backup_full", "payload": {"copy_only": true},
                   "items": [{"instance": "MSSQLSERVER", "database": "sales"}]}),
        )
        .await;
    assert_eq!(copy_only.status, StatusCode::ACCEPTED, "{}", copy_only.body);
    assert_eq!(
        copy_only.body["payload"],
        json!({"kind": "backup_full", "copy_only": true})
    );
    let unknown = app
        .post(
            "/v1/jobs",
            &admin,
            json!({"vm_id": vm_id, "kind": "backup_full", "payload": {"retention_days": 3650}}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{}", unknown.body);
    assert_eq!(unknown.code(), "malformed_body");
    let log_copy = app
        .post(
            "/v1/jobs",
            &admin,
            json!({"vm_id": vm_id, "kind": "backup_log", "payload": {"copy_only": true}}),
        )
        .await;
    assert_eq!(log_copy.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        log_copy.violations(),
        [(
            "/payload/copy_only".to_owned(),
            "payload_not_allowed".to_owned()
        )]
    );
}

async fn preflight(app: &TestApp, origin: &str) -> Response {
    app.send(
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/vaults")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

#[sqlx::test]
async fn cors_is_off_unless_origins_are_configured(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let res = preflight(&app, "https://console.example.com").await;
    assert!(res.headers.get("access-control-allow-origin").is_none());

    let app = TestApp::with_http(
        pool,
        &backvault_api::HttpOptions {
            cors_allowed_origins: vec!["https://console.example.com".into()],
        },
    );
    let allowed = preflight(&app, "https://console.example.com").await;
    assert!(allowed.status.is_success(), "{}", allowed.status);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        "https://console.example.com"
    );
    assert!(
        allowed
            .header("access-control-allow-headers")
            .contains("authorization")
    );
    let other = preflight(&app, "https://evil.example.net").await;
    assert!(other.headers.get("access-control-allow-origin").is_none());

    // A real request from the allowed origin exposes the headers a client reads.
    let admin = app.admin();
    let res = app
        .call(
            Method::GET,
            "/v1/vaults",
            Some(&admin),
            None,
            &[("origin", "https://console.example.com")],
        )
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.header("access-control-expose-headers").contains("etag"));
}

#[sqlx::test]
async fn large_bodies_are_compressed_when_asked(pool: PgPool) {
    use tower::ServiceExt;
    let app = TestApp::new(pool);
    // A client that refuses unencoded bodies and names no encoding the server has gets the
    // body unencoded, not a 406 after the request ran.
    let res = app
        .router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/openapi.json")
                .header("accept-encoding", "zstd, identity;q=0, *;q=0")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("content-encoding").is_none());
    for encoding in [None, Some("gzip"), Some("br")] {
        let mut req = Request::builder().uri("/openapi.json");
        if let Some(e) = encoding {
            req = req.header("accept-encoding", e);
        }
        let res = app
            .router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            encoding
        );
    }
}

/// Requests the schema calls valid are taken, and ones it calls invalid refused, where the
/// server and the schema used to disagree.
#[sqlx::test]
async fn the_server_takes_what_the_schema_allows_and_no_more(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let vault = app.vault("schema-vault", "sub-1").await;
    let vault_path = format!("/v1/vaults/{}", vault["id"].as_str().unwrap());

    // JSON Schema counts 3.0 as an integer: so does the server.
    let (_, agent) = enroll(&app, "vm-floats").await;
    let claim = app
        .post(
            "/v1/agent/claim",
            &agent,
            json!({"max_jobs": 3.0, "wait_seconds": 0.0}),
        )
        .await;
    assert_eq!(claim.status, StatusCode::OK, "{}", claim.body);
    let fraction = app
        .post("/v1/agent/claim", &agent, json!({"max_jobs": 2.5}))
        .await;
    assert_eq!(fraction.code(), "malformed_body");

    // A cursor is a UUID; any UUID is a position in the list.
    let page = app.get("/v1/vaults?limit=1", &admin).await;
    assert_eq!(page.status, StatusCode::OK);
    let after = app
        .get(&format!("/v1/vaults?cursor={}", uuid::Uuid::nil()), &admin)
        .await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.body["items"][0]["id"], vault["id"]);
    let garbage = app.get("/v1/vaults?cursor=", &admin).await;
    assert_eq!(garbage.code(), "invalid_cursor");

    // Conditional headers longer than any ETag are malformed.
    let long = "\"".to_owned() + &"0".repeat(520) + "\"";
    let res = get_unless(&app, &vault_path, &admin, &long).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::BAD_REQUEST, "invalid_header")
    );
    // An empty If-None-Match is a list of nothing: it matches nothing.
    let res = get_unless(&app, &vault_path, &admin, "").await;
    assert_eq!(res.status, StatusCode::OK);

    // A filter that breaks the identifier rule matches no VM: it is refused.
    let res = app.get("/v1/vms?subscription_id=", &admin).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );

    // A well-formed instant outside 1970..9000: a rule, not a malformed query.
    let res = app
        .post(
            "/v1/policies/preview?from=0000-01-01T00:00:00Z",
            &admin,
            weekly_spec(),
        )
        .await;
    assert_eq!(
        res.violations(),
        [("/from".to_owned(), "instant_out_of_range".to_owned())]
    );

    // What a client sent comes back bounded and printable.
    let res = app
        .post(
            "/v1/policies/preview",
            &admin,
            json!({"time_zone": "0".repeat(8000), "full": {"frequency": "daily", "time": "02:00"},
                   "retention": {"daily": {"days": 30}}}),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);
    for v in res.body["errors"].as_array().unwrap() {
        assert!(
            v["message"].as_str().unwrap().chars().count() <= 1024,
            "{v}"
        );
    }
    let res = app
        .post("/v1/tokens/revoke", &admin, json!({"a\u{13}": 1}))
        .await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);
    let pointer = res.body["errors"][0]["pointer"].as_str().unwrap();
    assert_eq!(pointer, "/a\\u0013");
}

/// A protected item's ETag changes when what it shows changes, even where its version
/// does not (its last backup comes from the recovery points); If-Match still takes it.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn an_item_etag_follows_its_backups(pool: PgPool) {
    use crate::protection::db;
    use crate::recovery::{Lsns, protect, run_backups, weekly_dst_policy};
    let p = protect(pool, weekly_dst_policy(), vec![db("MSSQLSERVER", "sales")]).await;
    let admin = p.app.admin();
    let item = p.item_path("sales");
    let before = p.app.get(&item, &admin).await;
    let etag = before.header("etag").to_owned();
    let same = get_unless(&p.app, &item, &admin, &etag).await;
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);

    let backup = p
        .app
        .post(
            &format!("{item}/backup"),
            &admin,
            json!({"type": "full", "retention_days": 45}),
        )
        .await;
    assert_eq!(backup.status, StatusCode::ACCEPTED, "{}", backup.body);
    let ran = run_backups(&p.app, &p.agent, &mut Lsns::default(), chrono::Utc::now()).await;
    assert_eq!(ran, ["backup_full"]);
    let after = get_unless(&p.app, &item, &admin, &etag).await;
    assert_eq!(after.status, StatusCode::OK, "the backup changed the item");
    assert_ne!(after.body["last_full_at"], before.body["last_full_at"]);
    assert_eq!(after.body["version"], before.body["version"]);

    // Changing the policy conditionally: the tag read last is current.
    let fresh = after.header("etag").to_owned();
    let change = p
        .app
        .call(
            Method::PATCH,
            &item,
            Some(&admin),
            Some(json!({"policy": "HourlyLogBackup"})),
            &[("if-match", &fresh)],
        )
        .await;
    assert_eq!(change.status, StatusCode::OK, "{}", change.body);
}

/// `Idempotency-Key` is 1 to 255 visible ASCII characters, as the document says.
#[sqlx::test]
async fn idempotency_keys_are_bounded(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let create = |key: String, name: &'static str| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.send(
                Request::builder()
                    .method(Method::POST)
                    .uri("/v1/vaults")
                    .header("authorization", format!("Bearer {admin}"))
                    .header("content-type", "application/json")
                    .header(
                        "idempotency-key",
                        axum::http::HeaderValue::from_bytes(key.as_bytes()).unwrap(),
                    )
                    .body(Body::from(vault_body(name, "sub-1").to_string()))
                    .unwrap(),
            )
            .await
        }
    };
    let longest = create("k".repeat(255), "key-longest").await;
    assert_eq!(longest.status, StatusCode::CREATED, "{}", longest.body);
    let too_long = create("k".repeat(256), "key-too-long").await;
    assert_eq!(
        (too_long.status, too_long.code()),
        (StatusCode::BAD_REQUEST, "idempotency_key_invalid")
    );
    let latin = create("clé".into(), "key-latin").await;
    assert_eq!(
        (latin.status, latin.code()),
        (StatusCode::BAD_REQUEST, "idempotency_key_invalid")
    );
}

/// A long poll with the ETag the client holds answers at once when the job already
/// differs from it, and waits while it does not.
#[sqlx::test]
async fn a_job_wait_answers_at_once_for_a_stale_etag(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let (vm_id, _) = enroll(&app, "vm-wait").await;
    let job_id = dispatch(&app, &vm_id, "discovery").await;
    let path = format!("/v1/jobs/{job_id}?wait=2s");
    let started = std::time::Instant::now();
    let stale = get_unless(&app, &path, &admin, "\"stale\"").await;
    assert_eq!(stale.status, StatusCode::OK);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "answered at once: {:?}",
        started.elapsed()
    );
    let etag = stale.header("etag").to_owned();
    let started = std::time::Instant::now();
    let held = get_unless(&app, &path, &admin, &etag).await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1500),
        "waited for a change: {:?}",
        started.elapsed()
    );
    assert_eq!(held.status, StatusCode::NOT_MODIFIED, "still the same job");
}
