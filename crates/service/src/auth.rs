//! Who is calling and what they may do. Tokens are HS256 JWTs; the algorithm is pinned, so
//! `alg: none` and algorithm-confusion tokens are rejected.

use chrono::{Duration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Policies, protection and jobs; reads everything in scope.
    Operator,
    /// Reads only.
    Reader,
    /// A VM's agent: the agent protocol for its own VM only.
    Agent,
    /// Short-lived: lets a new agent enroll its VM in the token's subscriptions.
    Enrollment,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "operator" => Ok(Self::Operator),
            "reader" => Ok(Self::Reader),
            "agent" => Ok(Self::Agent),
            "enrollment" => Ok(Self::Enrollment),
            _ => Err(format!(
                "unknown role '{s}' (admin, operator, reader, enrollment)"
            )),
        }
    }
}

/// The subscription that means "all subscriptions" in a token.
pub const ALL_SUBSCRIPTIONS: &str = "*";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub subscriptions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Uuid>,
    /// The VM's token generation when an agent token was issued; a later enrollment or the
    /// VM's removal makes it stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub iat: i64,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
    /// `None`: every subscription.
    pub subscriptions: Option<Vec<String>>,
    pub vm: Option<Uuid>,
    pub generation: Option<i64>,
}

/// What a use case asks permission for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    WritePolicies,
    WriteVaults,
    /// Run, cancel and dispatch jobs; mint enrollment tokens.
    OperateJobs,
    /// Remove VMs from the inventory.
    WriteInventory,
}

impl Principal {
    pub fn require(&self, permission: Permission) -> Result<()> {
        let allowed = match self.role {
            Role::Admin => true,
            Role::Operator => matches!(
                permission,
                Permission::Read | Permission::WritePolicies | Permission::OperateJobs
            ),
            Role::Reader => permission == Permission::Read,
            Role::Agent | Role::Enrollment => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Forbidden,
                "forbidden",
                format!("the {:?} role may not do this", self.role).to_lowercase(),
            ))
        }
    }

    pub fn sees_subscription(&self, subscription: &str) -> bool {
        self.subscriptions
            .as_ref()
            .is_none_or(|subs| subs.iter().any(|s| s == subscription))
    }
}

#[derive(Clone)]
pub struct AuthConfig {
    pub secret: Vec<u8>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Clock skew tolerated between the token's minter and this server, for `exp`, `nbf`, `iat`.
const CLOCK_LEEWAY_SECONDS: u64 = 5;

/// `now + ttl`, or the latest instant chrono can hold for lifetimes past it.
fn expiry(now: chrono::DateTime<Utc>, ttl: Duration) -> chrono::DateTime<Utc> {
    now.checked_add_signed(ttl)
        .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
}

/// Verifies and mints tokens with the configured key.
#[derive(Clone)]
pub struct Auth {
    config: AuthConfig,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(config: AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_LEEWAY_SECONDS;
        validation.validate_nbf = true;
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Self {
            encoding: EncodingKey::from_secret(&config.secret),
            decoding: DecodingKey::from_secret(&config.secret),
            validation,
            config,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Principal> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                let reason = match e.kind() {
                    K::ExpiredSignature => "the token has expired",
                    K::ImmatureSignature => "the token is not valid yet (nbf)",
                    K::InvalidSignature => "the token's signature does not verify",
                    K::InvalidAlgorithm => "the token's algorithm is not accepted",
                    K::InvalidIssuer => "the token's issuer is not accepted",
                    K::InvalidAudience => "the token's audience is not accepted",
                    K::MissingRequiredClaim(_) => "the token lacks a required claim",
                    _ => "the token is malformed",
                };
                Error::new(ErrorKind::Unauthorized, "invalid_token", reason)
            })?;
        let c = data.claims;
        // A token issued in the future was minted by a clock (or a hand) not to be trusted.
        if c.iat
            > Utc::now()
                .timestamp()
                .saturating_add(CLOCK_LEEWAY_SECONDS as i64)
        {
            return Err(Error::new(
                ErrorKind::Unauthorized,
                "invalid_token",
                "the token is issued in the future (iat)",
            ));
        }
        let subscriptions = if c.subscriptions.iter().any(|s| s == ALL_SUBSCRIPTIONS) {
            None
        } else {
            Some(c.subscriptions)
        };
        Ok(Principal {
            subject: c.sub,
            role: c.role,
            subscriptions,
            vm: c.vm,
            generation: c.generation,
        })
    }

    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        subscriptions: Vec<String>,
        vm: Option<Uuid>,
        ttl: Duration,
    ) -> String {
        self.mint_claims(subject, role, subscriptions, vm, None, ttl)
    }

    /// An agent token bound to one VM and its current token generation; returns the token
    /// and its expiry (Unix seconds).
    pub fn mint_agent(
        &self,
        vm: Uuid,
        subscription: &str,
        generation: i64,
        ttl: Duration,
    ) -> (String, i64) {
        let exp = expiry(Utc::now(), ttl).timestamp();
        let token = self.mint_claims(
            &format!("agent:{vm}"),
            Role::Agent,
            vec![subscription.to_owned()],
            Some(vm),
            Some(generation),
            ttl,
        );
        (token, exp)
    }

    fn mint_claims(
        &self,
        subject: &str,
        role: Role,
        subscriptions: Vec<String>,
        vm: Option<Uuid>,
        generation: Option<i64>,
        ttl: Duration,
    ) -> String {
        let now = Utc::now();
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            subscriptions,
            vm,
            generation,
            iat: now.timestamp(),
            exp: expiry(now, ttl).timestamp(),
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(issuer: Option<&str>, audience: Option<&str>) -> Auth {
        Auth::new(AuthConfig {
            secret: b"unit-test-secret".to_vec(),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
        })
    }

    #[test]
    fn minted_tokens_verify() {
        let a = auth(Some("backvault"), Some("api"));
        let t = a.mint(
            "alice",
            Role::Operator,
            vec!["sub-1".into()],
            None,
            Duration::hours(1),
        );
        let p = a.verify(&t).unwrap();
        assert_eq!(p.role, Role::Operator);
        assert!(p.sees_subscription("sub-1"));
        assert!(!p.sees_subscription("sub-2"));
        let all = a.mint(
            "root",
            Role::Admin,
            vec!["*".into()],
            None,
            Duration::hours(1),
        );
        assert!(a.verify(&all).unwrap().sees_subscription("anything"));
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let a = auth(Some("backvault"), Some("api"));
        let expired = a.mint("a", Role::Admin, vec![], None, Duration::hours(-1));
        assert_eq!(
            a.verify(&expired).unwrap_err().kind,
            ErrorKind::Unauthorized
        );
        let other_key = Auth::new(AuthConfig {
            secret: b"another".to_vec(),
            issuer: Some("backvault".into()),
            audience: Some("api".into()),
        })
        .mint("a", Role::Admin, vec![], None, Duration::hours(1));
        assert_eq!(
            a.verify(&other_key).unwrap_err().message,
            "the token's signature does not verify"
        );
        let wrong_iss = auth(Some("elsewhere"), Some("api")).mint(
            "a",
            Role::Admin,
            vec![],
            None,
            Duration::hours(1),
        );
        assert_eq!(
            a.verify(&wrong_iss).unwrap_err().message,
            "the token's issuer is not accepted"
        );
        let no_aud =
            auth(Some("backvault"), None).mint("a", Role::Admin, vec![], None, Duration::hours(1));
        assert_eq!(a.verify(&no_aud).unwrap_err().kind, ErrorKind::Unauthorized);
        assert_eq!(
            a.verify("not.a.token").unwrap_err().kind,
            ErrorKind::Unauthorized
        );
    }

    #[test]
    fn roles_grant_what_they_say() {
        let p = |role| Principal {
            subject: "x".into(),
            role,
            subscriptions: None,
            vm: None,
            generation: None,
        };
        assert!(p(Role::Admin).require(Permission::WriteVaults).is_ok());
        assert!(p(Role::Operator).require(Permission::WritePolicies).is_ok());
        assert!(p(Role::Operator).require(Permission::WriteVaults).is_err());
        assert!(p(Role::Reader).require(Permission::Read).is_ok());
        assert!(p(Role::Reader).require(Permission::WritePolicies).is_err());
        assert!(p(Role::Agent).require(Permission::Read).is_err());
        assert!(p(Role::Enrollment).require(Permission::Read).is_err());
        assert!(p(Role::Operator).require(Permission::OperateJobs).is_ok());
        assert!(
            p(Role::Operator)
                .require(Permission::WriteInventory)
                .is_err()
        );
    }
}
