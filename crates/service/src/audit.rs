//! The audit log: what the API did for whom (recorded by the HTTP layer, one event per
//! request it audits), what the server's own work did, and reading it back. Events are
//! append-only and stamped by the database's clock (`migrations/…_audit_log.sql`); no
//! token, secret or body is ever part of one.

use std::net::IpAddr;

use backvault_domain::access::Role;
use backvault_domain::audit::{
    MAX_REQUEST_TEXT_CHARS, MAX_USER_AGENT_CHARS, MIN_RETENTION_DAYS, clean_text,
};
use backvault_store::audit::{self as store, AuditFilter, NewAuditEvent};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Operation;
use crate::error::{Error, ErrorKind, Result};
use crate::pagination::{Page, page, page_request};
use crate::{Principal, Service};

/// One recorded event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEvent {
    pub id: Uuid,
    /// When, by the database's clock.
    pub at: DateTime<Utc>,
    /// The verified token's subject. Absent when the token was refused, and for the
    /// server's own work.
    pub subject: Option<String>,
    pub role: Option<Role>,
    /// The token's id (`jti`); agent tokens have none.
    pub token_id: Option<Uuid>,
    /// The operation id in the OpenAPI document (`update_vault`), or a dotted name for the
    /// server's own work (`audit_log.purge`).
    pub operation: String,
    pub method: Option<String>,
    /// The route template, e.g. `/v1/vaults/{vault_id}`.
    pub path: Option<String>,
    /// The id (or name) of the resource the request named last in its path, or created.
    pub resource: Option<String>,
    /// The request's `X-Request-Id`.
    pub request_id: Option<String>,
    /// The address of the connection's peer (a proxy's, behind one).
    pub client_addr: Option<String>,
    /// The `User-Agent` header: at most 256 characters, control characters dropped.
    pub user_agent: Option<String>,
    /// The answer's status. Absent when none was sent (the client went away, or the
    /// request timed out): whether it took effect is then unknown.
    pub status: Option<u16>,
    /// The answer's problem `code`, for an error.
    pub problem_code: Option<String>,
    /// The fields a change changed: `{"field": {"before": …, "after": …}}`.
    #[schema(value_type = Option<Object>)]
    pub changes: Option<Value>,
    /// More about the event: the path's parameters; for the server's own work, what it did.
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

impl TryFrom<store::AuditRow> for AuditEvent {
    type Error = Error;

    fn try_from(r: store::AuditRow) -> Result<Self> {
        let status = r
            .status
            .map(u16::try_from)
            .transpose()
            .map_err(|_| Error::internal("an audit event's status is not an HTTP status"))?;
        Ok(Self {
            id: r.id,
            at: r.at,
            subject: r.subject,
            role: r.role,
            token_id: r.token_id,
            operation: r.operation,
            method: r.method,
            path: r.path,
            resource: r.resource,
            request_id: r.request_id,
            client_addr: r.client_addr,
            user_agent: r.user_agent,
            status,
            problem_code: r.problem_code,
            changes: r.changes,
            details: r.details,
        })
    }
}

/// Whether the events listed succeeded or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered below 400.
    Success,
    /// Answered 400 or above, or not answered at all.
    Failure,
}

/// The filters of the audit log's list; each narrows it.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub subject: Option<String>,
    pub token_id: Option<Uuid>,
    pub operation: Option<String>,
    pub resource: Option<String>,
    pub status: Option<u16>,
    pub outcome: Option<Outcome>,
    pub problem_code: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// A request as the HTTP layer saw it, to record. Everything the client sent is cleaned
/// here before it is written.
#[derive(Debug, Clone)]
pub struct HttpEvent {
    /// The caller, once its token was verified.
    pub principal: Option<Principal>,
    pub operation: String,
    pub method: String,
    /// The route template.
    pub path: String,
    pub resource: Option<String>,
    /// The path's parameters, by name, as sent.
    pub path_params: Vec<(String, String)>,
    pub request_id: Option<String>,
    pub client_addr: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// `None`: no answer was sent.
    pub status: Option<u16>,
    pub problem_code: Option<String>,
    pub changes: Option<Map<String, Value>>,
}

fn client_text(text: &str) -> String {
    clean_text(text, MAX_REQUEST_TEXT_CHARS)
}

impl Service {
    /// Records one request, in a statement of its own.
    pub async fn audit_http(&self, event: &HttpEvent) -> Result<()> {
        let who = event.principal.as_ref();
        let resource = event.resource.as_deref().map(client_text);
        let request_id = event.request_id.as_deref().map(client_text);
        let user_agent = event
            .user_agent
            .as_deref()
            .map(|ua| clean_text(ua, MAX_USER_AGENT_CHARS));
        let changes = event.changes.clone().map(Value::Object);
        let details = (!event.path_params.is_empty()).then(|| {
            let params: Map<String, Value> = event
                .path_params
                .iter()
                .map(|(name, value)| (client_text(name), Value::from(client_text(value))))
                .collect();
            json!({ "path_params": params })
        });
        let row = NewAuditEvent {
            subject: who.map(|p| p.subject.as_str()),
            role: who.map(|p| p.role),
            token_id: who.and_then(|p| p.jti),
            operation: &event.operation,
            method: Some(&event.method),
            path: Some(&event.path),
            resource: resource.as_deref(),
            request_id: request_id.as_deref(),
            client_addr: event.client_addr.map(|a| a.to_string()),
            user_agent: user_agent.as_deref(),
            status: event.status.map(i32::from),
            problem_code: event.problem_code.as_deref(),
            changes: changes.as_ref(),
            details: details.as_ref(),
        };
        store::audit_insert(&self.pool, &row).await?;
        Ok(())
    }

    /// Records the server's own work (a background task), in the caller's transaction so
    /// that the event and the work commit together. `operation` is dotted:
    /// `<area>.<action>`.
    pub(crate) async fn audit_system(
        &self,
        conn: &mut PgConnection,
        operation: &str,
        resource: Option<&str>,
        details: Value,
    ) -> Result<()> {
        let row = NewAuditEvent {
            operation,
            resource,
            details: Some(&details),
            ..NewAuditEvent::default()
        };
        store::audit_insert(conn, &row).await?;
        Ok(())
    }

    /// The audit log, newest first.
    ///
    /// Events are not partitioned by subscription (a refused token names none, and an
    /// event's resource may be gone), so only a token for every subscription reads them:
    /// one scoped to some would learn of the others' resources.
    pub async fn audit_events(
        &self,
        principal: &Principal,
        query: &AuditQuery,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<AuditEvent>> {
        principal.require(Operation::ReadAuditLog)?;
        if principal.subscriptions.is_some() {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "the audit log spans every subscription: reading it takes a token for all subscriptions (`*`)",
            ));
        }
        let (request, limit) = page_request(cursor, limit)?;
        let filter = AuditFilter {
            subject: query.subject.as_deref(),
            token_id: query.token_id,
            operation: query.operation.as_deref(),
            resource: query.resource.as_deref(),
            status: query.status.map(i32::from),
            failed: query.outcome.map(|o| o == Outcome::Failure),
            problem_code: query.problem_code.as_deref(),
            from: query.from,
            to: query.to,
        };
        let rows = store::audit_list(&self.pool, &filter, request).await?;
        let page = page(rows, limit, |r| r.id, AuditEvent::try_from);
        Ok(Page {
            items: page.items.into_iter().collect::<Result<_>>()?,
            next_cursor: page.next_cursor,
        })
    }

    /// Deletes the events older than the configured retention (never younger than a year:
    /// the database refuses), in batches, one replica at a time. Each batch records that it
    /// ran, so the log shows its own pruning.
    pub async fn purge_audit_events(&self) -> Result<u64> {
        let days = self.config.audit_retention_days.max(MIN_RETENTION_DAYS);
        let days = i32::try_from(days).unwrap_or(i32::MAX);
        let mut total: u64 = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            if !backvault_store::try_lead(&mut tx, AUDIT_PURGE_LOCK).await? {
                return Ok(total);
            }
            let deleted = store::audit_purge(&mut tx, days, AUDIT_PURGE_BATCH).await?;
            if deleted > 0 {
                let details = json!({ "deleted": deleted, "retention_days": days });
                self.audit_system(&mut tx, "audit_log.purge", None, details)
                    .await?;
            }
            tx.commit().await?;
            total = total.saturating_add(deleted);
            if deleted < AUDIT_PURGE_BATCH.unsigned_abs() {
                return Ok(total);
            }
        }
    }
}

/// The advisory lock the replica that purges the audit log holds.
pub const AUDIT_PURGE_LOCK: i64 = 0x6261_636b_00a1;
const AUDIT_PURGE_BATCH: i64 = 10_000;
