//! Reading the audit log.

use axum::extract::State;
use backvault_service::audit::{AuditEvent, AuditQuery, Outcome};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiResult, Problem};
use crate::extract::{Caller, Query, bounded_instants};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit_events))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventList {
    pub items: Vec<AuditEvent>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

/// The longest text filter: longer than any subject, operation id, resource id or problem
/// code the log holds, and short enough for a URI.
pub const MAX_FILTER_CHARS: usize = 256;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditEventListParams {
    /// Events of this token subject.
    pub subject: Option<String>,
    /// Events of this token id (`jti`).
    pub token_id: Option<Uuid>,
    /// Events of this operation id (`update_vault`) or server task (`audit_log.purge`).
    pub operation: Option<String>,
    /// Events on this resource id or name.
    pub resource: Option<String>,
    /// Events answered with this HTTP status.
    pub status: Option<u16>,
    /// `success`: answered below 400; `failure`: answered 400 or above, or not answered.
    #[param(inline)]
    pub outcome: Option<Outcome>,
    /// Events answered with this problem code (`forbidden`).
    pub problem_code: Option<String>,
    /// Events at or after this instant.
    pub from: Option<DateTime<Utc>>,
    /// Events before this instant.
    pub to: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
}

/// List audit events, newest first.
///
/// Every change made through the API, every request refused with 401 or 403, and the
/// server's own pruning of the log: who (token subject, role and id), what (operation,
/// route, resource, and the fields a change changed), when (the database's clock), from
/// where (peer address, User-Agent) and how it ended (status, problem code). For admins
/// and auditors, with a token for all subscriptions (`*`): the log spans every
/// subscription.
#[utoipa::path(get, path = "/v1/audit-events", tag = "audit", params(AuditEventListParams),
    responses(
        (status = 200, body = AuditEventList),
        (status = 403, body = Problem, content_type = "application/problem+json", description = "`forbidden`: only admins and auditors read the audit log; `subscription_forbidden`: the token does not grant every subscription (`*`)."),
    ))]
async fn list_audit_events(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Query(p): Query<AuditEventListParams>,
) -> ApiResult<axum::Json<AuditEventList>> {
    bounded_instants(&[("from", p.from), ("to", p.to)])?;
    let too_long = [&p.subject, &p.operation, &p.resource, &p.problem_code]
        .into_iter()
        .flatten()
        .any(|f| f.chars().count() > MAX_FILTER_CHARS);
    if too_long {
        return Err(crate::error::ApiError::new(
            backvault_service::error::ErrorKind::BadRequest,
            "invalid_query",
            format!("a text filter has at most {MAX_FILTER_CHARS} characters"),
        ));
    }
    if p.status.is_some_and(|s| !(100..=599).contains(&s)) {
        return Err(crate::error::ApiError::new(
            backvault_service::error::ErrorKind::BadRequest,
            "invalid_query",
            "status is an HTTP status, 100 to 599",
        ));
    }
    let query = AuditQuery {
        subject: p.subject,
        token_id: p.token_id,
        operation: p.operation,
        resource: p.resource,
        status: p.status,
        outcome: p.outcome,
        problem_code: p.problem_code,
        from: p.from,
        to: p.to,
    };
    let page = state
        .service
        .audit_events(&principal, &query, p.cursor.as_deref(), p.limit)
        .await?;
    Ok(axum::Json(AuditEventList {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}
