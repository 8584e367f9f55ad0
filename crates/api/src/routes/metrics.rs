use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
fn method_label(method: &axum::http::Method) -> String {
    use axum::http::Method;
    const KNOWN: [Method; 7] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    if KNOWN.contains(method) {
        method.as_str().to_owned()
    } else {
        "other".to_owned()
    }
}

/// Records the latency of every request by matched route (not raw path, so ids do not
/// explode the label space) and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state
        .service
        .metrics
        .http_request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
