//! A database of its own per benchmark, on the Postgres server of the admin connection:
//! created empty or as a copy of another, and dropped at the end.
//!
//! Each binary names its databases with a prefix of its own (`backvault_bench_`,
//! `backvault_recbench_`); [`crate::sys::CpuSnapshot`] counts the Postgres backends of
//! databases with that prefix as the benchmark's, and all others as someone else's.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgExecutor, PgPool, Postgres, QueryBuilder};

/// The default admin connection; the benchmarks' databases live on the same server.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn url_with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .context("DATABASE_URL must look like postgres://user@host:port/database")?;
    let server = rest.split_once('/').map_or(rest, |(server, _)| server);
    let server = format!("{scheme}://{server}");
    Ok(match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    })
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

// Database names are identifiers, which cannot be bind parameters: the statements that
// name one are built with `QueryBuilder` around the quoted name instead of being static.

async fn drop_database(admin: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    QueryBuilder::<Postgres>::new("drop database if exists ")
        .push(quote_ident(name))
        .push(" with (force)")
        .build()
        .execute(admin)
        .await?;
    Ok(())
}

/// An empty database, or a copy of `template` (which must have no connections).
async fn create_database(
    admin: &mut PgConnection,
    name: &str,
    template: Option<&str>,
) -> sqlx::Result<()> {
    let mut create = QueryBuilder::<Postgres>::new("create database ");
    create.push(quote_ident(name));
    if let Some(t) = template {
        // FILE_COPY: a copy of a large fixture without writing it all to the WAL.
        create
            .push(" template ")
            .push(quote_ident(t))
            .push(" strategy file_copy");
    }
    create.build().execute(admin).await?;
    Ok(())
}

/// A scratch database, created empty or as a copy of another (an older one of the same
/// name is dropped first), and dropped by [`BenchDb::drop_db`].
pub struct BenchDb {
    admin_url: String,
    prefix: String,
    /// `<prefix><name>`.
    pub name: String,
    pub url: String,
}

impl BenchDb {
    /// Database `<prefix><name>` on the server of `admin_url`: empty, or a copy of
    /// `template` (a full name; the database must have no connections).
    pub async fn create(
        admin_url: &str,
        prefix: &str,
        name: &str,
        template: Option<&str>,
    ) -> anyhow::Result<Self> {
        let name = &format!("{prefix}{name}");
        let url = url_with_database(admin_url, name)?;
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to Postgres at {admin_url}"))?;
        drop_database(&mut admin, name).await?;
        create_database(&mut admin, name, template)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            prefix: prefix.to_owned(),
            name: name.to_owned(),
            url,
        })
    }

    /// Database `<prefix><name>` as it is, if it exists (a fixture kept by an earlier run).
    pub async fn existing(
        admin_url: &str,
        prefix: &str,
        name: &str,
    ) -> anyhow::Result<Option<Self>> {
        let name = format!("{prefix}{name}");
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to Postgres at {admin_url}"))?;
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
                .bind(&name)
                .fetch_one(&mut admin)
                .await?;
        admin.close().await?;
        Ok(exists.then(|| Self {
            admin_url: admin_url.to_owned(),
            prefix: prefix.to_owned(),
            url: url_with_database(admin_url, &name).unwrap_or_default(),
            name,
        }))
    }

    /// A copy of this database (which must have no connections), named `name` with the
    /// same prefix.
    pub async fn copy(&self, name: &str) -> anyhow::Result<Self> {
        Self::create(&self.admin_url, &self.prefix, name, Some(&self.name)).await
    }

    pub async fn pool(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        self.pool_with(max_connections, &[]).await
    }

    /// A pool whose sessions get these settings (`SET name = value`).
    pub async fn pool_with(
        &self,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgPool> {
        let options = PgConnectOptions::from_str(&self.url)?.options(settings.iter().copied());
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options)
            .await
            .with_context(|| format!("connecting to {}", self.name))
    }

    /// A pool on a database with backvault's schema applied.
    pub async fn migrated_pool(
        &self,
        max_connections: u32,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgPool> {
        let pool = self.pool_with(max_connections, settings).await?;
        backvault_store::MIGRATOR
            .run(&pool)
            .await
            .context("applying backvault's migrations")?;
        Ok(pool)
    }

    /// Drops the database; a failure is only warned about.
    pub async fn drop_db(self) {
        let dropped = async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            drop_database(&mut admin, &self.name).await?;
            admin.close().await?;
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = dropped.await {
            eprintln!("warning: could not drop database {}: {e:#}", self.name);
        }
    }
}

/// Runs `body` on a fresh database `<prefix><name>` and drops the database afterwards,
/// whatever happened.
pub async fn with_db<T, F, Fut>(
    admin_url: &str,
    prefix: &str,
    name: &str,
    body: F,
) -> anyhow::Result<T>
where
    F: FnOnce(BenchDb) -> Fut,
    Fut: Future<Output = (BenchDb, anyhow::Result<T>)>,
{
    let db = BenchDb::create(admin_url, prefix, name, None).await?;
    let (db, result) = body(db).await;
    db.drop_db().await;
    result
}

/// Jobs in `job_queue`, waiting or running (from `queue_stats`, per kind).
pub async fn jobs_queued(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    Ok(backvault_store::jobs::queue_stats(db)
        .await?
        .iter()
        .map(|s| s.pending + s.running)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_gets_the_bench_database() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://h:5432", "x").unwrap(),
            "postgres://h:5432/x"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("backvault_bench_x"), "\"backvault_bench_x\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
