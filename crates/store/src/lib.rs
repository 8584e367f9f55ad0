//! Postgres persistence: one module per resource, plain SQL, no HTTP. Functions take the
//! caller's connection or transaction, so the use case decides the transaction boundary.

pub mod idempotency;
pub mod inventory;
pub mod jobs;
pub mod policies;
pub mod protection;
pub mod recovery;
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
