//! Issue 16's promise end to end, with the real server and a real agent: an admin token
//! tries, in order, to delete a locked vault's data, shorten its retention, disable soft
//! delete and delete the vault; every attempt is refused or deferred, the audit log shows
//! each, every recovery point stays restorable, and then one approved operation succeeds,
//! once.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Api, Inventories, Server, TestDb, inventory_toml, migrate, mint_token_for};
use reqwest::Method;
use serde_json::json;

const SECRET: &str = "a-safety-e2e-secret-that-is-long-enough-42";

#[tokio::test]
async fn a_stolen_admin_token_cannot_destroy_a_locked_guarded_vaults_backups() {
    let db = TestDb::new();
    migrate(&db);
    let env = [
        ("BACKVAULT_JWT_SECRET", SECRET),
        ("BACKVAULT_JWT_ISSUER", "backvault-safety"),
    ];
    let server = Server::start(&db, &[], &env);
    let token = |subject: &str, role: &str| mint_token_for(subject, role, "*", "1h", &env);
    let admin = Api::new(&server.base, &token("alice", "admin"));
    let approver = Api::new(&server.base, &token("bob", "approver"));
    let auditor = Api::new(&server.base, &token("carol", "auditor"));

    // A VM with one database, protected, with a full and a log taken by its agent.
    let enrollment = admin.enrollment_token("sub-1").await;
    let agents = admin
        .start_agents(
            &enrollment,
            Inventories::new("safety"),
            &[(
                "sqlvm-01",
                inventory_toml("sqlvm-01", "4.8", true, &["sales"], 10),
            )],
            &[],
        )
        .await;
    let vault = admin.create_vault("safe-vault").await;
    admin.register(&vault, &[&agents.vm("sqlvm-01")]).await;
    let items = admin.protect_all(&vault, "HourlyLogBackup").await;
    let item = items[0]["id"].as_str().unwrap().to_owned();
    let item_path = format!("/v1/vaults/{vault}/protected-items/{item}");
    for body in [
        json!({"type": "full", "retention_days": 45}),
        json!({"type": "log"}),
    ] {
        let job = admin
            .post_expecting(&format!("{item_path}/backup"), body, 202)
            .await;
        assert_eq!(
            admin.finished_job(job["id"].as_str().unwrap()).await["status"],
            "completed"
        );
    }
    let (_, points) = admin.get(&format!("{item_path}/recovery-points")).await;
    let before = points["items"].clone();
    assert_eq!(before.as_array().unwrap().len(), 2, "{points}");

    // The vault locked, guarded, soft delete on.
    let guard = admin
        .post_expecting(
            "/v1/guards",
            json!({"subscription_id": "sub-1", "name": "prod",
                   "operations": ["stop_protection_delete_data", "shorten_retention", "delete_vault"]}),
            201,
        )
        .await;
    let (status, locked) = admin
        .send(
            Method::PATCH,
            &format!("/v1/vaults/{vault}/safety"),
            Some(json!({"immutability": "locked", "guard_id": guard["id"]})),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{locked}");

    // The attack, in order.
    let (status, deleted) = admin
        .send(
            Method::POST,
            &format!("{item_path}/stop"),
            Some(json!({"mode": "delete_data"})),
            &[],
        )
        .await;
    assert_eq!(
        (status, deleted["code"].as_str()),
        (403, Some("approval_required")),
        "{deleted}"
    );
    let mut shorter = json!({"time_zone": "UTC", "full": {"frequency": "daily", "time": "22:00"},
        "log": {"frequency_minutes": 60, "retention_days": 7}, "retention": {"daily": {"days": 7}}});
    let (status, shortened) = admin
        .send(
            Method::PUT,
            &format!("/v1/vaults/{vault}/policies/HourlyLogBackup"),
            Some(json!({"spec": shorter.take()})),
            &[],
        )
        .await;
    assert_eq!(
        (status, shortened["code"].as_str()),
        (403, Some("approval_required")),
        "{shortened}"
    );
    let (status, soft_off) = admin
        .send(
            Method::PATCH,
            &format!("/v1/vaults/{vault}/safety"),
            Some(json!({"soft_delete": "disabled"})),
            &[],
        )
        .await;
    assert_eq!(
        (status, soft_off["code"].as_str()),
        (403, Some("approval_required")),
        "{soft_off}"
    );
    let (status, gone) = admin
        .send(Method::DELETE, &format!("/v1/vaults/{vault}"), None, &[])
        .await;
    assert_eq!(
        (status, gone["code"].as_str()),
        (403, Some("approval_required")),
        "{gone}"
    );

    // The audit log shows each refusal, with who and what.
    let (status, audit) = auditor
        .get("/v1/audit-events?subject=alice&status=403&limit=50")
        .await;
    assert_eq!(status, 200, "{audit}");
    let refused: Vec<(String, String)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap_or_default().to_owned(),
                e["problem_code"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut operations: Vec<&str> = refused.iter().map(|(op, _)| op.as_str()).collect();
    operations.sort_unstable();
    assert_eq!(
        operations,
        [
            "change_vault_safety",
            "delete_vault",
            "replace_policy",
            "stop_protection"
        ],
        "{audit}"
    );
    assert!(
        refused.iter().all(|(_, code)| code == "approval_required"),
        "{refused:?}"
    );

    // Every point is still there and restorable.
    let (_, points) = admin.get(&format!("{item_path}/recovery-points")).await;
    assert_eq!(points["items"], before);
    let restore = admin
        .post_expecting(
            &format!("{item_path}/restore"),
            json!({"recovery_point_id": before[1]["id"], "target_database": "sales_check"}),
            202,
        )
        .await;
    let done = admin.finished_job(restore["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");

    // One approved operation succeeds, once: the deletion, deferred by the lock.
    let asked = admin
        .post_expecting(
            &format!("/v1/vaults/{vault}/approvals"),
            json!({"operation": "stop_protection_delete_data", "resource_id": item}),
            201,
        )
        .await;
    let approval = asked["id"].as_str().unwrap().to_owned();
    approver
        .post_expecting(
            &format!("/v1/vaults/{vault}/approvals/{approval}/grant"),
            json!({"minutes": 15}),
            200,
        )
        .await;
    let stop = |headers: Vec<(&'static str, String)>| {
        let admin = &admin;
        let path = format!("{item_path}/stop");
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            admin
                .send(
                    Method::POST,
                    &path,
                    Some(json!({"mode": "delete_data"})),
                    &headers,
                )
                .await
        }
    };
    let (status, stopped) = stop(vec![("backvault-approval", approval.clone())]).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(
        stopped["state"], "stopped_retain_per_policy",
        "deferred to each point's expiry"
    );
    let (status, again) = stop(vec![("backvault-approval", approval)]).await;
    assert_eq!(
        (status, again["code"].as_str()),
        (403, Some("approval_used")),
        "{again}"
    );
    let (_, points) = admin.get(&format!("{item_path}/recovery-points")).await;
    assert_eq!(points["items"].as_array().unwrap().len(), 2);
}
