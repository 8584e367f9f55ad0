//! Data safety through the API: soft delete and undelete, vault immutability and its lock,
//! retention bounds, and guards whose approvals destructive operations need.

use axum::http::{Method, StatusCode};
use chrono::{Duration, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::chain::{backup, point, sales};
use crate::helpers::sql::{
    forge_all_points_expired, forge_approval_lapsed, forge_locked_ago,
    forge_soft_delete_period_over, point_expiries, recovery_points_recorded, try_delete_all_points,
    try_expire_all_points_now, try_unlock_vaults,
};
use crate::helpers::{Response, recovery_points};
use crate::recovery::Protected;
use backvault_service::Role;

/// `sales` with a full and a log taken just now, both far from expiring.
async fn sales_with_points(pool: PgPool) -> Protected {
    let p = sales(pool).await;
    for (kind, first, last, facts) in [
        ("full", "100", "110", json!({"checkpoint_lsn": "100"})),
        ("log", "100", "200", json!({})),
    ] {
        let done = backup(&p, point(kind, Utc::now(), first, last, facts)).await;
        assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    }
    p
}

async fn safety(p: &Protected, token: &str, change: Value, approval: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = approval
        .map(|a| ("backvault-approval", a))
        .into_iter()
        .collect();
    p.app
        .call(
            Method::PATCH,
            &format!("/v1/vaults/{}/safety", p.vault),
            Some(token),
            Some(change),
            &headers,
        )
        .await
}

async fn stop_deleting(p: &Protected, token: &str, approval: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = approval
        .map(|a| ("backvault-approval", a))
        .into_iter()
        .collect();
    p.app
        .call(
            Method::POST,
            &format!("{}/stop", p.item_path("sales")),
            Some(token),
            Some(json!({"mode": "delete_data"})),
            &headers,
        )
        .await
}

async fn point_ids(p: &Protected) -> Vec<String> {
    recovery_points(&p.app, &p.item_path("sales")).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_deletion_is_soft_for_the_vaults_period_and_can_be_undone(pool: PgPool) {
    let p = sales_with_points(pool.clone()).await;
    let admin = p.app.admin();
    let before = point_ids(&p).await;
    assert_eq!(before.len(), 2);
    let res = stop_deleting(&p, &admin, None).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.body);
    assert_eq!(res.body["state"], "soft_deleted");
    let purge_after: chrono::DateTime<Utc> =
        res.body["purge_after"].as_str().unwrap().parse().unwrap();
    let expected = Utc::now() + Duration::days(14);
    assert!(
        (purge_after - expected).num_seconds().abs() < 60,
        "{purge_after}"
    );
    // Listed, points intact, but nothing runs from it.
    let listed = crate::helpers::protected_items(&p.app, &p.vault, "state=soft_deleted").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(point_ids(&p).await, before);
    let restore = p
        .app
        .post(
            &format!("{}/restore-plan", p.item_path("sales")),
            &admin,
            json!({"point_in_time": Utc::now()}),
        )
        .await;
    assert_eq!(
        (restore.status, restore.code()),
        (StatusCode::CONFLICT, "item_soft_deleted")
    );
    assert_eq!(
        stop_deleting(&p, &admin, None).await.code(),
        "item_soft_deleted"
    );
    // The sweep leaves a soft-deleted item's points alone, expired or not.
    forge_all_points_expired(&pool).await;
    p.app.service.sweep_recovery_points().await.unwrap();
    assert_eq!(point_ids(&p).await, before);

    let undelete = format!("{}/undelete", p.item_path("sales"));
    let back = p.app.post(&undelete, &admin, json!({})).await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.body);
    assert_eq!(back.body["state"], "stopped_retain");
    assert_eq!(point_ids(&p).await, before, "points and chain intact");
    let again = p.app.post(&undelete, &admin, json!({})).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "item_not_soft_deleted")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn after_the_period_the_purge_removes_the_item_once_and_undelete_is_gone(pool: PgPool) {
    let p = sales_with_points(pool.clone()).await;
    let admin = p.app.admin();
    assert_eq!(stop_deleting(&p, &admin, None).await.status, StatusCode::OK);
    forge_soft_delete_period_over(&pool, &p.items["sales"]).await;
    let undelete = format!("{}/undelete", p.item_path("sales"));
    let late = p.app.post(&undelete, &admin, json!({})).await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::GONE, "undelete_period_over")
    );
    assert_eq!(p.app.service.purge_soft_deleted().await.unwrap(), 1);
    assert_eq!(
        p.app.service.purge_soft_deleted().await.unwrap(),
        0,
        "idempotent"
    );
    let audited: Vec<String> = p
        .app
        .get("/v1/audit-events?operation=soft_delete.purge", &admin)
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        audited,
        [p.items["sales"].clone()],
        "the purge is audited once"
    );
    assert_eq!(
        recovery_points_recorded(&pool).await,
        0,
        "purged with all its points"
    );
    let gone = p.app.post(&undelete, &admin, json!({})).await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::GONE, "undelete_period_over")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn an_immutable_vault_keeps_every_point_until_it_expires(pool: PgPool) {
    let p = sales_with_points(pool.clone()).await;
    let admin = p.app.admin();
    let on = safety(&p, &admin, json!({"immutability": "enabled"}), None).await;
    assert_eq!(on.status, StatusCode::OK, "{}", on.body);
    let before = point_ids(&p).await;
    let first = point_expiries(&pool).await;
    // A shorter retention applies to new points only, and the preview says so.
    let mut shorter = crate::chain::spec();
    shorter["log"]["retention_days"] = json!(7);
    let preview = p
        .app
        .post(
            &format!("/v1/policies/preview?vault_id={}", p.vault),
            &admin,
            shorter.clone(),
        )
        .await;
    assert_eq!(preview.status, StatusCode::OK, "{}", preview.body);
    assert!(
        preview.body["existing_points"]
            .as_str()
            .unwrap()
            .contains("new recovery points only")
    );
    let replaced = p
        .app
        .call(
            Method::PUT,
            &format!("/v1/vaults/{}/policies/Gold", p.vault),
            Some(&admin),
            Some(json!({"spec": shorter})),
            &[],
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
    assert_eq!(
        point_expiries(&pool).await,
        first,
        "no expiry moved earlier"
    );
    // Stop with delete: protection stops, the points stay until they expire.
    let stopped = stop_deleting(&p, &admin, None).await;
    assert_eq!(stopped.status, StatusCode::OK, "{}", stopped.body);
    assert_eq!(stopped.body["state"], "stopped_retain_per_policy");
    assert_eq!(point_ids(&p).await, before);
    // Below the API, too: the database refuses.
    let deleted = try_delete_all_points(&pool).await;
    assert!(
        deleted
            .unwrap_err()
            .to_string()
            .contains("kept until they expire"),
        "the trigger refuses"
    );
    let forward = try_expire_all_points_now(&pool).await;
    assert!(forward.is_err(), "no expiry is brought forward");
    // The vault cannot be deleted while it holds them.
    let vault = p
        .app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}", p.vault),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(vault.code(), "vault_not_empty");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_lock_is_final_after_its_cooling_off_and_bounds_refuse_policies(pool: PgPool) {
    let p = sales_with_points(pool.clone()).await;
    let admin = p.app.admin();
    let locked = safety(
        &p,
        &admin,
        json!({"immutability": "locked", "min_retention_days": 10, "soft_delete": "always_on"}),
        None,
    )
    .await;
    assert_eq!(locked.status, StatusCode::OK, "{}", locked.body);
    assert_eq!(locked.body["lock_final"], false);
    let audit = p
        .app
        .get("/v1/audit-events?operation=change_vault_safety", &admin)
        .await;
    assert_eq!(
        audit.body["items"][0]["changes"]["immutability"],
        json!({"before": "disabled", "after": "locked"}),
        "the audit log shows the lock: {}",
        audit.body
    );
    // Within the cooling-off window the lock can be undone...
    let undone = safety(&p, &admin, json!({"immutability": "enabled"}), None).await;
    assert_eq!(undone.status, StatusCode::OK, "{}", undone.body);
    assert_eq!(
        safety(&p, &admin, json!({"immutability": "locked"}), None)
            .await
            .status,
        StatusCode::OK
    );
    // ...not after it.
    forge_locked_ago(&pool, &p.vault, 73).await;
    let refused = safety(&p, &admin, json!({"immutability": "disabled"}), None).await;
    assert_eq!(
        refused.violations(),
        [("/immutability".to_owned(), "vault_locked".to_owned())]
    );
    let bounds = safety(&p, &admin, json!({"min_retention_days": 1}), None).await;
    assert_eq!(bounds.violations()[0].1, "vault_locked");
    let soft = safety(&p, &admin, json!({"soft_delete": "disabled"}), None).await;
    assert_eq!(soft.violations()[0].1, "soft_delete_always_on");
    // The database holds the lock whatever the application does.
    let forced = try_unlock_vaults(&pool).await;
    assert!(forced.unwrap_err().to_string().contains("locked"));
    // A policy keeping logs 7 days is below the vault's 10-day minimum.
    let mut short = crate::chain::spec();
    short["log"]["retention_days"] = json!(7);
    let created = p
        .app
        .post(
            &format!("/v1/vaults/{}/policies", p.vault),
            &admin,
            json!({"name": "Short", "spec": short}),
        )
        .await;
    assert_eq!(
        created.violations(),
        [(
            "/spec/log/retention_days".to_owned(),
            "retention_below_vault_minimum".to_owned()
        )]
    );
}

async fn approve(p: &Protected, operation: &str, resource: &str, requester: &str) -> String {
    let asked = p
        .app
        .post(
            &format!("/v1/vaults/{}/approvals", p.vault),
            requester,
            json!({"operation": operation, "resource_id": resource, "reason": "decommissioning"}),
        )
        .await;
    assert_eq!(asked.status, StatusCode::CREATED, "{}", asked.body);
    let id = asked.body["id"].as_str().unwrap().to_owned();
    let approver = p.app.token_of("bob", Role::Approver);
    let granted = p
        .app
        .post(
            &format!("/v1/vaults/{}/approvals/{id}/grant", p.vault),
            &approver,
            json!({"minutes": 30}),
        )
        .await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    assert_eq!(granted.body["status"], "granted");
    id
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn a_guarded_operation_needs_an_approval_from_someone_else_used_once(pool: PgPool) {
    let p = sales_with_points(pool.clone()).await;
    let alice = p.app.token_of("alice", Role::Admin);
    let guard = p
        .app
        .post(
            "/v1/guards",
            &alice,
            json!({"subscription_id": "sub-1", "name": "prod-guard",
                   "operations": ["stop_protection_delete_data", "delete_vault"]}),
        )
        .await;
    assert_eq!(guard.status, StatusCode::CREATED, "{}", guard.body);
    let bound = safety(&p, &alice, json!({"guard_id": guard.body["id"]}), None).await;
    assert_eq!(
        bound.status,
        StatusCode::OK,
        "binding a guard needs no approval: {}",
        bound.body
    );

    let refused = stop_deleting(&p, &alice, None).await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::FORBIDDEN, "approval_required")
    );
    // An approval for another resource or operation unlocks nothing.
    let other = approve(&p, "delete_vault", &p.vault, &alice).await;
    assert_eq!(
        stop_deleting(&p, &alice, Some(&other)).await.code(),
        "approval_required"
    );
    let item = p.items["sales"].clone();
    let approval = approve(&p, "stop_protection_delete_data", &item, &alice).await;
    // Nobody approves their own request; an admin approves nothing.
    let own = p
        .app
        .post(
            &format!("/v1/vaults/{}/approvals", p.vault),
            &p.app.token_of("bob", Role::Operator),
            json!({"operation": "delete_vault", "resource_id": p.vault}),
        )
        .await;
    let own_id = own.body["id"].as_str().unwrap();
    let self_grant = p
        .app
        .post(
            &format!("/v1/vaults/{}/approvals/{own_id}/grant", p.vault),
            &p.app.token_of("bob", Role::Approver),
            json!({}),
        )
        .await;
    assert_eq!(
        (self_grant.status, self_grant.code()),
        (StatusCode::FORBIDDEN, "approval_self")
    );
    let by_admin = p
        .app
        .post(
            &format!("/v1/vaults/{}/approvals/{own_id}/grant", p.vault),
            &alice,
            json!({}),
        )
        .await;
    assert_eq!(
        (by_admin.status, by_admin.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    // Someone else's approval is not yours.
    let mallory = p.app.token_of("mallory", Role::Admin);
    assert_eq!(
        stop_deleting(&p, &mallory, Some(&approval)).await.code(),
        "approval_not_yours"
    );
    // Used once.
    let done = stop_deleting(&p, &alice, Some(&approval)).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.body["state"], "soft_deleted");
    let listed = p
        .app
        .get(&format!("/v1/vaults/{}/approvals", p.vault), &alice)
        .await;
    let statuses: Vec<(&str, &str)> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["operation"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&("stop_protection_delete_data", "used")),
        "{statuses:?}"
    );
    // An expired grant answers why.
    forge_approval_lapsed(&pool, &other).await;
    let vault = p
        .app
        .call(
            Method::DELETE,
            &format!("/v1/vaults/{}", p.vault),
            Some(&alice),
            None,
            &[("backvault-approval", &other)],
        )
        .await;
    assert_eq!(
        (vault.status, vault.code()),
        (StatusCode::FORBIDDEN, "approval_expired")
    );
    // Removing the guard is always guarded.
    let unbind = safety(&p, &alice, json!({"guard_id": null}), None).await;
    assert_eq!(unbind.code(), "approval_required");
    let removal = approve(&p, "remove_guard", &p.vault, &alice).await;
    let unbound = safety(&p, &alice, json!({"guard_id": null}), Some(&removal)).await;
    assert_eq!(unbound.status, StatusCode::OK, "{}", unbound.body);
    assert_eq!(unbound.body["guard_id"], Value::Null);
}
