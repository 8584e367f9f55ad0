//! The checks every request passes before a handler sees it: a bounded URI, path and query
//! values that obey the text rule (`domain::text`), and no query parameter that the
//! operation does not document. The allowed parameters come from the OpenAPI document the
//! routes are built with, so the contract and the check cannot disagree.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backvault_domain::text::text_fault;
use backvault_service::{ErrorKind, Service};

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
/// when none of their encodings is one the server has.
pub async fn lenient_accept_encoding(mut request: Request, next: Next) -> Response {
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
    next.run(request).await
}

/// The interactive documentation's policy: its own scripts and styles only (Swagger UI
/// styles elements inline), fetches to this origin, never framed.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Before routing, one layer for two checks (each layer costs a box and a clone of the
/// stack under it per request): URIs past `MAX_URI_BYTES` answer 414 in problem+json, and
/// every response, that 414 included, carries the security headers (`nosniff`: a problem
/// or JSON body is never rendered as something else), with the page's protections on
/// `/docs`.
pub async fn guard(request: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, header};
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    let docs = request.uri().path().starts_with("/docs");
    let mut response = if length > MAX_URI_BYTES {
        ApiError::http(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request URI is at most {MAX_URI_BYTES} bytes"),
        )
        .into_response()
    } else {
        next.run(request).await
    };
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

/// After routing and inside the audit layer, one layer (not one per check, each a box and a
/// clone per request): the request's latency by route and status is recorded, of what the
/// checks refuse too; path and query values obey the text rule and every query parameter is
/// one the operation documents; then the conditional GET around the handler.
pub async fn route_checks(
    State(checks): State<Arc<RouteChecks>>,
    request: Request,
    next: Next,
) -> Response {
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
