//! The single mapping from use-case errors to RFC 9457 problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backvault_domain::Violation;
use backvault_domain::agent::protocol::ReportRefusal;
use backvault_service::{Error, ErrorKind};
use serde::Serialize;
use utoipa::ToSchema;

/// What a 503 asks clients to wait before retrying: the pool gives up within about a
/// second, and a database that restarts or fails over is usually back within seconds.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// The longest `detail`; a longer one is cut.
pub const MAX_DETAIL_CHARS: usize = 2048;

/// RFC 9457 problem details.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:backvault:problem:<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable, machine-readable code (see the rule-code table in `docs/rules.md`).
    pub code: String,
    /// Every violated rule, for `validation_failed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Violation>,
}

/// A use-case error, or an HTTP-level one (415, 413) that only the transport can have.
pub struct ApiError(pub Error, Option<StatusCode>);

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e, None)
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self(Error::new(kind, code, message), None)
    }

    pub fn http(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(
            Error::new(ErrorKind::BadRequest, code, message),
            Some(status),
        )
    }
}

fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        ErrorKind::Validation => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One refused report of a version 2 claim: what the version 1 call would have answered
/// for it, logged the same way.
pub fn refusal(e: Error) -> ReportRefusal {
    let status = status(e.kind);
    if status.is_server_error() {
        tracing::error!(code = e.code, error = %e, "report refused");
    }
    ReportRefusal {
        status: status.as_u16(),
        code: e.code.to_owned(),
        detail: backvault_domain::violation::bounded(e.message, MAX_DETAIL_CHARS),
        errors: e.violations,
    }
}

/// The `code` of a problem response, beside its body: what the audit log records,
/// without reading the body back.
#[derive(Debug, Clone)]
pub struct ProblemCode(pub String);

pub fn problem_response(
    status: StatusCode,
    code: &str,
    detail: String,
    errors: Vec<Violation>,
) -> Response {
    let body = Problem {
        type_: format!("urn:backvault:problem:{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        // A detail can quote what the client sent.
        detail: backvault_domain::violation::bounded(detail, MAX_DETAIL_CHARS),
        code: code.to_owned(),
        errors,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
        .extensions_mut()
        .insert(ProblemCode(code.to_owned()));
    response
}

/// A handler that panicked answers 500 in problem+json, and the panic is logged once;
/// the connection and the other requests carry on.
pub fn problem_for_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = backvault_service::panic_message(panic.as_ref());
    tracing::error!(panic = %message, "request handler panicked");
    problem_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error".into(),
        Vec::new(),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError(e, http_status) = self;
        let status = http_status.unwrap_or_else(|| status(e.kind));
        // The only place a server error is logged; clients get no internals. A 503 is the
        // database's state, not a defect: a warning, so an outage does not read as bugs.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(code = e.code, error = %e, "request failed: unavailable");
        } else if status.is_server_error() {
            tracing::error!(code = e.code, error = %e, "request failed");
        }
        let mut response = problem_response(status, e.code, e.message, e.violations);
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caught_panic_is_a_problem_without_internals() {
        let response = problem_for_panic(Box::new("index out of bounds: secret detail"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("\"code\":\"internal\""));
        assert!(!body.contains("secret"), "{body}");
    }
}
