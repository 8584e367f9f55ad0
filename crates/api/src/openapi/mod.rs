//! The OpenAPI document: paths and schemas come from the handlers (utoipa); what every
//! operation shares (error responses, conditional headers, bounds from the domain's
//! constants, links between operations) is added here, in one place, to the JSON document
//! that is served at `/openapi.json` and committed as `openapi/openapi.json`.

mod constraints;
mod headers;
mod links;
mod responses;
mod unions;

pub use headers::MAX_CONDITIONAL_HEADER_CHARS;

use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "backvault",
        description = "Backup control plane for SQL Server databases on virtual machines.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(crate::error::Problem)),
    security(("bearer" = [])),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "vaults", description = "Recovery Services vaults"),
        (name = "policies", description = "SQL backup policies, scoped to a vault, and their preview"),
        (name = "vms", description = "The VM inventory"),
        (name = "discovery", description = "Finding SQL Server VMs and their databases: registration with a vault, discovery, protectable items"),
        (name = "protection", description = "Protected databases: configure, change, stop and resume protection, on-demand backups, auto-protection"),
        (name = "safety", description = "Data safety: soft delete, vault immutability (lock), retention bounds, guards and approvals (multi-user authorization), undelete"),
        (name = "recovery", description = "Recovery points, restore plans and restores"),
        (name = "jobs", description = "Backup jobs: history, waiting, cancelling, on-demand dispatch"),
        (name = "scheduler", description = "Running the backup scheduler on demand"),
        (name = "reports", description = "Reports across a vault's protected items"),
        (name = "agent", description = "The protocol agents on VMs speak"),
        (name = "tokens", description = "Enrollment tokens for new agents, and revoking tokens"),
        (name = "audit", description = "The audit log: who changed what, and every refused request"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // Keep the committed spec stable across releases of this crate.
    doc.info.version = "1".into();
    doc
}

/// The finished document: what the handlers describe, plus what every operation shares.
pub fn document(described: &utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(described).expect("the OpenAPI document serializes");
    unions::add(&mut doc);
    responses::add(&mut doc);
    headers::add(&mut doc);
    constraints::add(&mut doc);
    links::add(&mut doc);
    describe_every_response(&mut doc);
    doc
}

/// The body of every error response.
fn problem_content() -> Value {
    json!({ "application/problem+json": {
        "schema": { "$ref": "#/components/schemas/Problem" }
    }})
}

/// Every operation of the document.
fn operations_mut(doc: &mut Value) -> Vec<&mut Value> {
    methods_and_operations_mut(doc)
        .into_iter()
        .map(|(_, operation)| operation)
        .collect()
}

/// Every operation of the document, with its (lower-case) method.
fn methods_and_operations_mut(doc: &mut Value) -> Vec<(&str, &mut Value)> {
    doc["paths"]
        .as_object_mut()
        .expect("the document has paths")
        .values_mut()
        .flat_map(|item| item.as_object_mut().expect("a path item").iter_mut())
        .filter(|(method, _)| {
            matches!(
                method.as_str(),
                "get" | "put" | "post" | "delete" | "patch" | "head" | "options" | "trace"
            )
        })
        .map(|(method, operation)| (method.as_str(), operation))
        .collect()
}

/// OpenAPI 3.1 requires a `description` on every response, and generators refuse a
/// document without one; a response whose handler documents none gets its status's
/// reason phrase.
fn describe_every_response(doc: &mut Value) {
    for operation in operations_mut(doc) {
        let Some(responses) = operation["responses"].as_object_mut() else {
            continue;
        };
        for (status, response) in responses.iter_mut() {
            if response.get("$ref").is_some() {
                continue;
            }
            let empty = response["description"].as_str().is_none_or(str::is_empty);
            if empty {
                response["description"] = status
                    .parse::<axum::http::StatusCode>()
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("Response")
                    .into();
            }
        }
    }
}
