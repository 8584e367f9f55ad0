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

/// A pointer or message longer than this is cut: both may quote what a client sent.
pub const MAX_POINTER_CHARS: usize = 512;
pub const MAX_MESSAGE_CHARS: usize = 1024;

impl Violation {
    /// Control characters the text rule refuses (a field name can hold them) are written
    /// as `\uXXXX` in the pointer, and pointer and message are bounded: what a client sent
    /// comes back as text the response schema allows and a log can hold. (A field name
    /// with such a character is itself refused, so the pointer only has to name it.)
    pub fn new(pointer: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        let pointer: String = pointer.into();
        let refused = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r');
        let pointer = if pointer.chars().any(refused) {
            pointer
                .chars()
                .map(|c| {
                    if refused(c) {
                        format!("\\u{:04X}", u32::from(c))
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        } else {
            pointer
        };
        Self {
            pointer: bounded(pointer, MAX_POINTER_CHARS),
            code,
            message: bounded(message.into(), MAX_MESSAGE_CHARS),
        }
    }
}

/// `text` cut to `max` characters, the last of them `…` when cut.
pub fn bounded(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    #[test]
    fn pointers_and_messages_stay_printable_and_bounded() {
        let v = Violation::new("/a\u{13}b", "c", "m");
        assert_eq!(v.pointer, "/a\\u0013b");
        let long = Violation::new("/".repeat(5000), "c", "x".repeat(9000));
        assert_eq!(long.pointer.chars().count(), MAX_POINTER_CHARS);
        assert!(long.pointer.ends_with('…'));
        assert_eq!(long.message.chars().count(), MAX_MESSAGE_CHARS);
        let plain = Violation::new("/name", "c", "short");
        assert_eq!(
            (plain.pointer.as_str(), plain.message.as_str()),
            ("/name", "short")
        );
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
