//! The JSON Schema patterns the OpenAPI document publishes must accept exactly what the
//! domain's parsers accept: a client that validates against the schema is then never
//! surprised by the server.

use backvault_domain::lsn::{LSN_PATTERN, Lsn};
use backvault_domain::names::{
    IDENTIFIER_PATTERN, POLICY_NAME_PATTERN, PolicyName, VAULT_NAME_PATTERN, VaultName,
    check_identifier,
};
use backvault_domain::policy::TIME_OF_DAY_PATTERN;
use backvault_domain::text::{MAX_TEXT_CHARS, TEXT_PATTERN, text_fault};
use backvault_domain::violation::Violations;
use proptest::prelude::*;
use regex::Regex;

fn pattern(p: &str) -> Regex {
    Regex::new(p).expect("a pattern the regex crate reads")
}

/// Strings biased towards the edges of every pattern: ASCII, digits, hex, colons, slashes,
/// hyphens and underscores, whitespace of several kinds, and control characters.
fn edgy() -> impl Strategy<Value = String> {
    let interesting = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => proptest::char::range('A', 'F'),
        4 => proptest::char::range('0', '9'),
        2 => Just(':'),
        1 => Just('-'),
        1 => Just('_'),
        1 => Just('/'),
        1 => Just(' '),
        1 => prop_oneof![Just('\t'), Just('\n'), Just('\r'), Just('\u{a0}'), Just('\u{3000}'), Just('\u{feff}'), Just('\u{85}'), Just('\u{2028}')],
        1 => proptest::char::range('\u{0}', '\u{1f}'),
        1 => proptest::char::range('\u{7f}', '\u{9f}'),
        1 => any::<char>(),
    ];
    prop_oneof![
        proptest::collection::vec(interesting, 0..60).prop_map(|c| c.into_iter().collect()),
        // Long runs of the characters names and LSNs are made of, to reach their length
        // limits and shapes.
        "[A-Za-z0-9_-]{0,160}",
        "[A-Za-z][A-Za-z0-9-]{40,55}",
        "[A-Za-z0-9][A-Za-z0-9_-]{140,155}",
        "[0-9A-Fa-f:]{0,40}",
        "[0-9]{20,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn text_pattern_is_the_text_rule(s in edgy()) {
        let by_pattern = pattern(TEXT_PATTERN).is_match(&s) && s.chars().count() <= MAX_TEXT_CHARS;
        prop_assert_eq!(by_pattern, text_fault(&s).is_none(), "{:?}", s);
    }

    #[test]
    fn vault_name_pattern_is_the_rule(s in edgy()) {
        prop_assert_eq!(pattern(VAULT_NAME_PATTERN).is_match(&s), VaultName::parse(&s, "").is_ok(), "{:?}", s);
    }

    #[test]
    fn policy_name_pattern_is_the_rule(s in edgy()) {
        prop_assert_eq!(pattern(POLICY_NAME_PATTERN).is_match(&s), PolicyName::parse(&s, "").is_ok(), "{:?}", s);
    }

    #[test]
    fn identifier_pattern_is_the_rule(s in edgy(), max in 1usize..70) {
        let mut v = Violations::default();
        check_identifier(&s, "", "id", max, &mut v);
        let by_pattern = pattern(IDENTIFIER_PATTERN).is_match(&s) && s.chars().count() <= max;
        prop_assert_eq!(by_pattern, v.is_empty(), "{:?}", s);
    }

    #[test]
    fn lsn_pattern_is_the_parser(s in edgy()) {
        prop_assert_eq!(pattern(LSN_PATTERN).is_match(&s), Lsn::parse(&s).is_some(), "{:?}", s);
    }

    #[test]
    fn lsn_pattern_accepts_every_lsn(n in any::<u128>()) {
        let decimal = (n % 10u128.pow(25)).to_string();
        prop_assert!(pattern(LSN_PATTERN).is_match(&decimal));
        prop_assert!(Lsn::parse(&decimal).is_some());
    }
}

#[test]
fn time_pattern_is_every_half_hour_and_nothing_else() {
    let re = pattern(TIME_OF_DAY_PATTERN);
    for h in 0..30 {
        for m in 0..70 {
            let time = format!("{h:02}:{m:02}");
            let valid = h < 24 && (m == 0 || m == 30);
            assert_eq!(re.is_match(&time), valid, "{time}");
        }
    }
    for bad in ["2:00", "02:00:00", " 02:00", "0200", "24:00", "02:3O"] {
        assert!(!re.is_match(bad), "{bad}");
    }
}
