use axum::http::{Method, StatusCode};
use backvault_service::Role;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, sql, weekly_spec};

async fn vault_policies(app: &TestApp, name: &str) -> String {
    let vault = app.vault(name, "sub-1").await;
    format!("/v1/vaults/{}/policies", vault["id"].as_str().unwrap())
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn create_get_list_replace_delete(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let base = vault_policies(&app, "policy-vault").await;

    let created = app
        .post(
            &base,
            &admin,
            json!({"name": "WeeklyFull", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.header("location"), format!("{base}/WeeklyFull"));
    assert!(
        created.header("etag").starts_with("\"1-"),
        "the version, then a digest"
    );
    assert_eq!(created.body["spec"], weekly_spec());

    // Names ignore case.
    let got = app.get(&format!("{base}/weeklyfull"), &admin).await;
    assert_eq!((got.status, &got.body), (StatusCode::OK, &created.body));

    let list = app.get(&format!("{base}?limit=1"), &admin).await;
    assert_eq!(list.body["items"][0]["name"], "HourlyLogBackup");
    let cursor = list.body["next_cursor"].as_str().unwrap();
    let second = app
        .get(&format!("{base}?limit=1&cursor={cursor}"), &admin)
        .await;
    assert_eq!(second.body["items"][0]["name"], "WeeklyFull");
    assert!(second.body["next_cursor"].is_null());

    let mut spec = weekly_spec();
    spec["log"]["frequency_minutes"] = json!(15);
    let path = format!("{base}/WeeklyFull");
    let replaced = app
        .call(
            Method::PUT,
            &path,
            Some(&admin),
            Some(json!({"spec": spec})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK);
    assert!(replaced.header("etag").starts_with("\"2-"));
    assert_eq!(replaced.body["spec"]["log"]["frequency_minutes"], 15);
    let stale = app
        .call(
            Method::PUT,
            &path,
            Some(&admin),
            Some(json!({"spec": weekly_spec()})),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::PRECONDITION_FAILED, "precondition_failed")
    );
    assert_eq!(
        app.get(&path, &admin).await.body["spec"]["log"]["frequency_minutes"],
        15
    );

    let mut bad = weekly_spec();
    bad["log"]["retention_days"] = json!(40);
    let invalid = app
        .call(
            Method::PUT,
            &path,
            Some(&admin),
            Some(json!({"spec": bad})),
            &[],
        )
        .await;
    assert_eq!(
        invalid.violations(),
        [(
            "/spec/log/retention_days".to_owned(),
            "log_retention_above_maximum".to_owned()
        )]
    );

    let stale_delete = app
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            None,
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(stale_delete.status, StatusCode::PRECONDITION_FAILED);
    let deleted = app
        .call(
            Method::DELETE,
            &path,
            Some(&admin),
            None,
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = app.get(&path, &admin).await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::NOT_FOUND, "policy_not_found")
    );
    let replace_gone = app
        .call(
            Method::PUT,
            &path,
            Some(&admin),
            Some(json!({"spec": weekly_spec()})),
            &[],
        )
        .await;
    assert_eq!(replace_gone.code(), "policy_not_found");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn names_are_unique_per_vault_and_checked(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let base = vault_policies(&app, "names").await;
    let dup = app
        .post(
            &base,
            &admin,
            json!({"name": "hourlylogbackup", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "policy_name_taken")
    );
    let bad = app
        .post(
            &base,
            &admin,
            json!({"name": "has space", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(
        bad.violations(),
        [("/name".to_owned(), "policy_name_characters".to_owned())]
    );
    let empty = app
        .post(&base, &admin, json!({"name": "", "spec": weekly_spec()}))
        .await;
    assert_eq!(
        empty.violations(),
        [("/name".to_owned(), "policy_name_length".to_owned())]
    );
    let missing_vault = app
        .post(
            "/v1/vaults/0b9d2c3e-0000-4000-8000-000000000000/policies",
            &admin,
            json!({"name": "x", "spec": weekly_spec()}),
        )
        .await;
    assert_eq!(
        (missing_vault.status, missing_vault.code()),
        (StatusCode::NOT_FOUND, "vault_not_found")
    );
}

/// A page of policies carries its vault's visibility: another subscription's vault and a
/// missing one are 404 `vault_not_found` whether the page would hold policies or not, and a
/// page past the last policy of a visible vault is empty.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_policy_page_is_of_a_vault_the_caller_sees(pool: PgPool) {
    let app = TestApp::new(pool);
    let base = vault_policies(&app, "policy-vault").await;
    let admin = app.admin();
    let first = app.get(&base, &admin).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let last_id = first.body["items"][0]["id"].as_str().unwrap().to_owned();
    let past_the_end = format!("{base}?cursor={last_id}");
    let empty = app.get(&past_the_end, &admin).await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.body);
    assert_eq!(empty.body["items"], json!([]));

    let other = app.token(Role::Reader, &["sub-2"]);
    for path in [&base, &past_the_end] {
        let res = app.get(path, &other).await;
        assert_eq!(
            (res.status, res.code()),
            (StatusCode::NOT_FOUND, "vault_not_found"),
            "{path}"
        );
    }
    let missing = app
        .get(
            "/v1/vaults/0b9d2c3e-0000-4000-8000-000000000000/policies",
            &admin,
        )
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "vault_not_found")
    );
}

/// Every policy rule reaches the API with its code and a pointer into the request body.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn every_policy_rule_is_reported_through_the_api(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let base = vault_policies(&app, "rules").await;
    let daily = || {
        json!({
            "time_zone": "UTC",
            "full": {"frequency": "daily", "time": "02:00"},
            "retention": {"daily": {"days": 30}, "weekly": {"days_of_week": ["sunday"], "weeks": 4}}
        })
    };
    /// A valid spec, an edit that breaks one rule, where and which code is expected.
    type Case = (fn() -> Value, fn(&mut Value), &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            weekly_spec,
            |s| s["time_zone"] = json!("Atlantis/Capital"),
            "/spec/time_zone",
            "time_zone_unknown",
        ),
        (
            weekly_spec,
            |s| s["full"]["time"] = json!("25:00"),
            "/spec/full/time",
            "time_invalid",
        ),
        (
            weekly_spec,
            |s| s["full"]["time"] = json!("22:45"),
            "/spec/full/time",
            "time_not_on_half_hour",
        ),
        (
            weekly_spec,
            |s| s["full"]["days"] = json!([]),
            "/spec/full/days",
            "days_empty",
        ),
        (
            weekly_spec,
            |s| s["full"]["days"] = json!(["sunday", "sunday"]),
            "/spec/full/days/1",
            "days_duplicate",
        ),
        (
            daily,
            |s| s["full"]["days"] = json!(["sunday"]),
            "/spec/full/days",
            "days_not_allowed",
        ),
        (
            daily,
            |s| {
                s["differential"] =
                    json!({"days": ["monday"], "time": "01:00", "retention_days": 7})
            },
            "/spec/differential",
            "differential_requires_weekly_full",
        ),
        (
            weekly_spec,
            |s| s["differential"]["days"] = json!(["sunday"]),
            "/spec/differential/days/0",
            "differential_on_full_day",
        ),
        (
            weekly_spec,
            |s| s["differential"]["days"] = json!(["monday", "monday"]),
            "/spec/differential/days/1",
            "differential_twice_a_day",
        ),
        (
            weekly_spec,
            |s| {
                s["differential"]["retention_days"] = json!(181);
                s["retention"]["weekly"]["weeks"] = json!(52);
            },
            "/spec/differential/retention_days",
            "differential_retention_above_maximum",
        ),
        (
            weekly_spec,
            |s| s["differential"]["retention_days"] = json!(57),
            "/spec/differential/retention_days",
            "differential_retention_exceeds_full",
        ),
        (
            weekly_spec,
            |s| s["log"]["frequency_minutes"] = json!(14),
            "/spec/log/frequency_minutes",
            "log_frequency_below_minimum",
        ),
        (
            weekly_spec,
            |s| s["log"]["frequency_minutes"] = json!(90),
            "/spec/log/frequency_minutes",
            "log_frequency_not_allowed",
        ),
        (
            weekly_spec,
            |s| s["log"]["retention_days"] = json!(36),
            "/spec/log/retention_days",
            "log_retention_above_maximum",
        ),
        (
            weekly_spec,
            |s| s["log"]["retention_days"] = json!(6),
            "/spec/log/retention_days",
            "retention_below_minimum",
        ),
        (
            daily,
            |s| s["retention"]["daily"]["days"] = json!(10_000),
            "/spec/retention/daily/days",
            "retention_above_maximum",
        ),
        (
            daily,
            |s| s["retention"]["weekly"]["weeks"] = json!(5164),
            "/spec/retention/weekly/weeks",
            "retention_above_maximum",
        ),
        (
            daily,
            |s| s["retention"]["monthly"] = json!({"days_of_month": [1], "months": 1189}),
            "/spec/retention/monthly/months",
            "retention_above_maximum",
        ),
        (
            weekly_spec,
            |s| s["retention"]["yearly"] = json!({"months_of_year": ["may"], "weeks_of_month": ["first"], "days_of_week": ["sunday"], "years": 100}),
            "/spec/retention/yearly/years",
            "retention_above_maximum",
        ),
        (
            daily,
            |s| s["retention"]["daily"] = Value::Null,
            "/spec/retention/daily",
            "full_retention_missing",
        ),
        (
            weekly_spec,
            |s| s["retention"]["daily"] = json!({"days": 7}),
            "/spec/retention/daily",
            "daily_retention_requires_daily_full",
        ),
        (
            weekly_spec,
            |s| s["retention"]["monthly"]["days_of_week"] = json!(["monday"]),
            "/spec/retention/monthly/days_of_week/0",
            "retention_day_not_full_day",
        ),
        (
            weekly_spec,
            |s| {
                s["full"]["days"] = json!(["saturday", "sunday"]);
                s["differential"]["days"] = json!(["wednesday"]);
                s["retention"]["weekly"]["days_of_week"] = json!(["sunday"]);
            },
            "/spec/retention/weekly/days_of_week",
            "weekly_retention_days_mismatch",
        ),
        (
            weekly_spec,
            |s| s["retention"]["monthly"] = json!({"days_of_month": [1], "months": 3}),
            "/spec/retention/monthly/days_of_month",
            "day_based_retention_requires_daily_full",
        ),
        (
            daily,
            |s| s["retention"]["monthly"] = json!({"months": 3}),
            "/spec/retention/monthly",
            "retention_selector_invalid",
        ),
        (
            daily,
            |s| s["retention"]["monthly"] = json!({"days_of_month": [32], "months": 3}),
            "/spec/retention/monthly/days_of_month/0",
            "day_of_month_invalid",
        ),
    ];
    for (make, edit, pointer, code) in cases {
        let mut spec = make();
        edit(&mut spec);
        let res = app
            .post(&base, &admin, json!({"name": "Rule", "spec": spec}))
            .await;
        assert_eq!(
            res.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{code}: {}",
            res.body
        );
        assert_eq!(res.code(), "validation_failed");
        assert!(
            res.violations()
                .contains(&(pointer.to_owned(), code.to_owned())),
            "{code} at {pointer}: {:?}",
            res.violations()
        );
        // The same rule through the preview, with pointers into the bare spec.
        let preview = app.post("/v1/policies/preview", &admin, spec).await;
        let bare = pointer.strip_prefix("/spec").unwrap();
        assert!(
            preview
                .violations()
                .contains(&(bare.to_owned(), code.to_owned())),
            "preview {code}"
        );
    }
    // Nothing was saved along the way.
    let list = app.get(&base, &admin).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn copy_to_another_vault(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let source = vault_policies(&app, "source").await;
    let target_vault = app.vault("target", "sub-1").await;
    let target_id = target_vault["id"].as_str().unwrap();
    app.post(
        &source,
        &admin,
        json!({"name": "Gold", "spec": weekly_spec()}),
    )
    .await;

    let copy = app
        .post(
            &format!("{source}/Gold/copy"),
            &admin,
            json!({"target_vault_id": target_id}),
        )
        .await;
    assert_eq!(copy.status, StatusCode::CREATED, "{}", copy.body);
    assert_eq!(copy.body["vault_id"], target_id);
    assert_eq!(copy.body["name"], "Gold");
    assert_eq!(copy.body["spec"], weekly_spec());
    assert_eq!(
        copy.header("location"),
        format!("/v1/vaults/{target_id}/policies/Gold")
    );

    let again = app
        .post(
            &format!("{source}/Gold/copy"),
            &admin,
            json!({"target_vault_id": target_id}),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "policy_name_taken")
    );
    let renamed = app
        .post(
            &format!("{source}/Gold/copy"),
            &admin,
            json!({"target_vault_id": target_id, "name": "Gold-2"}),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::CREATED);
    let bad_name = app
        .post(
            &format!("{source}/Gold/copy"),
            &admin,
            json!({"target_vault_id": target_id, "name": "no spaces"}),
        )
        .await;
    assert_eq!(bad_name.status, StatusCode::UNPROCESSABLE_ENTITY);
    let missing = app
        .post(
            &format!("{source}/Silver/copy"),
            &admin,
            json!({"target_vault_id": target_id}),
        )
        .await;
    assert_eq!(missing.code(), "policy_not_found");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn idempotent_policy_create(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let base = vault_policies(&app, "idem").await;
    let body = json!({"name": "Once", "spec": weekly_spec()});
    let key = [("idempotency-key", "policy-once")];
    let first = app
        .call(Method::POST, &base, Some(&admin), Some(body.clone()), &key)
        .await;
    let second = app
        .call(Method::POST, &base, Some(&admin), Some(body), &key)
        .await;
    assert_eq!(
        (first.status, second.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(first.body, second.body);
    assert_eq!(
        app.get(&base, &admin).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// Protected items and auto-protection (a later issue) reference policies with `on delete
/// restrict`; a stand-in table proves a referenced policy answers 409, not 500.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn policy_in_use_cannot_be_deleted(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let admin = app.admin();
    let base = vault_policies(&app, "in-use").await;
    let policy = app.get(&format!("{base}/HourlyLogBackup"), &admin).await;
    sql::forge_restricting_reference(&pool, "policies", policy.body["id"].as_str().unwrap()).await;
    let res = app
        .call(
            Method::DELETE,
            &format!("{base}/HourlyLogBackup"),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (res.status, res.code()),
        (StatusCode::CONFLICT, "policy_in_use")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn preview_shows_runs_expiries_and_dst(pool: PgPool) {
    let app = TestApp::new(pool);
    let admin = app.admin();
    let mut spec = weekly_spec();
    spec["full"]["time"] = json!("02:30");
    let res = app
        .post(
            "/v1/policies/preview?from=2027-03-20T00:00:00Z&count=3",
            &admin,
            spec,
        )
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    let p = &res.body;
    assert_eq!(p["time_zone"], "Europe/Amsterdam");
    assert_eq!(p["full"].as_array().unwrap().len(), 3);
    assert_eq!(p["differential"].as_array().unwrap().len(), 3);
    assert_eq!(p["log"].as_array().unwrap().len(), 3);
    // Sunday 2027-03-28 02:30 does not exist in Amsterdam: the full runs at 03:30 CEST.
    let spring = &p["full"][1];
    assert_eq!(spring["at"], "2027-03-28T01:30:00Z");
    assert_eq!(spring["local_time"], "2027-03-28T03:30:00+02:00");
    assert_eq!(spring["shifted_by_dst"], true);
    assert_eq!(p["full"][0]["shifted_by_dst"], false);
    // 8 weekly points; the first Sunday of April is also a monthly point (12 months).
    assert_eq!(p["full"][0]["retention_tags"], json!(["weekly"]));
    assert_eq!(p["full"][2]["retention_tags"], json!(["weekly", "monthly"]));
    assert_eq!(p["full"][2]["expires_at"], "2028-04-04T00:30:00Z");
    assert_eq!(
        p["differential"][0]["depends_on_full_at"],
        p["full"][0]["at"]
    );
    assert_eq!(p["max_gap_minutes"], 60);

    let most = app
        .post("/v1/policies/preview?count=100", &admin, weekly_spec())
        .await;
    assert_eq!(most.body["full"].as_array().unwrap().len(), 100);
    for count in [0, 101] {
        let path = format!("/v1/policies/preview?count={count}");
        let bad = app.post(&path, &admin, weekly_spec()).await;
        assert_eq!(
            (bad.status, bad.code()),
            (StatusCode::BAD_REQUEST, "invalid_count")
        );
    }
    let bad_from = app
        .post("/v1/policies/preview?from=yesterday", &admin, weekly_spec())
        .await;
    assert_eq!(bad_from.code(), "invalid_query");
}
