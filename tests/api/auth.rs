use axum::http::{Method, StatusCode};
use backvault_service::{AuthConfig, Role};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{SECRET, TestApp, vault_body, weekly_spec};

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn missing_and_bad_tokens_answer_401(pool: PgPool) {
    let app = TestApp::new(pool);
    let none = app.call(Method::GET, "/v1/vaults", None, None, &[]).await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::UNAUTHORIZED, "missing_token")
    );
    assert_eq!(none.header("www-authenticate"), "Bearer");

    let basic = app
        .call(
            Method::GET,
            "/v1/vaults",
            None,
            None,
            &[("authorization", "Basic dXNlcjpwYXNz")],
        )
        .await;
    assert_eq!(
        (basic.status, basic.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );

    let expired = app.auth.mint(
        "x",
        Role::Admin,
        vec!["*".into()],
        None,
        chrono::Duration::hours(-1),
    );
    let res = app.get("/v1/vaults", &expired).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    assert!(res.body["detail"].as_str().unwrap().contains("expired"));

    let other = TestApp::new(app.pool.clone()).auth;
    let foreign = backvault_service::Auth::new(AuthConfig {
        secret: b"some-other-secret-of-enough-length!!".to_vec(),
        previous_secrets: Vec::new(),
        issuer: None,
        audience: None,
    })
    .mint(
        "x",
        Role::Admin,
        vec!["*".into()],
        None,
        chrono::Duration::hours(1),
    );
    let res = app.get("/v1/vaults", &foreign).await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
    assert!(other.verify(&foreign).is_err());
}

/// An unsigned token (`alg: none`) claiming admin is refused.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn alg_none_is_refused(pool: PgPool) {
    use base64::Engine;
    let app = TestApp::new(pool);
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = chrono::Utc::now().timestamp() + 3600;
    let token = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(
            json!({"sub": "mallory", "role": "admin", "subscriptions": ["*"], "iat": 0, "exp": exp})
        )
    );
    let res = app.get("/v1/vaults", &token).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    // The same claims correctly signed are accepted, so the refusal is about `alg`.
    let signed = app.auth.mint(
        "mallory",
        Role::Admin,
        vec!["*".into()],
        None,
        chrono::Duration::hours(1),
    );
    assert_eq!(app.get("/v1/vaults", &signed).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn issuer_and_audience_are_checked_when_configured(pool: PgPool) {
    let config = |iss: &str, aud: &str| AuthConfig {
        secret: SECRET.to_vec(),
        previous_secrets: Vec::new(),
        issuer: Some(iss.into()),
        audience: Some(aud.into()),
    };
    let app = TestApp::with_auth(pool.clone(), config("backvault", "api"));
    assert_eq!(
        app.get("/v1/vaults", &app.admin()).await.status,
        StatusCode::OK
    );
    let wrong_iss = TestApp::with_auth(pool.clone(), config("someone-else", "api")).admin();
    assert_eq!(
        app.get("/v1/vaults", &wrong_iss).await.status,
        StatusCode::UNAUTHORIZED
    );
    let wrong_aud = TestApp::with_auth(pool.clone(), config("backvault", "other")).admin();
    assert_eq!(
        app.get("/v1/vaults", &wrong_aud).await.status,
        StatusCode::UNAUTHORIZED
    );
    let no_claims = TestApp::new(pool).admin();
    assert_eq!(
        app.get("/v1/vaults", &no_claims).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn roles_are_enforced(pool: PgPool) {
    let app = TestApp::new(pool);
    let vault = app.vault("roles-vault", "sub-1").await;
    let policies = format!("/v1/vaults/{}/policies", vault["id"].as_str().unwrap());
    let reader = app.token(Role::Reader, &["sub-1"]);
    let operator = app.token(Role::Operator, &["sub-1"]);
    let agent = app.token(Role::Agent, &["sub-1"]);

    assert_eq!(app.get("/v1/vaults", &reader).await.status, StatusCode::OK);
    let res = app
        .post("/v1/vaults", &reader, vault_body("r-vault", "sub-1"))
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let res = app
        .post(
            &policies,
            &reader,
            json!({"name": "P", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    // Readers may preview: it changes nothing.
    assert_eq!(
        app.post("/v1/policies/preview", &reader, weekly_spec())
            .await
            .status,
        StatusCode::OK
    );

    let res = app
        .post("/v1/vaults", &operator, vault_body("o-vault", "sub-1"))
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
    let res = app
        .post(
            &policies,
            &operator,
            json!({"name": "P", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(res.status, StatusCode::CREATED);

    assert_eq!(
        app.get("/v1/vaults", &agent).await.status,
        StatusCode::FORBIDDEN
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn other_subscriptions_are_invisible(pool: PgPool) {
    let app = TestApp::new(pool);
    let mine = app.vault("mine", "sub-1").await;
    let theirs = app.vault("theirs", "sub-2").await;
    let token = app.token(Role::Admin, &["sub-1"]);

    let list = app.get("/v1/vaults", &token).await;
    let names: Vec<_> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [mine["name"].clone()]);

    let theirs_id = theirs["id"].as_str().unwrap();
    for path in [
        format!("/v1/vaults/{theirs_id}"),
        format!("/v1/vaults/{theirs_id}/policies"),
        format!("/v1/vaults/{theirs_id}/policies/HourlyLogBackup"),
    ] {
        let res = app.get(&path, &token).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::NOT_FOUND, "vault_not_found"),
            "{path}"
        );
    }
    let del = app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{theirs_id}"),
            Some(&token),
            None,
            &[],
        )
        .await;
    assert_eq!(del.status, StatusCode::NOT_FOUND);
    let create = app
        .post("/v1/vaults", &token, vault_body("elsewhere", "sub-2"))
        .await;
    assert_eq!(
        (create.status, create.code()),
        (StatusCode::FORBIDDEN, "subscription_forbidden")
    );

    // Copying a policy into a vault of another subscription: that vault is not found.
    let copy = app
        .post(
            &format!(
                "/v1/vaults/{}/policies/HourlyLogBackup/copy",
                mine["id"].as_str().unwrap()
            ),
            &token,
            json!({"target_vault_id": theirs_id}),
        )
        .await;
    assert_eq!(
        (copy.status, copy.code()),
        (StatusCode::NOT_FOUND, "vault_not_found")
    );
}

/// A token signed with the right key but not valid yet (`nbf`), or issued in the future
/// (`iat`), is refused; the same claims valid now are accepted.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn tokens_not_valid_yet_are_refused(pool: PgPool) {
    let app = TestApp::new(pool);
    let now = chrono::Utc::now().timestamp();
    let sign = |extra: serde_json::Value| {
        let mut claims = json!({"sub": "alice", "role": "admin", "subscriptions": ["*"], "jti": uuid::Uuid::now_v7(),
                                "iat": now, "exp": now + 3600});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    };
    for (extra, reason) in [
        (json!({"nbf": now + 600}), "not valid yet"),
        (json!({"iat": now + 600}), "issued in the future"),
    ] {
        let res = app.get("/v1/vaults", &sign(extra.clone())).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::UNAUTHORIZED, "invalid_token"),
            "{extra}"
        );
        assert!(
            res.body["detail"].as_str().unwrap().contains(reason),
            "{}",
            res.body
        );
    }
    // Within the clock leeway, and in the past, both are fine.
    for extra in [
        json!({"nbf": now - 60}),
        json!({"iat": now + 2, "nbf": now + 2}),
    ] {
        let res = app.get("/v1/vaults", &sign(extra.clone())).await;
        assert_eq!(res.status, StatusCode::OK, "{extra}: {}", res.body);
    }
}
