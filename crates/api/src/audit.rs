//! The audit log's HTTP side: a route layer that records every mutating request under
//! `/v1/` and every request answered 401 or 403 (a token refused, a permission denied):
//! who (as `Caller` verified it), what (the operation id, the route, the resource), from
//! where (the connection's peer, the User-Agent), and how it ended (status, problem code).
//! Bodies and the `Authorization` header are never read.
//!
//! The agent protocol's claims, heartbeats and job reports are recorded only when refused:
//! every agent makes them many times a minute, and they touch only its own VM's jobs.
//! Enrollment, a machine joining, is recorded like any change.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use backvault_domain::audit::changed_fields;
use backvault_service::audit::HttpEvent;
use backvault_service::{Principal, Service};
use futures_util::FutureExt;
use serde_json::{Map, Value};

use crate::error::ProblemCode;
use crate::transport::PeerAddr;

/// Operation ids by method and route template, read from the OpenAPI document the routes
/// are built with, so that an event names the operation exactly as the contract does.
#[derive(Debug, Default)]
pub struct Operations(HashMap<(Method, String), String>);

impl Operations {
    pub fn from_openapi(doc: &Value) -> Self {
        let mut ids = HashMap::new();
        let paths = doc.get("paths").and_then(Value::as_object).into_iter();
        for (path, item) in paths.flatten() {
            for (method, operation) in item.as_object().into_iter().flatten() {
                let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                    continue;
                };
                if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                    ids.insert((method, path.clone()), id.to_owned());
                }
            }
        }
        Self(ids)
    }

    /// The operation id, or `METHOD route` for the few routes outside the document
    /// (`/metrics`, `/docs`), which are never mutating.
    fn id(&self, method: &Method, route: &str) -> String {
        self.0
            .get(&(method.clone(), route.to_owned()))
            .cloned()
            .unwrap_or_else(|| format!("{method} {route}"))
    }
}

/// What the audit layer needs: where to write, and the operation ids.
pub struct Auditor {
    pub service: Service,
    pub operations: Operations,
}

/// What a request's handling tells the audit layer: the caller once `Caller` verified it,
/// what a change changed, and the resource when the path does not name it. The layer puts
/// one in every request's extensions; a handler takes it as an extractor.
#[derive(Clone, Default)]
pub struct AuditSlot(Arc<Mutex<Draft>>);

#[derive(Default)]
struct Draft {
    principal: Option<Principal>,
    resource: Option<String>,
    changes: Option<Map<String, Value>>,
}

impl AuditSlot {
    pub(crate) fn caller(&self, principal: &Principal) {
        self.draft().principal = Some(principal.clone());
    }

    /// Records the top-level fields that differ between the resource before and after
    /// the change (`domain::audit::changed_fields`; values of fields that name a secret are
    /// redacted). Give it resources as clients see them, never a request body.
    pub fn record_changes(&self, before: &impl serde::Serialize, after: &impl serde::Serialize) {
        let (Ok(before), Ok(after)) = (serde_json::to_value(before), serde_json::to_value(after))
        else {
            return;
        };
        let changes = changed_fields(&before, &after);
        self.draft().changes = (!changes.is_empty()).then_some(changes);
    }

    /// The resource the request acted on, where neither its path nor a `Location` names it.
    pub fn resource(&self, id: impl ToString) {
        self.draft().resource = Some(id.to_string());
    }

    fn draft(&self) -> MutexGuard<'_, Draft> {
        // A handler that panicked holding the lock left a draft that is still worth writing.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditSlot {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        // Outside the audit layer (never, in the app) a slot nobody reads.
        Ok(parts
            .extensions
            .get::<AuditSlot>()
            .cloned()
            .unwrap_or_default())
    }
}

/// Whether a request is recorded whatever its answer.
fn always_recorded(method: &Method, route: &str) -> bool {
    let mutating = matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let agent_traffic = route == "/v1/agent/claim"
        || route == "/v2/agent/claim"
        || route == "/v1/agent/heartbeat"
        || route.starts_with("/v1/agent/jobs/");
    let api = route.starts_with("/v1/") || route.starts_with("/v2/");
    mutating && api && !agent_traffic
}

/// What the request says about itself, read before the handler takes it. Kept as it came
/// (reference-counted route and path values, header values) and turned into text only for
/// an event that is written: most reads are never recorded.
struct Facts {
    method: Method,
    route: MatchedPath,
    path_params: Option<RawPathParams>,
    request_id: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    client_addr: Option<IpAddr>,
}

fn header_text(value: Option<HeaderValue>) -> Option<String> {
    value.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

impl Facts {
    fn event(
        self,
        operations: &Operations,
        slot: &AuditSlot,
        status: Option<StatusCode>,
        response: Option<&Response>,
    ) -> HttpEvent {
        let draft = std::mem::take(&mut *slot.draft());
        let created = response
            .filter(|r| r.status().is_success())
            .and_then(|r| r.headers().get(header::LOCATION))
            .and_then(|location| location.to_str().ok())
            .and_then(|location| location.rsplit('/').next())
            .map(str::to_owned);
        let path_params: Vec<(String, String)> = self
            .path_params
            .iter()
            .flat_map(|params| params.iter())
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let named = path_params.last().map(|(_, value)| value.clone());
        HttpEvent {
            principal: draft.principal,
            operation: operations.id(&self.method, self.route.as_str()),
            method: self.method.to_string(),
            path: self.route.as_str().to_owned(),
            resource: draft.resource.or(created).or(named),
            path_params,
            request_id: header_text(self.request_id),
            client_addr: self.client_addr,
            user_agent: header_text(self.user_agent),
            status: status.map(|s| s.as_u16()),
            problem_code: response
                .and_then(|r| r.extensions().get::<ProblemCode>())
                .map(|code| code.0.clone()),
            changes: draft.changes,
        }
    }
}

async fn write(service: Service, event: HttpEvent) {
    if let Err(e) = service.audit_http(&event).await {
        // The event holds no secret: it is logged whole, so that it is not lost.
        tracing::error!(error = %e, event = ?event, "the audit log did not record a request");
    }
}

/// A recorded request whose answer never came: the client went away or the timeout cut
/// it, and the handler's future was dropped mid-way, perhaps after its change committed.
/// Dropped still armed, it records the request without a status.
struct Unanswered {
    auditor: Arc<Auditor>,
    slot: AuditSlot,
    facts: Option<Facts>,
    armed: bool,
}

impl Unanswered {
    fn answered(mut self) -> Option<Facts> {
        self.armed = false;
        self.facts.take()
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(facts), Ok(runtime)) = (self.facts.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(write(
            self.auditor.service.clone(),
            facts.event(&self.auditor.operations, &self.slot, None, None),
        ));
    }
}

/// The audit of a request that `run` answers: part of the route layer (so that the route
/// template is known), outside everything else in it, so that it records what the checks
/// before the handler refuse too.
pub async fn record<Run, Answer>(auditor: &Arc<Auditor>, request: Request, run: Run) -> Response
where
    Run: FnOnce(Request) -> Answer,
    Answer: Future<Output = Response>,
{
    // Route layers only see requests that matched a route.
    let Some(route) = request.extensions().get::<MatchedPath>().cloned() else {
        return run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    let path_params = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .ok();
    let slot = AuditSlot::default();
    parts.extensions.insert(slot.clone());
    let always = always_recorded(&parts.method, route.as_str());
    let facts = Facts {
        method: parts.method.clone(),
        route,
        path_params,
        request_id: parts.headers.get(crate::REQUEST_ID).cloned(),
        user_agent: parts.headers.get(header::USER_AGENT).cloned(),
        // No proxy is trusted (no setting names one), so `X-Forwarded-For` is not read: a
        // client could write anything there.
        client_addr: parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map(|ConnectInfo(PeerAddr(addr))| addr.ip()),
    };
    let unanswered = Unanswered {
        auditor: auditor.clone(),
        slot: slot.clone(),
        facts: Some(facts),
        armed: always,
    };
    let request = Request::from_parts(parts, body);
    let response = match AssertUnwindSafe(run(request)).catch_unwind().await {
        Ok(response) => response,
        // Answered here rather than by the outer panic layer, so the event has its 500.
        Err(panic) => crate::error::problem_for_panic(panic),
    };
    let status = response.status();
    let facts = unanswered.answered();
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if let Some(facts) = facts.filter(|_| always || refused) {
        let event = facts.event(&auditor.operations, &slot, Some(status), Some(&response));
        // A task of its own: a client that goes away now cannot stop the write. Waited for,
        // so that the event is in the log when the client has its answer.
        if let Err(e) = tokio::spawn(write(auditor.service.clone(), event)).await {
            tracing::error!(error = %e, "the audit log's write panicked");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_the_documents_ids() {
        let operations = Operations::from_openapi(&crate::openapi());
        assert_eq!(
            operations.id(&Method::PATCH, "/v1/vaults/{vault_id}"),
            "update_vault"
        );
        assert_eq!(
            operations.id(&Method::GET, "/v1/audit-events"),
            "list_audit_events"
        );
        assert_eq!(operations.id(&Method::GET, "/metrics"), "GET /metrics");
    }

    #[test]
    fn agent_traffic_is_recorded_only_when_refused() {
        assert!(always_recorded(&Method::POST, "/v1/agent/enroll"));
        assert!(always_recorded(&Method::DELETE, "/v1/vaults/{vault_id}"));
        for route in [
            "/v1/agent/claim",
            "/v2/agent/claim",
            "/v1/agent/heartbeat",
            "/v1/agent/jobs/{job_id}/complete",
        ] {
            assert!(!always_recorded(&Method::POST, route), "{route}");
        }
        assert!(!always_recorded(&Method::GET, "/v1/vaults"));
        assert!(!always_recorded(&Method::POST, "/metrics"));
    }

    #[test]
    fn a_change_keeps_the_fields_that_changed() {
        let slot = AuditSlot::default();
        slot.record_changes(
            &serde_json::json!({"description": "a", "name": "n"}),
            &serde_json::json!({"description": "b", "name": "n"}),
        );
        assert_eq!(
            Value::Object(slot.draft().changes.clone().unwrap()),
            serde_json::json!({"description": {"before": "a", "after": "b"}})
        );
        slot.record_changes(&serde_json::json!({"a": 1}), &serde_json::json!({"a": 1}));
        assert!(slot.draft().changes.is_none());
    }
}
