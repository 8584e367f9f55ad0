//! Postgres persistence: one module per resource, plain SQL, no HTTP. Functions take the
//! caller's connection or transaction, so the use case decides the transaction boundary.

pub mod audit;
pub mod availability;
pub mod idempotency;
pub mod inventory;
pub mod jobs;
pub mod policies;
pub mod protection;
pub mod recovery;
pub mod safety;
pub mod schedule;
pub mod tokens;
pub mod vaults;
pub mod vms;

pub use sqlx::{PgPool, Postgres, Transaction};

/// The embedded migrations, applied by `backvault migrate`, `serve` and the tests.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Keyset page request: rows after `after` (by id, which is a time-ordered UUIDv7).
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub after: Option<uuid::Uuid>,
    pub limit: i64,
}

/// Takes a transaction-scoped advisory lock if free: true when this session leads the work
/// the key stands for until its transaction ends.
pub async fn try_lead(conn: &mut sqlx::PgConnection, key: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar!(r#"select pg_try_advisory_xact_lock($1) as "locked!""#, key)
        .fetch_one(conn)
        .await
}

/// Migrations recorded as applied; `None` when no migration ever ran on the database.
///
/// The one statement not checked at compile time: `_sqlx_migrations` is sqlx's own
/// bookkeeping, not part of `migrations/`, and its absence is an answer here (42P01),
/// so the query must compile whether or not the table exists.
pub async fn migrations_applied(db: impl sqlx::PgExecutor<'_>) -> sqlx::Result<Option<i64>> {
    match sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(db)
        .await
    {
        Ok(n) => Ok(Some(n)),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(None),
        Err(e) => Err(e),
    }
}
