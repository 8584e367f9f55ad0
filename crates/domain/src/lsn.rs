//! SQL Server's log-sequence numbers, as `msdb.dbo.backupset` stores them.
//!
//! An LSN is three numbers: the virtual-log-file sequence number, the log block's offset
//! and the slot in the block. SQL Server prints it in two forms: decimal, as `numeric(25,0)`
//! in `msdb` (`vlf * 10^15 + block * 10^5 + slot`), and textual, as hexadecimal parts
//! (`0000002a:00000010:0001`, as `fn_dblog` and `RESTORE HEADERONLY` tools show it). Both
//! forms name the same number, and comparing numbers orders LSNs.

use std::fmt;

/// The digits of `numeric(25,0)`.
pub const MAX_LSN_DIGITS: usize = 25;
/// [`Lsn::parse`] as a JSON Schema pattern: decimal, or SQL Server's textual form.
pub const LSN_PATTERN: &str = "^([0-9]{1,25}|[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{1,4})$";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u128);

const BLOCK_FACTOR: u128 = 100_000;
const VLF_FACTOR: u128 = 1_000_000_000_000_000;

impl Lsn {
    /// Either form: up to 25 decimal digits, or `vlf:block:slot` in hexadecimal (up to 8,
    /// 8 and 4 digits). `None` for anything else.
    pub fn parse(raw: &str) -> Option<Lsn> {
        if raw.contains(':') {
            return Self::parse_textual(raw);
        }
        let digits =
            (1..=MAX_LSN_DIGITS).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_digit());
        digits.then(|| raw.parse().ok().map(Lsn)).flatten()
    }

    fn parse_textual(raw: &str) -> Option<Lsn> {
        let mut parts = raw.split(':');
        let mut part = |max_digits: usize| -> Option<u128> {
            let p = parts.next()?;
            let hex =
                (1..=max_digits).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit());
            hex.then(|| u128::from_str_radix(p, 16).ok()).flatten()
        };
        let (vlf, block, slot) = (part(8)?, part(8)?, part(4)?);
        if parts.next().is_some() {
            return None;
        }
        // At most 0xffffffff * 10^15 + 0xffffffff * 10^5 + 0xffff: far below u128::MAX.
        Some(Lsn(vlf
            .checked_mul(VLF_FACTOR)?
            .checked_add(block.checked_mul(BLOCK_FACTOR)?)?
            .checked_add(slot)?))
    }

    /// The textual form, when the number is one SQL Server could have written (its block
    /// and slot parts within their ranges).
    pub fn textual(self) -> Option<String> {
        let vlf = self.0 / VLF_FACTOR;
        let block = (self.0 % VLF_FACTOR) / BLOCK_FACTOR;
        let slot = self.0 % BLOCK_FACTOR;
        (vlf <= 0xffff_ffff && block <= 0xffff_ffff && slot <= 0xffff)
            .then(|| format!("{vlf:08x}:{block:08x}:{slot:04x}"))
    }
}

/// The decimal form, as `msdb` and backvault's API give it.
impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// As a decimal string: a JSON number cannot hold every LSN exactly.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Lsn::parse(&raw).ok_or_else(|| serde::de::Error::custom(format!("not an LSN: {raw:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn both_forms_name_one_number() {
        let text = Lsn::parse("0000002a:00000010:0001").unwrap();
        assert_eq!(text, Lsn(42_000_000_001_600_001));
        assert_eq!(Lsn::parse("42000000001600001"), Some(text));
        assert_eq!(text.textual().as_deref(), Some("0000002a:00000010:0001"));
        assert_eq!(Lsn::parse("2a:10:1"), Some(text), "short parts too");
        assert_eq!(Lsn::parse("0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse(&"9".repeat(25)), Some(Lsn(10u128.pow(25) - 1)));
    }

    #[test]
    fn anything_else_is_not_an_lsn() {
        for bad in [
            "",
            "-1",
            "1.5",
            " 1",
            "1e3",
            &"9".repeat(26),
            "0000002a:00000010",
            "0000002a:00000010:0001:1",
            "0000002a:000000100:0001",
            "0000002a:00000010:00001",
            "0000002g:00000010:0001",
            "::",
            "+1",
        ] {
            assert_eq!(Lsn::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn textual_and_decimal_round_trip(vlf in 0u128..=0xffff_ffff, block in 0u128..=0xffff_ffff, slot in 0u128..=0xffff) {
            let text = format!("{vlf:x}:{block:x}:{slot:x}");
            let lsn = Lsn::parse(&text).unwrap();
            prop_assert_eq!(Lsn::parse(&lsn.to_string()), Some(lsn));
            prop_assert_eq!(Lsn::parse(&lsn.textual().unwrap()), Some(lsn));
            prop_assert!(lsn.to_string().len() <= MAX_LSN_DIGITS);
        }

        /// Textual order is numeric order: comparing LSNs compares log positions.
        #[test]
        fn order_follows_the_log(a in (0u128..=0xffff_ffff, 0u128..=0xffff_ffff, 0u128..=0xffff), b in (0u128..=0xffff_ffff, 0u128..=0xffff_ffff, 0u128..=0xffff)) {
            let lsn = |(v, bl, s): (u128, u128, u128)| Lsn::parse(&format!("{v:x}:{bl:x}:{s:x}")).unwrap();
            prop_assert_eq!(lsn(a).cmp(&lsn(b)), a.cmp(&b));
        }
    }
}
