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
