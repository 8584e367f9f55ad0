//! What an agent reports is held to its job: recovery points of the job's type, for the
//! job's databases, once each, stamped while the job ran; a restore of the database the
//! job restores. Agent-supplied free-form fields are bounded, lists carry no bodies,
//! restores exclude backups of the database they write, and the costs of a large
//! discovery and of a `/metrics` scrape do not grow with the wrong thing.

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{
    Response, TestApp, all_pages, claim, job_outcome, jobs, protected_items, sql,
};
use crate::protection::{
    auto_protect_instance, db, inventory, protectable, registered, run_configure, run_discovery,
};
use crate::recovery::{Protected, protect, weekly_dst_policy};

fn point(database: &str, backup_type: &str, at: DateTime<Utc>, first_lsn: u64) -> Value {
    json!({"instance": "MSSQLSERVER", "database": database, "backup_type": backup_type,
           "started_at": at, "backup_time": at, "first_lsn": first_lsn.to_string(),
           "last_lsn": (first_lsn + 5).to_string(), "database_backup_lsn": "0", "size_bytes": 100})
}

async fn backup_now(p: &Protected, database: &str, body: Value) -> String {
    let path = format!("{}/backup", p.item_path(database));
    let res = p.app.post(&path, &p.app.admin(), body).await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    res.body["id"].as_str().unwrap().to_owned()
}

async fn complete(app: &TestApp, agent: &str, job: &Value, result: Value) -> Response {
    app.post(
        &format!(
            "/v1/agent/jobs/{}/complete",
            job["job_id"].as_str().unwrap()
        ),
        agent,
        json!({"lease": job["lease"], "result": result}),
    )
    .await
}

fn backup_result(points: Vec<Value>) -> Value {
    json!({"kind": "backup", "recovery_points": points})
}

fn expect(pointer: &str, code: &str) -> Vec<(String, String)> {
    vec![(pointer.to_owned(), code.to_owned())]
}

/// What a test asks for, what the agent reports, and the violations expected.
type Case = (&'static str, Value, Vec<Value>, Vec<(String, String)>);

/// Each lie in a backup report fails its job with `JobResultInvalid` and records nothing;
/// completions that fit their jobs, sent in the same batch, are recorded.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn backup_reports_must_fit_their_jobs(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    let now = Utc::now();
    // (backup request, reported points, expected violations), one job each.
    let cases: Vec<Case> = vec![
        (
            "copy-only reported as a full",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![point("sales", "full", now, 100)],
            expect(
                "/result/recovery_points/0/backup_type",
                "point_type_mismatch",
            ),
        ),
        (
            "a full reported as a copy-only",
            json!({"type": "full", "retention_days": 45}),
            vec![point("sales", "copy_only_full", now, 200)],
            expect(
                "/result/recovery_points/0/backup_type",
                "point_type_mismatch",
            ),
        ),
        (
            "a database the job does not name",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![point("hr", "copy_only_full", now, 300)],
            expect("/result/recovery_points/0/database", "point_not_in_job"),
        ),
        (
            "two points for one database",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![
                point("sales", "copy_only_full", now, 400),
                point("sales", "copy_only_full", now, 500),
            ],
            expect("/result/recovery_points/1", "point_duplicate"),
        ),
        (
            "stamped an hour before the job was claimed",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![point(
                "sales",
                "copy_only_full",
                now - Duration::hours(1),
                600,
            )],
            expect(
                "/result/recovery_points/0/backup_time",
                "backup_time_out_of_window",
            ),
        ),
        (
            "stamped a day in the future",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![point(
                "sales",
                "copy_only_full",
                now + Duration::days(1),
                700,
            )],
            expect(
                "/result/recovery_points/0/backup_time",
                "backup_time_out_of_window",
            ),
        ),
        (
            "a fitting copy-only full",
            json!({"type": "copy_only_full", "retention_days": 30}),
            vec![point("sales", "copy_only_full", now, 800)],
            vec![],
        ),
    ];
    let mut jobs = Vec::new();
    for (_, request, _, _) in &cases {
        jobs.push(backup_now(&p, "sales", request.clone()).await);
    }
    let claimed = claim(&p.app, &p.agent, 50).await;
    assert_eq!(claimed.len(), cases.len());
    // All at once, so that they share a group commit.
    let answers = futures_util::future::join_all(cases.iter().zip(&jobs).map(
        |((what, _, points, _), id)| {
            let job = claimed.iter().find(|j| j["job_id"] == id.as_str()).unwrap();
            let (app, agent) = (&p.app, p.agent.clone());
            async move {
                (
                    *what,
                    complete(app, &agent, job, backup_result(points.clone())).await,
                )
            }
        },
    ))
    .await;
    for ((what, res), ((_, _, _, expected), id)) in answers.iter().zip(cases.iter().zip(&jobs)) {
        if expected.is_empty() {
            assert_eq!(res.status, StatusCode::OK, "{what}: {}", res.body);
            assert_eq!(job_outcome(&p.app, id).await.0, "completed", "{what}");
        } else {
            assert_eq!(
                res.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{what}: {}",
                res.body
            );
            assert_eq!(res.code(), "validation_failed");
            assert_eq!(&res.violations(), expected, "{what}");
            assert_eq!(
                job_outcome(&p.app, id).await,
                ("failed".to_owned(), "JobResultInvalid".to_owned()),
                "{what}"
            );
        }
    }
    assert_eq!(
        sql::recovery_points_recorded(&pool).await,
        1,
        "only the fitting point"
    );

    // A log job reports log points: a differential is refused.
    let log = backup_now(&p, "sales", json!({"type": "log"})).await;
    let job = &claim(&p.app, &p.agent, 1).await[0];
    let res = complete(
        &p.app,
        &p.agent,
        job,
        backup_result(vec![point("sales", "differential", Utc::now(), 900)]),
    )
    .await;
    assert_eq!(
        res.violations(),
        expect(
            "/result/recovery_points/0/backup_type",
            "point_type_mismatch"
        )
    );
    assert_eq!(job_outcome(&p.app, &log).await.1, "JobResultInvalid");
    // Repeating a refused completion finds the job over.
    let again = complete(
        &p.app,
        &p.agent,
        job,
        backup_result(vec![point("sales", "differential", Utc::now(), 900)]),
    )
    .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "lease_lost")
    );
    let metrics = p.app.get("/metrics", "").await.body;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("backvault_jobs_failed_total 7\n"),
        "{metrics}"
    );
}

/// A scheduled backup may carry the instant its `--dev` rehearsal chose
/// (`payload.scheduled_at`), but only on a server that rehearses.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_rehearsed_schedule_may_stamp_its_instant_only_in_dev(pool: PgPool) {
    let spec = json!({"time_zone": "UTC", "full": {"frequency": "daily", "time": "00:00"},
        "log": {"frequency_minutes": 60, "retention_days": 7}, "retention": {"daily": {"days": 7}}});
    let p = protect(pool.clone(), spec, vec![db("MSSQLSERVER", "sales")]).await;
    // The same database, served by a replica without `--dev`.
    let plain = TestApp::new(pool.clone());
    let t0: DateTime<Utc> = "2031-11-16T00:00:00Z".parse().unwrap();
    p.app.service.schedule_tick(t0).await.unwrap();
    let p = &p;
    let tick = |at: DateTime<Utc>| async move {
        assert_eq!(p.app.service.schedule_tick(at).await.unwrap(), 1);
        claim(&p.app, &p.agent, 1).await.remove(0)
    };

    let full = tick(t0 + Duration::hours(1)).await;
    assert_eq!(full["kind"], "backup_full");
    let res = complete(
        &plain,
        &p.agent,
        &full,
        backup_result(vec![point("sales", "full", t0 + Duration::hours(1), 100)]),
    )
    .await;
    assert_eq!(
        res.violations(),
        expect(
            "/result/recovery_points/0/backup_time",
            "backup_time_out_of_window"
        ),
        "a future instant, without --dev: {}",
        res.body
    );

    let full = tick(t0 + Duration::hours(2)).await;
    let res = complete(
        &p.app,
        &p.agent,
        &full,
        backup_result(vec![point("sales", "full", t0 + Duration::hours(2), 200)]),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    // Even in a rehearsal, not another instant.
    let log = tick(t0 + Duration::hours(3)).await;
    assert_eq!(log["kind"], "backup_log");
    let res = complete(
        &p.app,
        &p.agent,
        &log,
        backup_result(vec![point("sales", "log", t0 + Duration::hours(5), 205)]),
    )
    .await;
    assert_eq!(
        res.violations(),
        expect(
            "/result/recovery_points/0/backup_time",
            "backup_time_out_of_window"
        )
    );
}

/// Restores: the result names the database the job restores; one restore per target at a
/// time; a backup of a database waits while a restore of it is queued or running, and a
/// restore waits while a backup of its database runs.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn restores_exclude_each_other_and_the_backups_of_their_database(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    sql::forge_fulls_taken(&pool).await;
    backup_now(&p, "sales", json!({"type": "full", "retention_days": 45})).await;
    let job = &claim(&p.app, &p.agent, 1).await[0];
    let res = complete(
        &p.app,
        &p.agent,
        job,
        backup_result(vec![point("sales", "full", Utc::now(), 1000)]),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let points = p.points("sales").await;
    let full = points["items"][0]["id"].as_str().unwrap().to_owned();
    let restore = |target: &str, overwrite: bool| {
        let body =
            json!({"recovery_point_id": full, "target_database": target, "overwrite": overwrite});
        let path = format!("{}/restore", p.item_path("sales"));
        let app = &p.app;
        async move { app.post(&path, &app.admin(), body).await }
    };

    let first = restore("sales", true).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let first_id = first.body["id"].as_str().unwrap().to_owned();
    for (target, overwrite) in [("sales", true), ("SALES", true)] {
        let second = restore(target, overwrite).await;
        assert_eq!(
            (second.status, second.code()),
            (StatusCode::CONFLICT, "restore_in_progress"),
            "{target}: {}",
            second.body
        );
    }
    // Also when the restore is queued by other means: the queue admits one per target.
    let mut conn = pool.acquire().await.unwrap();
    let duplicate = backvault_store::jobs::jobs_enqueue(
        &mut conn,
        &[backvault_store::jobs::NewJob {
            id: uuid::Uuid::now_v7(),
            vm_id: first.body["vm_id"].as_str().unwrap().parse().unwrap(),
            subscription_id: "sub-1".into(),
            vault_id: None,
            kind: backvault_domain::jobs::JobKind::Restore,
            priority: 1,
            items: json!([{"instance": "MSSQLSERVER", "database": "Sales"}]),
            payload: json!({"target_instance": "mssqlserver", "target_database": "sales", "overwrite": true}),
            max_attempts: 3,
            run_at: Utc::now(),
            availability_group_id: None,
        }],
    )
    .await;
    assert!(duplicate.is_err(), "a second restore of one target");
    drop(conn);
    // A log backup of sales, and one of hr, queued with the restore.
    let sales_log = backup_now(&p, "sales", json!({"type": "log"})).await;
    let hr_log = backup_now(&p, "hr", json!({"type": "log"})).await;

    // One claim used to hand out the restore and the backup of the database it writes.
    let claimed = claim(&p.app, &p.agent, 50).await;
    let mut ids: Vec<&str> = claimed
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec![first_id.as_str(), hr_log.as_str()];
    expected.sort();
    assert_eq!(ids, expected, "the restore and hr's backup, not sales'");
    assert!(
        claim(&p.app, &p.agent, 50).await.is_empty(),
        "sales' log waits"
    );

    let restore_job = claimed.iter().find(|j| j["kind"] == "restore").unwrap();
    let wrong = complete(
        &p.app,
        &p.agent,
        restore_job,
        json!({"kind": "restore", "restored_database": "hr"}),
    )
    .await;
    assert_eq!(
        wrong.violations(),
        expect("/result/restored_database", "restored_database_mismatch")
    );
    assert_eq!(
        job_outcome(&p.app, &first_id).await,
        ("failed".to_owned(), "JobResultInvalid".to_owned())
    );
    let next = claim(&p.app, &p.agent, 50).await;
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0]["job_id"],
        sales_log.as_str(),
        "runs once the restore ended"
    );

    // The other way round: while sales' log runs, a restore over sales waits; a restore
    // under another name does not.
    let over = restore("sales", true).await;
    assert_eq!(over.status, StatusCode::ACCEPTED, "{}", over.body);
    let copy = restore("sales_copy", false).await;
    assert_eq!(copy.status, StatusCode::ACCEPTED, "{}", copy.body);
    let claimed = claim(&p.app, &p.agent, 50).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0]["job_id"], copy.body["id"]);
    let res = complete(
        &p.app,
        &p.agent,
        &claimed[0],
        json!({"kind": "restore", "restored_database": "sales_copy"}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert!(claim(&p.app, &p.agent, 50).await.is_empty());
    let res = complete(
        &p.app,
        &p.agent,
        &next[0],
        backup_result(vec![point("sales", "log", Utc::now(), 1000)]),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let claimed = claim(&p.app, &p.agent, 50).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0]["job_id"], over.body["id"]);
    let res = complete(
        &p.app,
        &p.agent,
        &claimed[0],
        json!({"kind": "restore", "restored_database": "sales"}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    // Finished: the target is free again.
    assert_eq!(restore("sales", true).await.status, StatusCode::ACCEPTED);

    // Racing requests for one target: one restore, the others refused.
    let racing =
        futures_util::future::join_all((0..6).map(|i| restore(["hr", "HR"][i % 2], true))).await;
    let mut answers: Vec<(StatusCode, &str)> =
        racing.iter().map(|r| (r.status, r.code())).collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            (StatusCode::ACCEPTED, ""),
            (StatusCode::CONFLICT, "restore_in_progress"),
            (StatusCode::CONFLICT, "restore_in_progress"),
            (StatusCode::CONFLICT, "restore_in_progress"),
            (StatusCode::CONFLICT, "restore_in_progress"),
            (StatusCode::CONFLICT, "restore_in_progress"),
        ]
    );
}

/// Progress, warnings, results and VM facts have size bounds (`field_too_large`); lists
/// of jobs leave the bodies out.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn agent_supplied_fields_are_bounded_and_lists_omit_bodies(pool: PgPool) {
    let app = TestApp::new(pool);
    let inv = inventory(vec![db("MSSQLSERVER", "sales")]);
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let admin = app.admin();
    let dispatch = |kind: &str| {
        let body = if kind == "discovery" {
            json!({"vm_id": s.vm, "kind": kind})
        } else {
            json!({"vm_id": s.vm, "kind": kind, "items": [{"instance": "MSSQLSERVER", "database": "sales"}]})
        };
        let app = &app;
        let admin = admin.clone();
        async move {
            let res = app.post("/v1/jobs", &admin, body).await;
            assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
            res.body["id"].as_str().unwrap().to_owned()
        }
    };

    // Progress: 4 KiB of JSON, in a job heartbeat and in an agent heartbeat.
    let log = dispatch("backup_log").await;
    let job = &claim(&app, &s.agent, 1).await[0];
    let lease = job["lease"].clone();
    let hb = |progress: Value| {
        let app = &app;
        let agent = s.agent.clone();
        let body = json!({"lease": lease, "progress": progress});
        let path = format!("/v1/agent/jobs/{log}/heartbeat");
        async move { app.post(&path, &agent, body).await }
    };
    let res = hb(json!({"percent": 40, "message": "x".repeat(1000)})).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    // Within the characters a message may have, but over 4 KiB of JSON.
    let res = hb(json!({"percent": 50, "message": "🦀".repeat(1024)})).await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
    assert_eq!(res.violations(), expect("/progress", "field_too_large"));
    let res = hb(json!({"percent": 101})).await;
    assert_eq!(
        res.violations(),
        expect("/progress/percent", "progress_invalid")
    );
    // Progress has a shape: a field it does not have is refused, not stored.
    let res = hb(json!({"percent": 50, "step": "copying"})).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::BAD_REQUEST, "malformed_body")
    );
    let res = app
        .post(
            "/v1/agent/heartbeat",
            &s.agent,
            json!({"jobs": [{"job_id": log, "lease": lease, "progress": {"message": "y".repeat(1025)}}]}),
        )
        .await;
    assert_eq!(
        res.violations(),
        expect("/jobs/0/progress/message", "field_too_large")
    );
    let res = app
        .post(
            "/v1/agent/heartbeat",
            &s.agent,
            json!({"jobs": [{"job_id": log, "lease": 0}]}),
        )
        .await;
    assert_eq!(res.violations(), expect("/jobs/0/lease", "lease_invalid"));
    let mut facts = crate::helpers::facts("sqlvm-01");
    facts["dotnet_version"] = json!("4.".repeat(40));
    facts["agent_version"] = json!("1.0.0");
    let res = app
        .post("/v1/agent/heartbeat", &s.agent, json!({"facts": facts}))
        .await;
    assert_eq!(
        res.violations(),
        expect("/facts/dotnet_version", "field_too_large")
    );

    // The list leaves payload, result and progress out; the job itself has them.
    let list = app.get("/v1/jobs", &admin).await;
    assert_eq!(list.status, StatusCode::OK);
    for job in list.body["items"].as_array().unwrap() {
        for body in ["payload", "result", "progress"] {
            assert!(job.get(body).is_none(), "{body} in a list: {job}");
        }
        assert!(job.get("items").is_some());
    }
    let one = app.get(&format!("/v1/jobs/{log}"), &admin).await;
    assert_eq!(one.body["payload"], json!({"kind": "backup_log"}));
    assert_eq!(one.body["progress"]["percent"], 40);

    // Warnings: 1,024 characters each.
    let res = app
        .post(
            &format!("/v1/agent/jobs/{log}/complete"),
            &s.agent,
            json!({"lease": lease, "result": backup_result(vec![]), "warnings": ["ok", "w".repeat(1025)]}),
        )
        .await;
    assert_eq!(res.violations(), expect("/warnings/1", "field_too_large"));
    assert_eq!(
        job_outcome(&app, &log).await,
        ("failed".to_owned(), "JobResultInvalid".to_owned())
    );

    // A result: 1 MiB of JSON (here 8,000 databases with long names, in a 1.5 MB body).
    let discovery = dispatch("discovery").await;
    let job = &claim(&app, &s.agent, 1).await[0];
    let databases: Vec<Value> = (0..8_000)
        .map(|i| db("MSSQLSERVER", &format!("{i:0>120}")))
        .collect();
    let res = complete(
        &app,
        &s.agent,
        job,
        json!({"kind": "discovery", "inventory": inventory(databases)}),
    )
    .await;
    assert_eq!(
        (res.status, res.violations()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            expect("/result", "field_too_large")
        ),
        "{}",
        res.body
    );
    assert_eq!(job_outcome(&app, &discovery).await.1, "JobResultInvalid");
    // A completed job keeps its result on GET, not in the list.
    let discovery = dispatch("discovery").await;
    let job = &claim(&app, &s.agent, 1).await[0];
    let res = complete(
        &app,
        &s.agent,
        job,
        json!({"kind": "discovery", "inventory": inv}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let one = app.get(&format!("/v1/jobs/{discovery}"), &admin).await;
    assert_eq!(one.body["result"]["kind"], "discovery");
    let list = app.get("/v1/jobs?kind=discovery&limit=1", &admin).await;
    assert_eq!(list.body["items"][0]["id"], discovery.as_str());
    assert!(list.body["items"][0].get("result").is_none());
}

/// 3,000 databases appear on an instance under auto-protection: one discovery protects
/// every eligible one (names judged once per instance, not once per database), in jobs of
/// at most 50.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn auto_protection_of_thousands_of_databases_in_one_discovery(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let small = inventory(vec![db("MSSQLSERVER", "sales")]);
    let s = registered(&app, "vault-a", "sqlvm-01", &small).await;
    let admin = app.admin();
    let containers = protectable(&app, &s.vault).await;
    let instance = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "MSSQLSERVER")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let intent = auto_protect_instance(&app, &admin, &s.vault, &instance).await;
    assert_eq!(intent.status, StatusCode::CREATED, "{}", intent.body);
    assert_eq!(run_configure(&app, &s.agent, false).await, [1]);

    let mut databases: Vec<Value> = (0..2_996)
        .map(|i| db("MSSQLSERVER", &format!("db{i:04}")))
        .collect();
    databases.extend([
        db("MSSQLSERVER", "sales"),
        db("MSSQLSERVER", "Dup"),
        db("MSSQLSERVER", "dup"),
        db("MSSQLSERVER", "R&D"),
        // Another instance's database of the same name collides with nothing.
        db("OLD", "DUP"),
    ]);
    let rediscover = app
        .call(
            Method::POST,
            &format!("/v1/vaults/{}/vms/{}/rediscover", s.vault, s.vm),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(rediscover.status, StatusCode::ACCEPTED);
    run_discovery(&app, &s.agent, &inventory(databases)).await;

    let configuring = jobs(&app, "kind=configure_protection&status=queued").await;
    let items: usize = configuring
        .iter()
        .map(|j| j["items"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        (configuring.len(), items),
        (60, 2_997),
        "db0000..db2995 and R&D, not Dup/dup, nor OLD's database"
    );
    let protecting: Vec<Value> = protected_items(&app, &s.vault, "")
        .await
        .into_iter()
        .filter(|i| i["state"] == "protecting")
        .map(|i| i["protected_name"].clone())
        .filter(|name| !name.as_str().unwrap().starts_with("db"))
        .collect();
    assert_eq!(protecting, ["R&D"]);
}

/// The unauthenticated scrape counts RPO breaches over every policy in one statement;
/// with 200 policies in use its value is the RPO report's.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn rpo_breaches_over_200_policies_in_one_scrape(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let names: Vec<String> = (0..200).map(|i| format!("db{i:03}")).collect();
    let inv = inventory(names.iter().map(|n| db("MSSQLSERVER", n)).collect());
    let s = registered(&app, "vault-a", "sqlvm-01", &inv).await;
    let admin = app.admin();
    let containers = protectable(&app, &s.vault).await;
    let spec = json!({"time_zone": "UTC", "full": {"frequency": "daily", "time": "00:00"},
        "log": {"frequency_minutes": 60, "retention_days": 7}, "retention": {"daily": {"days": 7}}});
    for (i, name) in names.iter().enumerate() {
        let res = app
            .post(
                &format!("/v1/vaults/{}/policies", s.vault),
                &admin,
                json!({"name": format!("P{i}"), "spec": spec}),
            )
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.body);
        let res = app
            .post(
                &format!("/v1/vaults/{}/protected-items", s.vault),
                &admin,
                json!({"policy": format!("P{i}"), "databases": [crate::protection::db_id(&containers, name)]}),
            )
            .await;
        assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    }
    while !run_configure(&app, &s.agent, false).await.is_empty() {}
    // Every third database has had nothing since protection began, three days ago.
    let idle: Vec<String> = names.iter().step_by(3).cloned().collect();
    sql::forge_protection_began(&pool, &idle, Duration::days(3)).await;
    let report = app
        .get(&format!("/v1/vaults/{}/rpo", s.vault), &admin)
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.body);
    assert_eq!(report.body["protected"], 200);
    assert_eq!(report.body["breached"], 67);
    // A page at a time (50 by default); the totals are the vault's, on the first page only.
    assert_eq!(report.body["items"].as_array().unwrap().len(), 50);
    let last = app
        .get(
            &format!(
                "/v1/vaults/{}/rpo?limit=100&cursor={}",
                s.vault,
                report.body["next_cursor"].as_str().unwrap()
            ),
            &admin,
        )
        .await;
    assert_eq!(last.status, StatusCode::OK, "{}", last.body);
    assert_eq!(last.body["items"].as_array().unwrap().len(), 100);
    assert!(
        last.body.get("protected").is_none() && last.body.get("breached").is_none(),
        "totals on a later page: {}",
        last.body
    );
    let items = all_pages(&app, &format!("/v1/vaults/{}/rpo?", s.vault), 64).await;
    assert_eq!(items.len(), 200);
    assert_eq!(items.iter().filter(|i| i["breached"] == true).count(), 67);
    let metrics = app.get("/metrics", "").await.body;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("backvault_rpo_breaching_items 67\n"),
        "{metrics}"
    );
}
