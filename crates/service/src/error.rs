//! The one error type of the use cases. `api` renders it as problem+json; nothing else
//! knows about HTTP.

use backvault_domain::Violation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    /// What was asked for existed and is gone for good (a purged soft-deleted item).
    Gone,
    PreconditionFailed,
    /// The request is well-formed but breaks rules; `violations` says which.
    Validation,
    Unavailable,
    Internal,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    /// Stable code clients can switch on.
    pub code: &'static str,
    pub message: String,
    pub violations: Vec<Violation>,
    /// Internal cause, logged once at the boundary and never sent to clients.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
            violations: Vec::new(),
            source: None,
        }
    }

    pub fn validation(violations: Vec<Violation>) -> Self {
        let message = match violations.len() {
            1 => format!("1 rule is violated: {}", violations[0].message),
            n => format!("{n} rules are violated; see `errors`"),
        };
        Self {
            violations,
            ..Self::new(ErrorKind::Validation, "validation_failed", message)
        }
    }

    pub fn not_found(code: &'static str, what: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::NotFound,
            code,
            format!("{what} does not exist or is not visible to you"),
        )
    }

    pub fn precondition_failed() -> Self {
        Self::new(
            ErrorKind::PreconditionFailed,
            "precondition_failed",
            "the resource changed since you read it (If-Match does not match its ETag); read it again and retry",
        )
    }

    /// The same failure for every request of a shared (batched) statement; the cause
    /// travels as text since it cannot be shared.
    pub fn for_each_request(&self) -> Self {
        Self {
            kind: self.kind,
            code: self.code,
            message: self.message.clone(),
            violations: self.violations.clone(),
            source: self.source.as_ref().map(|s| s.to_string().into()),
        }
    }

    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(ErrorKind::Internal, "internal", "internal error")
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// SQLSTATEs that say the database could not serve the statement now, not that the
/// statement is wrong: connection exceptions (class 08), operator intervention (class 57:
/// shutdown, cannot connect now, statement timeout), insufficient resources (class 53),
/// and serialization failures and deadlocks, which a retry resolves.
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57")
        || code.starts_with("53")
        || code == "40001"
        || code == "40P01"
}

/// True when the error says the database is unreachable or overloaded, so the request may
/// be retried as it is.
pub fn is_database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| transient_sqlstate(&c)),
        _ => false,
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_database_unavailable(&e) {
            return Self {
                source: Some(e.into()),
                ..Self::new(
                    ErrorKind::Unavailable,
                    "database_unavailable",
                    "the database is not reachable or is overloaded; retry after the time in Retry-After",
                )
            };
        }
        Self::internal(e)
    }
}

/// Turns named database constraint violations into client errors, in one place.
pub trait ResultExt<T> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> Error) -> Result<T>;
    /// Any foreign-key violation (a row still references the one being removed).
    fn on_foreign_key(self, f: impl FnOnce() -> Error) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for Result<T, E> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> Error) -> Result<T> {
        self.map_err(|e| {
            let e = e.into();
            match e
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<sqlx::Error>())
            {
                Some(sqlx::Error::Database(db)) if db.constraint() == Some(name) => f(),
                _ => e,
            }
        })
    }

    fn on_foreign_key(self, f: impl FnOnce() -> Error) -> Result<T> {
        self.map_err(|e| {
            let e = e.into();
            match e
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<sqlx::Error>())
            {
                Some(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => f(),
                _ => e,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_faults_are_unavailable_and_data_errors_are_not() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(io()),
            sqlx::Error::Protocol("unexpected message".into()),
        ] {
            let mapped = Error::from(e);
            assert_eq!(
                (mapped.kind, mapped.code),
                (ErrorKind::Unavailable, "database_unavailable")
            );
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
        ] {
            assert_eq!(Error::from(e).kind, ErrorKind::Internal);
        }
    }

    #[test]
    fn transient_sqlstates_are_connection_shutdown_resource_and_retryable_ones() {
        for code in [
            "08006", "08001", "57P01", "57P03", "57014", "53300", "40001", "40P01",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["22P02", "23505", "42601", "XX000"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }
}
