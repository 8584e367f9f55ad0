//! How the domain's enums and newtypes are stored in Postgres: the one place a value
//! becomes a column and back (the `sqlx` feature; `backvault-store` enables it, the agent
//! builds without it).
//!
//! - The enums are `text` columns holding their wire names (`as_str`), each column's set
//!   kept by a CHECK constraint; they read from `text`, `varchar` and the like.
//! - [`Priority`] is `int2`, its [`Priority::rank`].
//! - [`Lsn`] is `numeric(25, 0)` (`numeric(40, 0)` in older columns), read exactly through
//!   `rust_decimal`, or from the decimal text of a `::text` cast.
//!
//! A stored value outside the type (an unknown name, a fractional or negative number) is a
//! decode error, never a default.

use rust_decimal::Decimal;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef, Postgres};
use sqlx::{Decode, Encode, Type, ValueRef};

use crate::access::Role;
use crate::agent::{
    BackupPreference, DeploymentModel, RecoveryModel, RecoveryPointType, ReplicaRole,
    SynchronizationHealth,
};
use crate::chain::ChainBreak;
use crate::jobs::{AttemptOutcome, JobKind, JobStatus, Priority};
use crate::lsn::{Lsn, MAX_LSN_DIGITS};
use crate::protection::ProtectionState;
use crate::safety::{ApprovalStatus, GuardedOperation, Immutability, SoftDelete};

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
    ReplicaRole,
    Role,
    SynchronizationHealth,
    SoftDelete,
    Immutability,
    GuardedOperation,
    ApprovalStatus,
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

/// `numeric` and `numeric[]` (`pg_type.oid`, fixed for built-in types): LSNs are read and
/// written through `rust_decimal`'s exact codec.
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
        if value.type_info().oid() == Some(NUMERIC) {
            return Ok(lsn_of_decimal(<Decimal as Decode<Postgres>>::decode(
                value,
            )?)?);
        }
        let raw = value.as_str()?;
        Lsn::parse(raw).ok_or_else(|| unknown("Lsn", raw))
    }
}

impl Encode<'_, Postgres> for Lsn {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Decimal as Encode<Postgres>>::encode(decimal_of_lsn(*self)?, buf)
    }

    fn size_hint(&self) -> usize {
        decimal_of_lsn(*self).map_or(0, |d| <Decimal as Encode<Postgres>>::size_hint(&d))
    }
}

/// The least number of more than [`MAX_LSN_DIGITS`] digits.
const LSN_LIMIT: u128 = 10u128.pow(MAX_LSN_DIGITS as u32);

/// A stored LSN: a whole, non-negative number of at most [`MAX_LSN_DIGITS`] digits (the
/// bound `Lsn::parse` keeps), which a `Decimal` holds exactly (28 digits).
fn lsn_of_decimal(stored: Decimal) -> Result<Lsn, String> {
    let whole = stored.normalize();
    if whole.is_sign_negative() && !whole.is_zero() {
        return Err(format!(
            "an LSN is not negative; the database holds {stored}"
        ));
    }
    if whole.scale() != 0 {
        return Err(format!(
            "an LSN is a whole number; the database holds {stored}"
        ));
    }
    Some(whole.mantissa().unsigned_abs())
        .filter(|n| *n < LSN_LIMIT)
        .map(Lsn)
        .ok_or_else(|| {
            format!("an LSN has at most {MAX_LSN_DIGITS} digits; the database holds {stored}")
        })
}

fn decimal_of_lsn(lsn: Lsn) -> Result<Decimal, String> {
    i128::try_from(lsn.0)
        .ok()
        .and_then(|n| Decimal::try_from_i128_with_scale(n, 0).ok())
        .ok_or_else(|| format!("LSN {lsn} does not fit a numeric column"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decimal(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn whole_numbers_read_as_lsns() {
        assert_eq!(lsn_of_decimal(decimal("0")), Ok(Lsn(0)));
        assert_eq!(
            lsn_of_decimal(decimal("42000000001600001")),
            Ok(Lsn(42_000_000_001_600_001))
        );
        // A scale with only zero fractional digits is still a whole number.
        assert_eq!(lsn_of_decimal(decimal("7.00")), Ok(Lsn(7)));
        let largest = Lsn(10u128.pow(25) - 1);
        assert_eq!(
            lsn_of_decimal(decimal_of_lsn(largest).unwrap()),
            Ok(largest)
        );
    }

    #[test]
    fn anything_but_a_stored_lsn_is_an_error() {
        for (what, stored) in [
            ("negative", "-1"),
            ("a fraction", "1.5"),
            ("only a fraction", "0.5"),
            ("26 digits", "10000000000000000000000000"),
        ] {
            assert!(lsn_of_decimal(decimal(stored)).is_err(), "{what}");
        }
    }

    proptest! {
        #[test]
        fn every_lsn_round_trips(n in 0u128..10u128.pow(25)) {
            let stored = decimal_of_lsn(Lsn(n)).unwrap();
            prop_assert_eq!(stored.to_string(), n.to_string());
            prop_assert_eq!(lsn_of_decimal(stored), Ok(Lsn(n)));
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
        same(&ReplicaRole::ALL, ReplicaRole::as_str);
        same(&Role::ALL, Role::as_str);
        same(&SynchronizationHealth::ALL, SynchronizationHealth::as_str);
        same(&SoftDelete::ALL, SoftDelete::as_str);
        same(&Immutability::ALL, Immutability::as_str);
        same(&GuardedOperation::ALL, GuardedOperation::as_str);
        same(&ApprovalStatus::ALL, ApprovalStatus::as_str);
    }
}
