//! Names of resources, parsed once: past `parse` the invariant holds.

use crate::violation::{Violation, Violations};

pub const MIN_VAULT_NAME_CHARS: usize = 2;
pub const MAX_VAULT_NAME_CHARS: usize = 50;
pub const MIN_POLICY_NAME_CHARS: usize = 1;
pub const MAX_POLICY_NAME_CHARS: usize = 150;

/// [`VaultName::parse`] as a JSON Schema pattern (lengths included).
pub const VAULT_NAME_PATTERN: &str = "^[A-Za-z][A-Za-z0-9-]{0,48}[A-Za-z0-9]$";
/// [`PolicyName::parse`] as a JSON Schema pattern (lengths included).
pub const POLICY_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]{0,149}$";
/// [`check_identifier`] as a JSON Schema pattern; the length goes in `maxLength`.
/// Whitespace is spelled out (Unicode's White_Space, what `str::trim` removes): `\s`
/// differs between regex dialects (ECMA-262's includes U+FEFF).
pub const IDENTIFIER_PATTERN: &str = r"^[^/\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]([^/\u0000-\u001F\u007F-\u009F]*[^/\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000])?$";

/// A vault name as Azure allows it: 2–50 characters, letters, digits and hyphens, a letter
/// first, not ending in a hyphen. Uniqueness (per subscription and resource group, ignoring
/// case) is the store's to enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultName(String);

impl VaultName {
    pub fn parse(raw: &str, pointer: &str) -> Result<Self, Vec<Violation>> {
        let mut v = Violations::default();
        let len = raw.chars().count();
        if !(MIN_VAULT_NAME_CHARS..=MAX_VAULT_NAME_CHARS).contains(&len) {
            v.push(
                pointer,
                "vault_name_length",
                "a vault name has 2 to 50 characters",
            );
        }
        if !raw.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
            v.push(
                pointer,
                "vault_name_first_character",
                "a vault name starts with a letter",
            );
        }
        if raw
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-'))
        {
            v.push(
                pointer,
                "vault_name_characters",
                "a vault name has only letters, digits and hyphens",
            );
        }
        if raw.ends_with('-') {
            v.push(
                pointer,
                "vault_name_trailing_hyphen",
                "a vault name does not end with a hyphen",
            );
        }
        v.finish(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A policy name: 1–150 characters, letters, digits, hyphens and underscores, a letter or
/// digit first (it appears in URLs, so nothing that needs escaping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyName(String);

impl PolicyName {
    pub fn parse(raw: &str, pointer: &str) -> Result<Self, Vec<Violation>> {
        let mut v = Violations::default();
        let len = raw.chars().count();
        if !(MIN_POLICY_NAME_CHARS..=MAX_POLICY_NAME_CHARS).contains(&len) {
            v.push(
                pointer,
                "policy_name_length",
                "a policy name has 1 to 150 characters",
            );
        }
        if raw
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            || raw.starts_with(['-', '_'])
        {
            v.push(
                pointer,
                "policy_name_characters",
                "a policy name has only letters, digits, hyphens and underscores, and starts with a letter or digit",
            );
        }
        v.finish(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The longest subscription id, region and VM name; Azure's own limits are within these.
pub const MAX_SUBSCRIPTION_ID_CHARS: usize = 64;
pub const MAX_REGION_CHARS: usize = 64;
pub const MAX_VM_NAME_CHARS: usize = 64;
/// Azure's limit on a resource group's name.
pub const MAX_RESOURCE_GROUP_CHARS: usize = 90;

/// Subscriptions, resource groups and regions are identifiers from the cloud inventory;
/// backvault only insists they are non-empty, printable and of sane length.
pub fn check_identifier(raw: &str, pointer: &str, what: &str, max_len: usize, v: &mut Violations) {
    let len = raw.chars().count();
    if len == 0
        || len > max_len
        || raw.chars().any(|c| c.is_control() || c == '/')
        || raw.trim() != raw
    {
        v.push(
            pointer,
            "identifier_invalid",
            format!("{what} must be 1 to {max_len} printable characters without '/' or surrounding spaces"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(r: Result<impl Sized, Vec<Violation>>) -> Vec<&'static str> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.code)
            .collect()
    }

    #[test]
    fn vault_names_follow_azure_rules() {
        assert!(VaultName::parse("ab", "/name").is_ok());
        assert!(VaultName::parse("Prod-Vault-01", "/name").is_ok());
        assert!(VaultName::parse(&format!("a{}", "b".repeat(49)), "/name").is_ok());
        assert_eq!(codes(VaultName::parse("a", "/name")), ["vault_name_length"]);
        assert_eq!(
            codes(VaultName::parse(&"a".repeat(51), "/name")),
            ["vault_name_length"]
        );
        assert_eq!(
            codes(VaultName::parse("1vault", "/name")),
            ["vault_name_first_character"]
        );
        assert_eq!(
            codes(VaultName::parse("my_vault", "/name")),
            ["vault_name_characters"]
        );
        assert_eq!(
            codes(VaultName::parse("vault-", "/name")),
            ["vault_name_trailing_hyphen"]
        );
        assert_eq!(
            codes(VaultName::parse("", "/name")),
            ["vault_name_length", "vault_name_first_character"]
        );
    }

    #[test]
    fn policy_names_are_url_safe() {
        assert!(PolicyName::parse("HourlyLogBackup", "/name").is_ok());
        assert!(PolicyName::parse("weekly_full-2", "/name").is_ok());
        assert_eq!(
            codes(PolicyName::parse("", "/name")),
            ["policy_name_length"]
        );
        assert_eq!(
            codes(PolicyName::parse("a b", "/name")),
            ["policy_name_characters"]
        );
        assert_eq!(
            codes(PolicyName::parse("-x", "/name")),
            ["policy_name_characters"]
        );
    }

    #[test]
    fn identifiers_reject_empty_and_slashes() {
        for bad in ["", " rg", "a/b", "tab\t"] {
            let mut v = Violations::default();
            check_identifier(bad, "/resource_group", "resource group", 90, &mut v);
            assert_eq!(v.into_vec()[0].code, "identifier_invalid", "{bad:?}");
        }
        let mut v = Violations::default();
        check_identifier("rg-prod", "/resource_group", "resource group", 90, &mut v);
        assert!(v.is_empty());
    }
}
