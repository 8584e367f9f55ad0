//! Use cases: one function per operation. Each authorizes the principal, opens the
//! transaction, applies the `domain` rules and calls the `store`. Transport-agnostic: the
//! `api` crate maps requests in and `Error` out.

pub mod auth;
pub mod error;
mod idempotency;
pub mod pagination;
pub mod policies;
pub mod vaults;

pub use auth::{Auth, AuthConfig, Principal, Role};
pub use error::{Error, ErrorKind, Result};

use backvault_store::PgPool;

/// What every use case needs. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub pool: PgPool,
}

impl Service {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Database reachable and every embedded migration applied.
    pub async fn readiness(&self) -> Result<()> {
        let applied: i64 =
            match sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
                .fetch_one(&self.pool)
                .await
            {
                Ok(n) => n,
                // A database no migration ever ran on has no bookkeeping table yet.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => 0,
                Err(e) => return Err(e.into()),
            };
        let expected = backvault_store::MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .count();
        if usize::try_from(applied).unwrap_or(0) < expected {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "migrations_pending",
                "database migrations are not applied; run `backvault migrate`",
            ));
        }
        Ok(())
    }
}

/// A created resource, or the stored first response of a retried create.
#[derive(Debug)]
pub struct Created<T> {
    pub resource: T,
    pub replayed: bool,
}

/// Optimistic-concurrency precondition from `If-Match`: `None` means unconditional.
pub type ExpectedVersion = Option<i64>;
