//! What the migration tests share.

use sqlx::PgPool;

/// Applies the embedded migrations whose version `keep` accepts, each in a transaction of
/// its own (as sqlx does), so that a test can load data between two of them.
pub async fn migrate(pool: &PgPool, keep: impl Fn(i64) -> bool) {
    for m in backvault_store::MIGRATOR.iter().filter(|m| keep(m.version)) {
        let mut tx = pool.begin().await.expect("a transaction");
        sqlx::raw_sql(m.sql.clone())
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("migration {}: {e}", m.version));
        tx.commit().await.expect("committed");
    }
}
