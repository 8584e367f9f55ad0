//! How the domain's enums and newtypes are stored in Postgres: the one place a value
//! becomes a column and back (the `sqlx` feature; `backvault-store` enables it, the agent
//! builds without it).
//!
//! - The enums are `text` columns holding their wire names (`as_str`), each column's set
//!   kept by a CHECK constraint; they read from `text`, `varchar` and the like.
//! - [`Priority`] is `int2`, its [`Priority::rank`].
//! - [`Lsn`] is `numeric(25, 0)` (`numeric(40, 0)` in older columns), read from Postgres'
//!   binary `numeric` exactly, or from the decimal text of a `::text` cast.
//!
//! A stored value outside the type (an unknown name, a fractional or negative number) is a
//! decode error, never a default.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef, Postgres,
};
use sqlx::{Decode, Encode, Type, ValueRef};

use crate::agent::{BackupPreference, DeploymentModel, RecoveryModel, RecoveryPointType};
use crate::chain::ChainBreak;
use crate::jobs::{AttemptOutcome, JobKind, JobStatus, Priority};
use crate::lsn::{Lsn, MAX_LSN_DIGITS};
use crate::protection::ProtectionState;

/// Text-backed enums: their `as_str` is what the column holds, their `parse` reads it back.
macro_rules! stored_as_text {
    ($($t:ty),* $(,)?) => {$(
        impl Type<Postgres> for $t {
            fn type_info() -> PgTypeInfo {
                <str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $t {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <&str as PgHasArrayType>::array_compatible(ty)
            }
        }

        impl<'r> Decode<'r, Postgres> for $t {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let raw = <&str as Decode<Postgres>>::decode(value)?;
                <$t>::parse(raw).ok_or_else(|| unknown(stringify!($t), raw))
            }
        }

        impl Encode<'_, Postgres> for $t {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode(self.as_str(), buf)
            }

            fn size_hint(&self) -> usize {
                self.as_str().len()
            }
        }
    )*};
}

stored_as_text!(
    AttemptOutcome,
    BackupPreference,
    ChainBreak,
    DeploymentModel,
    JobKind,
    JobStatus,
    ProtectionState,
    RecoveryModel,
    RecoveryPointType,
);

fn unknown(ty: &str, raw: &str) -> BoxDynError {
    format!("the database holds {raw:?}, which is no {ty}").into()
}

impl Type<Postgres> for Priority {
    fn type_info() -> PgTypeInfo {
        <i16 as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <i16 as Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for Priority {
    fn array_type_info() -> PgTypeInfo {
        <i16 as PgHasArrayType>::array_type_info()
    }

    fn array_compatible(ty: &PgTypeInfo) -> bool {
        <i16 as PgHasArrayType>::array_compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Priority {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let rank = <i16 as Decode<Postgres>>::decode(value)?;
        Priority::from_rank(rank).ok_or_else(|| unknown("Priority", &rank.to_string()))
    }
}

impl Encode<'_, Postgres> for Priority {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <i16 as Encode<Postgres>>::encode(self.rank(), buf)
    }

    fn size_hint(&self) -> usize {
        std::mem::size_of::<i16>()
    }
}

/// `numeric` and `numeric[]` (`pg_type.oid`, fixed for built-in types).
const NUMERIC: Oid = Oid(1700);
const NUMERIC_ARRAY: Oid = Oid(1231);

impl Type<Postgres> for Lsn {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(NUMERIC)
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(NUMERIC) || <str as Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for Lsn {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(NUMERIC_ARRAY)
    }

    fn array_compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(NUMERIC_ARRAY) || <&str as PgHasArrayType>::array_compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Lsn {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        if value.format() == PgValueFormat::Binary && value.type_info().oid() == Some(NUMERIC) {
            return Ok(lsn_from_numeric(value.as_bytes()?)?);
        }
        let raw = value.as_str()?;
        Lsn::parse(raw).ok_or_else(|| unknown("Lsn", raw))
    }
}

impl Encode<'_, Postgres> for Lsn {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        numeric_of_lsn(*self, buf);
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        // The header and at most ten base-10000 digits (a `u128` has 39 decimal ones).
        28
    }
}

/// `numeric`'s base: each binary digit holds four decimal ones.
const NBASE: u128 = 10_000;
const NUMERIC_POSITIVE: u16 = 0x0000;
/// The least number of more than [`MAX_LSN_DIGITS`] digits.
const LSN_LIMIT: u128 = 10u128.pow(MAX_LSN_DIGITS as u32);

/// Postgres' binary `numeric` (`numeric_send`): the digit count, the weight (the power of
/// 10000 of the first digit), the sign, the display scale, then the base-10000 digits,
/// most significant first, trailing zero digits left out. All big-endian 16-bit words.
fn lsn_from_numeric(mut raw: &[u8]) -> Result<Lsn, String> {
    fn word(raw: &mut &[u8]) -> Result<u16, String> {
        let (head, rest) = raw
            .split_first_chunk::<2>()
            .ok_or("a numeric value cut short")?;
        *raw = rest;
        Ok(u16::from_be_bytes(*head))
    }
    let ndigits = i32::from(word(&mut raw)?.cast_signed());
    let weight = i32::from(word(&mut raw)?.cast_signed());
    let sign = word(&mut raw)?;
    let _display_scale = word(&mut raw)?;
    if sign != NUMERIC_POSITIVE || ndigits < 0 {
        return Err(format!(
            "an LSN is a whole number of at most {MAX_LSN_DIGITS} digits; the database holds a negative or non-finite one"
        ));
    }
    let too_large =
        || format!("an LSN has at most {MAX_LSN_DIGITS} digits; the database holds more");
    let mut value: u128 = 0;
    let mut power = weight;
    for _ in 0..ndigits {
        let digit = u128::from(word(&mut raw)?);
        if digit >= NBASE {
            return Err("a numeric digit out of its base".into());
        }
        if power >= 0 {
            value = value
                .checked_mul(NBASE)
                .and_then(|v| v.checked_add(digit))
                .ok_or_else(too_large)?;
        } else if digit != 0 {
            return Err("an LSN is a whole number; the database holds a fraction".into());
        }
        power = power
            .checked_sub(1)
            .ok_or("a numeric weight out of range")?;
    }
    // The zero digits left out between the last one sent and the units.
    while power >= 0 {
        value = value.checked_mul(NBASE).ok_or_else(too_large)?;
        power = power
            .checked_sub(1)
            .ok_or("a numeric weight out of range")?;
    }
    if !raw.is_empty() {
        return Err("a numeric value with bytes past its digits".into());
    }
    // The same bound as `Lsn::parse`: `numeric(25, 0)`.
    if value >= LSN_LIMIT {
        return Err(too_large());
    }
    Ok(Lsn(value))
}

fn numeric_of_lsn(lsn: Lsn, buf: &mut Vec<u8>) {
    // Base-10000 digits, least significant first.
    let mut digits: Vec<u16> = Vec::new();
    let mut rest = lsn.0;
    while rest > 0 {
        digits.extend(rest.checked_rem(NBASE).and_then(|d| u16::try_from(d).ok()));
        rest = rest.checked_div(NBASE).unwrap_or(0);
    }
    // A u128 has at most ten such digits: every count below fits a 16-bit word.
    let weight = digits.len().saturating_sub(1);
    let significant = digits.iter().position(|d| *d != 0).unwrap_or(digits.len());
    let digits = digits.get(significant..).unwrap_or_default();
    let word = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes();
    buf.extend(word(digits.len()));
    buf.extend(word(weight));
    buf.extend(NUMERIC_POSITIVE.to_be_bytes());
    buf.extend(0u16.to_be_bytes());
    for d in digits.iter().rev() {
        buf.extend(d.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, scale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [ndigits.cast_unsigned(), weight.cast_unsigned(), sign, scale] {
            out.extend(w.to_be_bytes());
        }
        for d in digits {
            out.extend(d.to_be_bytes());
        }
        out
    }

    fn encoded(lsn: Lsn) -> Vec<u8> {
        let mut buf = Vec::new();
        numeric_of_lsn(lsn, &mut buf);
        buf
    }

    #[test]
    fn numeric_reads_as_postgres_sends_it() {
        // As `numeric_send` writes them: zero has no digits; trailing zero digits go.
        assert_eq!(lsn_from_numeric(&numeric(0, 0, 0, 0, &[])), Ok(Lsn(0)));
        assert_eq!(lsn_from_numeric(&numeric(1, 0, 0, 0, &[42])), Ok(Lsn(42)));
        assert_eq!(
            lsn_from_numeric(&numeric(1, 1, 0, 0, &[1])),
            Ok(Lsn(10_000))
        );
        assert_eq!(
            lsn_from_numeric(&numeric(5, 4, 0, 0, &[4, 2000, 0, 160, 1])),
            Ok(Lsn(42_000_000_001_600_001)),
        );
        assert_eq!(
            lsn_from_numeric(&numeric(4, 4, 0, 0, &[4, 2000, 0, 160])),
            Ok(Lsn(42_000_000_001_600_000)),
        );
        // A scale with only zero fractional digits is still a whole number.
        assert_eq!(lsn_from_numeric(&numeric(1, 0, 0, 2, &[7])), Ok(Lsn(7)));
        assert_eq!(lsn_from_numeric(&numeric(2, 0, 0, 4, &[7, 0])), Ok(Lsn(7)));
        let largest = Lsn(10u128.pow(25) - 1);
        assert_eq!(lsn_from_numeric(&encoded(largest)), Ok(largest));
    }

    #[test]
    fn anything_but_a_stored_lsn_is_an_error() {
        for (what, raw) in [
            ("negative", numeric(1, 0, 0x4000, 0, &[1])),
            ("NaN", numeric(0, 0, 0xC000, 0, &[])),
            ("infinity", numeric(0, 0, 0xD000, 0, &[])),
            ("a fraction", numeric(2, 0, 0, 4, &[1, 5000])),
            ("only a fraction", numeric(1, -1, 0, 4, &[5000])),
            ("26 digits", encoded(Lsn(10u128.pow(25)))),
            ("past u128", numeric(1, 10, 0, 0, &[1])),
            ("a digit past the base", numeric(1, 0, 0, 0, &[10_000])),
            ("cut short", numeric(2, 1, 0, 0, &[1])),
            (
                "trailing bytes",
                [numeric(1, 0, 0, 0, &[1]), vec![0]].concat(),
            ),
            ("no header", vec![0, 1]),
        ] {
            assert!(lsn_from_numeric(&raw).is_err(), "{what}");
        }
    }

    #[test]
    fn the_encoding_is_postgres_canonical_form() {
        assert_eq!(encoded(Lsn(0)), numeric(0, 0, 0, 0, &[]));
        assert_eq!(encoded(Lsn(10_000)), numeric(1, 1, 0, 0, &[1]));
        assert_eq!(encoded(Lsn(10_001)), numeric(2, 1, 0, 0, &[1, 1]));
    }

    proptest! {
        #[test]
        fn every_lsn_round_trips(n in 0u128..10u128.pow(25)) {
            prop_assert_eq!(lsn_from_numeric(&encoded(Lsn(n))), Ok(Lsn(n)));
        }
    }

    /// The names in the database are the names on the wire, so a stored value serializes
    /// as the string the API always gave.
    #[test]
    fn stored_names_are_wire_names() {
        fn same<T: serde::Serialize + Copy>(all: &[T], as_str: fn(T) -> &'static str) {
            for t in all {
                assert_eq!(serde_json::to_value(t).unwrap(), as_str(*t));
            }
        }
        same(&AttemptOutcome::ALL, AttemptOutcome::as_str);
        same(&BackupPreference::ALL, BackupPreference::as_str);
        same(&ChainBreak::ALL, ChainBreak::as_str);
        same(&DeploymentModel::ALL, DeploymentModel::as_str);
        same(&JobKind::ALL, JobKind::as_str);
        same(&JobStatus::ALL, JobStatus::as_str);
        same(&ProtectionState::ALL, ProtectionState::as_str);
        same(&RecoveryModel::ALL, RecoveryModel::as_str);
        same(&RecoveryPointType::ALL, RecoveryPointType::as_str);
    }
}
