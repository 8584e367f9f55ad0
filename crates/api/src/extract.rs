//! Extractors that answer malformed input in problem+json, never axum's plain text.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use backvault_domain::Violation;
use backvault_domain::text::{check_text, text_fault};
use backvault_service::{ErrorKind, Principal};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::audit::AuditSlot;
use crate::error::ApiError;

/// The authenticated caller, from `Authorization: Bearer <jwt>`: verified, and not revoked.
/// The audit log learns who called from here (`audit::AuditSlot`): authentication is this
/// extractor, not a layer the audit layer could read from.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unauthorized,
                "missing_token",
                "send Authorization: Bearer <token>",
            )
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::Unauthorized,
                    "invalid_token",
                    "the Authorization header is not 'Bearer <token>'",
                )
            })?;
        let mut principal = state.service.authenticate(token.trim()).await?;
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            slot.caller(&principal);
        }
        principal.approval = approval_header(parts)?;
        Ok(Caller(principal))
    }
}

/// The header naming the approval an operation on a guarded vault comes with.
pub const APPROVAL_HEADER: &str = "backvault-approval";

fn approval_header(parts: &Parts) -> Result<Option<uuid::Uuid>, ApiError> {
    let Some(value) = parts.headers.get(APPROVAL_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| uuid::Uuid::parse_str(v.trim()).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::BadRequest,
                "invalid_approval_header",
                "Backvault-Approval is an approval id (a UUID)",
            )
        })
}

/// A JSON object body. Rejections are problems: `malformed_body` (not JSON, or not of the
/// operation's shape, including a nested struct sent as an array: serde would otherwise
/// read it from its sequence form), `body_not_object` (an array or scalar as the body), or
/// a 422 whose `errors`
/// point at every string that breaks the text rule (`domain::text`).
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let mut value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(JsonRejection::MissingJsonContentType(_)) => {
                return Err(ApiError::http(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as Content-Type: application/json",
                ));
            }
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::http(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is larger than the server accepts (2 MiB)",
                ));
            }
            Err(e) => {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "malformed_body",
                    e.body_text(),
                ));
            }
        };
        if !value.is_object() {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                "body_not_object",
                "the request body is a JSON object",
            ));
        }
        let faults = text_violations(&value);
        if !faults.is_empty() {
            return Err(backvault_service::Error::validation(faults).into());
        }
        whole_numbers_as_integers(&mut value);
        crate::strict::from_value(&value).map(Json).map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                "malformed_body",
                format!("the body does not fit this operation: {e}"),
            )
        })
    }
}

/// JSON has one number type, and JSON Schema counts `3.0` as the integer 3; serde does
/// not. Whole numbers written with a fraction become integers before the typed parse, so
/// a client whose JSON library writes `3.0` is not refused.
fn whole_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                // Exactly representable: |f| below 2^63 (i64) or 2^64 (u64).
                if (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f) {
                    *value = Value::from(f as i64);
                } else if (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                    *value = Value::from(f as u64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// Reports at most this many bad strings of one body.
const MAX_TEXT_VIOLATIONS: usize = 20;

/// Every string (and object key) of `value` that breaks the text rule, with its pointer.
fn text_violations(value: &serde_json::Value) -> Vec<Violation> {
    fn walk(value: &serde_json::Value, pointer: &mut String, out: &mut Vec<Violation>) {
        use serde_json::Value;
        if out.len() >= MAX_TEXT_VIOLATIONS {
            return;
        }
        match value {
            Value::String(s) => out.extend(check_text(s, pointer)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = pointer.len();
                    pointer.push('/');
                    pointer.push_str(&i.to_string());
                    walk(item, pointer, out);
                    pointer.truncate(len);
                }
            }
            Value::Object(fields) => {
                for (key, item) in fields {
                    let len = pointer.len();
                    pointer.push('/');
                    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                    if let Some(fault) = text_fault(key) {
                        out.push(Violation::new(
                            pointer.as_str(),
                            fault.code(),
                            format!("field name: {}", fault.message()),
                        ));
                    } else {
                        walk(item, pointer, out);
                    }
                    pointer.truncate(len);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut String::new(), &mut out);
    out.truncate(MAX_TEXT_VIOLATIONS);
    out
}

pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| {
                ApiError::new(ErrorKind::BadRequest, "invalid_path", e.body_text())
            })
    }
}

pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::new(ErrorKind::BadRequest, "invalid_query", e.body_text())
            })
    }
}

/// `If-Match`: absent or `*` is unconditional. Comparison is strong (RFC 9110): a weak
/// ETag, a list, or an ETag this server did not issue never matches, so the update is
/// refused rather than applied blindly.
pub struct IfMatch(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(None));
        };
        let value = value.to_str().unwrap_or("").trim();
        if value == "*" {
            return Ok(IfMatch(None));
        }
        // `"<version>-<digest>"` as sent, or `"<version>"` as servers before sent it.
        let version = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .map(|v| v.split_once('-').map_or(v, |(version, _)| version))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1);
        Ok(IfMatch(Some(version)))
    }
}

pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.headers.get("idempotency-key") {
            None => Ok(IdempotencyKey(None)),
            Some(v) => v
                .to_str()
                .map(|s| IdempotencyKey(Some(s.to_owned())))
                .map_err(|_| {
                    ApiError::new(
                        ErrorKind::BadRequest,
                        "idempotency_key_invalid",
                        "Idempotency-Key must be visible ASCII",
                    )
                }),
        }
    }
}

/// 422 `instant_out_of_range` for query instants outside the range backvault accepts
/// (`domain::text`), before any arithmetic on them: a well-formed date-time whose year the
/// schema cannot bound. The pointer names the parameter (`/from`).
pub fn bounded_instants(
    instants: &[(&str, Option<chrono::DateTime<chrono::Utc>>)],
) -> Result<(), ApiError> {
    let violations: Vec<Violation> = instants
        .iter()
        .filter_map(|(name, at)| {
            at.and_then(|at| backvault_domain::text::check_instant(at, &format!("/{name}")))
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(backvault_service::Error::validation(violations).into())
    }
}

/// A JSON body serialized once, with the ETag of exactly those bytes: a read that sends an
/// ETag pays one serialization, not one for the digest and another for the body.
pub struct Tagged {
    etag: HeaderValue,
    body: Bytes,
}

impl Tagged {
    /// The ETag of a resource with a version: `"<version>-<digest>"`. `If-Match` compares
    /// the version (what a change conflicts on); the digest makes the tag change whenever
    /// the representation does, for `If-None-Match`, also where it shows what other tables
    /// hold (a protected item's last backups, its VM's name).
    pub fn versioned(version: i64, body: &impl serde::Serialize) -> Result<Self, ApiError> {
        Self::new(Some(version), body)
    }

    /// The ETag of a resource that has no version: a digest of the representation the
    /// client gets, so it changes exactly when the body does.
    pub fn of(body: &impl serde::Serialize) -> Result<Self, ApiError> {
        Self::new(None, body)
    }

    fn new(version: Option<i64>, body: &impl serde::Serialize) -> Result<Self, ApiError> {
        use sha2::{Digest, Sha256};
        use std::fmt::Write;
        let body = serde_json::to_vec(body)
            .map_err(|e| ApiError::from(backvault_service::Error::internal(e)))?;
        let digest = Sha256::digest(&body);
        // `"` + a version of at most 20 characters + `-` + 32 hex digits + `"`.
        let mut etag = String::with_capacity(56);
        etag.push('"');
        if let Some(version) = version {
            let _ = write!(etag, "{version}-");
        }
        for b in &digest[..16] {
            etag.push(char::from(HEX[usize::from(b >> 4)]));
            etag.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        etag.push('"');
        Ok(Self {
            etag: HeaderValue::try_from(etag)
                .map_err(|e| ApiError::from(backvault_service::Error::internal(e)))?,
            body: Bytes::from(body),
        })
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl IntoResponse for Tagged {
    fn into_response(self) -> Response {
        (
            [
                (header::ETAG, self.etag),
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
            ],
            self.body,
        )
            .into_response()
    }
}

/// Whether `If-None-Match` holds a tag that matches `etag`: a list, `*`, weak or strong
/// (RFC 9110 compares weakly for `If-None-Match`).
pub fn none_match_hit(if_none_match: &str, etag: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    let current = opaque(etag);
    if_none_match.trim() == "*" || if_none_match.split(',').any(|tag| opaque(tag) == current)
}

pub const CREATED: StatusCode = StatusCode::CREATED;

#[cfg(test)]
mod tests {
    use super::*;

    async fn if_match(value: &str) -> Option<i64> {
        let (mut parts, ()) = axum::http::Request::builder()
            .header("if-match", value)
            .body(())
            .unwrap()
            .into_parts();
        let IfMatch(v) = IfMatch::from_request_parts(&mut parts, &())
            .await
            .ok()
            .unwrap();
        v
    }

    #[tokio::test]
    async fn a_tagged_body_is_hashed_as_sent() {
        use sha2::{Digest, Sha256};
        let value = serde_json::json!({"name": "v", "version": 3});
        let tagged = Tagged::versioned(3, &value).ok().unwrap();
        let etag = tagged.etag().to_str().unwrap().to_owned();
        let response = tagged.into_response();
        assert_eq!(response.headers()[header::ETAG], etag.as_str());
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let digest: String = Sha256::digest(&body)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(etag, format!("\"3-{digest}\""));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            value
        );
        let unversioned = Tagged::of(&value).ok().unwrap();
        assert_eq!(
            unversioned.etag().to_str().unwrap(),
            format!("\"{digest}\"")
        );
    }

    #[test]
    fn whole_numbers_are_integers() {
        let mut v = serde_json::json!({"a": 3.0, "b": [1.5, -2.0, 1e300], "c": 7, "d": 1e19});
        whole_numbers_as_integers(&mut v);
        assert_eq!(v["a"], serde_json::json!(3));
        assert!(v["a"].is_i64());
        assert_eq!(v["b"][0], serde_json::json!(1.5));
        assert!(v["b"][1].is_i64());
        assert!(v["b"][2].is_f64(), "too large for an integer: left alone");
        assert!(v["c"].is_i64());
        assert!(v["d"].is_u64());
    }

    #[tokio::test]
    async fn if_match_compares_strongly() {
        assert_eq!(if_match("\"3\"").await, Some(3));
        assert_eq!(if_match("\"3-0a1b\"").await, Some(3));
        assert_eq!(if_match("\"-3\"").await, Some(-1));
        assert_eq!(if_match("*").await, None);
        assert_eq!(if_match("W/\"3\"").await, Some(-1));
        assert_eq!(if_match("3").await, Some(-1));
        assert_eq!(if_match("\"1\", \"2\"").await, Some(-1));
    }
}
