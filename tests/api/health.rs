use axum::http::{Method, StatusCode};
use sqlx::PgPool;

use crate::helpers::{TestApp, sql};

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn health_readiness_spec_and_docs_are_open(pool: PgPool) {
    let app = TestApp::new(pool);
    let health = app.call(Method::GET, "/healthz", None, None, &[]).await;
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let ready = app.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let spec = app
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await;
    assert_eq!(spec.status, StatusCode::OK);
    assert!(spec.body["paths"]["/v1/vaults"].is_object());
    let docs = app.call(Method::GET, "/docs/", None, None, &[]).await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(docs.body.as_str().unwrap().contains("<html"));
    assert!(
        docs.header("content-security-policy")
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(docs.header("x-frame-options"), "DENY");
    assert_eq!(docs.header("x-content-type-options"), "nosniff");
    // The page's scripts come from files the policy allows, not inline code it forbids.
    let html = docs.body.as_str().unwrap();
    assert!(!html.contains("<script>"), "no inline script");
    assert_eq!(spec.header("x-content-type-options"), "nosniff");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn readiness_fails_when_migrations_are_missing(pool: PgPool) {
    sql::forge_migrations_unapplied(&pool).await;
    let app = TestApp::new(pool.clone());
    let ready = app.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(
        (ready.status, ready.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "migrations_pending")
    );
    // A database no migration ever touched.
    sql::forge_migrations_never_run(&pool).await;
    let ready = app.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(
        (ready.status, ready.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "migrations_pending")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn unknown_routes_and_methods_are_problems(pool: PgPool) {
    let app = TestApp::new(pool);
    let missing = app.get("/v1/nothing-here", &app.admin()).await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "route_not_found")
    );
    let method = app
        .call(Method::PUT, "/v1/vaults", Some(&app.admin()), None, &[])
        .await;
    assert_eq!(
        (method.status, method.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}
