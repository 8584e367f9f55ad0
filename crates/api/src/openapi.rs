//! Global OpenAPI metadata; paths and schemas come from the handlers.

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
    security(("bearer" = [])),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "vaults", description = "Recovery Services vaults"),
        (name = "policies", description = "SQL backup policies, scoped to a vault"),
        (name = "vms", description = "The VM inventory"),
        (name = "jobs", description = "Backup jobs: history, waiting, cancelling, on-demand dispatch"),
        (name = "agent", description = "The protocol agents on VMs speak"),
        (name = "tokens", description = "Enrollment tokens for new agents, and revoking tokens"),
        (name = "protection", description = "Discovery, registration, protection and auto-protection of SQL databases"),
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

/// OpenAPI 3.1 requires a `description` on every response, and generators refuse a
/// document without one; a response whose handler documents none gets its status's
/// reason phrase, in one place rather than on every annotation.
pub fn describe_every_response(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, response) in &mut operation.responses.responses {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = status
                        .parse::<axum::http::StatusCode>()
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("Response")
                        .to_owned();
                }
            }
        }
    }
}
