//! Who is calling and what they may do. Tokens are HS256 JWTs; the algorithm is pinned, so
//! `alg: none` and algorithm-confusion tokens are rejected. Every token but an agent's
//! carries an id (`jti`) so that it can be revoked, and a lifetime within its role's cap
//! (`domain::tokens`); agent tokens are revoked through their VM's token generation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use backvault_domain::tokens::lifetime_allowed;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::KeySet;

pub use backvault_domain::access::{Operation, Role};

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
    /// The token's id: what revocation names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<Uuid>,
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
    /// The token's id; only agent tokens have none.
    pub jti: Option<Uuid>,
    /// The approval the request comes with (`Backvault-Approval`), for an operation a
    /// vault's guard protects.
    pub approval: Option<Uuid>,
}

impl Principal {
    /// Whether the principal's role may perform `operation` (the table in
    /// `domain::access`).
    pub fn require(&self, operation: Operation) -> Result<()> {
        if backvault_domain::access::allowed(self.role, operation) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Forbidden,
                "forbidden",
                format!(
                    "the {} role may not do this ({operation:?})",
                    self.role.as_str()
                ),
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
    /// The key that signs new tokens.
    pub secret: Vec<u8>,
    /// Earlier keys, which still verify the tokens they signed (a rotation in progress).
    pub previous_secrets: Vec<Vec<u8>>,
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

fn invalid_token(reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthorized, "invalid_token", reason)
}

/// A minted token and what identifies it.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub jti: Option<Uuid>,
    pub expires_at: DateTime<Utc>,
}

/// How long a verified token is remembered, at most: never past its own expiry.
const VERIFIED_TTL_SECONDS: i64 = 60;

/// Tokens remembered at once, at most: past this, the expired ones are forgotten, and all of
/// them if that is not enough, so that no number of distinct tokens grows the memory.
const MAX_VERIFIED: usize = 4096;

/// A token that verified, and until when (Unix seconds) it is taken without verifying again.
struct Verified {
    principal: Principal,
    until: i64,
}

/// Verifies tokens with the configured keys and mints them with the current one.
#[derive(Clone)]
pub struct Auth {
    config: AuthConfig,
    keys: KeySet,
    validation: Validation,
    /// Tokens verified in the last minute, by their text. Verifying (two base64 decodes, two
    /// JSON parses and an HMAC) is a good share of a read's CPU, and a client sends the same
    /// token with every request. The keys never change while the server runs, so a token
    /// that verified once verifies again until it expires; revocation is checked on every
    /// request all the same (`Service::authenticate`).
    verified: Arc<Mutex<HashMap<String, Verified>>>,
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
            keys: KeySet::new(&config.secret, &config.previous_secrets),
            validation,
            config,
            verified: Arc::default(),
        }
    }

    /// The id (`kid`) of the key that signs new tokens.
    pub fn current_key_id(&self) -> &str {
        &self.keys.current().kid
    }

    pub fn verify(&self, token: &str) -> Result<Principal> {
        let now = Utc::now().timestamp();
        if let Some(principal) = self.remembered(token, now) {
            return Ok(principal);
        }
        let (principal, expires) = self.verify_signed(token)?;
        self.remember(
            token,
            &principal,
            expires.min(now.saturating_add(VERIFIED_TTL_SECONDS)),
            now,
        );
        Ok(principal)
    }

    fn verified(&self) -> MutexGuard<'_, HashMap<String, Verified>> {
        // The map holds only whole entries: one left by a panicking holder is still sound.
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The principal of a token that verified, while it is remembered.
    fn remembered(&self, token: &str, now: i64) -> Option<Principal> {
        self.verified()
            .get(token)
            .filter(|v| v.until > now)
            .map(|v| v.principal.clone())
    }

    fn remember(&self, token: &str, principal: &Principal, until: i64, now: i64) {
        if until <= now {
            return;
        }
        let mut verified = self.verified();
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, v| v.until > now);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
        }
        verified.insert(
            token.to_owned(),
            Verified {
                principal: principal.clone(),
                until,
            },
        );
    }

    /// Checks the token's signature and claims: its principal, and its expiry (`exp`).
    fn verify_signed(&self, token: &str) -> Result<(Principal, i64)> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid_token("the token is malformed"))?;
        let key = self.keys.verifying(header.kid.as_deref()).ok_or_else(|| {
            invalid_token("the token's key (kid) is not one this server holds; it was signed with a key since removed, or elsewhere")
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
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
            invalid_token(reason)
        })?;
        let c = data.claims;
        // A token issued in the future was minted by a clock (or a hand) not to be trusted.
        if c.iat
            > Utc::now()
                .timestamp()
                .saturating_add(CLOCK_LEEWAY_SECONDS as i64)
        {
            return Err(invalid_token("the token is issued in the future (iat)"));
        }
        // Only a token with an id can be revoked, and only one within its role's lifetime
        // cap stays on the deny list for as long as it could be presented.
        if c.role != Role::Agent {
            if c.jti.is_none() {
                return Err(invalid_token(
                    "the token has no id (jti): it was minted by an older backvault; mint a new one",
                ));
            }
            if !lifetime_allowed(c.role, c.exp.saturating_sub(c.iat)) {
                return Err(invalid_token(format!(
                    "the token lives longer than a {} token may",
                    c.role.as_str()
                )));
            }
        }
        let subscriptions = if c.subscriptions.iter().any(|s| s == ALL_SUBSCRIPTIONS) {
            None
        } else {
            Some(c.subscriptions)
        };
        let principal = Principal {
            subject: c.sub,
            role: c.role,
            subscriptions,
            vm: c.vm,
            generation: c.generation,
            jti: c.jti,
            approval: None,
        };
        Ok((principal, c.exp))
    }

    /// A token with a fresh id.
    pub fn mint(
        &self,
        subject: &str,
        role: Role,
        subscriptions: Vec<String>,
        vm: Option<Uuid>,
        ttl: Duration,
    ) -> String {
        self.mint_with_id(subject, role, subscriptions, Uuid::now_v7(), vm, ttl)
            .token
    }

    /// A token whose id is `jti`: an enrollment token's is its record's.
    pub fn mint_with_id(
        &self,
        subject: &str,
        role: Role,
        subscriptions: Vec<String>,
        jti: Uuid,
        vm: Option<Uuid>,
        ttl: Duration,
    ) -> Minted {
        self.mint_claims(subject, role, subscriptions, vm, None, Some(jti), ttl)
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
        // No id: an agent token is revoked through its VM's generation, checked on every
        // agent call anyway.
        let minted = self.mint_claims(
            &format!("agent:{vm}"),
            Role::Agent,
            vec![subscription.to_owned()],
            Some(vm),
            Some(generation),
            None,
            ttl,
        );
        (minted.token, minted.expires_at.timestamp())
    }

    #[allow(clippy::too_many_arguments)]
    fn mint_claims(
        &self,
        subject: &str,
        role: Role,
        subscriptions: Vec<String>,
        vm: Option<Uuid>,
        generation: Option<i64>,
        jti: Option<Uuid>,
        ttl: Duration,
    ) -> Minted {
        let now = Utc::now();
        let expires_at = expiry(now, ttl);
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            subscriptions,
            vm,
            generation,
            jti,
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
        };
        let key = self.keys.current();
        let header = Header {
            kid: Some(key.kid.clone()),
            ..Header::new(Algorithm::HS256)
        };
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .expect("HS256 signing with an in-memory key cannot fail");
        Minted {
            token,
            jti,
            expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(issuer: Option<&str>, audience: Option<&str>) -> Auth {
        Auth::new(AuthConfig {
            secret: b"unit-test-secret".to_vec(),
            previous_secrets: Vec::new(),
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
            previous_secrets: Vec::new(),
            issuer: Some("backvault".into()),
            audience: Some("api".into()),
        })
        .mint("a", Role::Admin, vec![], None, Duration::hours(1));
        assert!(
            a.verify(&other_key).unwrap_err().message.contains("(kid)"),
            "another key has another id"
        );
        let now = Utc::now().timestamp();
        let forged = jsonwebtoken::encode(
            &Header {
                kid: Some(a.current_key_id().to_owned()),
                ..Header::new(Algorithm::HS256)
            },
            &serde_json::json!({"sub": "a", "role": "admin", "subscriptions": ["*"], "jti": Uuid::now_v7(),
                                "iat": now, "exp": now + 60, "iss": "backvault", "aud": "api"}),
            &jsonwebtoken::EncodingKey::from_secret(b"another"),
        )
        .unwrap();
        assert_eq!(
            a.verify(&forged).unwrap_err().message,
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
    fn require_follows_the_permission_table() {
        let p = |role| Principal {
            subject: "x".into(),
            role,
            subscriptions: None,
            vm: None,
            generation: None,
            jti: None,
            approval: None,
        };
        for role in Role::ALL {
            for op in Operation::ALL {
                assert_eq!(
                    p(role).require(op).is_ok(),
                    backvault_domain::access::allowed(role, op),
                    "{role:?} {op:?}"
                );
            }
        }
        let denied = p(Role::Reader).require(Operation::DeleteVault).unwrap_err();
        assert_eq!(
            (denied.kind, denied.code),
            (ErrorKind::Forbidden, "forbidden")
        );
    }

    fn keyed(secret: &[u8], previous: &[&[u8]]) -> Auth {
        Auth::new(AuthConfig {
            secret: secret.to_vec(),
            previous_secrets: previous.iter().map(|p| p.to_vec()).collect(),
            issuer: None,
            audience: None,
        })
    }

    #[test]
    fn tokens_name_their_key_and_a_rotation_keeps_old_ones_until_removed() {
        let (old, new) = (&b"the-old-key"[..], &b"the-new-key"[..]);
        let before = keyed(old, &[]);
        let user = before.mint("a", Role::Admin, vec!["*".into()], None, Duration::hours(1));
        let (agent, _) = before.mint_agent(Uuid::now_v7(), "sub-1", 1, Duration::days(90));
        let header = jsonwebtoken::decode_header(&agent).unwrap();
        assert_eq!(header.kid.as_deref(), Some(before.current_key_id()));
        assert_eq!(before.current_key_id(), crate::keys::key_id(old));

        let rotating = keyed(new, &[old]);
        assert!(rotating.verify(&user).is_ok());
        assert!(rotating.verify(&agent).is_ok());
        let fresh = rotating.mint("a", Role::Admin, vec!["*".into()], None, Duration::hours(1));
        assert_eq!(
            jsonwebtoken::decode_header(&fresh).unwrap().kid.as_deref(),
            Some(crate::keys::key_id(new).as_str())
        );
        assert!(before.verify(&fresh).is_err(), "new tokens use the new key");

        let rotated = keyed(new, &[]);
        assert!(rotated.verify(&fresh).is_ok());
        let removed = rotated.verify(&agent).unwrap_err();
        assert!(removed.message.contains("kid"), "{}", removed.message);
    }

    #[test]
    fn tokens_without_kid_are_tried_with_the_current_key_only() {
        let claims = |role: &str| {
            let now = Utc::now().timestamp();
            serde_json::json!({"sub": "a", "role": role, "subscriptions": ["*"], "jti": Uuid::now_v7(),
                               "iat": now, "exp": now + 60})
        };
        let sign = |secret: &[u8]| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("admin"),
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let auth = keyed(b"current", &[b"previous"]);
        assert!(auth.verify(&sign(b"current")).is_ok());
        assert!(auth.verify(&sign(b"previous")).is_err());
    }

    #[test]
    fn user_tokens_need_an_id_and_a_lifetime_within_the_cap() {
        let auth = keyed(b"k", &[]);
        let sign = |role: &str, jti: Option<Uuid>, lifetime: i64| {
            let now = Utc::now().timestamp();
            let mut claims = serde_json::json!({"sub": "a", "role": role, "subscriptions": ["*"],
                                                "iat": now, "exp": now + lifetime});
            if let Some(jti) = jti {
                claims["jti"] = serde_json::json!(jti);
            }
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"k"),
            )
            .unwrap()
        };
        let id = Some(Uuid::now_v7());
        assert!(auth.verify(&sign("admin", id, 3_600)).is_ok());
        let no_id = auth.verify(&sign("admin", None, 3_600)).unwrap_err();
        assert!(no_id.message.contains("jti"), "{}", no_id.message);
        assert!(auth.verify(&sign("reader", id, 31 * 86_400)).is_err());
        assert!(auth.verify(&sign("enrollment", id, 86_400)).is_ok());
        assert!(auth.verify(&sign("enrollment", id, 86_401)).is_err());
        assert!(
            auth.verify(&sign("agent", None, 90 * 86_400)).is_ok(),
            "agent tokens live as the server says and are revoked by generation"
        );
    }

    #[test]
    fn a_remembered_token_is_taken_until_its_expiry_only() {
        let a = auth(None, None);
        let t = a.mint(
            "alice",
            Role::Reader,
            vec!["sub-1".into()],
            None,
            Duration::hours(1),
        );
        let p = a.verify(&t).unwrap();
        let now = Utc::now().timestamp();
        let remembered = a
            .remembered(&t, now)
            .expect("a verified token is remembered");
        assert_eq!(
            (remembered.subject, remembered.jti),
            (p.subject.clone(), p.jti)
        );
        assert!(
            a.remembered(&t, now + VERIFIED_TTL_SECONDS + 1).is_none(),
            "for a minute at most"
        );
        // A token that expires sooner is remembered until it expires, not a moment longer.
        a.remember("short", &p, now + 2, now);
        assert!(a.remembered("short", now + 1).is_some());
        assert!(a.remembered("short", now + 2).is_none());
        a.remember("expired", &p, now, now);
        assert!(a.remembered("expired", now).is_none());
    }

    #[test]
    fn tokens_that_fail_are_never_remembered() {
        let a = auth(None, None);
        let t = a.mint(
            "alice",
            Role::Reader,
            vec!["sub-1".into()],
            None,
            Duration::hours(1),
        );
        let tampered = format!("{t}x");
        for _ in 0..2 {
            assert!(a.verify(&tampered).is_err());
        }
        assert!(a.verified().is_empty());
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let a = auth(None, None);
        let t = a.mint(
            "alice",
            Role::Reader,
            vec!["sub-1".into()],
            None,
            Duration::hours(1),
        );
        let p = a.verify(&t).unwrap();
        let now = Utc::now().timestamp();
        for i in 0..MAX_VERIFIED + 10 {
            a.remember(&format!("token-{i}"), &p, now + 60, now);
        }
        assert!(a.verified().len() <= MAX_VERIFIED);
    }
}
