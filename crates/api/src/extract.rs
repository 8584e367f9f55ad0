//! Extractors that answer malformed input in problem+json, never axum's plain text.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use backvault_service::{ErrorKind, Principal};
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// The authenticated caller, from `Authorization: Bearer <jwt>`.
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
        Ok(Caller(state.service.auth.verify(token.trim())?))
    }
}

/// JSON body whose rejections are problems with code `malformed_body`.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::http(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::http(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than the server accepts (2 MiB)",
            )),
            Err(e) => Err(ApiError::new(
                ErrorKind::BadRequest,
                "malformed_body",
                e.body_text(),
            )),
        }
    }
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
        let version = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
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

pub fn etag(version: i64) -> (header::HeaderName, String) {
    (header::ETAG, format!("\"{version}\""))
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
    async fn if_match_compares_strongly() {
        assert_eq!(if_match("\"3\"").await, Some(3));
        assert_eq!(if_match("*").await, None);
        assert_eq!(if_match("W/\"3\"").await, Some(-1));
        assert_eq!(if_match("3").await, Some(-1));
        assert_eq!(if_match("\"1\", \"2\"").await, Some(-1));
    }
}
