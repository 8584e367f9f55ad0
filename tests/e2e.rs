//! End to end: the real `backvault` binary, started as an operator would, driven over HTTP.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Api, BIN, Server, TestDb, migrate, serve_refused, vm_facts, wait_until};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn dev_server_creates_its_database_serves_the_walkthrough_and_shuts_down_gracefully() {
    let db = TestDb::new();
    // Debug logs of the HTTP layer, to see the in-flight request start.
    let (mut server, log) = Server::start_logged(
        &db,
        "127.0.0.1:0",
        &["--dev"],
        &[("BACKVAULT_LOG", "info,sqlx=warn,tower_http=debug")],
    );
    let token = server.token.clone().expect("--dev prints an admin token");
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", server.base);

    assert_eq!(http.get(url("/readyz")).send().await.unwrap().status(), 200);

    let vault: Value = http
        .post(url("/v1/vaults"))
        .bearer_auth(&token)
        .json(&json!({"name": "e2e-vault", "subscription_id": "sub-1", "resource_group": "rg-sql", "region": "westeurope"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let policies = url(&format!(
        "/v1/vaults/{}/policies",
        vault["id"].as_str().unwrap()
    ));
    let spec = json!({
        "time_zone": "Europe/Amsterdam",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "22:00"},
        "differential": {"days": ["wednesday"], "time": "22:00", "retention_days": 30},
        "log": {"frequency_minutes": 30, "retention_days": 14},
        "retention": {"weekly": {"weeks": 8}}
    });
    let created = http
        .post(&policies)
        .bearer_auth(&token)
        .json(&json!({"name": "Gold", "spec": spec}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let list: Value = http
        .get(&policies)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let preview: Value = http
        .post(url("/v1/policies/preview?count=2"))
        .bearer_auth(&token)
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(preview["full"].as_array().unwrap().len(), 2);
    assert_eq!(preview["max_gap_minutes"], 30);

    // A request in flight when SIGTERM arrives still gets its answer: send the headers and
    // half the body, signal once the server is handling the request, then send the rest
    // once it is shutting down.
    let body = json!({"name": "late-vault", "subscription_id": "sub-1", "resource_group": "rg", "region": "westeurope"}).to_string();
    let addr = server.addr().to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request_id = "e2e-in-flight-at-sigterm";
    let head = format!(
        "POST /v1/vaults HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\nx-request-id: {request_id}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(body.len() / 2);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    log.awaited(&["started processing request", request_id])
        .await;
    server.signal_terminate();
    log.awaited(&["shutting down"]).await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let status = server.terminate();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn configured_key_token_command_and_refusal_without_key() {
    let db = TestDb::new();
    let no_key = serve_refused(&db, &[], &[]);
    assert!(!no_key.status.success());
    let stderr = String::from_utf8(no_key.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("BACKVAULT_JWT_SECRET"), "{stderr}");

    migrate(&db);

    let secret = "an-e2e-secret-that-is-long-enough-0123";
    let env = [
        ("BACKVAULT_JWT_SECRET", secret),
        ("BACKVAULT_JWT_ISSUER", "backvault-e2e"),
    ];
    let mint = |role: &str| common::mint_token(role, "sub-1", "10m", &env);
    let admin = mint("admin");
    let reader = mint("reader");
    let server = Server::start(&db, &[], &env);
    assert!(server.token.is_none(), "no token is printed outside --dev");
    let http = reqwest::Client::new();
    let vaults = format!("{}/v1/vaults", server.base);
    let body = json!({"name": "keyed", "subscription_id": "sub-1", "resource_group": "rg", "region": "westeurope"});
    assert_eq!(
        http.post(&vaults)
            .bearer_auth(&reader)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        http.post(&vaults)
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let list: Value = http
        .get(&vaults)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"][0]["name"], "keyed");
    assert_eq!(http.get(&vaults).send().await.unwrap().status(), 401);
}

/// A shutdown does not wait out long-polls: they answer (empty) and the server exits.
#[tokio::test]
async fn shutdown_ends_waiting_long_polls() {
    let db = TestDb::new();
    let mut server = Server::start(&db, &["--dev"], &[]);
    let api = server.dev_api();
    let enrollment = api.enrollment_token("sub-1").await;
    let agent = api.with_token(&enrollment).enroll_agent("vm-1").await;
    let poll = tokio::spawn(async move {
        agent
            .post(
                "/v1/agent/claim",
                json!({"max_jobs": 1, "wait_seconds": 60}),
            )
            .await
    });
    // The claim waits in its long-poll when the signal comes.
    let api = &api;
    wait_until(
        Duration::from_secs(10),
        "the claim to wait in a long-poll",
        || async move { api.metric("backvault_long_polls_waiting").await == Some(1.0) },
    )
    .await;
    assert!(!poll.is_finished(), "nothing to claim: the claim waits");
    let started = std::time::Instant::now();
    let status = server.terminate();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (code, body) = poll.await.unwrap();
    assert_eq!(
        (code, body["jobs"].as_array().map(Vec::len)),
        (200, Some(0))
    );
}

/// `backvault token` as an operator runs it: the API's lifetime caps, one subscription and a
/// database record for enrollment tokens, no agent tokens, and a clear error (exit 2, no
/// panic) for anything out of bounds.
#[tokio::test]
async fn token_command_caps_lifetimes_and_records_enrollment_tokens() {
    let db = TestDb::new();
    let secret = "an-e2e-secret-that-is-long-enough-0123";
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("token")
            .args(args)
            .env("BACKVAULT_JWT_SECRET", secret)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap()
    };
    for (args, says) in [
        (
            &["--role", "admin", "--subscription", "*", "--ttl", "31d"][..],
            "30d",
        ),
        (
            &[
                "--role",
                "reader",
                "--subscription",
                "*",
                "--ttl",
                "500000y",
            ],
            "30d",
        ),
        (
            &[
                "--role",
                "admin",
                "--subscription",
                "*",
                "--ttl",
                "100000000000000y",
            ],
            "--ttl",
        ),
        (
            &[
                "--role",
                "enrollment",
                "--subscription",
                "sub-1",
                "--ttl",
                "25h",
            ],
            "24h",
        ),
        (&["--role", "enrollment", "--subscription", "*"], "'*'"),
        (
            &[
                "--role",
                "enrollment",
                "--subscription",
                "a",
                "--subscription",
                "b",
            ],
            "one --subscription",
        ),
        (
            &[
                "--role",
                "enrollment",
                "--subscription",
                "sub-1",
                "--max-uses",
                "101",
            ],
            "1 to 100",
        ),
        (&["--role", "agent", "--subscription", "sub-1"], "enrolling"),
        (
            &["--role", "admin", "--subscription", "*", "--max-uses", "2"],
            "enrollment tokens",
        ),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }

    migrate(&db);
    let minted = run(&[
        "--role",
        "enrollment",
        "--subscription",
        "sub-1",
        "--ttl",
        "24h",
        "--vm-name",
        "vm-1",
        "--resource-group",
        "rg",
    ]);
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let enrollment = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    assert!(
        String::from_utf8_lossy(&minted.stderr).contains("token id (jti)"),
        "the operator learns the id to revoke it by"
    );
    let admin = common::mint_token("admin", "*", "30d", &[("BACKVAULT_JWT_SECRET", secret)]);

    let server = Server::start(&db, &[], &[("BACKVAULT_JWT_SECRET", secret)]);
    let api = Api::new(&server.base, &admin);
    let (status, listed) = api.get("/v1/enrollment-tokens").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["items"][0]["created_by"], "backvault-cli");
    assert_eq!(listed["items"][0]["vm_name"], "vm-1");
    let facts = |name: &str| json!({"facts": vm_facts(name)});
    let agent = api.with_token(&enrollment);
    let (status, body) = agent.post("/v1/agent/enroll", facts("vm-2")).await;
    assert_eq!(
        (status, &body["code"]),
        (403, &json!("enrollment_token_vm_mismatch"))
    );
    let (status, body) = agent.post("/v1/agent/enroll", facts("vm-1")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = agent.post("/v1/agent/enroll", facts("vm-1")).await;
    assert_eq!(
        (status, &body["code"]),
        (401, &json!("enrollment_token_used"))
    );

    // A minted admin token can be revoked by its id.
    let doomed = common::mint_token("reader", "*", "1h", &[("BACKVAULT_JWT_SECRET", secret)]);
    let jti = {
        use base64::Engine;
        let payload = doomed.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["jti"].as_str().unwrap().to_owned()
    };
    assert_eq!(api.with_token(&doomed).get("/v1/vaults").await.0, 200);
    let (status, _) = api.post("/v1/tokens/revoke", json!({"jti": jti})).await;
    assert_eq!(status, 204);
    let (status, body) = api.with_token(&doomed).get("/v1/vaults").await;
    assert_eq!((status, &body["code"]), (401, &json!("token_revoked")));
}

/// `serve --dev` never runs with a real key, and its admin token goes to stderr, not into
/// the (shipped, kept) log stream. `Server::start` reads it there and checks the logs.
#[tokio::test]
async fn dev_mode_refuses_a_configured_key_and_prints_its_token_on_stderr() {
    let db = TestDb::new();
    let refused = serve_refused(
        &db,
        &["--dev"],
        &[(
            "BACKVAULT_JWT_SECRET",
            "an-e2e-secret-that-is-long-enough-0123",
        )],
    );
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(
        stderr.contains("--dev") && stderr.contains("BACKVAULT_JWT_SECRET"),
        "{stderr}"
    );
    assert!(refused.stdout.is_empty());

    let server = Server::start(&db, &["--dev"], &[]);
    assert!(server.token.is_some(), "the dev token, on stderr");
    let (status, _) = server.dev_api().get("/v1/vaults").await;
    assert_eq!(status, 200);
}

/// Rotating the key through the configuration: tokens of the previous key keep working
/// while it is listed in BACKVAULT_JWT_PREVIOUS_SECRETS, and stop once it is removed.
#[tokio::test]
async fn a_key_rotation_keeps_old_tokens_until_the_previous_key_is_removed() {
    let db = TestDb::new();
    let old = "the-old-e2e-secret-that-is-long-enough-01";
    let new = "the-new-e2e-secret-that-is-long-enough-02";
    let old_token = common::mint_token("reader", "*", "1h", &[("BACKVAULT_JWT_SECRET", old)]);
    let new_token = common::mint_token("reader", "*", "1h", &[("BACKVAULT_JWT_SECRET", new)]);
    let status_with = |server: &Server, token: &str| {
        let api = Api::new(&server.base, token);
        async move { api.get("/v1/vaults").await.0 }
    };
    let mut rotating = Server::start(
        &db,
        &[],
        &[
            ("BACKVAULT_JWT_SECRET", new),
            ("BACKVAULT_JWT_PREVIOUS_SECRETS", &format!("{old},")),
        ],
    );
    assert_eq!(status_with(&rotating, &old_token).await, 200);
    assert_eq!(status_with(&rotating, &new_token).await, 200);
    assert!(rotating.terminate().success());
    let rotated = Server::start(&db, &[], &[("BACKVAULT_JWT_SECRET", new)]);
    assert_eq!(status_with(&rotated, &old_token).await, 401);
    assert_eq!(status_with(&rotated, &new_token).await, 200);

    let short = serve_refused(
        &db,
        &[],
        &[
            ("BACKVAULT_JWT_SECRET", new),
            ("BACKVAULT_JWT_PREVIOUS_SECRETS", "too-short"),
        ],
    );
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("BACKVAULT_JWT_PREVIOUS_SECRETS"));
}

/// Requests hyper cannot parse — a 100k URI, a head past its buffer, a garbage request
/// line — are answered by hyper itself; the real server's connections turn those answers
/// into problem+json like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_requests_are_answered_in_problem_json() {
    let db = TestDb::new();
    let server = Server::start(&db, &["--dev"], &[]);
    let addr = server.addr().to_owned();
    let raw = |request: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            // The server may answer and close before it has read everything we send.
            let _ = stream.write_all(&request).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .expect("the server answers and closes");
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let long_uri = format!(
        "GET /v1/vaults?cursor={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100_000)
    );
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    for (request, status, code) in [
        (long_uri.into_bytes(), "414", "uri_too_long"),
        (big_header.into_bytes(), "431", "headers_too_large"),
        (
            b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
            "400",
            "malformed_request",
        ),
    ] {
        let answer = raw(request).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{head}"
        );
        let problem: Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["code"], code);
    }
    // The server is unharmed.
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
