//! What the API tests share: the in-process app and its client, the setup every file
//! needs, reads through the API named for what a test asks, waits on the events tests
//! coordinate on, and (`sql`) the few states no API can produce or show.

pub mod sql;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use backvault_api::AppState;
use backvault_service::{Auth, AuthConfig, Role, Service};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

pub use crate::common::wait_until;

pub const SECRET: &[u8] = b"integration-test-secret-0123456789";

pub struct TestApp {
    pub router: Router,
    pub auth: Auth,
    pub pool: PgPool,
    pub service: Service,
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// The problem code of an error response.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// The `(pointer, code)` pairs of a 422.
    pub fn violations(&self) -> Vec<(String, String)> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["pointer"].as_str().unwrap().to_owned(),
                            e["code"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl TestApp {
    pub fn new(pool: PgPool) -> Self {
        Self::with_auth(
            pool,
            AuthConfig {
                secret: SECRET.to_vec(),
                previous_secrets: Vec::new(),
                issuer: None,
                audience: None,
            },
        )
    }

    /// As a `--dev` server: scheduler ticks at chosen instants, and scheduled backups may
    /// be stamped with them (`payload.scheduled_at`), so tests rehearse schedules.
    pub fn rehearsing(pool: PgPool) -> Self {
        Self::with_config(
            pool,
            backvault_service::Config {
                allow_clock_override: true,
                ..backvault_service::Config::default()
            },
        )
    }

    pub fn with_config(pool: PgPool, config: backvault_service::Config) -> Self {
        Self::with_auth_and_config(
            pool,
            AuthConfig {
                secret: SECRET.to_vec(),
                previous_secrets: Vec::new(),
                issuer: None,
                audience: None,
            },
            config,
        )
    }

    /// The router built with HTTP options (CORS), as `serve` builds it.
    pub fn with_http(pool: PgPool, options: &backvault_api::HttpOptions) -> Self {
        let mut app = Self::new(pool);
        app.router = backvault_api::router_with(
            AppState {
                service: app.service.clone(),
            },
            options,
        );
        app
    }

    /// The app whose use cases read "now" from `clock` (the database keeps its own).
    pub fn with_clock(pool: PgPool, clock: std::sync::Arc<dyn backvault_service::Clock>) -> Self {
        let mut app = Self::new(pool);
        app.service = app.service.clone().with_clock(clock);
        app.router = backvault_api::router(AppState {
            service: app.service.clone(),
        });
        app
    }

    pub fn with_auth(pool: PgPool, config: AuthConfig) -> Self {
        Self::with_auth_and_config(pool, config, backvault_service::Config::default())
    }

    fn with_auth_and_config(
        pool: PgPool,
        config: AuthConfig,
        service_config: backvault_service::Config,
    ) -> Self {
        let auth = Auth::new(config);
        let service = Service::new(pool.clone(), auth.clone(), service_config);
        let router = backvault_api::router(AppState {
            service: service.clone(),
        });
        Self {
            router,
            auth,
            pool,
            service,
        }
    }

    pub fn token(&self, role: Role, subscriptions: &[&str]) -> String {
        self.auth.mint(
            "tester",
            role,
            subscriptions.iter().map(|s| s.to_string()).collect(),
            None,
            chrono::Duration::hours(1),
        )
    }

    pub fn admin(&self) -> String {
        self.token(Role::Admin, &["*"])
    }

    /// A token of `role` for a person other than `tester` (approvals tell people apart).
    pub fn token_of(&self, subject: &str, role: Role) -> String {
        self.auth.mint(
            subject,
            role,
            vec!["*".to_owned()],
            None,
            chrono::Duration::hours(1),
        )
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Body>) -> Response {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(
                headers.get("content-type").map(|v| v.to_str().unwrap()),
                Some("application/problem+json"),
                "every error is problem+json: {status} {body}"
            );
        }
        Response {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(token), Some(body), &[])
            .await
    }

    /// Creates a vault as admin and returns its JSON.
    pub async fn vault(&self, name: &str, subscription: &str) -> Value {
        let res = self
            .post("/v1/vaults", &self.admin(), vault_body(name, subscription))
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
        res.body
    }
}

pub fn vault_body(name: &str, subscription: &str) -> Value {
    json!({"name": name, "subscription_id": subscription, "resource_group": "rg-sql", "region": "westeurope"})
}

pub fn weekly_spec() -> Value {
    json!({
        "time_zone": "Europe/Amsterdam",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
        "differential": {"days": ["wednesday"], "time": "22:00", "retention_days": 30},
        "log": {"frequency_minutes": 60, "retention_days": 30},
        "retention": {"weekly": {"weeks": 8}, "monthly": {"weeks_of_month": ["first"], "days_of_week": ["sunday"], "months": 12}},
        "compression": true
    })
}

/// Enrolls an agent for a VM named `name` in `sub-1`; returns `(vm_id, agent_token)`.
pub async fn enroll(app: &TestApp, name: &str) -> (String, String) {
    enroll_using(app, json!({"subscription_id": "sub-1"}), name).await
}

/// Enrolls with a token bound to the VM, which replaces the agent the VM may already have
/// (a reinstalled agent); returns `(vm_id, agent_token)`.
pub async fn enroll_bound(app: &TestApp, name: &str) -> (String, String) {
    let body = json!({"subscription_id": "sub-1", "vm_name": name, "resource_group": "rg-sql"});
    enroll_using(app, body, name).await
}

/// Mints an enrollment token as admin from `body`; returns `(id, token)`.
pub async fn enrollment_token(app: &TestApp, body: Value) -> (String, String) {
    let res = app.post("/v1/enrollment-tokens", &app.admin(), body).await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
    (
        res.body["id"].as_str().unwrap().to_owned(),
        res.body["token"].as_str().unwrap().to_owned(),
    )
}

async fn enroll_using(app: &TestApp, token_body: Value, name: &str) -> (String, String) {
    let (_, token) = enrollment_token(app, token_body).await;
    let res = app
        .post("/v1/agent/enroll", &token, json!({"facts": facts(name)}))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    (
        res.body["vm_id"].as_str().unwrap().to_owned(),
        res.body["agent_token"].as_str().unwrap().to_owned(),
    )
}

pub fn facts(name: &str) -> Value {
    json!({
        "name": name, "resource_group": "rg-sql", "subscription_id": "sub-1", "region": "westeurope",
        "deployment_model": "resource_manager", "agent_version": "1.0.0", "dotnet_version": "4.8",
        "sql_iaas_extension": true, "other_backup_product": false
    })
}

/// Dispatches an on-demand job as admin; returns its id.
pub async fn dispatch(app: &TestApp, vm_id: &str, kind: &str) -> String {
    let res = app
        .post(
            "/v1/jobs",
            &app.admin(),
            if kind == "discovery" {
                json!({"vm_id": vm_id, "kind": kind})
            } else {
                json!({"vm_id": vm_id, "kind": kind, "items": [{"instance": "MSSQLSERVER", "database": "sales"}]})
            },
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    res.body["id"].as_str().unwrap().to_owned()
}

/// Claims without waiting; returns the claimed jobs.
pub async fn claim(app: &TestApp, agent: &str, max_jobs: u32) -> Vec<Value> {
    let res = app
        .post(
            "/v1/agent/claim",
            agent,
            json!({"max_jobs": max_jobs, "wait_seconds": 0}),
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body["jobs"].as_array().unwrap().clone()
}

pub fn discovery_result() -> Value {
    json!({"kind": "discovery", "inventory": {"instances": [{"name": "MSSQLSERVER", "version": "2019"}],
           "databases": [{"instance": "MSSQLSERVER", "name": "sales", "recovery_model": "full", "size_bytes": 1024}]}})
}

/// Every job `GET /v1/jobs?{filter}` lists, newest first, across its pages.
pub async fn jobs(app: &TestApp, filter: &str) -> Vec<Value> {
    all_pages(app, &format!("/v1/jobs?{filter}"), 200).await
}

/// Every item a list endpoint (`path_and_query`) returns, across its pages of `limit`.
pub async fn all_pages(app: &TestApp, path_and_query: &str, limit: u32) -> Vec<Value> {
    let admin = app.admin();
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let res = app
            .get(&format!("{path_and_query}&limit={limit}{cursor}"), &admin)
            .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
        all.extend(res.body["items"].as_array().unwrap().iter().cloned());
        match res.body["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return all,
        }
    }
}

/// A job's status and the code of its error (empty without one).
pub async fn job_outcome(app: &TestApp, job: &str) -> (String, String) {
    let res = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    (
        res.body["status"].as_str().unwrap().to_owned(),
        res.body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// The databases a job's items name, sorted.
pub fn job_databases(job: &Value) -> Vec<String> {
    let mut names: Vec<String> = job["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["database"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Every protected item of the vault `GET .../protected-items?{filter}` lists, across its
/// pages.
pub async fn protected_items(app: &TestApp, vault: &str, filter: &str) -> Vec<Value> {
    all_pages(
        app,
        &format!("/v1/vaults/{vault}/protected-items?{filter}"),
        200,
    )
    .await
}

/// The recovery points of the protected item at `item_path` (`/v1/vaults/{v}/protected-
/// items/{i}`) and its restorable ranges, as the API lists them (oldest first).
pub async fn recovery_points(app: &TestApp, item_path: &str) -> Value {
    let res = app
        .get(&format!("{item_path}/recovery-points"), &app.admin())
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body
}

/// The vault's policy `name` as the API shows it (with its id and version).
pub async fn policy(app: &TestApp, vault: &str, name: &str) -> Value {
    let res = app
        .get(&format!("/v1/vaults/{vault}/policies/{name}"), &app.admin())
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    res.body
}

/// Replaces the spec of the vault's policy `name` (unconditionally); it must succeed.
pub async fn replace_policy(app: &TestApp, vault: &str, name: &str, spec: Value) {
    let res = app
        .call(
            Method::PUT,
            &format!("/v1/vaults/{vault}/policies/{name}"),
            Some(&app.admin()),
            Some(json!({"spec": spec})),
            &[],
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
}

/// What the scheduler knows of a protected item's chain, which the API shows only as its
/// health: whether its next backup must be a full, and whether a differential would heal
/// it (`needs_full`, `needs_differential`).
pub async fn chain_needs(app: &TestApp, item_id: &str) -> (bool, bool) {
    let item = backvault_store::protection::item_get(&app.pool, item_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("protected item {item_id}"));
    (item.needs_full, item.needs_differential)
}

/// A gauge or counter of `/metrics` without labels.
pub async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let res = app.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(res.status, StatusCode::OK);
    res.body
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// How long a test waits for an event before it fails.
const EVENT_WITHIN: Duration = Duration::from_secs(10);

/// Waits until `vms` VMs have a claim waiting in a long-poll on this replica
/// (`backvault_long_polls_waiting`).
pub async fn claims_waiting(app: &TestApp, vms: u32) {
    wait_until(
        EVENT_WITHIN,
        &format!("{vms} claims to wait in a long-poll"),
        || async move { metric(app, "backvault_long_polls_waiting").await == Some(vms.into()) },
    )
    .await;
}

/// Waits until a request other than this helper waits in a long-poll for the job
/// (`GET /v1/jobs/{id}?wait=`). The replica's notifier holds one registration per waiting
/// request, and nothing else shows a waiting job long-poll (the gauge counts claims).
pub async fn job_waited_on(app: &TestApp, job: &str) {
    let id: uuid::Uuid = job.parse().unwrap();
    let registration = app.service.notifier.job(id);
    let registration = &registration;
    wait_until(
        EVENT_WITHIN,
        &format!("a long-poll to wait for job {job}"),
        // References: the registration map's, this helper's, and one per waiting request.
        || async move { std::sync::Arc::strong_count(&registration.notify) > 2 },
    )
    .await;
}

/// Waits until the replica's notification listener listens (it has read the token deny
/// list, which it does once `LISTEN` is in place), so that the replica learns of what
/// other replicas do by notification from now on.
pub async fn listening(app: &TestApp) {
    wait_until(
        EVENT_WITHIN,
        "the replica's notification listener to listen",
        || async move { app.service.notifier.revoked(uuid::Uuid::nil()).is_some() },
    )
    .await;
}
