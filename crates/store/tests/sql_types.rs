//! The domain's types as Postgres stores them (`backvault_domain`'s `sqlx` feature): each
//! comes back as it went in, through the column types the migrations give it, and a value
//! outside the type is an error, never a default.

use backvault_domain::access::Role;
use backvault_domain::agent::{
    BackupPreference, DeploymentModel, RecoveryModel, RecoveryPointType, ReplicaRole,
    SynchronizationHealth,
};
use backvault_domain::chain::ChainBreak;
use backvault_domain::jobs::{AttemptOutcome, JobKind, JobStatus, Priority};
use backvault_domain::lsn::Lsn;
use backvault_domain::protection::ProtectionState;
use sqlx::postgres::PgHasArrayType;
// The statements built with `format!` are made of this file's constants (`AssertSqlSafe`).
use sqlx::{AssertSqlSafe, Decode, Encode, PgPool, Postgres, Type};

/// Every value of a text-backed type through `text` and `varchar`, one at a time and as an
/// array; an unknown name fails to decode.
async fn text_round_trip<T>(pool: &PgPool, all: &[T])
where
    T: for<'r> Decode<'r, Postgres>
        + for<'q> Encode<'q, Postgres>
        + Type<Postgres>
        + PgHasArrayType
        + PartialEq
        + std::fmt::Debug
        + Copy
        + Send
        + Sync
        + Unpin
        + 'static,
{
    for value in all {
        for cast in ["$1::text", "$1::text::varchar"] {
            let back: T = sqlx::query_scalar(AssertSqlSafe(format!("select {cast}")))
                .bind(*value)
                .fetch_one(pool)
                .await
                .expect("a value back");
            assert_eq!(back, *value, "{cast}");
        }
    }
    let back: Vec<T> = sqlx::query_scalar("select array(select unnest($1::text[]))")
        .bind(all.to_vec())
        .fetch_one(pool)
        .await
        .expect("an array back");
    assert_eq!(back, all);
    let unknown = sqlx::query_scalar::<_, T>("select 'no_such_value'::text")
        .fetch_one(pool)
        .await;
    assert!(
        matches!(unknown, Err(sqlx::Error::ColumnDecode { .. })),
        "{unknown:?}"
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn enums_are_their_wire_names(pool: PgPool) {
    text_round_trip(&pool, &AttemptOutcome::ALL).await;
    text_round_trip(&pool, &BackupPreference::ALL).await;
    text_round_trip(&pool, &ReplicaRole::ALL).await;
    text_round_trip(&pool, &SynchronizationHealth::ALL).await;
    text_round_trip(&pool, &ChainBreak::ALL).await;
    text_round_trip(&pool, &DeploymentModel::ALL).await;
    text_round_trip(&pool, &JobKind::ALL).await;
    text_round_trip(&pool, &JobStatus::ALL).await;
    text_round_trip(&pool, &ProtectionState::ALL).await;
    text_round_trip(&pool, &RecoveryModel::ALL).await;
    text_round_trip(&pool, &RecoveryPointType::ALL).await;
    text_round_trip(&pool, &Role::ALL).await;
    // The names the database holds are those its CHECK constraints admit.
    let stored: String = sqlx::query_scalar("select $1::text")
        .bind(JobStatus::CompletedWithWarnings)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, "completed_with_warnings");
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn priorities_are_their_ranks(pool: PgPool) {
    for p in Priority::ALL {
        let back: Priority = sqlx::query_scalar("select $1::int2")
            .bind(p)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(back, p);
    }
    let unknown = sqlx::query_scalar::<_, Priority>("select 7::int2")
        .fetch_one(&pool)
        .await;
    assert!(matches!(unknown, Err(sqlx::Error::ColumnDecode { .. })));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn lsns_are_exact_numerics(pool: PgPool) {
    let lsns = [
        0,
        1,
        9_999,
        10_000,
        10_001,
        100_000_000,
        42_000_000_001_600_001,
        10u128.pow(24),
        10u128.pow(25) - 1,
    ]
    .map(Lsn);
    for lsn in lsns {
        for column in ["numeric(25, 0)", "numeric(40, 0)", "numeric"] {
            let (back, text): (Lsn, String) = sqlx::query_as(AssertSqlSafe(format!(
                "select $1::{column}, $1::{column}::text"
            )))
            .bind(lsn)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(back, lsn, "{column}");
            assert_eq!(text, lsn.to_string(), "what Postgres stored, in {column}");
        }
        // As the decimal text of a `::text` cast, too.
        let back: Lsn = sqlx::query_scalar("select $1::numeric::text")
            .bind(lsn)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(back, lsn);
        // Written by Postgres itself (`numeric_in`), not by the encoder.
        let back: Lsn = sqlx::query_scalar("select $1::text::numeric(25, 0)")
            .bind(lsn.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(back, lsn);
    }
    let back: Vec<Option<Lsn>> = sqlx::query_scalar("select array(select unnest($1::numeric[]))")
        .bind(vec![Some(lsns[6]), None, Some(lsns[0])])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(back, [Some(lsns[6]), None, Some(lsns[0])]);
    for bad in [
        "1.5::numeric",
        "0.5::numeric",
        "(-1)::numeric",
        "'NaN'::numeric",
        "'Infinity'::numeric",
        "(10::numeric ^ 25)::numeric(40, 0)",
        "(10::numeric ^ 39)::numeric(40, 0)",
        "'1.5'::text",
        "'twelve'::text",
    ] {
        let decoded = sqlx::query_scalar::<_, Lsn>(AssertSqlSafe(format!("select {bad}")))
            .fetch_one(&pool)
            .await;
        assert!(
            matches!(decoded, Err(sqlx::Error::ColumnDecode { .. })),
            "{bad}: {decoded:?}"
        );
    }
    // A scale with nothing after the point is a whole number still.
    let back: Lsn = sqlx::query_scalar("select 42::numeric(30, 4)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(back, Lsn(42));
}
