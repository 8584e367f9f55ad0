//! Stored first responses of creates, keyed by principal and `Idempotency-Key`.

use sqlx::{PgConnection, PgExecutor};

pub enum Claim {
    /// This request owns the key; store its response before committing.
    Fresh,
    /// An earlier request with this key committed; its hash and response.
    Replay {
        request_hash: Vec<u8>,
        response: Option<serde_json::Value>,
    },
}

/// Claims the key inside the caller's transaction. A concurrent request with the same key
/// waits on the row lock until the first commits (then replays) or rolls back (then owns it).
pub async fn idempotency_claim(
    conn: &mut PgConnection,
    subject: &str,
    key: &str,
    request_hash: &[u8],
) -> sqlx::Result<Claim> {
    let inserted = sqlx::query!(
        "insert into idempotency_keys (subject, key, request_hash) values ($1, $2, $3)
         on conflict (subject, key) do nothing",
        subject,
        key,
        request_hash,
    )
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::Fresh);
    }
    let stored = sqlx::query!(
        "select request_hash, response from idempotency_keys where subject = $1 and key = $2",
        subject,
        key,
    )
    .fetch_one(conn)
    .await?;
    Ok(Claim::Replay {
        request_hash: stored.request_hash,
        response: stored.response,
    })
}

pub async fn idempotency_store(
    conn: &mut PgConnection,
    subject: &str,
    key: &str,
    response: &serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update idempotency_keys set response = $3 where subject = $1 and key = $2",
        subject,
        key,
        response,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn idempotency_prune(
    db: impl PgExecutor<'_>,
    older_than: chrono::Duration,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from idempotency_keys where created_at < now() - $1::interval",
        // sqlx maps `interval` to `PgInterval`; chrono's duration encodes as one too.
        older_than as chrono::Duration,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
