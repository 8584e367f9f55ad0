//! Tokens as things with an identity: enrollment tokens on record (minted, listed,
//! revoked, and used up by enrollment) and the deny list of revoked tokens, which every
//! request is checked against.

use backvault_domain::agent::VmFacts;
use backvault_domain::names::{
    MAX_RESOURCE_GROUP_CHARS, MAX_SUBSCRIPTION_ID_CHARS, MAX_VM_NAME_CHARS, check_identifier,
};
use backvault_domain::tokens::{
    DEFAULT_ENROLLMENT_TTL_SECONDS, MAX_ENROLLMENT_TTL_SECONDS, MAX_ENROLLMENT_USES,
    MAX_USER_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS,
};
use backvault_domain::violation::Violations;
use backvault_store::PgPool;
use backvault_store::tokens::{self as store, EnrollmentTokenRow, NewEnrollmentToken};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{ALL_SUBSCRIPTIONS, Auth, Operation, Role};
use crate::error::{Error, ErrorKind, Result};
use crate::pagination::{Page, page, page_request};
use crate::{Principal, Service};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    pub subscription_id: String,
    /// Lifetime, 60 to 86400 seconds (default 3600).
    #[serde(default = "default_enrollment_ttl")]
    pub ttl_seconds: i64,
    /// Binds the token to one VM, with `resource_group`: only that VM may enroll with it,
    /// and it may re-enroll that VM when it already has an agent (a reinstalled agent),
    /// replacing the agent's token.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The bound VM's resource group; given with `vm_name`.
    #[serde(default)]
    pub resource_group: Option<String>,
    /// Enrollments the token allows, 1 to 100 (default 1).
    #[serde(default = "default_max_uses")]
    pub max_uses: i32,
}

fn default_enrollment_ttl() -> i64 {
    DEFAULT_ENROLLMENT_TTL_SECONDS
}

fn default_max_uses() -> i32 {
    1
}

/// A minted enrollment token. The token is shown this once: the server keeps its record,
/// never the token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentToken {
    /// The token's id (its `jti`), to list and revoke it by.
    pub id: Uuid,
    pub token: String,
    pub subscription_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    pub max_uses: i32,
    pub expires_at: DateTime<Utc>,
}

/// An enrollment token on record, without the token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenRecord {
    pub id: Uuid,
    pub subscription_id: String,
    /// The VM the token is bound to, if any (with `resource_group`).
    pub vm_name: Option<String>,
    pub resource_group: Option<String>,
    /// The subject of the token that minted it (`backvault-cli` for the command line).
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_uses: i32,
    pub uses: i32,
}

impl From<EnrollmentTokenRow> for EnrollmentTokenRecord {
    fn from(r: EnrollmentTokenRow) -> Self {
        Self {
            id: r.id,
            subscription_id: r.subscription_id,
            vm_name: r.vm_name,
            resource_group: r.resource_group,
            created_by: r.created_by,
            created_at: r.created_at,
            expires_at: r.expires_at,
            max_uses: r.max_uses,
            uses: r.uses,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeToken {
    /// The `jti` claim of the token to revoke.
    pub jti: Uuid,
}

/// What one use of an enrollment token allows.
pub(crate) struct EnrollmentGrant {
    pub token_id: Uuid,
    /// Bound to the enrolling VM: it may replace the VM's current agent.
    pub bound: bool,
}

fn enrollment_token_not_found(id: Uuid) -> Error {
    Error::not_found(
        "enrollment_token_not_found",
        format_args!("enrollment token {id}"),
    )
}

/// Every rule a request for an enrollment token breaks, at once.
pub fn check_enrollment_request(req: &CreateEnrollmentToken) -> Result<()> {
    let mut v = Violations::default();
    if !(MIN_TOKEN_TTL_SECONDS..=MAX_ENROLLMENT_TTL_SECONDS).contains(&req.ttl_seconds) {
        v.push(
            "/ttl_seconds",
            "ttl_out_of_range",
            format!(
                "an enrollment token lives {MIN_TOKEN_TTL_SECONDS} to {MAX_ENROLLMENT_TTL_SECONDS} seconds"
            ),
        );
    }
    check_identifier(
        &req.subscription_id,
        "/subscription_id",
        "subscription_id",
        MAX_SUBSCRIPTION_ID_CHARS,
        &mut v,
    );
    // `*` in a token means every subscription: an enrollment token names one.
    if req.subscription_id == ALL_SUBSCRIPTIONS {
        v.push(
            "/subscription_id",
            "identifier_invalid",
            "an enrollment token is for one subscription, not '*'",
        );
    }
    match (&req.vm_name, &req.resource_group) {
        (Some(name), Some(group)) => {
            check_identifier(name, "/vm_name", "vm_name", MAX_VM_NAME_CHARS, &mut v);
            check_identifier(
                group,
                "/resource_group",
                "resource_group",
                MAX_RESOURCE_GROUP_CHARS,
                &mut v,
            );
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            let missing = if req.vm_name.is_none() {
                "/vm_name"
            } else {
                "/resource_group"
            };
            v.push(
                missing,
                "identifier_invalid",
                "vm_name and resource_group bind a token to a VM together: give both or neither",
            );
        }
    }
    if !(1..=MAX_ENROLLMENT_USES).contains(&req.max_uses) {
        v.push(
            "/max_uses",
            "max_uses_out_of_range",
            format!("an enrollment token allows 1 to {MAX_ENROLLMENT_USES} enrollments"),
        );
    }
    v.finish(()).map_err(Error::validation)
}

/// Records and mints an enrollment token for a checked request (`check_enrollment_request`).
/// Authorization is the caller's: the API asks the principal, the command line holds the key.
pub async fn mint_enrollment_token(
    pool: &PgPool,
    auth: &Auth,
    created_by: &str,
    req: CreateEnrollmentToken,
) -> Result<EnrollmentToken> {
    let ttl = chrono::Duration::seconds(req.ttl_seconds);
    let minted = auth.mint_with_id(
        &format!("enrollment:{created_by}"),
        Role::Enrollment,
        vec![req.subscription_id.clone()],
        Uuid::now_v7(),
        None,
        ttl,
    );
    let id = minted
        .jti
        .ok_or_else(|| Error::internal("a minted token has no id"))?;
    let row = store::enrollment_token_insert(
        pool,
        &NewEnrollmentToken {
            id,
            subscription_id: &req.subscription_id,
            bound_to: req.vm_name.as_deref().zip(req.resource_group.as_deref()),
            created_by,
            expires_at: minted.expires_at,
            max_uses: req.max_uses,
        },
    )
    .await?;
    Ok(EnrollmentToken {
        id,
        token: minted.token,
        subscription_id: row.subscription_id,
        vm_name: row.vm_name,
        resource_group: row.resource_group,
        max_uses: row.max_uses,
        expires_at: row.expires_at,
    })
}

/// Names compared as the VM inventory does (`lower()` in its unique index).
pub(crate) fn same_name(a: &str, b: &str) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

impl Service {
    /// Verifies a bearer token and checks it against the deny list. The list is held in
    /// memory and kept current through notifications; while it cannot be vouched for
    /// (before it is loaded, or after the listener lost its connection) the database is
    /// asked instead. Agent tokens carry no id: their VM's generation revokes them.
    pub async fn authenticate(&self, token: &str) -> Result<Principal> {
        let principal = self.auth.verify(token)?;
        if let Some(jti) = principal.jti {
            let revoked = match self.notifier.revoked(jti) {
                Some(revoked) => revoked,
                None => store::token_is_revoked(&self.pool, jti).await?,
            };
            if revoked {
                return Err(Error::new(
                    ErrorKind::Unauthorized,
                    "token_revoked",
                    "this token was revoked; ask for a new one",
                ));
            }
        }
        Ok(principal)
    }

    pub async fn enrollment_token_create(
        &self,
        principal: &Principal,
        req: CreateEnrollmentToken,
    ) -> Result<EnrollmentToken> {
        principal.require(Operation::MintEnrollmentToken)?;
        check_enrollment_request(&req)?;
        if !principal.sees_subscription(&req.subscription_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "subscription_forbidden",
                "your token does not grant this subscription",
            ));
        }
        let minted = mint_enrollment_token(&self.pool, &self.auth, &principal.subject, req).await?;
        tracing::info!(enrollment_token.id = %minted.id, subject = %principal.subject, "enrollment token minted");
        Ok(minted)
    }

    /// Enrollment tokens that can still enroll a VM, in the principal's subscriptions.
    pub async fn enrollment_token_list(
        &self,
        principal: &Principal,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Page<EnrollmentTokenRecord>> {
        principal.require(Operation::ListEnrollmentTokens)?;
        let (request, limit) = page_request(cursor, limit)?;
        let rows = store::enrollment_tokens_outstanding(
            &self.pool,
            principal.subscriptions.as_deref(),
            request,
        )
        .await?;
        Ok(page(rows, limit, |r| r.id, EnrollmentTokenRecord::from))
    }

    /// Revokes an enrollment token: it enrolls nothing more. Revoking twice is harmless.
    pub async fn enrollment_token_revoke(&self, principal: &Principal, id: Uuid) -> Result<()> {
        principal.require(Operation::RevokeEnrollmentToken)?;
        if !store::enrollment_token_revoke(&self.pool, id, principal.subscriptions.as_deref())
            .await?
        {
            return Err(enrollment_token_not_found(id));
        }
        tracing::info!(enrollment_token.id = %id, subject = %principal.subject, "enrollment token revoked");
        Ok(())
    }

    /// Puts a token on the deny list. Every token but an agent's lives at most
    /// `MAX_USER_TTL_SECONDS` (verification refuses longer ones), so the entry is kept that
    /// long, and a minute for clock skew; every replica learns of it at commit.
    pub async fn token_revoke(&self, principal: &Principal, req: RevokeToken) -> Result<()> {
        principal.require(Operation::RevokeToken)?;
        let until = backvault_domain::instants::later(
            Utc::now(),
            chrono::Duration::seconds(MAX_USER_TTL_SECONDS.saturating_add(60)),
        );
        let mut tx = self.pool.begin().await?;
        store::token_revoke(&mut *tx, req.jti, until, &principal.subject).await?;
        backvault_store::jobs::notify(&mut *tx, &crate::notifier::revoked_payload(req.jti, until))
            .await?;
        tx.commit().await?;
        self.notifier.note_revoked(req.jti, until);
        tracing::info!(token.jti = %req.jti, subject = %principal.subject, "token revoked");
        Ok(())
    }
}

/// Takes one use of the enrollment token `principal` presents, for a VM with `facts`,
/// in `tx`: a rolled-back enrollment gives it back.
pub(crate) async fn take_enrollment_use(
    tx: &mut sqlx::PgConnection,
    principal: &Principal,
    facts: &VmFacts,
) -> Result<EnrollmentGrant> {
    let unknown = || {
        Error::new(
            ErrorKind::Unauthorized,
            "invalid_token",
            "this enrollment token is not on record (minted by an older backvault, or long expired); mint a new one",
        )
    };
    let jti = principal.jti.ok_or_else(unknown)?;
    let Some(token) = store::enrollment_token_consume(&mut *tx, jti).await? else {
        return Err(match store::enrollment_token_get(&mut *tx, jti).await? {
            None => unknown(),
            Some(t) if t.revoked_at.is_some() => Error::new(
                ErrorKind::Unauthorized,
                "enrollment_token_revoked",
                "this enrollment token was revoked; ask an admin for a new one",
            ),
            Some(t) if t.uses >= t.max_uses => Error::new(
                ErrorKind::Unauthorized,
                "enrollment_token_used",
                format!(
                    "this enrollment token allowed {} enrollment(s) and has been used; ask an admin for a new one",
                    t.max_uses
                ),
            ),
            Some(_) => Error::new(
                ErrorKind::Unauthorized,
                "invalid_token",
                "the token has expired",
            ),
        });
    };
    if facts.subscription_id != token.subscription_id {
        return Err(Error::new(
            ErrorKind::Forbidden,
            "subscription_forbidden",
            "the enrollment token does not grant this VM's subscription",
        ));
    }
    let bound = match (&token.vm_name, &token.resource_group) {
        (Some(name), Some(group)) => {
            if !same_name(name, &facts.name) || !same_name(group, &facts.resource_group) {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    "enrollment_token_vm_mismatch",
                    format!(
                        "this enrollment token is bound to VM {name} in resource group {group}"
                    ),
                ));
            }
            true
        }
        _ => false,
    };
    Ok(EnrollmentGrant {
        token_id: token.id,
        bound,
    })
}
