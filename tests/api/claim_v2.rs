//! Version 2 of the claim (`POST /v2/agent/claim`): finished jobs reported in the claim
//! itself. Each report is recorded exactly once however many times and ways it arrives,
//! a stale lease is fenced off per report, and a report that is refused does not stop the
//! others in its batch.

use axum::http::StatusCode;
use chrono::Utc;
use futures_util::future::join_all;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{Response, TestApp, claim, dispatch, enroll, job_outcome, sql};
use crate::protection::db;
use crate::recovery::{protect, weekly_dst_policy};

async fn claim_v2(app: &TestApp, agent: &str, body: Value) -> Response {
    app.post("/v2/agent/claim", agent, body).await
}

fn empty_backup(job: &Value) -> Value {
    json!({"job_id": job["job_id"], "lease": job["lease"],
           "result": {"kind": "backup", "recovery_points": []}})
}

fn outcome_of(res: &Response, list: &str, i: usize) -> (Option<String>, Option<String>) {
    let o = &res.body[list][i];
    (
        o["status"].as_str().map(str::to_owned),
        o["refused"]["code"].as_str().map(str::to_owned),
    )
}

fn done() -> (Option<String>, Option<String>) {
    (Some("completed".into()), None)
}

fn refused(code: &str) -> (Option<String>, Option<String>) {
    (None, Some(code.into()))
}

/// One call reports a good completion, a result that does not fit its job, another VM's
/// job, a retryable failure and a final failure, and claims the next jobs: each report is
/// answered on its own and the good ones are recorded.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn reports_ride_on_the_claim_and_a_refused_one_stops_no_other(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let (other_vm, _) = enroll(&app, "sqlvm-02").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(dispatch(&app, &vm, "backup_full").await);
    }
    let foreign = dispatch(&app, &other_vm, "backup_full").await;
    let claimed = claim(&app, &agent, 4).await;
    assert_eq!(claimed.len(), 4);
    let next = dispatch(&app, &vm, "backup_log").await;

    let now = Utc::now();
    let misfit = json!({"job_id": claimed[1]["job_id"], "lease": claimed[1]["lease"],
        "result": {"kind": "backup", "recovery_points": [{
            "instance": "MSSQLSERVER", "database": "hr", "backup_type": "full",
            "started_at": now, "backup_time": now, "first_lsn": "100", "last_lsn": "105",
            "database_backup_lsn": "0", "size_bytes": 100}]}});
    let not_mine = json!({"job_id": foreign, "lease": 1,
                          "result": {"kind": "backup", "recovery_points": []}});
    let res = claim_v2(
        &app,
        &agent,
        json!({"max_jobs": 5, "wait_seconds": 0,
               "completions": [empty_backup(&claimed[0]), misfit, not_mine],
               "failures": [
                   {"job_id": claimed[2]["job_id"], "lease": claimed[2]["lease"],
                    "code": "UserErrorVssBusy", "message": "busy", "retryable": true},
                   {"job_id": claimed[3]["job_id"], "lease": claimed[3]["lease"],
                    "code": "UserErrorSQLNoSysAdminMembership", "message": "no", "retryable": false}]}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(outcome_of(&res, "completions", 0), done());
    assert_eq!(
        outcome_of(&res, "completions", 1),
        refused("validation_failed")
    );
    assert_eq!(res.body["completions"][1]["refused"]["status"], 422);
    assert_eq!(
        res.body["completions"][1]["refused"]["errors"][0]["code"],
        "point_not_in_job"
    );
    assert_eq!(outcome_of(&res, "completions", 2), refused("job_not_found"));
    assert_eq!(res.body["completions"][2]["job_id"], foreign.as_str());
    assert_eq!(
        outcome_of(&res, "failures", 0),
        (Some("queued".into()), None)
    );
    assert!(res.body["failures"][0]["retry_at"].is_string());
    assert_eq!(
        outcome_of(&res, "failures", 1),
        (Some("failed".into()), None)
    );
    let jobs: Vec<&str> = res.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, vec![next.as_str()], "the claim after the reports");

    assert_eq!(job_outcome(&app, &ids[0]).await.0, "completed");
    assert_eq!(
        job_outcome(&app, &ids[1]).await,
        ("failed".into(), "JobResultInvalid".into())
    );
    assert_eq!(job_outcome(&app, &ids[2]).await.0, "queued");
    assert_eq!(
        job_outcome(&app, &ids[3]).await,
        ("failed".into(), "UserErrorSQLNoSysAdminMembership".into())
    );
    assert_eq!(
        job_outcome(&app, &foreign).await.0,
        "queued",
        "another VM's job is untouched"
    );
}

/// The same completion sent at once in several batched claims and as version 1 calls is
/// recorded once: one attempt, one recovery point, and every answer says `completed`.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_completion_is_recorded_exactly_once_however_often_it_arrives(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales")],
    )
    .await;
    let app = &p.app;
    let res = app
        .post(
            &format!("{}/backup", p.item_path("sales")),
            &app.admin(),
            json!({"type": "copy_only_full", "retention_days": 30}),
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    let backup = res.body["id"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    // 20 in all: the most backups a VM runs at once by default.
    for _ in 0..19 {
        ids.push(dispatch(app, &p.vm, "backup_full").await);
    }
    let claimed = claim(app, &p.agent, 50).await;
    assert_eq!(claimed.len(), 20);
    let now = Utc::now();
    let completions: Vec<Value> = claimed
        .iter()
        .map(|job| {
            if job["job_id"] == backup.as_str() {
                json!({"job_id": job["job_id"], "lease": job["lease"],
                    "result": {"kind": "backup", "recovery_points": [{
                        "instance": "MSSQLSERVER", "database": "sales",
                        "backup_type": "copy_only_full", "started_at": now, "backup_time": now,
                        "first_lsn": "1000", "last_lsn": "1005", "database_backup_lsn": "0",
                        "size_bytes": 100}]}})
            } else {
                empty_backup(job)
            }
        })
        .collect();
    let v2 = (0..5).map(|_| {
        claim_v2(
            app,
            &p.agent,
            json!({"max_jobs": 0, "completions": completions}),
        )
    });
    let v1 = completions.iter().map(|c| async {
        let path = format!("/v1/agent/jobs/{}/complete", c["job_id"].as_str().unwrap());
        app.post(
            &path,
            &p.agent,
            json!({"lease": c["lease"], "result": c["result"]}),
        )
        .await
    });
    let (v2, v1) = tokio::join!(join_all(v2), join_all(v1));
    for res in &v2 {
        assert_eq!(res.status, StatusCode::OK, "{}", res.body);
        for i in 0..completions.len() {
            assert_eq!(outcome_of(res, "completions", i), done(), "{}", res.body);
        }
        assert!(res.body["jobs"].as_array().unwrap().is_empty());
    }
    for res in &v1 {
        assert_eq!(
            (res.status, res.body["status"].as_str()),
            (StatusCode::OK, Some("completed")),
            "{}",
            res.body
        );
    }
    for job in ids.iter().chain([&backup]) {
        assert_eq!(job_outcome(app, job).await.0, "completed");
        assert_eq!(
            sql::attempt_outcomes(&pool, job).await,
            vec!["completed".to_owned()],
            "one attempt, ended once"
        );
    }
    assert_eq!(
        sql::recovery_points_recorded(&pool).await,
        1,
        "{}",
        p.points("sales").await
    );
    assert_eq!(p.point_count().await, 1, "the point is recorded once");
    assert_eq!(sql::queue_len(&pool).await, 0);
}

/// A completion that carries a lease taken over by a later attempt is refused alone; the
/// later attempt's holder completes the job; other reports of the stale batch go through.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_stale_lease_is_fenced_off_per_report(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let expiring = dispatch(&app, &vm, "backup_log").await;
    let first = claim(&app, &agent, 1).await;
    sql::forge_leases_expired(&pool).await;
    app.service.rescue_expired_leases().await.unwrap();
    sql::forge_retries_due(&pool).await;
    let healthy = dispatch(&app, &vm, "backup_full").await;
    let second = claim(&app, &agent, 2).await;
    assert_eq!(second.len(), 2);
    let retry = second
        .iter()
        .find(|j| j["job_id"] == expiring.as_str())
        .unwrap();
    let other = second
        .iter()
        .find(|j| j["job_id"] == healthy.as_str())
        .unwrap();
    assert_ne!(retry["lease"], first[0]["lease"]);

    let stale = claim_v2(
        &app,
        &agent,
        json!({"max_jobs": 0, "completions": [empty_backup(&first[0]), empty_backup(other)]}),
    )
    .await;
    assert_eq!(stale.status, StatusCode::OK, "{}", stale.body);
    assert_eq!(outcome_of(&stale, "completions", 0), refused("lease_lost"));
    assert_eq!(stale.body["completions"][0]["refused"]["status"], 409);
    assert_eq!(outcome_of(&stale, "completions", 1), done());
    assert_eq!(job_outcome(&app, &expiring).await.0, "in_progress");

    let current = claim_v2(
        &app,
        &agent,
        json!({"max_jobs": 0, "completions": [empty_backup(retry)]}),
    )
    .await;
    assert_eq!(outcome_of(&current, "completions", 0), done());
    assert_eq!(
        sql::attempt_outcomes(&pool, &expiring).await,
        vec!["lease_expired".to_owned(), "completed".to_owned()]
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_v2_claim_is_bounded_and_reports_alone_claim_nothing(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    let job = dispatch(&app, &vm, "backup_full").await;
    let only_reports = claim_v2(&app, &agent, json!({"max_jobs": 0, "wait_seconds": 60})).await;
    assert_eq!(only_reports.status, StatusCode::OK, "{}", only_reports.body);
    assert_eq!(
        only_reports.body["jobs"],
        json!([]),
        "max_jobs 0 claims nothing, at once"
    );
    assert_eq!(job_outcome(&app, &job).await.0, "queued");

    let report =
        json!({"job_id": job, "lease": 1, "result": {"kind": "backup", "recovery_points": []}});
    for body in [
        json!({"max_jobs": 51}),
        json!({"wait_seconds": 61}),
        json!({"max_jobs": 0, "completions": vec![report.clone(); 101]}),
        json!({"max_jobs": 0, "completions": vec![report.clone(); 60],
               "failures": vec![json!({"job_id": job, "lease": 1, "code": "X", "message": "x", "retryable": false}); 41]}),
    ] {
        let res = claim_v2(&app, &agent, body.clone()).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::BAD_REQUEST, "invalid_claim"),
            "{body}"
        );
    }
    // What the document states of each report is checked for the whole call.
    for (body, pointer) in [
        (
            json!({"max_jobs": 0, "completions": [{"job_id": job, "lease": 0, "result": {"kind": "backup", "recovery_points": []}}]}),
            "/completions/0/lease",
        ),
        (
            json!({"max_jobs": 0, "completions": [{"job_id": job, "lease": 1, "result": {"kind": "backup", "recovery_points": []},
                                                   "warnings": vec!["w"; 101]}]}),
            "/completions/0/warnings",
        ),
        (
            json!({"max_jobs": 0, "failures": [{"job_id": job, "lease": 1, "code": "", "message": "x", "retryable": false}]}),
            "/failures/0/code",
        ),
        (
            json!({"max_jobs": 0, "completions": [{"job_id": job, "lease": 1,
                "result": {"kind": "restore", "restored_database": ""}}]}),
            "/completions/0/result/restored_database",
        ),
    ] {
        let res = claim_v2(&app, &agent, body).await;
        assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
        assert_eq!(res.violations()[0].0, pointer, "{}", res.body);
    }
    assert_eq!(job_outcome(&app, &job).await.0, "queued");
    // Refused at the edge as a whole: nothing of it is recorded.
    let nul = claim_v2(
        &app,
        &agent,
        json!({"max_jobs": 0, "failures": [{"job_id": job, "lease": 1, "code": "X\u{0}", "message": "x", "retryable": false}]}),
    )
    .await;
    assert_eq!(nul.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", nul.body);
    let user = claim_v2(&app, &app.admin(), json!({})).await;
    assert_eq!(user.status, StatusCode::FORBIDDEN);
    let claimed = claim_v2(&app, &agent, json!({"max_jobs": 3})).await;
    assert_eq!(claimed.body["jobs"][0]["job_id"], job.as_str());
    assert_eq!(claimed.body["completions"], json!([]));
}

/// The hot queue's own vacuum (run by every replica's background loop) works through the
/// pool, outside any transaction, and leaves no dead row of finished jobs behind.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_hot_queue_is_vacuumed_by_the_service(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (vm, agent) = enroll(&app, "sqlvm-01").await;
    for _ in 0..5 {
        dispatch(&app, &vm, "backup_full").await;
    }
    let claimed = claim(&app, &agent, 5).await;
    let completions: Vec<Value> = claimed.iter().map(empty_backup).collect();
    let done = claim_v2(
        &app,
        &agent,
        json!({"max_jobs": 0, "completions": completions}),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(sql::queue_len(&pool).await, 0);
    app.service.vacuum_queue().await.unwrap();
    assert_eq!(
        sql::queue_vacuum_stats(&pool).await,
        (true, 0),
        "vacuumed, no dead rows left"
    );
}
