//! Nobody reaches beyond their scope: every user operation is tried by every role and
//! must be allowed exactly as the permission table (`domain::access`) says, and every
//! reference to another subscription's resource answers 404 with no side effect.

use std::collections::HashSet;

use axum::http::{Method, StatusCode};
use backvault_domain::access::{Operation, Role, allowed};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{claim, facts, vault_body};
use crate::protection::{db, db_id, protectable};
use crate::recovery::{protect, weekly_dst_policy};

struct Call {
    operation: Operation,
    method: Method,
    path: String,
    body: Option<Value>,
}

fn call(operation: Operation, method: Method, path: String, body: Option<Value>) -> Call {
    Call {
        operation,
        method,
        path,
        body,
    }
}

/// Every user operation, by every role, against one protected database: the role gets a
/// 403 exactly where the table denies it. Roles run from least to most privileged, so an
/// allowed call by one role does not hide a refusal of the next.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn every_role_may_do_exactly_what_the_table_says(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![
            db("MSSQLSERVER", "sales"),
            db("MSSQLSERVER", "hr"),
            db("MSSQLSERVER", "crm"),
        ],
    )
    .await;
    let app = &p.app;
    let v = p.vault.clone();
    let spare_vault = app.vault("spare", "sub-1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let vm = app
        .get(&format!("/v1/vaults/{v}/protected-items"), &app.admin())
        .await
        .body["items"][0]["vm_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = crate::helpers::dispatch(app, &vm, "discovery").await;
    let spare_enrollment = app
        .post(
            "/v1/enrollment-tokens",
            &app.admin(),
            json!({"subscription_id": "sub-1"}),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let containers = protectable(app, &v).await;
    let instance = containers[0]["id"].as_str().unwrap().to_owned();
    let sales = p.item_path("sales");
    let hr = p.item_path("hr");
    let crm = p.item_path("crm");
    // Configure Protection names crm's database, free once the delete-data stop before
    // it has removed crm's item.
    let unprotected = db_id(&containers, "crm");

    let calls = [
        call(Operation::Read, Method::GET, "/v1/vaults".into(), None),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}/policies"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}/protectable-items"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}/protected-items"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("{sales}/recovery-points"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}/rpo"),
            None,
        ),
        call(
            Operation::Read,
            Method::GET,
            format!("/v1/vaults/{v}/discovery"),
            None,
        ),
        call(Operation::Read, Method::GET, "/v1/jobs".into(), None),
        call(Operation::Read, Method::GET, "/v1/vms".into(), None),
        call(
            Operation::ReadAuditLog,
            Method::GET,
            "/v1/audit-events".into(),
            None,
        ),
        call(
            Operation::Read,
            Method::POST,
            "/v1/policies/preview".into(),
            Some(crate::helpers::weekly_spec()),
        ),
        call(
            Operation::CreateVault,
            Method::POST,
            "/v1/vaults".into(),
            Some(vault_body("role-vault", "sub-1")),
        ),
        call(
            Operation::UpdateVault,
            Method::PATCH,
            format!("/v1/vaults/{v}"),
            Some(json!({"description": "x"})),
        ),
        call(
            Operation::WritePolicy,
            Method::POST,
            format!("/v1/vaults/{v}/policies"),
            Some(json!({"name": "RoleTest", "spec": weekly_dst_policy()})),
        ),
        call(
            Operation::RegisterVm,
            Method::POST,
            format!("/v1/vaults/{v}/vms/{vm}/rediscover"),
            None,
        ),
        call(
            Operation::UpsertVm,
            Method::PUT,
            "/v1/vms".into(),
            Some(
                json!({"name": "inv-vm", "resource_group": "rg", "subscription_id": "sub-1", "region": "westeurope", "deployment_model": "resource_manager"}),
            ),
        ),
        call(
            Operation::DispatchJob,
            Method::POST,
            "/v1/jobs".into(),
            Some(json!({"vm_id": vm, "kind": "discovery"})),
        ),
        call(
            Operation::CancelJob,
            Method::POST,
            format!("/v1/jobs/{job}/cancel"),
            None,
        ),
        call(
            Operation::MintEnrollmentToken,
            Method::POST,
            "/v1/enrollment-tokens".into(),
            Some(json!({"subscription_id": "sub-1"})),
        ),
        call(
            Operation::ListEnrollmentTokens,
            Method::GET,
            "/v1/enrollment-tokens".into(),
            None,
        ),
        call(
            Operation::RevokeEnrollmentToken,
            Method::DELETE,
            format!("/v1/enrollment-tokens/{spare_enrollment}"),
            None,
        ),
        call(
            Operation::RevokeToken,
            Method::POST,
            "/v1/tokens/revoke".into(),
            Some(json!({"jti": "00000000-0000-7000-8000-000000000000"})),
        ),
        call(
            Operation::BackupNow,
            Method::POST,
            format!("{sales}/backup"),
            Some(json!({"type": "copy_only_full", "retention_days": 30})),
        ),
        call(
            Operation::RestoreAsNew,
            Method::POST,
            format!("{sales}/restore"),
            Some(json!({"point_in_time": "2030-01-01T00:00:00Z", "target_database": "sales_copy"})),
        ),
        call(
            Operation::RestoreOverwrite,
            Method::POST,
            format!("{sales}/restore"),
            Some(json!({"point_in_time": "2030-01-01T00:00:00Z", "overwrite": true})),
        ),
        call(
            Operation::ManageAutoProtection,
            Method::POST,
            format!("/v1/vaults/{v}/auto-protection"),
            Some(json!({"instance_id": instance, "policy": "Gold"})),
        ),
        call(
            Operation::ConfigureProtection,
            Method::PATCH,
            hr.clone(),
            Some(json!({"policy": "HourlyLogBackup"})),
        ),
        call(
            Operation::StopProtectionRetainData,
            Method::POST,
            format!("{hr}/stop"),
            Some(json!({"mode": "retain_data"})),
        ),
        call(
            Operation::ConfigureProtection,
            Method::POST,
            format!("{hr}/resume"),
            Some(json!({"policy": "Gold"})),
        ),
        call(
            Operation::StopProtectionDeleteData,
            Method::POST,
            format!("{crm}/stop"),
            Some(json!({"mode": "delete_data"})),
        ),
        call(
            Operation::ConfigureProtection,
            Method::POST,
            format!("/v1/vaults/{v}/protected-items"),
            Some(json!({"policy": "Gold", "databases": [unprotected]})),
        ),
        call(
            Operation::Undelete,
            Method::POST,
            format!("{crm}/undelete"),
            None,
        ),
        call(
            Operation::ChangeVaultSecurity,
            Method::PATCH,
            format!("/v1/vaults/{v}/safety"),
            Some(json!({"soft_delete_days": 20})),
        ),
        call(
            Operation::RequestApproval,
            Method::POST,
            format!("/v1/vaults/{v}/approvals"),
            Some(json!({"operation": "delete_vault", "resource_id": v})),
        ),
        call(
            Operation::DecideApproval,
            Method::POST,
            format!("/v1/vaults/{v}/approvals/{}/grant", uuid::Uuid::now_v7()),
            Some(json!({})),
        ),
        call(
            Operation::ManageGuards,
            Method::POST,
            "/v1/guards".into(),
            Some(json!({"subscription_id": "sub-1", "name": "guard-1"})),
        ),
        call(
            Operation::RunScheduler,
            Method::POST,
            "/v1/scheduler/run".into(),
            Some(json!({})),
        ),
        call(
            Operation::UnregisterVm,
            Method::DELETE,
            format!("/v1/vaults/{v}/vms/{vm}"),
            None,
        ),
        call(
            Operation::DeleteVault,
            Method::DELETE,
            format!("/v1/vaults/{spare_vault}"),
            None,
        ),
        call(
            Operation::DeleteVm,
            Method::DELETE,
            format!("/v1/vms/{vm}"),
            None,
        ),
    ];
    let covered: HashSet<Operation> = calls.iter().map(|c| c.operation).collect();
    for op in Operation::ALL {
        assert!(covered.contains(&op), "{op:?} is never tried");
    }

    let order = [
        Role::Agent,
        Role::Enrollment,
        Role::Reader,
        Role::Auditor,
        Role::Approver,
        Role::Operator,
        Role::Admin,
    ];
    for c in &calls {
        // The audit log spans every subscription, so only a token for all reads it.
        let scope = if c.operation == Operation::ReadAuditLog {
            "*"
        } else {
            "sub-1"
        };
        for role in order {
            let token = app.token(role, &[scope]);
            let res = app
                .call(c.method.clone(), &c.path, Some(&token), c.body.clone(), &[])
                .await;
            if allowed(role, c.operation) {
                assert!(
                    res.status != StatusCode::FORBIDDEN && res.status != StatusCode::UNAUTHORIZED,
                    "{role:?} may {:?}: {} {} answered {} {}",
                    c.operation,
                    c.method,
                    c.path,
                    res.status,
                    res.body
                );
            } else {
                assert_eq!(
                    (res.status, res.code()),
                    (StatusCode::FORBIDDEN, "forbidden"),
                    "{role:?} may not {:?}: {} {}",
                    c.operation,
                    c.method,
                    c.path
                );
            }
        }
    }
}

/// What a tenant can see of another: nothing. Counts of the victim's rows.
async fn victim_state(pool: &PgPool) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "vaults",
        "policies",
        "protected_items",
        "recovery_points",
        "jobs",
        "auto_protection_intents",
        "vms",
    ] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                .fetch_one(pool)
                .await
                .unwrap();
        counts.push(n);
    }
    let needs_full: i64 =
        sqlx::query_scalar("select count(*) from protected_items where needs_full")
            .fetch_one(pool)
            .await
            .unwrap();
    counts.push(needs_full);
    counts
}

/// A caller holding another subscription (even as admin) names this tenant's vault, VM,
/// protected item, policy, job and intent in every operation: each answers 404 (or, for
/// ids inside a configure-protection list, the per-database 422) and nothing changes.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn another_subscriptions_ids_are_not_found_anywhere(pool: PgPool) {
    let p = protect(
        pool.clone(),
        weekly_dst_policy(),
        vec![db("MSSQLSERVER", "sales"), db("MSSQLSERVER", "hr")],
    )
    .await;
    let app = &p.app;
    let v = p.vault.clone();
    let item_id = p.items["sales"].clone();
    let sales = p.item_path("sales");
    let containers = protectable(app, &v).await;
    let instance = containers[0]["id"].as_str().unwrap().to_owned();
    let database = db_id(&containers, "hr");
    let vm = app
        .get(&format!("/v1/vaults/{v}/protected-items"), &app.admin())
        .await
        .body["items"][0]["vm_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = crate::helpers::dispatch(app, &vm, "discovery").await;
    let intent = app
        .post(
            &format!("/v1/vaults/{v}/auto-protection"),
            &app.admin(),
            json!({"instance_id": instance, "policy": "Gold"}),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The attacker: an admin of sub-9 with a vault and an enrolled VM of its own.
    let attacker = app.token(Role::Admin, &["sub-9"]);
    let own_vault = app
        .post("/v1/vaults", &attacker, vault_body("attacker", "sub-9"))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let enrollment = app
        .post(
            "/v1/enrollment-tokens",
            &attacker,
            json!({"subscription_id": "sub-9"}),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut own_facts = facts("attacker-vm");
    own_facts["subscription_id"] = json!("sub-9");
    let enrolled = app
        .post("/v1/agent/enroll", &enrollment, json!({"facts": own_facts}))
        .await;
    assert_eq!(enrolled.status, StatusCode::OK, "{}", enrolled.body);
    let own_vm = enrolled.body["vm_id"].as_str().unwrap().to_owned();
    let own_agent = enrolled.body["agent_token"].as_str().unwrap().to_owned();

    let before = victim_state(&pool).await;
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/v1/vaults/{v}"), None),
        (
            Method::PATCH,
            format!("/v1/vaults/{v}"),
            Some(json!({"description": "pwned"})),
        ),
        (Method::DELETE, format!("/v1/vaults/{v}"), None),
        (Method::GET, format!("/v1/vaults/{v}/policies/Gold"), None),
        (
            Method::PUT,
            format!("/v1/vaults/{v}/policies/Gold"),
            Some(json!({"spec": weekly_dst_policy()})),
        ),
        (
            Method::DELETE,
            format!("/v1/vaults/{v}/policies/Gold"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/vaults/{v}/policies/Gold/copy"),
            Some(json!({"target_vault_id": own_vault})),
        ),
        (
            Method::POST,
            format!("/v1/vaults/{v}/policies"),
            Some(json!({"name": "Evil", "spec": weekly_dst_policy()})),
        ),
        (
            Method::GET,
            format!("/v1/vaults/{v}/protectable-items"),
            None,
        ),
        (Method::GET, format!("/v1/vaults/{v}/protected-items"), None),
        (Method::GET, sales.clone(), None),
        (
            Method::PATCH,
            sales.clone(),
            Some(json!({"policy": "HourlyLogBackup"})),
        ),
        (
            Method::POST,
            format!("{sales}/stop"),
            Some(json!({"mode": "delete_data"})),
        ),
        (
            Method::POST,
            format!("{sales}/resume"),
            Some(json!({"policy": "Gold"})),
        ),
        (
            Method::POST,
            format!("{sales}/backup"),
            Some(json!({"type": "copy_only_full", "retention_days": 3650})),
        ),
        (Method::GET, format!("{sales}/recovery-points"), None),
        (
            Method::POST,
            format!("{sales}/restore-plan"),
            Some(json!({"point_in_time": "2030-01-01T00:00:00Z"})),
        ),
        (
            Method::POST,
            format!("{sales}/restore"),
            Some(json!({"point_in_time": "2030-01-01T00:00:00Z", "overwrite": true})),
        ),
        // The attacker's own item path with the victim's item id.
        (
            Method::GET,
            format!("/v1/vaults/{own_vault}/protected-items/{item_id}"),
            None,
        ),
        (Method::GET, format!("/v1/vaults/{v}/rpo"), None),
        (Method::GET, format!("/v1/vaults/{v}/discovery"), None),
        (
            Method::POST,
            format!("/v1/vaults/{v}/vms/{vm}/discover"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/vaults/{own_vault}/vms/{vm}/discover"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/vaults/{v}/vms/{vm}/rediscover"),
            None,
        ),
        (Method::DELETE, format!("/v1/vaults/{v}/vms/{vm}"), None),
        (Method::GET, format!("/v1/vaults/{v}/auto-protection"), None),
        (
            Method::GET,
            format!("/v1/vaults/{v}/auto-protection/{intent}"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/vaults/{v}/auto-protection/{intent}"),
            None,
        ),
        (
            Method::POST,
            format!("/v1/vaults/{own_vault}/auto-protection"),
            Some(json!({"instance_id": instance, "policy": "HourlyLogBackup"})),
        ),
        (Method::GET, format!("/v1/vms/{vm}"), None),
        (Method::DELETE, format!("/v1/vms/{vm}"), None),
        (Method::GET, format!("/v1/jobs/{job}"), None),
        (Method::POST, format!("/v1/jobs/{job}/cancel"), None),
        (
            Method::POST,
            "/v1/jobs".into(),
            Some(json!({"vm_id": vm, "kind": "discovery"})),
        ),
        // The attacker's own VM, naming the victim's protected item: its results would be
        // recorded into the victim's chain.
        (
            Method::POST,
            "/v1/jobs".into(),
            Some(
                json!({"vm_id": own_vm, "kind": "backup_full", "items": [{"instance": "MSSQLSERVER", "database": "sales", "protected_item_id": item_id}]}),
            ),
        ),
    ];
    for (method, path, body) in &calls {
        let res = app
            .call(method.clone(), path, Some(&attacker), body.clone(), &[])
            .await;
        assert_eq!(
            res.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            res.body
        );
    }
    // A list of database ids reports each one it cannot use, as a rule violation.
    let res = app
        .post(
            &format!("/v1/vaults/{own_vault}/protected-items"),
            &attacker,
            json!({"policy": "HourlyLogBackup", "databases": [database]}),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", res.body);
    assert!(
        ["database_not_found", "database_not_in_vault"].contains(&res.violations()[0].1.as_str()),
        "{}",
        res.body
    );
    // The attacker's agent finds nothing to do for the victim.
    assert!(claim(app, &own_agent, 50).await.is_empty());

    assert_eq!(victim_state(&pool).await, before, "no side effect");
}
