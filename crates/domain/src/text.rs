//! What any text and any instant must be before backvault stores or computes with it.
//! Checked once, at the edge (the API's extractors), for every string of every body, path
//! and query, whoever sends it: Postgres refuses NUL in `text` and `jsonb`, and control
//! characters in names end up in logs, file names and T-SQL.

use chrono::{DateTime, NaiveDate, Utc};

use crate::violation::Violation;

/// The longest single string a request may carry (bodies have their own size cap).
pub const MAX_TEXT_CHARS: usize = 8192;

/// [`text_fault`] as a JSON Schema (ECMA-262) pattern, for the OpenAPI document: no control
/// character but tab, line feed and carriage return. The length goes in `maxLength`.
pub const TEXT_PATTERN: &str = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]*$";

/// Why a string is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFault {
    /// U+0000: Postgres cannot store it.
    Nul,
    /// A C0 or C1 control character other than tab, line feed and carriage return.
    Control(char),
    TooLong,
}

impl TextFault {
    pub fn code(self) -> &'static str {
        match self {
            TextFault::Nul | TextFault::Control(_) => "control_character",
            TextFault::TooLong => "text_too_long",
        }
    }

    pub fn message(self) -> String {
        match self {
            TextFault::Nul => "text may not contain the NUL character (U+0000)".to_owned(),
            TextFault::Control(c) => format!(
                "text may not contain control characters (found U+{:04X})",
                u32::from(c)
            ),
            TextFault::TooLong => format!("text is at most {MAX_TEXT_CHARS} characters"),
        }
    }
}

/// The first reason `text` cannot be accepted. Tab, line feed and carriage return are
/// allowed: agents report multi-line error messages.
pub fn text_fault(text: &str) -> Option<TextFault> {
    let mut chars = 0usize;
    for c in text.chars() {
        chars = chars.saturating_add(1);
        if c == '\0' {
            return Some(TextFault::Nul);
        }
        if c.is_control() && !matches!(c, '\t' | '\n' | '\r') {
            return Some(TextFault::Control(c));
        }
    }
    (chars > MAX_TEXT_CHARS).then_some(TextFault::TooLong)
}

/// The violation for a string at `pointer`, if it has a fault.
pub fn check_text(text: &str, pointer: &str) -> Option<Violation> {
    text_fault(text).map(|f| Violation::new(pointer, f.code(), f.message()))
}

/// The earliest instant backvault accepts from a client or an agent.
pub fn earliest_accepted_instant() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The latest instant backvault accepts from a client or an agent. Far enough that no real
/// backup comes near it, and early enough that anything derived from it (99 years of
/// retention, chain extensions, previews) stays within RFC 3339's four-digit years.
pub fn latest_accepted_instant() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(9000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A violation when `at` lies outside the accepted range.
pub fn check_instant(at: DateTime<Utc>, pointer: &str) -> Option<Violation> {
    let (earliest, latest) = (earliest_accepted_instant(), latest_accepted_instant());
    (at < earliest || at > latest).then(|| {
        Violation::new(
            pointer,
            "instant_out_of_range",
            format!(
                "an instant lies between {} and {}",
                earliest.to_rfc3339(),
                latest.to_rfc3339()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nul_and_controls_are_refused_line_breaks_are_not() {
        assert_eq!(text_fault("a\0b"), Some(TextFault::Nul));
        assert_eq!(text_fault("bell\u{7}"), Some(TextFault::Control('\u{7}')));
        assert_eq!(
            text_fault("esc\u{1b}[31m"),
            Some(TextFault::Control('\u{1b}'))
        );
        assert_eq!(text_fault("c1\u{85}"), Some(TextFault::Control('\u{85}')));
        assert_eq!(text_fault("del\u{7f}"), Some(TextFault::Control('\u{7f}')));
        assert_eq!(text_fault("line one\r\nline two\tend"), None);
        assert_eq!(text_fault("Zürich — 東京"), None);
        assert_eq!(text_fault(""), None);
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        assert_eq!(text_fault(&"é".repeat(MAX_TEXT_CHARS)), None);
        assert_eq!(
            text_fault(&"a".repeat(MAX_TEXT_CHARS + 1)),
            Some(TextFault::TooLong)
        );
    }

    #[test]
    fn instants_are_bounded_on_both_sides() {
        let ok: DateTime<Utc> = "2026-11-30T10:00:00Z".parse().unwrap();
        assert!(check_instant(ok, "/at").is_none());
        assert!(check_instant(earliest_accepted_instant(), "/at").is_none());
        assert!(check_instant(latest_accepted_instant(), "/at").is_none());
        let far: DateTime<Utc> = "+10017-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            check_instant(far, "/at").map(|v| v.code),
            Some("instant_out_of_range")
        );
        assert!(check_instant(DateTime::<Utc>::MIN_UTC, "/at").is_some());
        // 99 years past the latest instant still prints as RFC 3339.
        let derived = latest_accepted_instant() + chrono::Duration::days(36_159);
        assert!(!derived.to_rfc3339().starts_with('+'));
    }

    proptest! {
        #[test]
        fn a_string_is_refused_exactly_when_it_holds_a_forbidden_character(s in any::<String>()) {
            let forbidden = s.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'));
            let too_long = s.chars().count() > MAX_TEXT_CHARS;
            prop_assert_eq!(text_fault(&s).is_some(), forbidden || too_long);
            prop_assert_eq!(text_fault(&s) == Some(TextFault::Nul), s.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) == Some('\0'));
        }
    }
}
