//! The audit log is append-only in the database itself, whatever the code above it does:
//! no update, no truncate, no delete of an event younger than the domain's minimum
//! retention, and no event stamped with any time but the database's.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

use backvault_domain::audit::MIN_RETENTION_DAYS;
use backvault_store::audit::{NewAuditEvent, audit_insert, audit_purge};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

async fn record(pool: &PgPool, operation: &str) {
    let event = NewAuditEvent {
        operation,
        subject: Some("tester"),
        ..NewAuditEvent::default()
    };
    audit_insert(pool, &event).await.unwrap();
}

/// An event as if recorded `days` ago. Only a superuser can write one (the tests run as
/// one): it turns the table's triggers off for its transaction.
async fn recorded_days_ago(pool: &PgPool, operation: &str, days: u32) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("set local session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "insert into audit_events (operation, at) values ($1, now() - make_interval(days => $2))",
    )
    .bind(operation)
    .bind(i32::try_from(days).unwrap())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn operations(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("select operation from audit_events order by operation")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The SQLSTATE a statement failed with, or `None` when it succeeded.
async fn refusal(pool: &PgPool, statement: &'static str) -> Option<String> {
    sqlx::query(statement)
        .execute(pool)
        .await
        .err()
        .map(|e| e.as_database_error().unwrap().code().unwrap().into_owned())
}

const REFUSED: Option<&str> = Some("42501");

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn events_are_never_updated_or_truncated(pool: PgPool) {
    record(&pool, "update_vault").await;
    for statement in [
        "update audit_events set subject = 'someone else'",
        // Refused as a statement, before any row is looked at.
        "update audit_events set subject = 'x' where false",
        "truncate audit_events",
    ] {
        assert_eq!(
            refusal(&pool, statement).await.as_deref(),
            REFUSED,
            "{statement}"
        );
    }
    let subject: String = sqlx::query_scalar("select subject from audit_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(subject, "tester");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn only_events_older_than_the_minimum_retention_are_deleted(pool: PgPool) {
    record(&pool, "now").await;
    recorded_days_ago(&pool, "just_younger", MIN_RETENTION_DAYS - 1).await;
    recorded_days_ago(&pool, "just_older", MIN_RETENTION_DAYS + 1).await;
    for young in ["now", "just_younger"] {
        let delete = format!("delete from audit_events where operation = '{young}'");
        let refused = sqlx::query(sqlx::AssertSqlSafe(delete))
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(
            refused.as_database_error().unwrap().code().as_deref(),
            REFUSED
        );
    }
    // One young row refuses the whole statement.
    assert_eq!(
        refusal(&pool, "delete from audit_events").await.as_deref(),
        REFUSED
    );
    assert_eq!(
        operations(&pool).await,
        ["just_older", "just_younger", "now"]
    );
    let deleted = sqlx::query("delete from audit_events where operation = 'just_older'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    assert_eq!(operations(&pool).await, ["just_younger", "now"]);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_database_stamps_id_and_time(pool: PgPool) {
    let sent = Uuid::nil();
    let (id, at, now): (Uuid, DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "insert into audit_events (id, at, operation) values ($1, '2000-01-01T00:00:00Z', 'backdated')
         returning id, at, now()",
    )
    .bind(sent)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        at, now,
        "the event's time is the database's, not the one sent"
    );
    assert_ne!(id, sent);
    assert_eq!(id.get_version_num(), 7);
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_purge_deletes_what_retention_lets_go(pool: PgPool) {
    record(&pool, "today").await;
    recorded_days_ago(&pool, "kept_by_400", 380).await;
    recorded_days_ago(&pool, "past_400", 401).await;
    recorded_days_ago(&pool, "long_past", 900).await;
    let mut conn = pool.acquire().await.unwrap();
    // Batches of one: a purge deletes at most its batch, oldest first.
    assert_eq!(audit_purge(&mut conn, 400, 1).await.unwrap(), 1);
    assert_eq!(
        operations(&pool).await,
        ["kept_by_400", "past_400", "today"]
    );
    assert_eq!(audit_purge(&mut conn, 400, 10).await.unwrap(), 1);
    assert_eq!(operations(&pool).await, ["kept_by_400", "today"]);
    assert_eq!(audit_purge(&mut conn, 365, 10).await.unwrap(), 1);
    // A shorter retention than the database keeps is refused, not honoured.
    let refused = audit_purge(&mut conn, 0, 10).await.unwrap_err();
    assert_eq!(
        refused.as_database_error().unwrap().code().as_deref(),
        REFUSED
    );
    assert_eq!(operations(&pool).await, ["today"]);
}
