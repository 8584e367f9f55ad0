use std::time::Instant;

use axum::extract::{MatchedPath, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backvault_service::Service;
use backvault_service::metrics::HttpLabels;

use crate::AppState;
use crate::error::ApiError;

/// Prometheus text format. Open, like `/healthz`.
pub async fn metrics(axum::extract::State(state): State<AppState>) -> Result<Response, ApiError> {
    state.service.refresh_queue_gauges().await?;
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &state.service.metrics.registry())
        .map_err(|e| ApiError::from(backvault_service::Error::internal(e)))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// Methods this API serves keep their name; anything else a client invents is `other`, so
/// nobody can grow the label space.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Records the latency of a request by matched route (not raw path, so ids do not explode
/// the label space) and status. Called by `edge::route_checks`.
pub fn observe(
    service: &Service,
    method: &Method,
    route: Option<&MatchedPath>,
    status: StatusCode,
    started: Instant,
) {
    let labels = HttpLabels {
        method: method_label(method),
        route: route.map_or("unmatched", MatchedPath::as_str).to_owned(),
        status: status.as_u16(),
    };
    service
        .metrics
        .http_request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
}
