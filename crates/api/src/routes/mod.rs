//! Handlers, one module per area. Each handler: extract, call one use case, render.

pub mod agent;
pub mod audit;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod policies;
pub mod protection;
pub mod safety;
pub mod tokens;
pub mod vaults;
pub mod vms;

use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::problem_response;

pub async fn not_found() -> Response {
    problem_response(
        StatusCode::NOT_FOUND,
        "route_not_found",
        "no such route".into(),
        Vec::new(),
    )
}

pub async fn method_not_allowed() -> Response {
    problem_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method".into(),
        Vec::new(),
    )
}

/// Pagination for every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
}

/// Headers a created or fetched resource carries.
pub fn location(path: String) -> (axum::http::HeaderName, String) {
    (axum::http::header::LOCATION, path)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
}
