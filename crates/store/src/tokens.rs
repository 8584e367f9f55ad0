//! Enrollment tokens on record and the deny list of revoked tokens.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Page;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EnrollmentTokenRow {
    pub id: Uuid,
    pub subscription_id: String,
    pub vm_name: Option<String>,
    pub resource_group: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_uses: i32,
    pub uses: i32,
    pub revoked_at: Option<DateTime<Utc>>,
}

// Every statement below that returns an `EnrollmentTokenRow` lists its columns as
// `id, subscription_id, vm_name, resource_group, created_by, created_at, expires_at, max_uses, uses,
// revoked_at`.

pub struct NewEnrollmentToken<'a> {
    pub id: Uuid,
    pub subscription_id: &'a str,
    /// `(vm name, resource group)` of the one VM the token may enroll.
    pub bound_to: Option<(&'a str, &'a str)>,
    pub created_by: &'a str,
    pub expires_at: DateTime<Utc>,
    pub max_uses: i32,
}

pub async fn enrollment_token_insert(
    db: impl PgExecutor<'_>,
    t: &NewEnrollmentToken<'_>,
) -> sqlx::Result<EnrollmentTokenRow> {
    sqlx::query_as!(
        EnrollmentTokenRow,
        "insert into enrollment_tokens (id, subscription_id, vm_name, resource_group, created_by, expires_at, max_uses)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning id, subscription_id, vm_name, resource_group, created_by, created_at, expires_at, max_uses, uses,
                   revoked_at",
        t.id,
        t.subscription_id,
        t.bound_to.map(|b| b.0),
        t.bound_to.map(|b| b.1),
        t.created_by,
        t.expires_at,
        t.max_uses,
    )
    .fetch_one(db)
    .await
}

/// Takes one use of a live token (not revoked, not expired, uses left) and returns it;
/// `None` when it has none to give. The row stays locked until the transaction ends, so
/// racing enrollments take turns and a rolled-back enrollment gives its use back.
pub async fn enrollment_token_consume(
    conn: &mut PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<EnrollmentTokenRow>> {
    sqlx::query_as!(
        EnrollmentTokenRow,
        "update enrollment_tokens set uses = uses + 1
         where id = $1 and revoked_at is null and expires_at > now() and uses < max_uses
         returning id, subscription_id, vm_name, resource_group, created_by, created_at, expires_at, max_uses, uses,
                   revoked_at",
        id,
    )
    .fetch_optional(conn)
    .await
}

pub async fn enrollment_token_get(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> sqlx::Result<Option<EnrollmentTokenRow>> {
    sqlx::query_as!(
        EnrollmentTokenRow,
        "select id, subscription_id, vm_name, resource_group, created_by, created_at, expires_at, max_uses, uses,
                revoked_at
         from enrollment_tokens where id = $1",
        id,
    )
    .fetch_optional(db)
    .await
}

/// Tokens that can still enroll (not revoked, not expired, uses left), oldest first.
pub async fn enrollment_tokens_outstanding(
    db: impl PgExecutor<'_>,
    subscriptions: Option<&[String]>,
    page: Page,
) -> sqlx::Result<Vec<EnrollmentTokenRow>> {
    sqlx::query_as!(
        EnrollmentTokenRow,
        "select id, subscription_id, vm_name, resource_group, created_by, created_at, expires_at, max_uses, uses,
                revoked_at
         from enrollment_tokens
         where revoked_at is null and expires_at > now() and uses < max_uses
           and ($1::text[] is null or subscription_id = any($1))
           and ($2::uuid is null or id > $2)
         order by id limit $3",
        subscriptions,
        page.after,
        page.limit,
    )
    .fetch_all(db)
    .await
}

/// Revokes the token if `subscriptions` (`None`: all) grant it; false when there is no
/// such token. Revoking twice keeps the first instant.
pub async fn enrollment_token_revoke(
    db: impl PgExecutor<'_>,
    id: Uuid,
    subscriptions: Option<&[String]>,
) -> sqlx::Result<bool> {
    let found: Option<Uuid> = sqlx::query_scalar!(
        "update enrollment_tokens set revoked_at = coalesce(revoked_at, now())
         where id = $1 and ($2::text[] is null or subscription_id = any($2))
         returning id",
        id,
        subscriptions,
    )
    .fetch_optional(db)
    .await?;
    Ok(found.is_some())
}

/// Forgets tokens that expired more than `keep` ago: they can no longer be used anyway.
pub async fn enrollment_tokens_prune(
    db: impl PgExecutor<'_>,
    keep: chrono::Duration,
) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "delete from enrollment_tokens where expires_at < now() - $1::interval",
        // sqlx maps `interval` to `PgInterval`; chrono's duration encodes as one too.
        keep as chrono::Duration,
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// Puts a token on the deny list until `expires_at`; a repeat changes nothing.
pub async fn token_revoke(
    db: impl PgExecutor<'_>,
    jti: Uuid,
    expires_at: DateTime<Utc>,
    revoked_by: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into revoked_tokens (jti, expires_at, revoked_by) values ($1, $2, $3)
         on conflict (jti) do nothing",
        jti,
        expires_at,
        revoked_by,
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn token_is_revoked(db: impl PgExecutor<'_>, jti: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from revoked_tokens where jti = $1 and expires_at > now()) as "revoked!""#,
        jti,
    )
    .fetch_one(db)
    .await
}

/// A token on the deny list, until it expires.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RevokedToken {
    pub jti: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// The deny list as it stands: every entry whose token could still be presented.
pub async fn tokens_revoked(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<RevokedToken>> {
    sqlx::query_as!(
        RevokedToken,
        "select jti, expires_at from revoked_tokens where expires_at > now()"
    )
    .fetch_all(db)
    .await
}

/// Drops deny-list entries whose tokens have expired.
pub async fn revoked_tokens_prune(db: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    Ok(
        sqlx::query!("delete from revoked_tokens where expires_at <= now()")
            .execute(db)
            .await?
            .rows_affected(),
    )
}
