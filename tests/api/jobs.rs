use axum::http::{Method, StatusCode};
use backvault_service::Role;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestApp, claim, discovery_result, dispatch, enroll, job_waited_on, sql};

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn cancel_queued_and_running_jobs(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let queued = dispatch(&app, &vm, "backup_full").await;
    let res = app
        .call(
            Method::POST,
            &format!("/v1/jobs/{queued}/cancel"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (res.status, res.body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelled"))
    );
    assert!(
        claim(&app, &agent, 5).await.is_empty(),
        "a cancelled job is never claimed"
    );

    let running = dispatch(&app, &vm, "backup_full").await;
    let lease = claim(&app, &agent, 5).await[0]["lease"].as_i64().unwrap();
    let res = app
        .call(
            Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(res.body["status"], "in_progress");
    assert_eq!(res.body["cancel_requested"], true);
    let hb = app
        .post(
            "/v1/agent/heartbeat",
            &agent,
            json!({"jobs": [{"job_id": running, "lease": lease}]}),
        )
        .await;
    assert_eq!(hb.body["cancel_requested"], json!([running]));
    let job_hb = app
        .post(
            &format!("/v1/agent/jobs/{running}/heartbeat"),
            &agent,
            json!({"lease": lease}),
        )
        .await;
    assert_eq!(job_hb.body["cancel_requested"], true);
    let stopped = app
        .post(
            &format!("/v1/agent/jobs/{running}/fail"),
            &agent,
            json!({"lease": lease, "code": "JobCancelled", "message": "stopped", "retryable": false}),
        )
        .await;
    assert_eq!(stopped.body["status"], "cancelled");
    let again = app
        .call(
            Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "job_finished")
    );
    let reader = app.token(Role::Reader, &["*"]);
    let denied = app
        .call(
            Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            Some(&reader),
            None,
            &[],
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn list_filters_and_pages(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm_a, agent_a) = enroll(&app, "vm-a").await;
    let (vm_b, _) = enroll(&app, "vm-b").await;
    for _ in 0..3 {
        dispatch(&app, &vm_a, "backup_log").await;
    }
    dispatch(&app, &vm_a, "discovery").await;
    dispatch(&app, &vm_b, "backup_log").await;
    claim(&app, &agent_a, 1).await;
    let admin = app.admin();
    let count = |path: String| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.get(&path, &admin).await.body["items"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("/v1/jobs".into()).await, 5);
    assert_eq!(count(format!("/v1/jobs?vm_id={vm_a}")).await, 4);
    assert_eq!(count("/v1/jobs?kind=backup_log".into()).await, 4);
    assert_eq!(count("/v1/jobs?status=in_progress".into()).await, 1);
    assert_eq!(
        count(
            "/v1/jobs?created_after=2000-01-01T00:00:00Z&created_before=2000-01-02T00:00:00Z"
                .into()
        )
        .await,
        0
    );
    let bad = app.get("/v1/jobs?status=sleeping", &admin).await;
    assert_eq!(bad.code(), "invalid_query");

    let mut seen = std::collections::BTreeSet::new();
    let mut path = "/v1/jobs?limit=2".to_owned();
    loop {
        let page = app.get(&path, &admin).await;
        for j in page.body["items"].as_array().unwrap() {
            assert!(seen.insert(j["id"].as_str().unwrap().to_owned()));
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/jobs?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    // A cursor is a position even when no job has its id: the UUIDv7's time places it.
    let after_all = uuid::Uuid::now_v7();
    assert_eq!(count(format!("/v1/jobs?cursor={after_all}")).await, 5);
    let in_2001 = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        1_000_000_000,
        0,
    ));
    assert_eq!(count(format!("/v1/jobs?cursor={in_2001}")).await, 0);

    let other = app.token(Role::Reader, &["sub-9"]);
    assert_eq!(
        app.get("/v1/jobs", &other).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let job = dispatch(&app, &vm_b, "discovery").await;
    assert_eq!(
        app.get(&format!("/v1/jobs/{job}"), &other).await.status,
        StatusCode::NOT_FOUND
    );
}

/// A `GET` of the job that waits up to 30 s for a change: how long it took, and its answer.
fn wait_for_change(
    app: &std::sync::Arc<TestApp>,
    job: &str,
) -> tokio::task::JoinHandle<(std::time::Duration, crate::helpers::Response)> {
    let (app, job) = (app.clone(), job.to_owned());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let res = app
            .get(&format!("/v1/jobs/{job}?wait=30s"), &app.admin())
            .await;
        (started.elapsed(), res)
    })
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn get_waits_for_a_change(pool: PgPool) {
    let app = std::sync::Arc::new(TestApp::new(pool));
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "discovery").await;
    let waiter = wait_for_change(&app, &job);
    // The GET waits for the job, still queued, when the agent claims it.
    job_waited_on(&app, &job).await;
    assert!(!waiter.is_finished(), "the job has not changed yet");
    let claimed = claim(&app, &agent, 1).await;
    let (elapsed, res) = waiter.await.unwrap();
    assert_eq!(res.body["status"], "in_progress");
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");

    let short = app
        .get(&format!("/v1/jobs/{job}?wait=1s"), &app.admin())
        .await;
    assert_eq!(
        short.body["status"], "in_progress",
        "no change: answered when the wait ran out"
    );
    let bad = app
        .get(&format!("/v1/jobs/{job}?wait=2h"), &app.admin())
        .await;
    assert_eq!(bad.code(), "invalid_wait");

    // A completion wakes a waiter too (its notification is sent after the commit).
    let waiter = wait_for_change(&app, &job);
    job_waited_on(&app, &job).await;
    let done = app
        .post(
            &format!("/v1/agent/jobs/{job}/complete"),
            &agent,
            json!({"lease": claimed[0]["lease"], "result": discovery_result()}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let (elapsed, res) = waiter.await.unwrap();
    assert_eq!(res.body["status"], "completed");
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn dispatch_checks_the_vm_and_item_limit(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, _) = enroll(&app, "sqlvm-01").await;
    let items: Vec<_> = (0..51)
        .map(|i| json!({"instance": "I", "database": format!("db{i}")}))
        .collect();
    let res = app
        .post(
            "/v1/jobs",
            &app.admin(),
            json!({"vm_id": vm, "kind": "backup_full", "items": items}),
        )
        .await;
    assert_eq!(
        res.violations(),
        [("/items".to_owned(), "too_many_items".to_owned())]
    );
    let missing = app
        .post(
            "/v1/jobs",
            &app.admin(),
            json!({"vm_id": "0b9d2c3e-0000-4000-8000-000000000000", "kind": "discovery"}),
        )
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "vm_not_found")
    );
    let ok = app
        .post(
            "/v1/jobs",
            &app.admin(),
            json!({"vm_id": vm, "kind": "discovery"}),
        )
        .await;
    assert_eq!(
        ok.header("location"),
        format!("/v1/jobs/{}", ok.body["id"].as_str().unwrap())
    );
    let too_many_in_db = sql::insert_job_of_51_items(&app.pool, &vm).await;
    assert!(
        too_many_in_db.is_err(),
        "the database refuses more than 50 items too"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn metrics_report_the_queue(pool: PgPool) {
    let app = TestApp::new(pool);
    let (vm, _) = enroll(&app, "sqlvm-01").await;
    dispatch(&app, &vm, "backup_log").await;
    let res = app.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(res.status, StatusCode::OK);
    let text = res.body.as_str().unwrap();
    assert!(
        text.contains("backvault_queue_pending_jobs{kind=\"backup_log\"} 1"),
        "{text}"
    );
    assert!(text.contains("backvault_http_request_duration_seconds"));
    assert!(text.contains("backvault_jobs_claimed_total"));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn old_finished_jobs_are_pruned(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, _) = enroll(&app, "sqlvm-01").await;
    let old = dispatch(&app, &vm, "discovery").await;
    let fresh = dispatch(&app, &vm, "discovery").await;
    for job in [&old, &fresh] {
        app.call(
            Method::POST,
            &format!("/v1/jobs/{job}/cancel"),
            Some(&app.admin()),
            None,
            &[],
        )
        .await;
    }
    sql::forge_finished_ago(&pool, &old, chrono::Duration::days(91)).await;
    let pruned = app.service.prune_history().await.unwrap();
    assert_eq!(pruned, 1);
    assert_eq!(
        app.get(&format!("/v1/jobs/{old}"), &app.admin())
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{fresh}"), &app.admin())
            .await
            .status,
        StatusCode::OK
    );
}

/// A claim writes only the queue row: a running job's status, attempts, start and running
/// attempt are read from it, and its history and attempt row are written when the attempt
/// ends, through a retry and a second attempt.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_running_job_is_seen_from_its_queue_row_until_its_attempt_ends(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let admin = app.admin();
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "discovery").await;
    let waiting = dispatch(&app, &vm, "discovery").await;
    let first = claim(&app, &agent, 1).await;
    assert_eq!(first[0]["job_id"], job.as_str());
    let lease = first[0]["lease"].as_i64().unwrap();

    let running = app.get(&format!("/v1/jobs/{job}"), &admin).await.body;
    assert_eq!(running["status"], "in_progress");
    assert_eq!(running["attempts"], 1);
    let started = running["started_at"].as_str().expect("started").to_owned();
    let history = running["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["lease"], lease);
    assert_eq!(history[0]["started_at"], started.as_str());
    assert_eq!(history[0]["outcome"], serde_json::Value::Null);
    let listed = |status: &'static str| {
        let (app, admin) = (&app, admin.clone());
        async move {
            let page = app.get(&format!("/v1/jobs?status={status}"), &admin).await;
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| {
                    assert_eq!(j["status"], status);
                    j["id"].as_str().unwrap().to_owned()
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("in_progress").await, [job.as_str()]);
    assert_eq!(listed("queued").await, [waiting.as_str()]);

    let failed = app
        .post(
            &format!("/v1/agent/jobs/{job}/fail"),
            &agent,
            json!({"lease": lease, "code": "UserErrorOpeningSQLConnection", "message": "cannot connect", "retryable": true}),
        )
        .await;
    assert_eq!(failed.status, StatusCode::OK, "{}", failed.body);
    let retried = app.get(&format!("/v1/jobs/{job}"), &admin).await.body;
    assert_eq!(retried["status"], "queued");
    assert_eq!(retried["attempts"], 1);
    assert_eq!(retried["started_at"], started.as_str());
    assert_eq!(retried["attempt_history"][0]["outcome"], "failed");
    assert_eq!(
        retried["attempt_history"][0]["started_at"],
        started.as_str()
    );
    assert_eq!(listed("in_progress").await, Vec::<String>::new());

    sql::forge_retries_due(&pool).await;
    let second = claim(&app, &agent, 2).await;
    let again = second
        .iter()
        .find(|c| c["job_id"] == job.as_str())
        .expect("the retried job is claimed again");
    assert_eq!(again["attempt"], 2);
    let mut running_now = listed("in_progress").await;
    running_now.sort();
    let mut both = vec![job.clone(), waiting.clone()];
    both.sort();
    assert_eq!(running_now, both);
    let page = app
        .get("/v1/jobs?status=in_progress&limit=1", &admin)
        .await
        .body;
    let cursor = page["next_cursor"].as_str().expect("a second page");
    let rest = app
        .get(
            &format!("/v1/jobs?status=in_progress&limit=1&cursor={cursor}"),
            &admin,
        )
        .await
        .body;
    assert_ne!(page["items"][0]["id"], rest["items"][0]["id"]);
    assert_eq!(rest["next_cursor"], serde_json::Value::Null);

    let ended = app
        .post(
            &format!("/v1/agent/jobs/{job}/fail"),
            &agent,
            json!({"lease": again["lease"], "code": "UserErrorOpeningSQLConnection", "message": "still down", "retryable": false}),
        )
        .await;
    assert_eq!(ended.status, StatusCode::OK, "{}", ended.body);
    let done = app.get(&format!("/v1/jobs/{job}"), &admin).await.body;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["started_at"], started.as_str());
    let outcomes: Vec<_> = done["attempt_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["attempt"].clone(), a["outcome"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [(json!(1), json!("failed")), (json!(2), json!("failed"))]
    );
    assert_eq!(
        sql::attempt_outcomes(&pool, &job).await,
        ["failed", "failed"]
    );
}
