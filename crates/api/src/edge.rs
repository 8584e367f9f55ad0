//! The checks every request passes before a handler sees it: a bounded URI, path and query
//! values that obey the text rule (`domain::text`), and no query parameter that the
//! operation does not document. The allowed parameters come from the OpenAPI document the
//! routes are built with, so the contract and the check cannot disagree.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backvault_domain::text::text_fault;
use backvault_service::{ErrorKind, Service};
use pin_project_lite::pin_project;
use tower::{Layer, Service as TowerService};

use crate::error::ApiError;

/// Longer URIs answer 414 in problem+json. No operation needs more: ids are UUIDs, names
/// are short and filters few.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// The query parameters each operation documents, by method and route template (looked up
/// by the route's text, without building a key per request).
#[derive(Debug, Default)]
pub struct QueryContract(HashMap<Method, HashMap<String, HashSet<String>>>);

impl QueryContract {
    pub fn from_openapi(doc: &serde_json::Value) -> Self {
        let mut allowed = HashMap::new();
        let Some(paths) = doc.get("paths").and_then(|p| p.as_object()) else {
            return Self(allowed);
        };
        for (path, item) in paths {
            let Some(operations) = item.as_object() else {
                continue;
            };
            for (method, operation) in operations {
                let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                let names = operation
                    .get("parameters")
                    .and_then(|p| p.as_array())
                    .into_iter()
                    .flatten()
                    .filter(|p| p.get("in").and_then(|i| i.as_str()) == Some("query"))
                    .filter_map(|p| p.get("name").and_then(|n| n.as_str()))
                    .map(str::to_owned)
                    .collect();
                allowed
                    .entry(method)
                    .or_insert_with(HashMap::new)
                    .insert(path.clone(), names);
            }
        }
        Self(allowed)
    }

    fn allowed(&self, method: &Method, route: &str) -> Option<&HashSet<String>> {
        self.0.get(method)?.get(route)
    }
}

fn bad_request(code: &'static str, message: String) -> Response {
    ApiError::new(ErrorKind::BadRequest, code, message).into_response()
}

/// `Accept-Encoding` that refuses an unencoded body (`identity;q=0`, `*;q=0`) is read as if
/// it did not: the compression layer would otherwise replace the answer of a request that
/// already ran (a vault created, jobs claimed) with a 406. Clients get the body unencoded
/// when none of their encodings is one the server has. A plain function of the request
/// (`map_request`), so it costs no boxed future.
pub fn lenient_accept_encoding(mut request: Request) -> Request {
    use axum::http::{HeaderValue, header};
    let refuses_identity = |entry: &str| {
        let mut parts = entry.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let zero = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        zero && (coding.eq_ignore_ascii_case("identity") || coding == "*")
    };
    if let Some(value) = request
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        && value.split(',').any(refuses_identity)
    {
        let kept = value
            .split(',')
            .filter(|entry| !refuses_identity(entry))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", ");
        let headers = request.headers_mut();
        match HeaderValue::from_str(&kept) {
            Ok(v) if !kept.is_empty() => {
                headers.insert(header::ACCEPT_ENCODING, v);
            }
            _ => {
                headers.remove(header::ACCEPT_ENCODING);
            }
        }
    }
    request
}

/// The interactive documentation's policy: its own scripts and styles only (Swagger UI
/// styles elements inline), fetches to this origin, never framed.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The innermost of the edge layers, four guarantees in one hand-written service (a layer
/// per guarantee cost a boxed future and a clone of the stack below it per request; see
/// `BENCHMARKS.md`, fifth pass): URIs past `MAX_URI_BYTES` answer 414; a request
/// that takes longer than `timeout` answers 408; a handler that panics answers 500 (the
/// panic logged once, the connection and the other requests carry on); and every answer,
/// those three included, carries the security headers (`nosniff`: a problem or JSON body
/// is never rendered as something else), with the page's protections on `/docs`. All
/// answers are problems in problem+json.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    pub timeout: Duration,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    timeout: Duration,
}

impl<S> TowerService<Request> for Edge<S>
where
    S: TowerService<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let docs = request.uri().path().starts_with("/docs");
        let length = request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len());
        let state = if length > MAX_URI_BYTES {
            EdgeState::Answered {
                response: Some(uri_too_long()),
            }
        } else {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
                Ok(future) => EdgeState::Running {
                    future: tokio::time::timeout(self.timeout, future),
                },
                Err(panic) => EdgeState::Answered {
                    response: Some(crate::error::problem_for_panic(panic)),
                },
            }
        };
        EdgeFuture { state, docs }
    }
}

pin_project! {
    /// The answer of [`Edge`].
    pub struct EdgeFuture<F> {
        #[pin]
        state: EdgeState<F>,
        docs: bool,
    }
}

pin_project! {
    #[project = EdgeStateProjection]
    enum EdgeState<F> {
        Running { #[pin] future: tokio::time::Timeout<F> },
        Answered { response: Option<Response> },
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            EdgeStateProjection::Answered { response } => match response.take() {
                Some(response) => response,
                // Polled again after its answer: nothing is left to give.
                None => return Poll::Pending,
            },
            EdgeStateProjection::Running { future } => {
                match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(Ok(response)))) => response,
                    Ok(Poll::Ready(Ok(Err(never)))) => match never {},
                    Ok(Poll::Ready(Err(_elapsed))) => request_timeout(),
                    Err(panic) => crate::error::problem_for_panic(panic),
                }
            }
        };
        Poll::Ready(Ok(secured(response, *this.docs)))
    }
}

fn uri_too_long() -> Response {
    ApiError::http(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        format!("the request URI is at most {MAX_URI_BYTES} bytes"),
    )
    .into_response()
}

fn request_timeout() -> Response {
    ApiError::http(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request took longer than the server allows; retry",
    )
    .into_response()
}

fn secured(mut response: Response, docs: bool) -> Response {
    use axum::http::{HeaderValue, header};
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if docs {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOCS_CSP),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    response
}

/// What the route checks need: the documented query parameters, and the service whose
/// metrics time every request.
pub struct RouteChecks {
    pub contract: QueryContract,
    pub service: Service,
}

/// After routing, inside the audit, in the one route layer (`lib.rs::route_layer`): the
/// request's latency by route and status is recorded, of what the
/// checks refuse too; path and query values obey the text rule and every query parameter is
/// one the operation documents; then the conditional GET around the handler.
pub async fn route_checks(checks: &RouteChecks, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let (mut parts, body) = request.into_parts();
    let response = match refused_parameters(&checks.contract, &mut parts).await {
        Some(refusal) => refusal,
        None => conditional_get(Request::from_parts(parts, body), next).await,
    };
    crate::routes::metrics::observe(
        &checks.service,
        &method,
        route.as_ref(),
        response.status(),
        started,
    );
    response
}

/// Conditional requests: `If-Match` and `If-None-Match` longer than any ETag this server
/// sends are malformed (400 `invalid_header`); on a read, a 200 whose `ETag` the client
/// already holds becomes a 304 without a body, for every operation that sends an `ETag`.
async fn conditional_get(request: Request, next: Next) -> Response {
    use axum::http::header;
    for name in [header::IF_MATCH, header::IF_NONE_MATCH] {
        if request
            .headers()
            .get(&name)
            .is_some_and(|v| v.len() > crate::openapi::MAX_CONDITIONAL_HEADER_CHARS)
        {
            return bad_request(
                "invalid_header",
                format!(
                    "{name} holds at most {} characters: a few of the ETags this server sends",
                    crate::openapi::MAX_CONDITIONAL_HEADER_CHARS
                ),
            );
        }
    }
    let if_none_match = matches!(*request.method(), Method::GET | Method::HEAD)
        .then(|| request.headers().get(header::IF_NONE_MATCH).cloned())
        .flatten();
    let response = next.run(request).await;
    let Some(if_none_match) = if_none_match else {
        return response;
    };
    let etag = response.headers().get(header::ETAG).cloned();
    let hit = response.status() == StatusCode::OK
        && etag.as_ref().is_some_and(|etag| {
            crate::extract::none_match_hit(
                if_none_match.to_str().unwrap_or(""),
                etag.to_str().unwrap_or(""),
            )
        });
    match etag {
        Some(etag) if hit => (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response(),
        _ => response,
    }
}

/// After routing: path and query values obey the text rule, and every query parameter is
/// one the operation documents. The refusal, if any.
async fn refused_parameters(contract: &QueryContract, parts: &mut Parts) -> Option<Response> {
    if let Ok(params) = RawPathParams::from_request_parts(parts, &()).await {
        for (name, value) in &params {
            if let Some(fault) = text_fault(value) {
                return Some(bad_request(
                    "invalid_path",
                    format!("path parameter {name}: {}", fault.message()),
                ));
            }
        }
    }
    let route = parts.extensions.get::<MatchedPath>();
    if let (Some(route), Some(query)) = (route, parts.uri.query()) {
        let allowed = contract.allowed(&parts.method, route.as_str());
        let Some(pairs) = form_urlencoded_pairs(query) else {
            return Some(bad_request(
                "invalid_query",
                "the query string is not valid UTF-8 once percent-decoded".to_owned(),
            ));
        };
        for (name, value) in pairs {
            if let Some(fault) = text_fault(&name).or_else(|| text_fault(&value)) {
                return Some(bad_request(
                    "invalid_query",
                    format!("query parameter {name:?}: {}", fault.message()),
                ));
            }
            // Routes outside the document (`/docs`, `/metrics`) are not checked for names.
            if let Some(allowed) = allowed
                && !allowed.contains(name.as_str())
            {
                let mut known: Vec<_> = allowed.iter().map(String::as_str).collect();
                known.sort_unstable();
                return Some(bad_request(
                    "unknown_query_parameter",
                    if known.is_empty() {
                        format!("this operation takes no query parameters (got {name:?})")
                    } else {
                        format!(
                            "unknown query parameter {name:?}; this operation takes {}",
                            known.join(", ")
                        )
                    },
                ));
            }
        }
    }
    None
}

/// `application/x-www-form-urlencoded` pairs, decoded as axum's `Query` decodes them.
fn form_urlencoded_pairs(query: &str) -> Option<Vec<(String, String)>> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::Arc;

    #[test]
    fn pairs_are_percent_decoded() {
        assert_eq!(
            form_urlencoded_pairs("policy=a%00b&x=1+2").unwrap(),
            vec![
                ("policy".to_owned(), "a\0b".to_owned()),
                ("x".to_owned(), "1 2".to_owned())
            ]
        );
    }

    /// The edge around `inner`, called once with a request for `uri`.
    async fn through_edge<S>(inner: S, timeout: Duration, uri: &str) -> (Response, Value)
    where
        S: TowerService<Request, Response = Response, Error = Infallible>,
    {
        let mut edge = EdgeLayer { timeout }.layer(inner);
        let request = Request::builder()
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let Ok(response) = edge.call(request).await;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (Response::from_parts(parts, axum::body::Body::empty()), json)
    }

    fn ok(_: Request) -> std::future::Ready<Result<Response, Infallible>> {
        std::future::ready(Ok(StatusCode::OK.into_response()))
    }

    fn assert_problem(response: &Response, body: &Value, status: StatusCode, code: &str) {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert_eq!(body["code"], code, "{body}");
    }

    #[tokio::test]
    async fn answers_pass_with_the_security_headers() {
        let (response, _) =
            through_edge(tower::service_fn(ok), Duration::from_secs(5), "/v1/vaults").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert!(!response.headers().contains_key("content-security-policy"));
        let (docs, _) = through_edge(tower::service_fn(ok), Duration::from_secs(5), "/docs/").await;
        assert_eq!(docs.headers()["x-frame-options"], "DENY");
        assert_eq!(docs.headers()["content-security-policy"], DOCS_CSP);
    }

    #[tokio::test]
    async fn a_long_uri_answers_414_without_reaching_the_handler() {
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        let inner = tower::service_fn(move |request: Request| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            ok(request)
        });
        let uri = format!("/v1/vaults?{}", "a".repeat(MAX_URI_BYTES));
        let (response, body) = through_edge(inner, Duration::from_secs(5), &uri).await;
        assert_problem(&response, &body, StatusCode::URI_TOO_LONG, "uri_too_long");
        assert!(!reached.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_request_past_the_timeout_answers_408() {
        let never =
            tower::service_fn(|_: Request| std::future::pending::<Result<Response, Infallible>>());
        let (response, body) = through_edge(never, Duration::from_millis(20), "/v1/jobs").await;
        assert_problem(
            &response,
            &body,
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
        );
    }

    #[tokio::test]
    async fn a_panic_while_called_or_polled_answers_500() {
        #[derive(Clone)]
        struct PanicsWhenCalled;
        impl TowerService<Request> for PanicsWhenCalled {
            type Response = Response;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request) -> Self::Future {
                panic!("a defect in a handler's synchronous part")
            }
        }
        let (response, body) =
            through_edge(PanicsWhenCalled, Duration::from_secs(5), "/v1/vaults").await;
        assert_problem(
            &response,
            &body,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        );
        let panics_when_polled = tower::service_fn(|_: Request| async {
            if std::hint::black_box(true) {
                panic!("a defect in a handler");
            }
            Ok::<Response, Infallible>(StatusCode::OK.into_response())
        });
        let (response, body) =
            through_edge(panics_when_polled, Duration::from_secs(5), "/v1/vaults").await;
        assert_problem(
            &response,
            &body,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        );
    }

    #[test]
    fn an_accept_encoding_that_refuses_identity_is_read_without_the_refusal() {
        let with = |value: &str| {
            let request = Request::builder()
                .header("accept-encoding", value)
                .body(axum::body::Body::empty())
                .unwrap();
            lenient_accept_encoding(request)
                .headers()
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(with("gzip, identity;q=0").as_deref(), Some("gzip"));
        assert_eq!(with("identity;q=0, *;q=0"), None);
        assert_eq!(with("gzip, br").as_deref(), Some("gzip, br"));
    }

    #[test]
    fn the_contract_lists_documented_query_parameters() {
        let contract = QueryContract::from_openapi(&crate::openapi());
        let jobs = contract.allowed(&Method::GET, "/v1/jobs").unwrap();
        assert!(jobs.contains("status") && jobs.contains("limit"));
        let vault = contract
            .allowed(&Method::GET, "/v1/vaults/{vault_id}")
            .unwrap();
        assert!(vault.is_empty());
    }
}
