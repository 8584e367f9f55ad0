//! The audit log (`audit_events`): append-only; the database stamps each event's id and
//! time, and refuses updates and the deletion of events younger than a year.

use backvault_domain::access::Role;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

/// An event to record; the database adds its id and time.
#[derive(Debug, Default)]
pub struct NewAuditEvent<'a> {
    pub subject: Option<&'a str>,
    pub role: Option<Role>,
    pub token_id: Option<Uuid>,
    pub operation: &'a str,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// An IP address, as text (`inet` reads it).
    pub client_addr: Option<String>,
    pub user_agent: Option<&'a str>,
    pub status: Option<i32>,
    pub problem_code: Option<&'a str>,
    pub changes: Option<&'a serde_json::Value>,
    pub details: Option<&'a serde_json::Value>,
}

pub async fn audit_insert(db: impl PgExecutor<'_>, e: &NewAuditEvent<'_>) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into audit_events (subject, role, token_id, operation, method, path, resource, request_id,
                                   client_addr, user_agent, status, problem_code, changes, details)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::inet, $10, $11, $12, $13, $14)",
        e.subject,
        e.role as Option<Role>,
        e.token_id,
        e.operation,
        e.method,
        e.path,
        e.resource,
        e.request_id,
        e.client_addr,
        e.user_agent,
        e.status,
        e.problem_code,
        e.changes,
        e.details,
    )
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct AuditRow {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub subject: Option<String>,
    pub role: Option<Role>,
    pub token_id: Option<Uuid>,
    pub operation: String,
    pub method: Option<String>,
    pub path: Option<String>,
    pub resource: Option<String>,
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub status: Option<i32>,
    pub problem_code: Option<String>,
    pub changes: Option<serde_json::Value>,
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Default)]
pub struct AuditFilter<'a> {
    pub subject: Option<&'a str>,
    pub token_id: Option<Uuid>,
    pub operation: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub status: Option<i32>,
    /// `true`: only events that failed (4xx, 5xx, or no answer); `false`: only the others.
    pub failed: Option<bool>,
    pub problem_code: Option<&'a str>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// Newest first: ids are UUIDv7 the database stamped, so descending id is descending time.
pub async fn audit_list(
    db: impl PgExecutor<'_>,
    f: &AuditFilter<'_>,
    page: Page,
) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as!(
        AuditRow,
        r#"select id, at, subject, role as "role: Role", token_id, operation, method, path, resource,
                  request_id, host(client_addr) as client_addr, user_agent, status, problem_code,
                  changes, details
           from audit_events
           where ($1::text is null or subject = $1)
             and ($2::uuid is null or token_id = $2)
             and ($3::text is null or operation = $3)
             and ($4::text is null or resource = $4)
             and ($5::int is null or status = $5)
             and ($6::bool is null or (status is null or status >= 400) = $6)
             and ($7::text is null or problem_code = $7)
             and ($8::timestamptz is null or at >= $8)
             and ($9::timestamptz is null or at < $9)
             and ($10::uuid is null or id < $10)
           order by id desc limit $11"#,
        f.subject,
        f.token_id,
        f.operation,
        f.resource,
        f.status,
        f.failed,
        f.problem_code,
        f.from,
        f.to,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

/// Deletes up to `batch` events older than `days` days, by the database's clock; the
/// table's trigger refuses any younger than a year, whatever `days` says.
pub async fn audit_purge(conn: &mut PgConnection, days: i32, batch: i64) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from audit_events where id in (
             select id from audit_events where at < now() - make_interval(days => $1) order by at limit $2)",
        days,
        batch,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
