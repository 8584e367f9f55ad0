use axum::http::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{
    TestApp, claim, claims_waiting, discovery_result, dispatch, enroll, enroll_bound, facts,
    listening, sql, wait_until,
};

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn enrollment_upserts_the_vm_and_revokes_older_tokens(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, first) = enroll(&app, "sqlvm-01").await;
    let got = app.get(&format!("/v1/vms/{vm}"), &app.admin()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["name"], "sqlvm-01");
    assert_eq!(got.body["agent_installed"], true);
    assert_eq!(got.body["dotnet_version"], "4.8");

    let hb = app.post("/v1/agent/heartbeat", &first, json!({})).await;
    assert_eq!(hb.status, StatusCode::OK, "{}", hb.body);

    // The same VM enrolls again with a token bound to it (a reinstalled agent): same id,
    // the old token is dead.
    let (again, second) = enroll_bound(&app, "SQLVM-01").await;
    assert_eq!(again, vm);
    let stale = app.post("/v1/agent/heartbeat", &first, json!({})).await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::UNAUTHORIZED, "token_revoked")
    );
    assert_eq!(
        app.post("/v1/agent/heartbeat", &second, json!({}))
            .await
            .status,
        StatusCode::OK
    );

    // Removing the VM revokes the current token too.
    let del = app
        .call(
            Method::DELETE,
            &format!("/v1/vms/{vm}"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let gone = app.post("/v1/agent/heartbeat", &second, json!({})).await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn enrollment_needs_an_enrollment_token_for_the_subscription(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin_enroll = app
        .post(
            "/v1/agent/enroll",
            &app.admin(),
            json!({"facts": facts("x")}),
        )
        .await;
    assert_eq!(
        (admin_enroll.status, admin_enroll.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let other = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-2"}),
        )
        .await;
    let token = other.body["token"].as_str().unwrap();
    let wrong_sub = app
        .post("/v1/agent/enroll", token, json!({"facts": facts("x")}))
        .await;
    assert_eq!(
        (wrong_sub.status, wrong_sub.code()),
        (StatusCode::FORBIDDEN, "subscription_forbidden")
    );
    let mut bad = facts("");
    bad["resource_group"] = json!("a/b");
    let mine = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1"}),
        )
        .await;
    let invalid = app
        .post(
            "/v1/agent/enroll",
            mine.body["token"].as_str().unwrap(),
            json!({"facts": bad}),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(invalid.violations().len(), 2);
    let reader = app.token(backvault_service::Role::Reader, &["sub-1"]);
    let denied = app
        .post(
            "/v1/enrollment-tokens",
            &reader,
            json!({"subscription_id": "sub-1"}),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let ttl = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1", "ttl_seconds": 10}),
        )
        .await;
    assert_eq!(ttl.violations()[0].1, "ttl_out_of_range");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn claim_heartbeat_complete_and_idempotent_repeat(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "discovery").await;
    let claimed = claim(&app, &agent, 5).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0]["job_id"], job.as_str());
    assert_eq!(claimed[0]["kind"], "discovery");
    assert_eq!(claimed[0]["attempt"], 1);
    assert_eq!(
        claimed[0]["items"],
        json!([]),
        "discovery names no database"
    );
    let lease = claimed[0]["lease"].as_i64().unwrap();

    let running = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
    assert_eq!(running.body["status"], "in_progress");

    let hb = app
        .post(
            &format!("/v1/agent/jobs/{job}/heartbeat"),
            &agent,
            json!({"lease": lease, "progress": {"percent": 50}}),
        )
        .await;
    assert_eq!(hb.status, StatusCode::OK, "{}", hb.body);
    assert_eq!(hb.body["cancel_requested"], false);
    let progress = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
    assert_eq!(progress.body["progress"]["percent"], 50);

    let all = app
        .post(
            "/v1/agent/heartbeat",
            &agent,
            json!({"jobs": [{"job_id": job, "lease": lease}, {"job_id": job, "lease": lease + 9}]}),
        )
        .await;
    assert_eq!(all.body["extended"], json!([job]));

    let complete = json!({"lease": lease, "result": discovery_result()});
    let done = app
        .post(
            &format!("/v1/agent/jobs/{job}/complete"),
            &agent,
            complete.clone(),
        )
        .await;
    assert_eq!(
        (done.status, done.body["status"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    let again = app
        .post(&format!("/v1/agent/jobs/{job}/complete"), &agent, complete)
        .await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    let different = app
        .post(
            &format!("/v1/agent/jobs/{job}/complete"),
            &agent,
            json!({"lease": lease, "result": {"kind": "discovery", "inventory": {"instances": [], "databases": []}}}),
        )
        .await;
    assert_eq!(
        (different.status, different.code()),
        (StatusCode::CONFLICT, "lease_lost")
    );

    let finished = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
    assert_eq!(finished.body["status"], "completed");
    assert_eq!(
        finished.body["result"]["inventory"]["databases"][0]["name"],
        "sales"
    );
    assert_eq!(finished.body["attempt_history"][0]["outcome"], "completed");
    assert_eq!(
        sql::queue_len(&app.pool).await,
        0,
        "finished jobs leave the hot queue"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn agents_reach_only_their_own_vms_jobs(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm_a, agent_a) = enroll(&app, "vm-a").await;
    let (_vm_b, agent_b) = enroll(&app, "vm-b").await;
    let job = dispatch(&app, &vm_a, "backup_full").await;
    assert!(
        claim(&app, &agent_b, 10).await.is_empty(),
        "B never sees A's job"
    );
    let claimed = claim(&app, &agent_a, 10).await;
    let lease = claimed[0]["lease"].as_i64().unwrap();
    for action in ["heartbeat", "complete", "fail"] {
        let body = match action {
            "heartbeat" => json!({"lease": lease}),
            "complete" => {
                json!({"lease": lease, "result": {"kind": "backup", "recovery_points": []}})
            }
            _ => json!({"lease": lease, "code": "X", "message": "x", "retryable": false}),
        };
        let res = app
            .post(&format!("/v1/agent/jobs/{job}/{action}"), &agent_b, body)
            .await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::NOT_FOUND, "job_not_found"),
            "{action}"
        );
    }
    let missing = app
        .post(
            "/v1/agent/jobs/0b9d2c3e-0000-4000-8000-000000000000/heartbeat",
            &agent_a,
            json!({"lease": 1}),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let user = app.post("/v1/agent/claim", &app.admin(), json!({})).await;
    assert_eq!(user.status, StatusCode::FORBIDDEN);
    let bad = app
        .post("/v1/agent/claim", &agent_a, json!({"max_jobs": 0}))
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (StatusCode::BAD_REQUEST, "invalid_claim")
    );
    let mismatch = app
        .post(
            &format!("/v1/agent/jobs/{job}/complete"),
            &agent_a,
            json!({"lease": lease, "result": discovery_result()}),
        )
        .await;
    assert_eq!(
        (mismatch.status, mismatch.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "result_kind_mismatch")
    );
}

/// A lease that runs out returns the job with the attempt counted; the agent that lost it
/// gets 409; after the last attempt the job fails with a stable code.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn expired_leases_are_retried_then_fail(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "backup_log").await;
    let mut leases = Vec::new();
    for attempt in 1..=3 {
        let claimed = claim(&app, &agent, 1).await;
        assert_eq!(claimed.len(), 1, "attempt {attempt}");
        assert_eq!(claimed[0]["attempt"], attempt);
        leases.push(claimed[0]["lease"].as_i64().unwrap());
        sql::forge_leases_expired(&pool).await;
        let rescued = app.service.rescue_expired_leases().await.unwrap();
        let queued = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
        if attempt < 3 {
            assert_eq!((rescued.retried, rescued.failed), (1, 0));
            assert_eq!(queued.body["status"], "queued");
            assert_eq!(queued.body["error"]["code"], "JobLeaseExpired");
            assert!(queued.body["next_attempt_at"].is_string());
            sql::forge_retries_due(&pool).await;
        } else {
            assert_eq!((rescued.retried, rescued.failed), (0, 1));
            assert_eq!(queued.body["status"], "failed");
            assert_eq!(queued.body["error"]["code"], "JobAttemptsExhausted");
            let outcomes: Vec<_> = queued.body["attempt_history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["outcome"].clone())
                .collect();
            assert_eq!(outcomes, vec![json!("lease_expired"); 3]);
        }
    }
    let late = app
        .post(
            &format!("/v1/agent/jobs/{job}/complete"),
            &agent,
            json!({"lease": leases[0], "result": {"kind": "backup", "recovery_points": []}}),
        )
        .await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::CONFLICT, "lease_lost")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn retryable_failures_back_off_and_grow(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "backup_full").await;
    let mut delays = Vec::new();
    for _ in 0..2 {
        let claimed = claim(&app, &agent, 1).await;
        let lease = claimed[0]["lease"].as_i64().unwrap();
        let before = chrono::Utc::now();
        let res = app
            .post(
                &format!("/v1/agent/jobs/{job}/fail"),
                &agent,
                json!({"lease": lease, "code": "UserErrorOpeningSQLConnection", "message": "cannot connect", "retryable": true}),
            )
            .await;
        assert_eq!(res.body["status"], "queued", "{}", res.body);
        let retry_at: chrono::DateTime<chrono::Utc> =
            res.body["retry_at"].as_str().unwrap().parse().unwrap();
        delays.push((retry_at - before).num_milliseconds());
        assert!(
            claim(&app, &agent, 1).await.is_empty(),
            "not claimable while backing off"
        );
        sql::forge_retries_due(&pool).await;
    }
    // 2 s then 4 s, each with jitter in [0.5, 1.5).
    assert!((1000..3100).contains(&delays[0]), "{delays:?}");
    assert!((2000..6100).contains(&delays[1]), "{delays:?}");
    let claimed = claim(&app, &agent, 1).await;
    let lease = claimed[0]["lease"].as_i64().unwrap();
    let last = app
        .post(
            &format!("/v1/agent/jobs/{job}/fail"),
            &agent,
            json!({"lease": lease, "code": "UserErrorOpeningSQLConnection", "message": "still down", "retryable": true}),
        )
        .await;
    assert_eq!(
        last.body["status"], "failed",
        "the third attempt was the last"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn non_retryable_failures_end_the_job_at_once(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "discovery").await;
    let lease = claim(&app, &agent, 1).await[0]["lease"].as_i64().unwrap();
    let res = app
        .post(
            &format!("/v1/agent/jobs/{job}/fail"),
            &agent,
            json!({"lease": lease, "code": "UserErrorSQLNoSysAdminMembership", "message": "grant sysadmin", "retryable": false}),
        )
        .await;
    assert_eq!(res.body["status"], "failed");
    let got = app.get(&format!("/v1/jobs/{job}"), &app.admin()).await;
    assert_eq!(
        got.body["error"]["code"],
        "UserErrorSQLNoSysAdminMembership"
    );
    assert_eq!(got.body["attempts"], 1);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn per_vm_caps_bound_running_jobs(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, agent) = enroll(&app, "busy-vm").await;
    for _ in 0..25 {
        dispatch(&app, &vm, "backup_log").await;
    }
    // Restores are not dispatched by hand (their endpoint checks the target): queue them
    // as the restore endpoint does.
    // Each to a database of its own: one restore per target at a time.
    let restores: Vec<_> = (0..17)
        .map(|i| backvault_store::jobs::NewJob {
            id: uuid::Uuid::now_v7(),
            vm_id: vm.parse().unwrap(),
            subscription_id: "sub-1".into(),
            vault_id: None,
            kind: backvault_domain::jobs::JobKind::Restore,
            priority: 1,
            items: json!([{"instance": "MSSQLSERVER", "database": format!("sales_copy_{i}")}]),
            payload: json!({"target_database": format!("sales_copy_{i}")}),
            max_attempts: 3,
            run_at: chrono::Utc::now(),
            availability_group_id: None,
        })
        .collect();
    let mut conn = app.pool.acquire().await.unwrap();
    backvault_store::jobs::jobs_enqueue(&mut conn, &restores)
        .await
        .unwrap();
    let first = claim(&app, &agent, 50).await;
    let restores = first.iter().filter(|j| j["kind"] == "restore").count();
    let backups = first.len() - restores;
    assert_eq!(first.len(), 35);
    assert_eq!((backups, restores), (20, 15));
    assert!(claim(&app, &agent, 50).await.is_empty(), "caps reached");
    let one = &first.iter().find(|j| j["kind"] == "backup_log").unwrap();
    let done = app
        .post(
            &format!(
                "/v1/agent/jobs/{}/complete",
                one["job_id"].as_str().unwrap()
            ),
            &agent,
            json!({"lease": one["lease"], "result": {"kind": "backup", "recovery_points": []}}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK);
    let next = claim(&app, &agent, 50).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0]["kind"], "backup_log");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn long_poll_wakes_on_enqueue(pool: PgPool) {
    let app = std::sync::Arc::new(TestApp::new(pool));
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let waiting = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let res = app
                .post(
                    "/v1/agent/claim",
                    &agent,
                    json!({"max_jobs": 1, "wait_seconds": 30}),
                )
                .await;
            (started.elapsed(), res)
        })
    };
    // The claim waits in its long-poll before the job is enqueued.
    claims_waiting(&app, 1).await;
    assert!(!waiting.is_finished(), "nothing to claim yet");
    let job = dispatch(&app, &vm, "discovery").await;
    let (elapsed, res) = waiting.await.unwrap();
    assert_eq!(res.body["jobs"][0]["job_id"], job.as_str());
    // The fallback re-check is 10 s; only the notification explains an answer this soon.
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn inventory_automation_upserts_vms_and_lists_filter(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let vm = json!({"name": "sqlvm-09", "resource_group": "rg-a", "subscription_id": "sub-1", "region": "westeurope",
                    "deployment_model": "classic"});
    let created = app
        .call(Method::PUT, "/v1/vms", Some(&admin), Some(vm.clone()), &[])
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["agent_installed"], false);
    let mut moved = vm.clone();
    moved["region"] = json!("northeurope");
    moved["name"] = json!("SQLVM-09");
    let updated = app
        .call(Method::PUT, "/v1/vms", Some(&admin), Some(moved), &[])
        .await;
    assert_eq!(
        (updated.status, &updated.body["id"]),
        (StatusCode::OK, &created.body["id"])
    );
    assert_eq!(updated.body["region"], "northeurope");
    let mut bad = vm.clone();
    bad["resource_group"] = json!("");
    let invalid = app
        .call(Method::PUT, "/v1/vms", Some(&admin), Some(bad), &[])
        .await;
    assert_eq!(
        invalid.violations(),
        [(
            "/resource_group".to_owned(),
            "identifier_invalid".to_owned()
        )]
    );
    let reader = app.token(backvault_service::Role::Reader, &["*"]);
    assert_eq!(
        app.call(Method::PUT, "/v1/vms", Some(&reader), Some(vm), &[])
            .await
            .status,
        StatusCode::FORBIDDEN
    );

    enroll(&app, "sqlvm-01").await;
    let count = |q: &'static str| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.get(&format!("/v1/vms?{q}"), &admin).await.body["items"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("").await, 2);
    assert_eq!(count("resource_group=RG-A").await, 1);
    assert_eq!(count("region=westeurope").await, 1);
    assert_eq!(count("registered=false").await, 2);
    assert_eq!(count("registered=true").await, 0);
    assert_eq!(count("subscription_id=sub-2").await, 0);
}

/// A replica that cached an agent's token generation learns of a re-enrollment on another
/// replica through the notification channel.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn revocation_reaches_other_replicas(pool: PgPool) {
    let replica_a = TestApp::new(pool.clone());
    let replica_b = TestApp::new(pool);
    let (_, old_token) = enroll(&replica_a, "sqlvm-01").await;
    // B listens before the re-enrollment, so that it can only learn of it by notification.
    listening(&replica_b).await;
    assert_eq!(
        replica_b
            .post("/v1/agent/heartbeat", &old_token, json!({}))
            .await
            .status,
        StatusCode::OK
    );
    enroll_bound(&replica_a, "sqlvm-01").await;
    let (replica_b, old_token) = (&replica_b, &old_token);
    wait_until(
        std::time::Duration::from_secs(2),
        "replica B to refuse the replaced token (within 2 s, well before the 5 s cache expiry)",
        || async move {
            replica_b
                .post("/v1/agent/heartbeat", old_token, json!({}))
                .await
                .status
                == StatusCode::UNAUTHORIZED
        },
    )
    .await;
}
