//! The signing keys. The current key signs every new token; previous keys only verify, so
//! that tokens they signed keep working through a key rotation until the operator removes
//! them. Tokens name their key in the `kid` header, derived from the key itself.

use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::{Digest, Sha256};

/// A key's id: the first 4 bytes of SHA-256 over a label and the key, in hex. It tells keys
/// apart without revealing them; the label keeps it distinct from any other hash of the key.
pub fn key_id(secret: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"backvault-jwt-kid\0")
        .chain_update(secret)
        .finalize();
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub encoding: EncodingKey,
    decoding: DecodingKey,
}

impl SigningKey {
    fn new(secret: &[u8]) -> Self {
        Self {
            kid: key_id(secret),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }
}

#[derive(Clone)]
pub struct KeySet {
    current: SigningKey,
    previous: Vec<SigningKey>,
}

impl KeySet {
    /// A previous key equal to the current one is dropped: it would add nothing.
    pub fn new(current: &[u8], previous: &[Vec<u8>]) -> Self {
        let current = SigningKey::new(current);
        let previous = previous
            .iter()
            .map(|secret| SigningKey::new(secret))
            .filter(|key| key.kid != current.kid)
            .collect();
        Self { current, previous }
    }

    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    /// The key to verify a token with: the one its `kid` names, or the current key for a
    /// token without one (minted before tokens carried key ids). `None` for a `kid` this
    /// server does not hold, e.g. a key already removed after a rotation.
    pub fn verifying(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            None => Some(&self.current.decoding),
            Some(kid) => std::iter::once(&self.current)
                .chain(&self.previous)
                .find(|key| key.kid == kid)
                .map(|key| &key.decoding),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_keys_without_revealing_them() {
        let kid = key_id(b"a-secret-of-some-length-0123456789");
        assert_eq!(kid.len(), 8);
        assert!(kid.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(kid, key_id(b"a-secret-of-some-length-0123456789"));
        assert_ne!(kid, key_id(b"another-secret-of-some-length-0123"));
    }

    #[test]
    fn previous_keys_verify_and_unknown_ids_do_not() {
        let keys = KeySet::new(b"current", &[b"old".to_vec(), b"current".to_vec()]);
        assert_eq!(
            keys.previous.len(),
            1,
            "the current key is not listed twice"
        );
        assert!(keys.verifying(Some(&key_id(b"old"))).is_some());
        assert!(keys.verifying(Some(&key_id(b"current"))).is_some());
        assert!(keys.verifying(None).is_some());
        assert!(keys.verifying(Some("00000000")).is_none());
    }
}
