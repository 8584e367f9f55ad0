//! A broken rule as a value: where (JSON pointer), which rule (stable code), and why.

use serde::Serialize;

/// One violated rule. Codes are a public contract: they are listed in `docs/rules.md` and
/// never renamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Violation {
    /// JSON pointer (RFC 6901) to the offending field of the request body.
    pub pointer: String,
    /// Stable, machine-readable rule code.
    pub code: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Violation {
    pub fn new(pointer: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            code,
            message: message.into(),
        }
    }
}

/// Collects violations so that a validator reports every broken rule, not just the first.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn push(
        &mut self,
        pointer: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) {
        self.0.push(Violation::new(pointer, code, message));
    }

    pub fn extend(&mut self, violations: impl IntoIterator<Item = Violation>) {
        self.0.extend(violations);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was violated.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<Violation>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }

    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }
}
