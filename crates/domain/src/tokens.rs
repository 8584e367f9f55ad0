//! How long tokens live and how often an enrollment token may be used: one definition for
//! the API, the `backvault token` command and token verification.

use crate::access::Role;

/// The shortest lifetime a minted token may have.
pub const MIN_TOKEN_TTL_SECONDS: i64 = 60;
/// An enrollment token lives an hour unless asked otherwise.
pub const DEFAULT_ENROLLMENT_TTL_SECONDS: i64 = 3_600;
/// An enrollment token lives at most a day: it lets a machine in.
pub const MAX_ENROLLMENT_TTL_SECONDS: i64 = 86_400;
/// User tokens (admin, operator, reader, approver, auditor) live at most 30 days; a revoked one stays on the deny
/// list this long.
pub const MAX_USER_TTL_SECONDS: i64 = 2_592_000;
/// Enrollments one enrollment token allows, at most (one by default).
pub const MAX_ENROLLMENT_USES: i32 = 100;

/// The lifetimes a token of `role` may be minted with, in seconds. `None` for agent
/// tokens: the server mints them at enrollment, for its configured lifetime.
pub fn lifetime_range(role: Role) -> Option<std::ops::RangeInclusive<i64>> {
    match role {
        Role::Admin | Role::Operator | Role::Reader | Role::Approver | Role::Auditor => {
            Some(MIN_TOKEN_TTL_SECONDS..=MAX_USER_TTL_SECONDS)
        }
        Role::Enrollment => Some(MIN_TOKEN_TTL_SECONDS..=MAX_ENROLLMENT_TTL_SECONDS),
        Role::Agent => None,
    }
}

/// Whether a token of `role` that lives `seconds` (from `iat` to `exp`) is one this
/// service could have minted. Shorter is fine: tests and clocks mint expired tokens.
pub fn lifetime_allowed(role: Role, seconds: i64) -> bool {
    lifetime_range(role).is_none_or(|range| seconds <= *range.end())
}

/// `seconds` as a person reads it: `30d`, `24h`, `90m` or `45s`.
pub fn describe_seconds(seconds: i64) -> String {
    match seconds {
        s if s % 86_400 == 0 && s > 86_400 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_by_role() {
        assert_eq!(MAX_USER_TTL_SECONDS, 30 * 86_400);
        for role in [Role::Admin, Role::Operator, Role::Reader] {
            assert!(lifetime_allowed(role, 30 * 86_400));
            assert!(!lifetime_allowed(role, 30 * 86_400 + 1));
        }
        assert!(lifetime_allowed(Role::Enrollment, 86_400));
        assert!(!lifetime_allowed(Role::Enrollment, 86_401));
        assert!(lifetime_allowed(Role::Agent, i64::MAX));
        assert!(lifetime_allowed(Role::Admin, -3_600));
        assert_eq!(lifetime_range(Role::Agent), None);
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(describe_seconds(MAX_USER_TTL_SECONDS), "30d");
        assert_eq!(describe_seconds(MAX_ENROLLMENT_TTL_SECONDS), "24h");
        assert_eq!(describe_seconds(7_200), "2h");
        assert_eq!(describe_seconds(90), "90s");
        assert_eq!(describe_seconds(120), "2m");
    }
}
