//! `Idempotency-Key` for creates: the key is claimed in the create's own transaction, so
//! a retried request either replays the committed first response or, if the first one
//! rolled back, runs afresh. Never two resources.

use backvault_store::idempotency::{Claim, idempotency_claim, idempotency_store};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::error::{Error, ErrorKind, Result};
use crate::{Created, Principal};

/// The longest `Idempotency-Key` (visible ASCII, so characters are bytes).
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// Runs `create` in `tx` under the key, or replays the stored response.
pub(crate) async fn idempotent<T, F>(
    tx: &mut PgConnection,
    principal: &Principal,
    key: Option<&str>,
    operation: &str,
    request: &impl Serialize,
    create: F,
) -> Result<Created<T>>
where
    T: Serialize + DeserializeOwned,
    F: AsyncFnOnce(&mut PgConnection) -> Result<T>,
{
    let Some(key) = key else {
        return Ok(Created {
            resource: create(tx).await?,
            replayed: false,
        });
    };
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(Error::new(
            ErrorKind::BadRequest,
            "idempotency_key_invalid",
            format!("Idempotency-Key is 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
        ));
    }
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(request).map_err(Error::internal)?);
    let hash = hasher.finalize().to_vec();

    match idempotency_claim(tx, &principal.subject, key, &hash).await? {
        Claim::Fresh => {
            let resource = create(tx).await?;
            let stored = serde_json::to_value(&resource).map_err(Error::internal)?;
            idempotency_store(tx, &principal.subject, key, &stored).await?;
            Ok(Created {
                resource,
                replayed: false,
            })
        }
        Claim::Replay { request_hash, .. } if request_hash != hash => Err(Error::new(
            ErrorKind::Validation,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request; use a new key",
        )),
        Claim::Replay {
            response: Some(response),
            ..
        } => Ok(Created {
            resource: serde_json::from_value(response).map_err(Error::internal)?,
            replayed: true,
        }),
        Claim::Replay { response: None, .. } => Err(Error::new(
            ErrorKind::Conflict,
            "idempotency_key_in_flight",
            "a request with this Idempotency-Key is still running; retry shortly",
        )),
    }
}
