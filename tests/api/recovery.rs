//! Scheduler, recovery points, retention and restore, with a controlled clock: the
//! scheduler tick takes `now`, and backups report whatever times the test says.

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use backvault_domain::agent::protocol::ScheduledBackup;
use backvault_domain::jobs::{MAX_ITEMS_PER_JOB, batch, batch_of};

use crate::helpers::{
    Response, TestApp, claim, job_databases, jobs, policy, recovery_points, replace_policy, sql,
    wait_until,
};
use crate::protection::{db, db_id, inventory, protectable, registered, run_configure};

fn utc(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

/// A fake SQL Server's log-sequence state per database, so reported points chain.
#[derive(Default)]
pub(crate) struct Lsns {
    next: u128,
    last_log: HashMap<String, u128>,
    full_first: HashMap<String, u128>,
}

impl Lsns {
    pub(crate) fn point(&mut self, db: &str, kind: &str, at: DateTime<Utc>) -> Value {
        self.next += 10;
        let (first, last, base) = match kind {
            "backup_full" => {
                let first = self.next;
                self.full_first.insert(db.to_owned(), first);
                self.last_log.entry(db.to_owned()).or_insert(first);
                (first, first + 5, first)
            }
            "backup_differential" => (self.next, self.next + 5, self.full_first[db]),
            _ => {
                let first = self.last_log[db];
                self.last_log.insert(db.to_owned(), self.next + 5);
                (first, self.next + 5, self.full_first[db])
            }
        };
        let backup_type = match kind {
            "backup_full" => "full",
            "backup_differential" => "differential",
            _ => "log",
        };
        json!({"instance": "MSSQLSERVER", "database": db, "backup_type": backup_type, "started_at": at, "backup_time": at,
               "first_lsn": first.to_string(), "last_lsn": last.to_string(), "database_backup_lsn": base.to_string(), "size_bytes": 100})
    }
}

/// Completes every claimable job as the agent would, with points taken at `at`; returns
/// the kinds run.
pub(crate) async fn run_backups(
    app: &TestApp,
    agent: &str,
    lsns: &mut Lsns,
    at: DateTime<Utc>,
) -> Vec<String> {
    let mut kinds = Vec::new();
    loop {
        let jobs = claim(app, agent, 50).await;
        if jobs.is_empty() {
            return kinds;
        }
        for job in jobs {
            let kind = job["kind"].as_str().unwrap().to_owned();
            let points: Vec<Value> = job["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| lsns.point(i["database"].as_str().unwrap(), &kind, at))
                .collect();
            let res = app
                .post(
                    &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
                    agent,
                    json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": points}}),
                )
                .await;
            assert_eq!(res.status, StatusCode::OK, "{}", res.body);
            kinds.push(kind);
        }
    }
}

pub(crate) fn weekly_dst_policy() -> Value {
    json!({
        "time_zone": "Europe/Amsterdam",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "02:30"},
        "differential": {"days": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday"], "time": "22:00", "retention_days": 14},
        "log": {"frequency_minutes": 15, "retention_days": 14},
        "retention": {"weekly": {"weeks": 4}}
    })
}

/// `sales` and `hr` on one VM under the weekly DST policy, their fulls taken.
async fn sales_and_hr_with_fulls(pool: &PgPool) -> Protected {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    sql::forge_fulls_taken(pool).await;
    p
}

pub(crate) struct Protected {
    pub(crate) app: TestApp,
    pub(crate) vault: String,
    pub(crate) vm: String,
    pub(crate) agent: String,
    pub(crate) items: HashMap<String, String>,
}

impl Protected {
    pub(crate) fn item_path(&self, database: &str) -> String {
        format!(
            "/v1/vaults/{}/protected-items/{}",
            self.vault, self.items[database]
        )
    }

    /// Moves a database's item to `policy`, with its ETag.
    async fn change_policy(&self, database: &str, policy: &str) -> Response {
        let path = self.item_path(database);
        let admin = self.app.admin();
        let etag = self.app.get(&path, &admin).await;
        self.app
            .call(
                axum::http::Method::PATCH,
                &path,
                Some(&admin),
                Some(json!({"policy": policy})),
                &[("if-match", etag.header("etag"))],
            )
            .await
    }

    /// The database's recovery points and restorable ranges, as the API lists them.
    pub(crate) async fn points(&self, database: &str) -> Value {
        recovery_points(&self.app, &self.item_path(database)).await
    }

    /// How many recovery points all the protected databases have.
    pub(crate) async fn point_count(&self) -> usize {
        let mut count = 0;
        for database in self.items.keys() {
            count += self.points(database).await["items"]
                .as_array()
                .unwrap()
                .len();
        }
        count
    }

    /// The backup jobs, by kind, with their databases (sorted), oldest first.
    async fn backup_jobs(&self) -> Vec<(String, Vec<String>)> {
        let mut all = jobs(&self.app, "").await;
        all.reverse();
        all.iter()
            .filter(|j| j["kind"].as_str().unwrap().starts_with("backup_"))
            .map(|j| (j["kind"].as_str().unwrap().to_owned(), job_databases(j)))
            .collect()
    }

    /// Stops protection, retaining the data.
    async fn stop(&self, database: &str) -> Response {
        let path = format!("{}/stop", self.item_path(database));
        self.app
            .post(&path, &self.app.admin(), json!({"mode": "retain_data"}))
            .await
    }

    async fn resume(&self, database: &str, policy: &str) -> Response {
        let path = format!("{}/resume", self.item_path(database));
        self.app
            .post(&path, &self.app.admin(), json!({"policy": policy}))
            .await
    }
}

/// `databases` on one VM protected by `spec` (the policy `Gold`), on a server that
/// rehearses schedules: the tests tick at chosen instants and stamp backups with them.
pub(crate) async fn protect(pool: PgPool, spec: Value, databases: Vec<Value>) -> Protected {
    let app = TestApp::rehearsing(pool);
    let names: Vec<String> = databases
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    let s = registered(&app, "vault-a", "sqlvm-01", &inventory(databases)).await;
    app.post(
        &format!("/v1/vaults/{}/policies", s.vault),
        &app.admin(),
        json!({"name": "Gold", "spec": spec}),
    )
    .await;
    let containers = protectable(&app, &s.vault).await;
    let ids: Vec<String> = names.iter().map(|n| db_id(&containers, n)).collect();
    let res = app
        .post(
            &format!("/v1/vaults/{}/protected-items", s.vault),
            &app.admin(),
            json!({"policy": "Gold", "databases": ids}),
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    run_configure(&app, &s.agent, false).await;
    let items = res.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["database"].as_str().unwrap().to_owned(),
                i["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    Protected {
        app,
        vault: s.vault,
        vm: s.vm,
        agent: s.agent,
        items,
    }
}

/// A week with a spring-forward change: every 15-minute log slot, six differentials and
/// one full (02:30 does not exist that Sunday, so it runs at 03:30 CEST), nothing else.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_week_of_schedule_across_dst(pool: PgPool) {
    let p = protect(pool, weekly_dst_policy(), vec![db("MSSQLSERVER", "sales")]).await;
    let mut lsns = Lsns::default();
    let start = utc("2027-03-22T00:00:00Z");
    assert_eq!(
        p.app.service.schedule_tick(start).await.unwrap(),
        0,
        "no backup fires when protection starts"
    );
    // The first slot is promoted to a full (the chain has none); from then on the schedule
    // alone decides.
    p.app
        .service
        .schedule_tick(start + Duration::minutes(15))
        .await
        .unwrap();
    assert_eq!(
        run_backups(&p.app, &p.agent, &mut lsns, start + Duration::minutes(15)).await,
        ["backup_full"]
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut full_at = Vec::new();
    let mut now = start + Duration::minutes(15);
    while now < start + Duration::days(7) + Duration::minutes(15) {
        now += Duration::minutes(15);
        p.app.service.schedule_tick(now).await.unwrap();
        for kind in run_backups(&p.app, &p.agent, &mut lsns, now).await {
            if kind == "backup_full" {
                full_at.push(now);
            }
            *counts.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(counts.get("backup_log"), Some(&(7 * 96)));
    assert_eq!(counts.get("backup_differential"), Some(&6));
    assert_eq!(counts.get("backup_full"), Some(&1));
    assert_eq!(full_at, [utc("2027-03-28T01:30:00Z")]);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn first_backup_is_a_full_and_simple_recovery_pauses_logs(pool: PgPool) {
    let simple = json!({"instance": "MSSQLSERVER", "name": "staging", "recovery_model": "simple", "size_bytes": 1});
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), simple.clone()],
    )
    .await;
    let mut lsns = Lsns::default();
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    let items = p
        .app
        .get(
            &format!("/v1/vaults/{}/protected-items", p.vault),
            &p.app.admin(),
        )
        .await;
    assert_eq!(items.body["items"][0]["health"], "awaiting_first_backup");
    // The first due slot (a log slot) is promoted to a full for both.
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(15))
        .await
        .unwrap();
    let first = run_backups(&p.app, &p.agent, &mut lsns, t0 + Duration::minutes(15)).await;
    assert_eq!(first, ["backup_full"]);
    let fulls = jobs(&p.app, "kind=backup_full").await;
    assert_eq!(fulls.len(), 1, "{fulls:?}");
    assert_eq!(job_databases(&fulls[0]), ["sales", "staging"]);
    let sales = p
        .app
        .get(
            &format!(
                "/v1/vaults/{}/protected-items/{}",
                p.vault, p.items["sales"]
            ),
            &p.app.admin(),
        )
        .await;
    assert_eq!(sales.body["health"], "healthy");
    assert_eq!(
        sales.body["last_full_at"],
        json!(t0 + Duration::minutes(15))
    );
    // Then logs for sales only.
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(30))
        .await
        .unwrap();
    let next = claim(&p.app, &p.agent, 50).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0]["kind"], "backup_log");
    assert_eq!(next[0]["items"].as_array().unwrap().len(), 1);
    assert_eq!(next[0]["items"][0]["database"], "sales");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_log_chain_gap_promotes_the_next_backup_to_a_full(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales")],
    )
    .await;
    let mut lsns = Lsns::default();
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(15))
        .await
        .unwrap();
    run_backups(&p.app, &p.agent, &mut lsns, t0 + Duration::minutes(15)).await;
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(30))
        .await
        .unwrap();
    // Another tool took a log backup: the chain jumps ahead (and the log that follows
    // ends after it starts, as every log does).
    lsns.last_log.insert("sales".into(), 999_999);
    lsns.next = 1_000_000;
    assert_eq!(
        run_backups(&p.app, &p.agent, &mut lsns, t0 + Duration::minutes(30)).await,
        ["backup_log"]
    );
    let points = p.points("sales").await;
    assert_eq!(points["items"][1]["chain_gap"], true);
    let item = p
        .app
        .get(
            &format!(
                "/v1/vaults/{}/protected-items/{}",
                p.vault, p.items["sales"]
            ),
            &p.app.admin(),
        )
        .await;
    assert_eq!(item.body["health"], "chain_broken");
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(45))
        .await
        .unwrap();
    let next = claim(&p.app, &p.agent, 50).await;
    assert_eq!(
        next[0]["kind"], "backup_differential",
        "the full is intact: a differential heals the log chain (the policy has them)"
    );
}

/// Two replicas tick the same schedule many times: no slot becomes two jobs.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn two_replicas_never_duplicate_a_job(pool: PgPool) {
    let dbs: Vec<Value> = (0..60)
        .map(|i| db("MSSQLSERVER", &format!("db{i}")))
        .collect();
    let p = protect(pool.clone(), weekly_dst_policy(), dbs).await;
    sql::forge_fulls_taken(&pool).await;
    let other = TestApp::new(pool.clone()).service;
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    let ticks = 24;
    for i in 1..=ticks {
        let now = t0 + Duration::minutes(15 * i);
        let (a, b) = tokio::join!(p.app.service.schedule_tick(now), other.schedule_tick(now));
        assert_eq!(
            a.unwrap() + b.unwrap(),
            2,
            "slot {now}: one firing, 60 databases"
        );
        // The jobs leave the queue as if they had run, so coalescing cannot hide a
        // duplicate: every slot must be fired by exactly one replica.
        sql::drain_queue(&pool).await;
    }
    let jobs: Vec<(String, Value)> = jobs(&p.app, "")
        .await
        .into_iter()
        .filter(|j| j["kind"].as_str().unwrap().starts_with("backup_"))
        .map(|j| (j["kind"].as_str().unwrap().to_owned(), j["items"].clone()))
        .collect();
    assert_eq!(jobs.len(), 2 * ticks as usize, "{jobs:?}");
    assert!(jobs.iter().all(|j| j.0 == "backup_log"));
    let expected_sizes: Vec<usize> = batch((0..60).collect::<Vec<_>>())
        .iter()
        .map(Vec::len)
        .collect();
    let mut per_item: HashMap<String, i64> = HashMap::new();
    for pair in jobs.chunks(2) {
        let mut sizes: Vec<usize> = pair.iter().map(|j| j.1.as_array().unwrap().len()).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(sizes, expected_sizes, "split as the domain's batch");
        for (_, items) in pair {
            for item in items.as_array().unwrap() {
                *per_item
                    .entry(item["protected_item_id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    assert_eq!(per_item.len(), 60);
    assert!(
        per_item.values().all(|&n| n == ticks),
        "each database once per slot: {per_item:?}"
    );
    assert_eq!(sql::slots_fired(&pool, "backup_log").await, ticks);
}

/// The slot's primary key is the last word: a replica that read the same due slot as
/// another and inserts it after the other committed gets nothing.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_slot_is_claimed_once_even_by_a_stale_reader(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales")],
    )
    .await;
    let gold = policy(&p.app, &p.vault, "Gold").await;
    let (policy, version): (uuid::Uuid, i64) = (
        gold["id"].as_str().unwrap().parse().unwrap(),
        gold["version"].as_i64().unwrap(),
    );
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    let slot = t0 + Duration::minutes(15);
    let next = slot + Duration::minutes(15);
    let claim = |pool: PgPool| async move {
        let mut conn = pool.acquire().await.unwrap();
        backvault_store::schedule::schedule_claim_slot(
            &mut conn,
            policy,
            version,
            backvault_domain::jobs::JobKind::BackupLog,
            slot,
            next,
        )
        .await
        .unwrap()
    };
    // Both transactions read the due slot; the second inserts only after the first commits.
    let mut first = pool.begin().await.unwrap();
    let claimed = backvault_store::schedule::schedule_claim_slot(
        &mut first,
        policy,
        version,
        backvault_domain::jobs::JobKind::BackupLog,
        slot,
        next,
    )
    .await
    .unwrap();
    assert_eq!(claimed, Some(slot));
    let second = tokio::spawn(claim(pool.clone()));
    let pool_ref = &pool;
    wait_until(
        std::time::Duration::from_secs(10),
        "the second insert to wait for the first's key",
        || async move { sql::sessions_waiting_for_a_lock(pool_ref).await > 0 },
    )
    .await;
    assert!(!second.is_finished(), "the second insert waits on the key");
    first.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), None);
    assert_eq!(claim(pool.clone()).await, None, "and nobody later");
    let stale = backvault_store::schedule::schedule_claim_slot(
        &mut pool.acquire().await.unwrap(),
        policy,
        version - 1,
        backvault_domain::jobs::JobKind::BackupLog,
        next,
        next + Duration::minutes(15),
    )
    .await
    .unwrap();
    assert_eq!(
        stale, None,
        "a claim from an older policy version does nothing"
    );
}

/// The database split into jobs in SQL is the domain's `batch`, for every size.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_sql_split_into_jobs_is_the_domains(pool: PgPool) {
    let rows = sql::batch_of_in_sql(&pool, 400, MAX_ITEMS_PER_JOB as i32).await;
    assert_eq!(rows.len(), 400 * 401 / 2);
    for (n, i, job) in rows {
        assert_eq!(
            job as usize,
            batch_of(i as usize, n as usize),
            "item {i} of {n}"
        );
    }
}

/// A database whose scheduled job of a type is still queued is skipped by the next slot
/// of that type (coalesced); others are not, and an on-demand job does not count.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_pending_scheduled_job_coalesces_the_next_slot(pool: PgPool) {
    let p = sales_and_hr_with_fulls(&pool).await;
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    assert_eq!(
        p.app
            .service
            .schedule_tick(t0 + Duration::minutes(15))
            .await
            .unwrap(),
        1
    );
    // The 10:15 job is left with sales only, still queued: hr's log is done. hr also gets
    // an on-demand log, which is not a scheduled one.
    sql::forge_jobs_left_with(&pool, "backup_log", "sales").await;
    let on_demand = p
        .app
        .post(
            &format!(
                "/v1/vaults/{}/protected-items/{}/backup",
                p.vault, p.items["hr"]
            ),
            &p.app.admin(),
            json!({"type": "log"}),
        )
        .await;
    assert_eq!(on_demand.status, StatusCode::ACCEPTED, "{}", on_demand.body);
    assert_eq!(
        p.app
            .service
            .schedule_tick(t0 + Duration::minutes(30))
            .await
            .unwrap(),
        1
    );
    let latest = jobs(&p.app, "kind=backup_log")
        .await
        .into_iter()
        .filter(|j| j["priority"] == "scheduled")
        .max_by_key(|j| j["id"].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(
        job_databases(&latest),
        ["hr"],
        "sales is coalesced, hr is not"
    );
}

/// A policy change that moves no slot (retention only) keeps the due slot; one that moves
/// the log slots starts the log schedule afresh, at the new schedule's next slot.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn policy_changes_restart_only_the_schedules_they_move(pool: PgPool) {
    let p = sales_and_hr_with_fulls(&pool).await;
    let replace = |spec: Value| replace_policy(&p.app, &p.vault, "Gold", spec);
    let t0 = utc("2027-01-04T10:05:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    let mut spec = weekly_dst_policy();
    spec["log"]["retention_days"] = json!(7);
    replace(spec.clone()).await;
    let at = |minutes| t0 + Duration::minutes(minutes);
    assert_eq!(
        p.app.service.schedule_tick(at(10)).await.unwrap(),
        1,
        "the 10:15 log slot still fires"
    );
    sql::drain_queue(&pool).await;
    spec["log"]["frequency_minutes"] = json!(60);
    replace(spec).await;
    assert_eq!(
        p.app.service.schedule_tick(at(25)).await.unwrap(),
        0,
        "the hourly schedule starts at 10:30"
    );
    assert_eq!(p.app.service.schedule_tick(at(40)).await.unwrap(), 0);
    assert_eq!(
        p.app.service.schedule_tick(at(55)).await.unwrap(),
        1,
        "its first slot: 11:00"
    );
}

/// A database moved to another policy while its old policy's slot is being made waits for
/// those jobs, and the new policy's same slot coalesces it: one job per slot.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_database_moving_policies_mid_tick_gets_one_job_per_slot(pool: PgPool) {
    let p = sales_and_hr_with_fulls(&pool).await;
    let admin = p.app.admin();
    let created = p
        .app
        .post(
            &format!("/v1/vaults/{}/policies", p.vault),
            &admin,
            json!({"name": "Silver", "spec": weekly_dst_policy()}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    // hr keeps Silver in use; both schedules start at 10:05.
    assert_eq!(p.change_policy("hr", "Silver").await.status, StatusCode::OK);
    let t0 = utc("2027-01-04T10:05:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();

    // A tick is making Gold's 10:15 log jobs (sales) and has not committed yet.
    let slot = utc("2027-01-04T10:15:00Z");
    let gold = policy(&p.app, &p.vault, "Gold").await;
    let (gold, version): (uuid::Uuid, i64) = (
        gold["id"].as_str().unwrap().parse().unwrap(),
        gold["version"].as_i64().unwrap(),
    );
    let mut tick = pool.begin().await.unwrap();
    let claimed = backvault_store::schedule::schedule_claim_slot(
        &mut tick,
        gold,
        version,
        backvault_domain::jobs::JobKind::BackupLog,
        slot,
        slot + Duration::minutes(15),
    )
    .await
    .unwrap();
    assert_eq!(claimed, Some(slot));
    backvault_store::schedule::schedule_enqueue(
        &mut tick,
        gold,
        backvault_domain::jobs::JobKind::BackupLog,
        slot,
        slot,
        backvault_service::scheduler::slot_jobs(backvault_domain::jobs::JobKind::BackupLog, None),
    )
    .await
    .unwrap();
    let committed = std::sync::atomic::AtomicBool::new(false);
    let (moved, ()) = tokio::join!(
        async {
            let res = p.change_policy("sales", "Silver").await;
            (
                res.status,
                committed.load(std::sync::atomic::Ordering::SeqCst),
            )
        },
        async {
            let pool = &pool;
            wait_until(
                std::time::Duration::from_secs(10),
                "the move to wait for the tick's locks",
                || async move { sql::sessions_waiting_for_a_lock(pool).await > 0 },
            )
            .await;
            committed.store(true, std::sync::atomic::Ordering::SeqCst);
            tick.commit().await.unwrap();
        }
    );
    assert_eq!(moved, (StatusCode::OK, true), "the move waits for the tick");

    // Silver's 10:15 slot: hr only, sales's Gold job is still queued.
    p.app.service.schedule_tick(slot).await.unwrap();
    let mut names: Vec<String> = jobs(&p.app, "kind=backup_log")
        .await
        .iter()
        .flat_map(job_databases)
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["hr", "sales"],
        "each database once for the 10:15 slot"
    );
}

/// A policy that protected nothing for a while starts its schedule afresh when a database
/// joins it again: the first run is the next slot, not the slots that passed meanwhile.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn resuming_into_an_idle_policy_waits_for_the_next_slot(pool: PgPool) {
    let p = sales_and_hr_with_fulls(&pool).await;
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    for name in ["sales", "hr"] {
        let stopped = p.stop(name).await;
        assert_eq!(stopped.status, StatusCode::OK, "{}", stopped.body);
    }
    let later = t0 + Duration::days(8) + Duration::minutes(7);
    assert_eq!(p.app.service.schedule_tick(later).await.unwrap(), 0);
    let resumed = p.resume("sales", "Gold").await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(
        p.app.service.schedule_tick(later).await.unwrap(),
        0,
        "no full, differential or log from the idle week"
    );
    assert_eq!(
        p.app
            .service
            .schedule_tick(later + Duration::minutes(8))
            .await
            .unwrap(),
        1,
        "the next log slot"
    );
}

/// Catching up across a full day runs the full and no differential beside it; `master`
/// never gets a differential.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn no_differential_beside_a_full_and_nothing_but_fulls_for_master(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "master")],
    )
    .await;
    sql::forge_fulls_taken(&pool).await;
    // The backup jobs after the first `skip`, by kind; they leave the queue as if run.
    let kinds_since = |skip: usize| {
        let (p, pool) = (&p, &pool);
        async move {
            let mut rows = p.backup_jobs().await.split_off(skip);
            rows.sort();
            sql::drain_queue(pool).await;
            rows
        }
    };
    // Friday 2027-01-08: the 22:00 (21:00Z) differential runs for sales, not master.
    p.app
        .service
        .schedule_tick(utc("2027-01-08T20:50:00Z"))
        .await
        .unwrap();
    let mark = 0;
    p.app
        .service
        .schedule_tick(utc("2027-01-08T21:00:00Z"))
        .await
        .unwrap();
    assert_eq!(
        kinds_since(mark).await,
        [
            ("backup_differential".to_owned(), vec!["sales".to_owned()]),
            // By name, whatever master's recovery model says: it takes fulls only.
            ("backup_log".to_owned(), vec!["sales".to_owned()]),
        ]
    );
    // Down from Saturday 20:00Z to Sunday 02:00Z: Saturday's differential (21:00Z) and
    // Sunday's full (02:30 CET = 01:30Z) are both missed. Only the full runs.
    p.app
        .service
        .schedule_tick(utc("2027-01-09T20:00:00Z"))
        .await
        .unwrap();
    sql::drain_queue(&pool).await;
    let mark = p.backup_jobs().await.len();
    p.app
        .service
        .schedule_tick(utc("2027-01-10T02:00:00Z"))
        .await
        .unwrap();
    let caught_up = kinds_since(mark).await;
    assert_eq!(
        caught_up,
        [
            (
                "backup_full".to_owned(),
                vec!["master".to_owned(), "sales".to_owned()]
            ),
            ("backup_log".to_owned(), vec!["sales".to_owned()]),
        ]
    );
}

/// Changing an item's policy, stopping and resuming protection take effect at the next
/// tick, with nothing to reset per item.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn policy_changes_stops_and_resumes_take_effect_at_the_next_tick(pool: PgPool) {
    let p = sales_and_hr_with_fulls(&pool).await;
    let mut hourly = weekly_dst_policy();
    hourly["log"]["frequency_minutes"] = json!(60);
    let admin = p.app.admin();
    let created = p
        .app
        .post(
            &format!("/v1/vaults/{}/policies", p.vault),
            &admin,
            json!({"name": "Hourly", "spec": hourly}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    // Each tick: what got a log job, the queue emptied as if the jobs had run.
    let tick = |at: DateTime<Utc>| {
        let (app, pool) = (&p.app, &pool);
        async move {
            app.service.schedule_tick(at).await.unwrap();
            let mut names: Vec<String> = jobs(app, "status=queued")
                .await
                .iter()
                .flat_map(job_databases)
                .collect();
            names.sort();
            sql::drain_queue(pool).await;
            names
        }
    };
    let t0 = utc("2027-01-04T10:05:00Z");
    assert!(
        tick(t0).await.is_empty(),
        "the first tick starts the schedules"
    );
    assert_eq!(tick(t0 + Duration::minutes(10)).await, ["hr", "sales"]);

    let changed = p.change_policy("sales", "Hourly").await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    // 10:30: Gold's slot (hr only); Hourly's schedule starts, its next slot is 11:00.
    assert_eq!(tick(t0 + Duration::minutes(25)).await, ["hr"]);
    assert_eq!(tick(t0 + Duration::minutes(40)).await, ["hr"]);
    assert_eq!(tick(t0 + Duration::minutes(55)).await, ["hr", "sales"]);

    let stopped = p.stop("hr").await;
    assert_eq!(stopped.status, StatusCode::OK, "{}", stopped.body);
    assert!(tick(t0 + Duration::minutes(70)).await.is_empty());
    let resumed = p.resume("hr", "Gold").await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    // Gold protected nothing while hr was stopped: its schedule starts again at 11:30.
    assert!(tick(t0 + Duration::minutes(85)).await.is_empty());
    assert_eq!(tick(t0 + Duration::minutes(100)).await, ["hr"]);
    assert_eq!(tick(t0 + Duration::minutes(115)).await, ["hr", "sales"]);
}

/// The seed's example through recorded points: weekly full on Nov 16 kept 4 weeks, logs
/// to Nov 22 kept 30 days; the full stays until its last log expires (Dec 22).
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_recovery_chain_keeps_a_full_for_its_logs_and_restores_to_any_instant(pool: PgPool) {
    let spec = json!({
        "time_zone": "UTC",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:00"},
        "log": {"frequency_minutes": 60, "retention_days": 30},
        "retention": {"weekly": {"weeks": 4}}
    });
    let p = protect(pool.clone(), spec, vec![db("MSSQLSERVER", "sales")]).await;
    let mut lsns = Lsns::default();
    let item = &p.items["sales"];
    // Run the full on Nov 16 and hourly logs until Nov 22 23:00, as the agent reports them.
    let full_at = utc("2025-11-16T00:00:00Z");
    p.app
        .service
        .schedule_tick(full_at - Duration::hours(1))
        .await
        .unwrap();
    p.app.service.schedule_tick(full_at).await.unwrap();
    assert_eq!(
        run_backups(&p.app, &p.agent, &mut lsns, full_at).await,
        ["backup_full"]
    );
    let mut at = full_at;
    while at < utc("2025-11-22T23:00:00Z") {
        at += Duration::hours(1);
        p.app.service.schedule_tick(at).await.unwrap();
        run_backups(&p.app, &p.agent, &mut lsns, at).await;
    }
    let points = p.points("sales").await;
    let items = points["items"].as_array().unwrap();
    assert_eq!(items.len(), 1 + 6 * 24 + 23);
    let full = &items[0];
    assert_eq!(full["backup_type"], "full");
    assert_eq!(full["expires_at"], "2025-12-14T00:00:00Z");
    assert_eq!(full["chain_until"], "2025-12-22T23:00:00Z");
    assert_eq!(full["delete_after"], "2025-12-22T23:00:00Z");
    assert_eq!(
        points["restorable_ranges"],
        json!([{"from": "2025-11-16T00:00:00Z", "to": "2025-11-22T23:00:00Z"}])
    );

    let plan = p
        .app
        .post(
            &format!("/v1/vaults/{}/protected-items/{item}/restore-plan", p.vault),
            &p.app.admin(),
            json!({"point_in_time": "2025-11-16T02:30:00Z"}),
        )
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    let types: Vec<&str> = plan.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["backup_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["full", "log", "log", "log"]);
    assert_eq!(plan.body["total_size_bytes"], 400);
    let outside = p
        .app
        .post(
            &format!("/v1/vaults/{}/protected-items/{item}/restore-plan", p.vault),
            &p.app.admin(),
            json!({"point_in_time": "2025-11-30T00:00:00Z"}),
        )
        .await;
    assert_eq!(
        (outside.status, outside.code()),
        (StatusCode::CONFLICT, "point_not_covered")
    );

    // A restore to another name runs on the agent.
    let restore = p
        .app
        .post(
            &format!("/v1/vaults/{}/protected-items/{item}/restore", p.vault),
            &p.app.admin(),
            json!({"point_in_time": "2025-11-20T12:00:00Z", "target_database": "sales_copy"}),
        )
        .await;
    assert_eq!(restore.status, StatusCode::ACCEPTED, "{}", restore.body);
    assert_eq!(restore.body["kind"], "restore");
    assert_eq!(restore.body["payload"]["target_database"], "sales_copy");
    let over = p
        .app
        .post(
            &format!("/v1/vaults/{}/protected-items/{item}/restore", p.vault),
            &p.app.admin(),
            json!({"point_in_time": "2025-11-20T12:00:00Z"}),
        )
        .await;
    assert_eq!(
        over.violations()[0].1,
        "UserErrorCannotRestoreExistingDBWithoutForceOverwrite"
    );

    // Everything is past its expiry now (2026): the sweep removes the logs and the full
    // together, but never a full while one of its dependents lives. The last log lives
    // a day longer, and the full's own record of its chain is gone.
    let last_log = items.last().unwrap();
    assert_eq!(last_log["backup_type"], "log");
    sql::forge_expiry(
        &pool,
        last_log["id"].as_str().unwrap(),
        Utc::now() + Duration::days(1),
    )
    .await;
    sql::forge_no_chain_until(&pool, full["id"].as_str().unwrap()).await;
    let removed = p.app.service.sweep_recovery_points().await.unwrap();
    assert_eq!(removed, 6 * 24 + 22, "all logs but the live one");
    let left: Vec<Value> = p.points("sales").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["backup_type"].clone())
        .collect();
    assert_eq!(left, ["full", "log"], "the full stays for its live log");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn policy_retention_changes_recompute_expiry_and_rpo_is_reported(pool: PgPool) {
    // No differentials: the test runs at the wall clock's time of day.
    let mut base = weekly_dst_policy();
    base.as_object_mut().unwrap().remove("differential");
    let p = protect(pool.clone(), base.clone(), vec![db("MSSQLSERVER", "sales")]).await;
    let mut lsns = Lsns::default();
    let t0 = Utc::now() - Duration::hours(2);
    p.app.service.schedule_tick(t0).await.unwrap();
    p.app
        .service
        .schedule_tick(t0 + Duration::minutes(15))
        .await
        .unwrap();
    run_backups(&p.app, &p.agent, &mut lsns, t0 + Duration::minutes(15)).await;
    let before = p.points("sales").await;
    let full_expiry: DateTime<Utc> = before["items"][0]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let mut spec = base;
    spec["retention"]["weekly"]["weeks"] = json!(8);
    replace_policy(&p.app, &p.vault, "Gold", spec).await;
    let after = p.points("sales").await;
    let new_expiry: DateTime<Utc> = after["items"][0]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!((new_expiry - full_expiry).num_days(), 28);

    // The last point is 105 minutes old; the policy allows 15 minutes (+15 grace).
    let rpo = p
        .app
        .get(&format!("/v1/vaults/{}/rpo", p.vault), &p.app.admin())
        .await;
    assert_eq!(rpo.body["protected"], 1);
    assert_eq!(rpo.body["breached"], 1);
    assert_eq!(rpo.body["items"][0]["allowed_gap_minutes"], 15);
    let metrics = p
        .app
        .call(axum::http::Method::GET, "/metrics", None, None, &[])
        .await;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("backvault_rpo_breaching_items 1")
    );
    // A retention change moves no slot: the next tick runs the log slots missed since,
    // once (the weekly full only if its slot passed in these two hours).
    let enqueued = p.app.service.schedule_tick(Utc::now()).await.unwrap();
    let kinds = run_backups(&p.app, &p.agent, &mut lsns, Utc::now()).await;
    assert_eq!(kinds.len(), enqueued);
    assert!(kinds.iter().any(|k| k == "backup_log"), "{kinds:?}");
    let rpo = p
        .app
        .get(&format!("/v1/vaults/{}/rpo", p.vault), &p.app.admin())
        .await;
    assert_eq!(rpo.body["breached"], 0, "{}", rpo.body);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn scheduler_run_is_for_admins_and_takes_a_clock_only_in_dev(pool: PgPool) {
    let app = TestApp::new(pool);
    let run = app.post("/v1/scheduler/run", &app.admin(), json!({})).await;
    assert_eq!(
        (run.status, run.body["jobs_enqueued"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    let clock = app
        .post(
            "/v1/scheduler/run",
            &app.admin(),
            json!({"now": "2030-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(
        (clock.status, clock.code()),
        (StatusCode::FORBIDDEN, "clock_override_disabled")
    );
    let operator = app.token(backvault_service::Role::Operator, &["*"]);
    assert_eq!(
        app.post("/v1/scheduler/run", &operator, json!({}))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

/// After downtime the missed slots make one job per type, not one per slot.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn missed_slots_after_downtime_make_one_job(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales")],
    )
    .await;
    sql::forge_fulls_taken(&pool).await;
    let t0 = utc("2027-01-04T10:00:00Z");
    p.app.service.schedule_tick(t0).await.unwrap();
    // Down from 10:00 to 13:00 UTC: twelve missed log slots, nothing else due.
    let jobs = p
        .app
        .service
        .schedule_tick(t0 + Duration::hours(3))
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    let backups = p.backup_jobs().await;
    assert_eq!(
        backups,
        [("backup_log".to_owned(), vec!["sales".to_owned()])]
    );
    let job = crate::helpers::jobs(&p.app, "kind=backup_log").await[0].clone();
    let job = p
        .app
        .get(
            &format!("/v1/jobs/{}", job["id"].as_str().unwrap()),
            &p.app.admin(),
        )
        .await;
    let payload: ScheduledBackup = serde_json::from_value(job.body["payload"].clone()).unwrap();
    assert_eq!(
        payload,
        ScheduledBackup {
            slot_at: t0 + Duration::minutes(15),
            scheduled_at: t0 + Duration::hours(3)
        },
        "the first slot missed, enqueued at the restart"
    );
    // The next slot is the one after the restart, not a backlog.
    let after = t0 + Duration::hours(3) + Duration::minutes(1);
    assert_eq!(p.app.service.schedule_tick(after).await.unwrap(), 0);
    let metrics = p
        .app
        .call(axum::http::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains("backvault_scheduled_jobs_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("backvault_scheduler_tick_duration_seconds_count 3\n"),
        "{text}"
    );
}

/// A full expires together with its last log (the chain ties them); small sweep batches
/// must still take the dependents first and never cut a full from its chain.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn sweeping_in_small_batches_keeps_chains_whole(pool: PgPool) {
    let spec = json!({"time_zone": "UTC", "full": {"frequency": "daily", "time": "00:00"},
        "log": {"frequency_minutes": 60, "retention_days": 7}, "retention": {"daily": {"days": 7}}});
    let p = protect(
        pool.clone(),
        spec,
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    let mut lsns = Lsns::default();
    let t0 = utc("2025-01-01T00:00:00Z");
    p.app
        .service
        .schedule_tick(t0 - Duration::hours(1))
        .await
        .unwrap();
    for h in 0..6 {
        let at = t0 + Duration::hours(h);
        p.app.service.schedule_tick(at).await.unwrap();
        run_backups(&p.app, &p.agent, &mut lsns, at).await;
    }
    assert_eq!(
        p.point_count().await,
        12,
        "a full and five logs for each database"
    );
    let removed = p
        .app
        .service
        .sweep_recovery_points_in_batches(3)
        .await
        .unwrap();
    assert_eq!(removed, 12);
}

/// A `--dev` rehearsal ticks at a chosen future instant; a server without `--dev` on the
/// same database forgets those cursors, so its real ticks are not held back until then.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn rehearsed_schedule_cursors_are_forgotten(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales")],
    )
    .await;
    let now = Utc::now();
    p.app.service.schedule_tick(now).await.unwrap();
    let (real, _) = sql::schedule_cursors(&pool).await;
    assert!(real > 0);
    let rehearsed = now + Duration::days(3 * 365);
    p.app.service.schedule_tick(rehearsed).await.unwrap();
    p.app
        .service
        .schedule_tick(rehearsed + Duration::hours(2))
        .await
        .unwrap();
    let latest_next = || async { sql::schedule_cursors(&pool).await.1.unwrap() };
    assert!(
        latest_next().await > rehearsed,
        "the rehearsal moved the cursors"
    );

    let forgotten = p.app.service.forget_rehearsals().await.unwrap();
    assert!(forgotten > 0);
    assert!(
        latest_next().await <= now + Duration::days(8),
        "only real cursors remain"
    );
    let (left, _) = sql::schedule_cursors(&pool).await;
    assert_eq!(left, real, "the real schedule is untouched");
    assert_eq!(p.app.service.forget_rehearsals().await.unwrap(), 0);
}
