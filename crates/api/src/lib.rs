//! HTTP mapping only: extract, call one use case, render. Routes and the OpenAPI document
//! are built together (utoipa-axum), so they cannot drift.

pub mod audit;
pub mod edge;
pub mod error;
pub mod extract;
mod openapi;
mod routes;
mod strict;
pub mod transport;

use std::time::Duration;

use axum::Router;
use axum::http::HeaderName;
use backvault_service::Service;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use openapi::ApiDoc;

#[derive(Clone)]
pub struct AppState {
    pub service: Service,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// How long a request may take before it answers 408.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(routes::health::router())
        .merge(routes::vaults::router())
        .merge(routes::policies::router())
        .merge(routes::vms::router())
        .merge(routes::jobs::router())
        .merge(routes::agent::router())
        .merge(routes::protection::router())
        .merge(routes::safety::router())
        .merge(routes::tokens::router())
        .merge(routes::audit::router())
}

/// The OpenAPI document the code describes; committed as `openapi/openapi.json`.
pub fn openapi() -> serde_json::Value {
    openapi::document(&api_router().into_openapi())
}

/// What the HTTP layer is configured with, beyond the service.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Origins a browser may call the API from (CORS); none by default. `*` allows any:
    /// the API authenticates with bearer tokens, never cookies, so a page on another
    /// origin can only act with a token its user gave it.
    pub cors_allowed_origins: Vec<String>,
}

/// The whole HTTP application, with default options.
pub fn router(state: AppState) -> Router {
    router_with(state, &HttpOptions::default())
}

/// An origin as browsers send it and CORS compares it: `*`, or `scheme://host[:port]`
/// (http or https, no path, no trailing slash). Surrounding spaces are dropped, so a list
/// written `a, b` works.
pub fn parse_cors_origin(raw: &str) -> Result<String, String> {
    let origin = raw.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let uri: axum::http::Uri = origin
        .parse()
        .map_err(|e| format!("{origin:?} is not an origin: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    // `http` reads an absent path as `/`; the text tells the two apart.
    let bare = uri
        .path_and_query()
        .is_none_or(|pq| matches!(pq.as_str(), "" | "/"))
        && !origin.ends_with('/');
    if !scheme_ok || uri.host().is_none() || !bare {
        return Err(format!(
            "{origin:?} is not an origin: write scheme://host[:port], e.g. https://console.example.com"
        ));
    }
    Ok(origin.to_owned())
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    use axum::http::{Method, header};
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
                REQUEST_ID,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// What the route layer needs.
struct RouteLayer {
    auditor: std::sync::Arc<audit::Auditor>,
    checks: edge::RouteChecks,
}

/// The one route layer: the audit outside (its write is not counted in the request's
/// metrics), then the request's metrics, the path and query checks and conditional GETs.
async fn route_layer(
    axum::extract::State(layer): axum::extract::State<std::sync::Arc<RouteLayer>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    audit::record(&layer.auditor, request, |request| {
        edge::route_checks(&layer.checks, request, next)
    })
    .await
}

/// The whole HTTP application.
pub fn router_with(state: AppState, options: &HttpOptions) -> Router {
    let (router, described) = api_router().split_for_parts();
    let spec = openapi::document(&described);
    let checks = edge::RouteChecks {
        contract: edge::QueryContract::from_openapi(&spec),
        service: state.service.clone(),
    };
    let auditor = std::sync::Arc::new(audit::Auditor {
        service: state.service.clone(),
        operations: audit::Operations::from_openapi(&spec),
    });
    router
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", spec))
        .route("/metrics", axum::routing::get(routes::metrics::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Each `route_layer`/`layer` call boxes every route once more, and a route's box is
        // cloned and dropped for every request; so does each `from_fn` layer, with a boxed
        // future besides: one route layer, and an edge stack of one `layer` call whose
        // members box no future. In a stack the first layer is the outermost.
        .route_layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(RouteLayer { auditor, checks }),
            route_layer,
        ))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(tower::util::option_layer(cors(
                    &options.cors_allowed_origins,
                )))
                // CORS answers preflights with an empty body of the type below it.
                .map_response(axum::response::IntoResponse::into_response)
                .map_request(edge::lenient_accept_encoding)
                // Inside the request id, so compressed and preflight answers carry it too.
                .layer(CompressionLayer::new())
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &axum::http::Request<_>| {
                            let route = req
                                .extensions()
                                .get::<axum::extract::MatchedPath>()
                                .map_or(req.uri().path(), |p| p.as_str());
                            let request_id = req
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!("http", method = %req.method(), route, request_id)
                        })
                        // Failures are logged once, where the error is rendered (`error.rs`).
                        .on_failure(()),
                )
                // Innermost: its answers (414, 408, a panic's 500) are traced and
                // compressed like any other.
                .layer(edge::EdgeLayer {
                    timeout: REQUEST_TIMEOUT,
                }),
        )
}

#[cfg(test)]
mod tests {
    use super::parse_cors_origin;

    #[test]
    fn cors_origins_are_checked() {
        assert_eq!(
            parse_cors_origin(" https://a.example ").unwrap(),
            "https://a.example"
        );
        assert_eq!(
            parse_cors_origin("http://localhost:3000").unwrap(),
            "http://localhost:3000"
        );
        assert_eq!(parse_cors_origin("*").unwrap(), "*");
        for bad in [
            "https://a.example/",
            "https://a.example/app",
            "a.example",
            "ftp://a.example",
            "",
        ] {
            assert!(parse_cors_origin(bad).is_err(), "{bad:?}");
        }
    }
}
