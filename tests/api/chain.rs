//! The recovery chain as SQL Server sees it, through the API: an agent reports chosen
//! backupset facts and the server must record, range and plan exactly what SQL Server
//! would restore (issue 11's findings, one test each).

use axum::http::{Method, StatusCode};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{Response, chain_needs, claim, protected_items};
use crate::protection::{db, db_id, inventory, protectable, run_discovery};
use crate::recovery::{Protected, protect};

pub(crate) fn spec() -> Value {
    json!({
        "time_zone": "UTC",
        "full": {"frequency": "weekly", "days": ["sunday"], "time": "00:00"},
        "differential": {"days": ["monday"], "time": "12:00", "retention_days": 14},
        "log": {"frequency_minutes": 15, "retention_days": 14},
        "retention": {"weekly": {"weeks": 4}}
    })
}

pub(crate) async fn sales(pool: PgPool) -> Protected {
    protect(pool, spec(), vec![db("MSSQLSERVER", "sales")]).await
}

/// A backup as an agent reports it, with `facts` (second-version fields) merged in.
pub(crate) fn point(kind: &str, at: DateTime<Utc>, first: &str, last: &str, facts: Value) -> Value {
    let mut p = json!({"instance": "MSSQLSERVER", "database": "sales", "backup_type": kind,
                       "started_at": at, "backup_time": at, "first_lsn": first, "last_lsn": last,
                       "database_backup_lsn": "0", "size_bytes": 100});
    for (k, v) in facts.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

/// Runs an on-demand backup of `sales` whose agent reports `point`.
pub(crate) async fn backup(p: &Protected, point: Value) -> Response {
    let kind = match point["backup_type"].as_str().unwrap() {
        "full" => "full",
        "copy_only_full" => "copy_only_full",
        "differential" => "differential",
        _ => "log",
    };
    let body = match kind {
        "full" | "copy_only_full" => json!({"type": kind, "retention_days": 60}),
        _ => json!({"type": kind}),
    };
    let path = format!("{}/backup", p.item_path("sales"));
    let started = p.app.post(&path, &p.app.admin(), body).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.body);
    let jobs = claim(&p.app, &p.agent, 1).await;
    let job = &jobs[0];
    p.app
        .post(
            &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
            &p.agent,
            json!({"lease": job["lease"], "result": {"kind": "backup", "recovery_points": [point]}}),
        )
        .await
}

async fn plan(p: &Protected, at: DateTime<Utc>) -> Response {
    p.app
        .post(
            &format!("{}/restore-plan", p.item_path("sales")),
            &p.app.admin(),
            json!({"point_in_time": at}),
        )
        .await
}

/// A discovery of the item's VM whose agent reports `inv`.
async fn rediscover(p: &Protected, inv: &Value) {
    let item = p.app.get(&p.item_path("sales"), &p.app.admin()).await;
    let vm = item.body["vm_id"].as_str().unwrap();
    let res = p
        .app
        .call(
            Method::POST,
            &format!("/v1/vaults/{}/vms/{vm}/discover", p.vault),
            Some(&p.app.admin()),
            None,
            &[],
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    run_discovery(&p.app, &p.agent, inv).await;
}

fn statements(plan: &Value) -> Vec<(String, String, String)> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["statement"].as_str().unwrap().to_owned(),
                s["backup_type"].as_str().unwrap().to_owned(),
                s["recovery"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn range(from: DateTime<Utc>, to: DateTime<Utc>) -> Value {
    json!({"from": from, "to": to})
}

/// Instants a minute apart, all inside an on-demand job's window.
fn times() -> impl Fn(i64) -> DateTime<Utc> {
    let base = Utc::now() - Duration::minutes(4);
    let base = base - Duration::nanoseconds(i64::from(base.timestamp_subsec_nanos()));
    move |seconds| base + Duration::seconds(seconds)
}

const GUID: &str = "6f0d6d4e-2b1b-4c47-9a55-0c7a1f2e3d4c";

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn lsns_come_in_both_of_sql_servers_forms_and_in_order(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let textual = point(
        "full",
        t(0),
        "0000002a:00000010:0001",
        "0000002a:00000020:0001",
        json!({"checkpoint_lsn": "0000002a:00000018:0001"}),
    );
    let res = backup(&p, textual).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let listed = p.points("sales").await;
    assert_eq!(listed["items"][0]["first_lsn"], "42000000001600001");
    assert_eq!(listed["items"][0]["checkpoint_lsn"], "42000000002400001");

    let backwards = point("log", t(10), "900", "100", json!({}));
    let res = backup(&p, backwards).await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
    assert_eq!(res.violations()[0].1, "lsn_order");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_busy_databases_differential_matches_its_fulls_checkpoint(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    // An open transaction: the full's first LSN is well before its checkpoint.
    let full = point(
        "full",
        t(0),
        "100",
        "150",
        json!({"checkpoint_lsn": "140", "differential_base_lsn": "140", "differential_base_guid": GUID}),
    );
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    let diff = point(
        "differential",
        t(10),
        "300",
        "310",
        json!({"database_backup_lsn": "140", "differential_base_lsn": "140", "differential_base_guid": GUID,
               "checkpoint_lsn": "300", "recovery_model": "full"}),
    );
    assert_eq!(backup(&p, diff).await.status, StatusCode::OK);
    let listed = p.points("sales").await;
    let diff = &listed["items"][1];
    assert_eq!(diff["chain_gap"], false, "{diff}");
    assert_eq!(diff["full_id"], listed["items"][0]["id"]);
    let res = plan(&p, t(10)).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(
        statements(&res.body),
        [
            (
                "restore_database".into(),
                "full".into(),
                "no_recovery".into()
            ),
            (
                "restore_database".into(),
                "differential".into(),
                "recovery".into()
            )
        ]
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_differential_of_another_tools_full_is_a_break_and_never_planned(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let full = point("full", t(0), "100", "150", json!({"checkpoint_lsn": "140"}));
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    // Another tool took a full with checkpoint 200: SQL Server's base moved there.
    let diff = point(
        "differential",
        t(10),
        "300",
        "310",
        json!({"database_backup_lsn": "200", "differential_base_lsn": "200"}),
    );
    assert_eq!(backup(&p, diff).await.status, StatusCode::OK);
    let listed = p.points("sales").await;
    let diff = &listed["items"][1];
    assert_eq!(diff["chain_break"], "differential_base_unknown");
    assert_eq!(diff["full_id"], Value::Null);
    assert_eq!(listed["restorable_ranges"], json!([range(t(0), t(0))]));
    let res = plan(&p, t(10)).await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::CONFLICT, "point_not_covered")
    );
    let item = p.app.get(&p.item_path("sales"), &p.app.admin()).await;
    assert_eq!(item.body["health"], "chain_broken");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn data_backups_without_logs_are_instants_not_ranges(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    for (at, first) in [(0, 100), (60, 200)] {
        let full = point(
            "full",
            t(at),
            &first.to_string(),
            &(first + 10).to_string(),
            json!({"recovery_model": "simple", "checkpoint_lsn": first.to_string()}),
        );
        assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    }
    assert_eq!(
        p.points("sales").await["restorable_ranges"],
        json!([range(t(0), t(0)), range(t(60), t(60))])
    );
    assert_eq!(plan(&p, t(30)).await.code(), "point_not_covered");
    assert_eq!(plan(&p, t(60)).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_log_with_bulk_logged_changes_restores_to_its_end_only(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let full = point("full", t(0), "100", "110", json!({"checkpoint_lsn": "100"}));
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    for (at, first, last, bulk) in [
        (15, 100, 200, false),
        (30, 200, 300, true),
        (45, 300, 400, false),
    ] {
        let log = point(
            "log",
            t(at),
            &first.to_string(),
            &last.to_string(),
            json!({"has_bulk_logged_data": bulk, "recovery_model": "bulk_logged"}),
        );
        assert_eq!(backup(&p, log).await.status, StatusCode::OK);
    }
    assert_eq!(
        p.points("sales").await["restorable_ranges"],
        json!([range(t(0), t(15)), range(t(30), t(45))])
    );
    assert_eq!(
        plan(&p, t(20)).await.code(),
        "UserErrorRestoreNotPossibleBecauseLogBackupContainsBulkLoggedChanges"
    );
    let to_end = plan(&p, t(30)).await;
    assert_eq!(to_end.status, StatusCode::OK, "{}", to_end.body);
    assert_eq!(to_end.body["steps"][2]["stop_at"], Value::Null);
    let inside_next = plan(&p, t(40)).await;
    assert_eq!(inside_next.body["steps"][3]["stop_at"], json!(t(40)));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_copy_only_full_starts_a_log_restore(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let copy = point(
        "copy_only_full",
        t(0),
        "100",
        "110",
        json!({"checkpoint_lsn": "105", "is_copy_only": true}),
    );
    assert_eq!(backup(&p, copy).await.status, StatusCode::OK);
    let log = point("log", t(15), "90", "200", json!({}));
    assert_eq!(backup(&p, log).await.status, StatusCode::OK);
    let res = plan(&p, t(10)).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(
        statements(&res.body),
        [
            (
                "restore_database".into(),
                "copy_only_full".into(),
                "no_recovery".into()
            ),
            ("restore_log".into(), "log".into(), "recovery".into())
        ]
    );
    assert_eq!(res.body["steps"][1]["stop_at"], json!(t(10)));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_switch_to_simple_and_back_needs_a_differential(pool: PgPool) {
    let p = sales(pool.clone()).await;
    let t = times();
    let full = point("full", t(0), "100", "110", json!({"checkpoint_lsn": "100"}));
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    let item = p.app.get(&p.item_path("sales"), &p.app.admin()).await;
    assert_eq!(item.body["health"], "healthy");
    for model in ["simple", "full"] {
        let mut switched = db("MSSQLSERVER", "sales");
        switched["recovery_model"] = json!(model);
        rediscover(&p, &inventory(vec![switched])).await;
    }
    let item = p.app.get(&p.item_path("sales"), &p.app.admin()).await;
    assert_eq!(
        item.body["health"], "chain_broken",
        "SQL Server refuses log backups (Msg 4214) until a full or differential"
    );
    assert_eq!(
        chain_needs(&p.app, &p.items["sales"]).await,
        (false, true),
        "the policy has differentials"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_restore_job_says_what_to_run_and_backs_up_the_tail_first(pool: PgPool) {
    let p = sales(pool.clone()).await;
    let t = times();
    let full = point(
        "full",
        t(0),
        "100",
        "110",
        json!({"checkpoint_lsn": "100", "recovery_model": "full"}),
    );
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    let log = point(
        "log",
        t(30),
        "100",
        "200",
        json!({"recovery_model": "full"}),
    );
    assert_eq!(backup(&p, log).await.status, StatusCode::OK);

    let replace = p
        .app
        .post(
            &format!("{}/restore", p.item_path("sales")),
            &p.app.admin(),
            json!({"point_in_time": t(20), "overwrite": true, "tail_log_backup": false}),
        )
        .await;
    assert_eq!(replace.status, StatusCode::ACCEPTED, "{}", replace.body);
    assert_eq!(
        (
            &replace.body["payload"]["replace"],
            &replace.body["payload"]["tail_log_backup"]
        ),
        (&json!(true), &json!(false))
    );
    p.app
        .call(
            Method::POST,
            &format!("/v1/jobs/{}/cancel", replace.body["id"].as_str().unwrap()),
            Some(&p.app.admin()),
            None,
            &[],
        )
        .await;

    let res = p
        .app
        .post(
            &format!("{}/restore", p.item_path("sales")),
            &p.app.admin(),
            json!({"point_in_time": t(20), "overwrite": true}),
        )
        .await;
    assert_eq!(res.status, StatusCode::ACCEPTED, "{}", res.body);
    let payload = &res.body["payload"];
    assert_eq!(payload["tail_log_backup"], true, "{payload}");
    assert_eq!(payload["replace"], false);
    assert_eq!(
        statements(payload),
        [
            (
                "restore_database".into(),
                "full".into(),
                "no_recovery".into()
            ),
            ("restore_log".into(), "log".into(), "recovery".into())
        ]
    );
    assert_eq!(payload["steps"][1]["stop_at"], json!(t(20)));

    let job = claim(&p.app, &p.agent, 1).await.remove(0);
    assert_eq!(job["kind"], "restore");
    let tail = point(
        "log",
        t(40),
        "200",
        "250",
        json!({"recovery_model": "full"}),
    );
    let done = p
        .app
        .post(
            &format!("/v1/agent/jobs/{}/complete", job["job_id"].as_str().unwrap()),
            &p.agent,
            json!({"lease": job["lease"], "result": {"kind": "restore", "restored_database": "sales", "tail_log_backup": tail}}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let listed = p.points("sales").await;
    let last = &listed["items"][2];
    assert_eq!(
        (&last["backup_type"], &last["chain_gap"]),
        (&json!("log"), &json!(false))
    );
    assert_eq!(
        listed["restorable_ranges"],
        json!([range(t(0), t(40))]),
        "the tail is restorable: no work since the last log backup is lost"
    );
    let (needs_full, _) = chain_needs(&p.app, &p.items["sales"]).await;
    assert!(
        needs_full,
        "the overwritten database is a new recovery fork: its next backup is a full"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_backup_set_reported_twice_is_recorded_once(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let set = "0b4b7a1e-8a43-4d7c-9f6e-2b9d1c3e5f70";
    let full = point(
        "full",
        t(0),
        "100",
        "110",
        json!({"checkpoint_lsn": "100", "backup_set_uuid": set}),
    );
    assert_eq!(backup(&p, full.clone()).await.status, StatusCode::OK);
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    let listed = p.points("sales").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["items"][0]["backup_set_uuid"], set);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn tempdb_is_never_protectable(pool: PgPool) {
    let p = sales(pool.clone()).await;
    let mut tempdb = db("MSSQLSERVER", "tempdb");
    tempdb["system"] = json!(true);
    tempdb["recovery_model"] = json!("simple");
    rediscover(&p, &inventory(vec![db("MSSQLSERVER", "sales"), tempdb])).await;
    let containers = protectable(&p.app, &p.vault).await;
    let id = db_id(&containers, "tempdb");
    let entry = containers
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["databases"].as_array().unwrap())
        .find(|d| d["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["protectable"], false);
    assert_eq!(entry["issue"]["code"], "tempdb_not_protectable");
    let res = p
        .app
        .post(
            &format!("/v1/vaults/{}/protected-items", p.vault),
            &p.app.admin(),
            json!({"policy": "Gold", "databases": [id]}),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
    // Nor by auto-protection of its instance.
    let instance = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "MSSQLSERVER")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let intent = p
        .app
        .post(
            &format!("/v1/vaults/{}/auto-protection", p.vault),
            &p.app.admin(),
            json!({"instance_id": instance, "policy": "Gold"}),
        )
        .await;
    assert_eq!(intent.status, StatusCode::CREATED, "{}", intent.body);
    let protected: Vec<Value> = protected_items(&p.app, &p.vault, "")
        .await
        .iter()
        .map(|i| i["protected_name"].clone())
        .collect();
    assert_eq!(protected, ["sales"], "tempdb stays unprotected");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_new_chain_needs_a_full_even_after_a_copy_only_one(pool: PgPool) {
    let p = sales(pool.clone()).await;
    let t = times();
    let copy = point(
        "copy_only_full",
        t(0),
        "100",
        "110",
        json!({"checkpoint_lsn": "105", "is_copy_only": true}),
    );
    assert_eq!(backup(&p, copy).await.status, StatusCode::OK);
    let (needs_full, _) = chain_needs(&p.app, &p.items["sales"]).await;
    assert!(
        needs_full,
        "a copy-only full is no differential base: the next backup is a full"
    );
}

/// Items protected before the chain state existed keep their base and log chain: the
/// migration builds the state from the old columns.
#[sqlx::test(migrations = false)]
async fn items_protected_before_the_upgrade_keep_their_chain(pool: PgPool) {
    const CHAIN_STATE: i64 = 20261130000003;
    let run = |below: bool| {
        let pool = pool.clone();
        async move {
            for m in backvault_store::MIGRATOR
                .iter()
                .filter(|m| (m.version < CHAIN_STATE) == below)
            {
                sqlx::raw_sql(m.sql.clone()).execute(&pool).await.unwrap();
            }
        }
    };
    run(true).await;
    sqlx::raw_sql(
        "insert into vaults (id, subscription_id, resource_group, name, region)
             values ('00000000-0000-0000-0000-000000000001', 'sub-1', 'rg', 'v', 'westeurope');
         insert into vms (id, subscription_id, resource_group, name, region, deployment_model)
             values ('00000000-0000-0000-0000-000000000002', 'sub-1', 'rg', 'vm', 'westeurope', 'resource_manager');
         insert into sql_instances (id, vm_id, name, version)
             values ('00000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-000000000002', 'MSSQLSERVER', '2019');
         insert into sql_databases (id, vm_id, instance_id, name, recovery_model, size_bytes)
             values ('00000000-0000-0000-0000-000000000004', '00000000-0000-0000-0000-000000000002',
                     '00000000-0000-0000-0000-000000000003', 'sales', 'full', 1),
                    ('00000000-0000-0000-0000-000000000005', '00000000-0000-0000-0000-000000000002',
                     '00000000-0000-0000-0000-000000000003', 'fresh', 'full', 1);
         insert into protected_items (id, vault_id, database_id, state, protected_name, needs_full)
             values ('00000000-0000-0000-0000-000000000006', '00000000-0000-0000-0000-000000000001',
                     '00000000-0000-0000-0000-000000000004', 'stopped_retain', 'sales', false),
                    ('00000000-0000-0000-0000-000000000007', '00000000-0000-0000-0000-000000000001',
                     '00000000-0000-0000-0000-000000000005', 'stopped_retain', 'fresh', true);
         insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn,
                                      last_lsn, database_backup_lsn, size_bytes, chain_gap)
             values ('00000000-0000-0000-0000-000000000008', '00000000-0000-0000-0000-000000000006', 'full',
                     now(), now(), 100, 110, 0, 1, false),
                    ('00000000-0000-0000-0000-000000000009', '00000000-0000-0000-0000-000000000006', 'log',
                     now(), now(), 150, 200, 100, 1, true);
         update protected_items set last_full_id = '00000000-0000-0000-0000-000000000008',
                                    last_full_first_lsn = 100, last_log_lsn = 200
             where id = '00000000-0000-0000-0000-000000000006';",
    )
    .execute(&pool)
    .await
    .unwrap();
    run(false).await;

    let rows: Vec<(String, Value, bool, bool)> = sqlx::query_as(
        "select protected_name, chain, needs_full, needs_differential from protected_items order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let full_id = "00000000-0000-0000-0000-000000000008";
    assert_eq!(
        rows[0],
        (
            "fresh".to_owned(),
            json!({"needs": "full", "log_anchored": false}),
            true,
            false
        )
    );
    assert_eq!(
        rows[1],
        (
            "sales".to_owned(),
            json!({"base": {"point_id": full_id, "first_lsn": "100", "last_lsn": "110"},
                   "log_end": "200", "log_anchored": true, "anchor": "110", "needs": "nothing"}),
            false,
            false
        )
    );
    let state: backvault_domain::chain::ChainState =
        serde_json::from_value(rows[1].1.clone()).unwrap();
    assert_eq!(state.log_end, Some(backvault_domain::lsn::Lsn(200)));
    let flagged: (bool, Option<String>) = sqlx::query_as(
        "select chain_gap, chain_break from recovery_points where backup_type = 'log'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(flagged, (true, Some("log_chain_broken".to_owned())));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_database_in_an_availability_group_is_never_overwritten(pool: PgPool) {
    let p = sales(pool).await;
    let t = times();
    let full = point("full", t(0), "100", "110", json!({"checkpoint_lsn": "100"}));
    assert_eq!(backup(&p, full).await.status, StatusCode::OK);
    let mut joined = db("MSSQLSERVER", "hr");
    joined["availability_group"] = json!("ag1");
    let mut inv = inventory(vec![db("MSSQLSERVER", "sales"), joined]);
    inv["availability_groups"] = json!([{"name": "ag1", "backup_preference": "primary",
        "replicas": [{"vm_name": "sqlvm-01", "resource_group": "rg-sql", "instance": "MSSQLSERVER", "primary": true}]}]);
    rediscover(&p, &inv).await;
    let res = p
        .app
        .post(
            &format!("{}/restore", p.item_path("sales")),
            &p.app.admin(),
            json!({"point_in_time": t(0), "target_database": "hr", "overwrite": true}),
        )
        .await;
    assert_eq!(
        res.violations(),
        [(
            "/overwrite".to_owned(),
            "restore_target_in_availability_group".to_owned()
        )],
        "{}",
        res.body
    );
}
