//! Reads at scale: every list page of the API on a fixture the size of a large deployment
//! (by default 1,000,000 protected databases over 20,000 VMs, 10,000,000 jobs of history,
//! a vault of 100,000 items for the RPO report), read by 50 concurrent clients through the
//! real server, with each page's plans captured by `auto_explain` and checked for
//! sequential scans of big tables.
//!
//! The fixture is built with set-based SQL in `backvault_bench_scale` (`--keep` leaves it
//! for the next run, `--reuse` takes a kept one of the same sizes). Two vaults: `big` holds
//! every item but the last `--rpo-vault-items` (its pages are the item lists), `rpo` holds
//! those (its report is the RPO page). The server starts on it twice: once with one
//! database connections and `auto_explain` in their sessions (each page read often enough
//! that a prepared statement's switch to its generic plan shows), then with its defaults for the
//! timed readers.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use backvault_bench::db::{BenchDb, url_with_database};
use backvault_bench::fixture::{Block, fixture_id, seed_inventory};
use backvault_bench::server::{Launch, Server, http_client, server_bin};
use backvault_bench::sys::{CpuSnapshot, CpuSplit};
use chrono::{DateTime, Utc};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::DB_PREFIX;

#[derive(Debug, Clone, Parser)]
pub struct ScaleArgs {
    /// Protected databases (one item each).
    #[arg(long, default_value_t = 1_000_000)]
    pub items: i64,
    /// VMs they are spread over (one SQL instance each).
    #[arg(long, default_value_t = 20_000)]
    pub vms: i64,
    /// Jobs of history, spread over the last 60 days.
    #[arg(long, default_value_t = 10_000_000)]
    pub jobs: i64,
    /// Items of the vault whose RPO report is read (taken from `--items`).
    #[arg(long, default_value_t = 100_000)]
    pub rpo_vault_items: i64,
    /// Concurrent readers.
    #[arg(long, default_value_t = 50)]
    pub readers: usize,
    /// Measured seconds (after a 5 s warm-up).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Pages followed through `next_cursor` after each first page.
    #[arg(long, default_value_t = 3)]
    pub deep_pages: usize,
    /// Items of the RPO vault with a day of log backups (`--logs-per-item` points each);
    /// every item has one full.
    #[arg(long, default_value_t = 1_000)]
    pub deep_items: i64,
    #[arg(long, default_value_t = 96)]
    pub logs_per_item: i64,
    /// VMs of the big vault whose databases are availability-group databases (one group per
    /// VM).
    #[arg(long, default_value_t = 100)]
    pub ag_vms: i64,
    /// The newest jobs are still queued (with their queue rows).
    #[arg(long, default_value_t = 2_000)]
    pub queued_jobs: i64,
    /// p99 goal per page, in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub goal_ms: f64,
    /// The `backvault` binary (default: target/release/backvault of this workspace).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Keep the fixture database for the next run.
    #[arg(long)]
    pub keep: bool,
    /// Use the kept fixture if its sizes match (else build one).
    #[arg(long)]
    pub reuse: bool,
    /// Build the fixture on the schema of the migrations up to this version only (the
    /// server applies the rest): to measure an older server on the same fixture.
    #[arg(long)]
    pub migrate_until: Option<i64>,
    /// Postgres's log file, where `auto_explain` writes the plans (empty: no plan check).
    #[arg(long, default_value = "/var/log/postgresql/postgresql-15-main.log")]
    pub postgres_log: PathBuf,
    /// Database connections of the server while plans are captured.
    #[arg(long, default_value_t = 3)]
    pub plan_connections: u32,
    /// Reads of each page before the captured one (enough for every connection to have
    /// run the statement six times: a prepared statement's generic plan comes at the sixth).
    #[arg(long, default_value_t = 18)]
    pub plan_reads: usize,
}

impl Default for ScaleArgs {
    fn default() -> Self {
        Self::parse_from(["scale"])
    }
}

/// A table of more rows than this is big: its sequential scan on a user path is a finding
/// (Postgres rightly scans small tables whole).
const BIG_TABLE_ROWS: f32 = 10_000.0;

/// A policy every fixture policy uses (15-minute logs, daily fulls).
const POLICY: &str = r#"{"time_zone":"UTC","full":{"frequency":"daily","time":"00:00"},"log":{"frequency_minutes":15,"retention_days":7},"retention":{"daily":{"days":7}}}"#;

/// What the pages need to know about the fixture.
#[derive(Debug, Clone)]
struct Fixture {
    big_vault: Uuid,
    rpo_vault: Uuid,
    /// Items `0..big_items` are in the big vault, on VMs `1..=big_vms`.
    big_items: i64,
    big_vms: i64,
    vms: i64,
    items: i64,
    deep_items: i64,
    ag_vms: i64,
    built_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct Built {
    fixture: Fixture,
    build: Option<Duration>,
    size: String,
}

/// Item `s`'s state, policy and flags, as the seeding statement computes them (keep alike).
fn soft_deleted(s: i64) -> bool {
    s % 1000 == 7
}

fn sizes_key(a: &ScaleArgs) -> String {
    format!(
        "items={} vms={} jobs={} rpo={} deep={}x{} ag={} queued={}",
        a.items,
        a.vms,
        a.jobs,
        a.rpo_vault_items,
        a.deep_items,
        a.logs_per_item,
        a.ag_vms,
        a.queued_jobs,
    )
}

/// The non-constraint indexes of `table`, dropped (and returned) so a bulk load does not
/// maintain them row by row; [`recreate`] builds them again afterwards.
async fn drop_indexes(conn: &mut PgConnection, table: &str) -> sqlx::Result<Vec<String>> {
    let defs: Vec<(String, String)> = sqlx::query_as(
        "select i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) from pg_index i
         where i.indrelid = $1::regclass
           and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    for (name, _) in &defs {
        sqlx::query(sqlx::AssertSqlSafe(format!("drop index {name}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(defs.into_iter().map(|(_, def)| def).collect())
}

async fn recreate(conn: &mut PgConnection, defs: &[String]) -> sqlx::Result<()> {
    for def in defs {
        sqlx::query(sqlx::AssertSqlSafe(def.as_str()))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn build_fixture(admin_url: &str, args: &ScaleArgs) -> anyhow::Result<(BenchDb, Built)> {
    let key = sizes_key(args);
    if args.reuse
        && let Some(db) = BenchDb::existing(admin_url, DB_PREFIX, "scale").await?
    {
        let pool = db.pool(1).await?;
        let kept: Option<(String, serde_json::Value)> =
            sqlx::query_as("select sizes, fixture from bench_scale_fixture")
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
        let size: String =
            sqlx::query_scalar("select pg_size_pretty(pg_database_size(current_database()))")
                .fetch_one(&pool)
                .await?;
        pool.close().await;
        if let Some((sizes, f)) = kept
            && sizes == key
        {
            eprintln!("scale: reusing the kept fixture {} ({size})", db.name);
            return Ok((
                db,
                Built {
                    fixture: fixture_from_json(&f)?,
                    build: None,
                    size,
                },
            ));
        }
        eprintln!("scale: the kept fixture has other sizes; building a new one");
    }
    let started = Instant::now();
    let db = BenchDb::create(admin_url, DB_PREFIX, "scale", None).await?;
    let built = async {
        let pool = db.pool(1).await?;
        match args.migrate_until {
            Some(until) => {
                let mut m = sqlx::migrate::Migrator {
                    migrations: backvault_store::MIGRATOR.migrations.clone(),
                    ..sqlx::migrate::Migrator::DEFAULT
                };
                m.migrations = std::borrow::Cow::Owned(
                    m.migrations
                        .iter()
                        .filter(|mg| mg.version <= until)
                        .cloned()
                        .collect(),
                );
                m.run(&pool).await?;
            }
            None => backvault_store::MIGRATOR.run(&pool).await?,
        }
        let mut conn = pool.acquire().await?;
        let fixture = seed(&mut conn, args).await?;
        drop(conn);
        let mut conn = pool.acquire().await?;
        sqlx::query("create table bench_scale_fixture (sizes text, fixture jsonb)")
            .execute(&mut *conn)
            .await?;
        sqlx::query("insert into bench_scale_fixture values ($1, $2)")
            .bind(&key)
            .bind(fixture_json(&fixture))
            .execute(&mut *conn)
            .await?;
        let t = Instant::now();
        sqlx::query("vacuum (analyze)").execute(&mut *conn).await?;
        eprintln!("scale:   vacuum analyze {:.1} s", t.elapsed().as_secs_f64());
        let size: String =
            sqlx::query_scalar("select pg_size_pretty(pg_database_size(current_database()))")
                .fetch_one(&mut *conn)
                .await?;
        drop(conn);
        pool.close().await;
        Ok::<_, anyhow::Error>(Built {
            fixture,
            build: Some(started.elapsed()),
            size,
        })
    }
    .await;
    match built {
        Ok(b) => Ok((db, b)),
        Err(e) => {
            db.drop_db().await;
            Err(e)
        }
    }
}

fn fixture_json(f: &Fixture) -> serde_json::Value {
    serde_json::json!({
        "big_vault": f.big_vault, "rpo_vault": f.rpo_vault, "big_items": f.big_items,
        "big_vms": f.big_vms, "vms": f.vms, "items": f.items, "deep_items": f.deep_items,
        "ag_vms": f.ag_vms, "built_at": f.built_at,
    })
}

fn fixture_from_json(v: &serde_json::Value) -> anyhow::Result<Fixture> {
    let int = |k: &str| v[k].as_i64().with_context(|| format!("kept fixture: {k}"));
    let uuid = |k: &str| -> anyhow::Result<Uuid> {
        Ok(v[k].as_str().context("kept fixture: vault")?.parse()?)
    };
    Ok(Fixture {
        big_vault: uuid("big_vault")?,
        rpo_vault: uuid("rpo_vault")?,
        big_items: int("big_items")?,
        big_vms: int("big_vms")?,
        vms: int("vms")?,
        items: int("items")?,
        deep_items: int("deep_items")?,
        ag_vms: int("ag_vms")?,
        built_at: serde_json::from_value(v["built_at"].clone())?,
    })
}

async fn step<T>(
    name: &str,
    f: impl std::future::Future<Output = sqlx::Result<T>>,
) -> anyhow::Result<T> {
    let t = Instant::now();
    let r = f.await.with_context(|| format!("fixture step {name}"))?;
    eprintln!("scale:   {name} {:.1} s", t.elapsed().as_secs_f64());
    Ok(r)
}

/// The whole fixture, set-based, foreign-key triggers off (`session_replication_role =
/// replica`: the rows are consistent by construction) and the big tables' secondary
/// indexes built after their load.
async fn seed(conn: &mut PgConnection, a: &ScaleArgs) -> anyhow::Result<Fixture> {
    ensure!(
        a.rpo_vault_items < a.items && a.rpo_vault_items > 0,
        "--rpo-vault-items must be below --items"
    );
    let now = Utc::now();
    let big_items = a.items - a.rpo_vault_items;
    let big_vms = (a.vms * big_items / a.items).max(1);
    ensure!(big_vms < a.vms, "too few VMs for two vaults");
    ensure!(
        a.ag_vms < big_vms,
        "--ag-vms must be below the big vault's VMs"
    );
    ensure!(
        a.deep_items <= a.rpo_vault_items,
        "--deep-items must fit the RPO vault"
    );
    for s in [
        "set synchronous_commit = off",
        "set session_replication_role = replica",
        "set maintenance_work_mem = '512MB'",
    ] {
        sqlx::query(s).execute(&mut *conn).await?;
    }
    let mut vaults = Vec::new();
    let mut policies = BTreeMap::new();
    for (vault, names) in [
        ("big", &["Gold", "Silver", "Bronze"][..]),
        ("rpo", &["Gold"][..]),
    ] {
        let vault_id = Uuid::now_v7();
        backvault_store::vaults::vault_insert(
            &mut *conn,
            backvault_store::vaults::NewVault {
                id: vault_id,
                subscription_id: "sub-1",
                resource_group: "rg-bench",
                name: vault,
                region: "westeurope",
                description: "",
            },
        )
        .await?;
        for name in names {
            let id = Uuid::now_v7();
            let spec: serde_json::Value = serde_json::from_str(POLICY)?;
            backvault_store::policies::policy_insert(&mut *conn, id, vault_id, name, &spec).await?;
            policies.insert((vault, *name), id);
        }
        vaults.push(vault_id);
    }
    let (big_vault, rpo_vault) = (vaults[0], vaults[1]);
    let mut dropped = Vec::new();
    for t in [
        "sql_databases",
        "protected_items",
        "recovery_points",
        "jobs",
    ] {
        dropped.extend(drop_indexes(conn, t).await?);
    }
    let big = Block {
        vault_id: big_vault,
        first_vm: 1,
        vms: big_vms,
        first_db: 0,
        databases: big_items,
    };
    let rpo = Block {
        vault_id: rpo_vault,
        first_vm: big_vms + 1,
        vms: a.vms - big_vms,
        first_db: big_items,
        databases: a.rpo_vault_items,
    };
    step("inventory (VMs, instances, databases)", async {
        seed_inventory(conn, big, now).await?;
        seed_inventory(conn, rpo, now).await
    })
    .await?;
    // Availability groups: the databases of the first `ag_vms` VMs belong to one group per
    // VM (kind 6), each database its own group database (kind 7).
    step("availability groups", async {
        sqlx::query(
            "insert into availability_groups (id, subscription_id, name, backup_preference, group_id)
             select ('00000006-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, 'sub-1',
                    'ag-' || g, 'primary', ('00000006-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid
             from generate_series(1, $1::int8) g",
        )
        .bind(a.ag_vms)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "insert into ag_replicas (availability_group_id, vm_id, instance_id, role, synchronization_health, backup_priority)
             select ('00000006-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid,
                    ('00000001-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid,
                    ('00000002-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid,
                    'primary', 'healthy', 50
             from generate_series(1, $1::int8) g",
        )
        .bind(a.ag_vms)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "with d as (select d.id, d.vm_id, d.name, ('x' || right(d.id::text, 12))::bit(48)::int8 - 4294967296 as s,
                               ('x' || right(d.vm_id::text, 12))::bit(48)::int8 - 4294967296 as g
                        from sql_databases d
                        where d.vm_id <= ('00000001-0000-7000-8000-' || lpad(to_hex($1::int8 + 4294967296), 12, '0'))::uuid),
                  ins as (
                 insert into ag_databases (id, availability_group_id, name)
                 select ('00000007-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                        ('00000006-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, name
                 from d)
             update sql_databases x
             set availability_group_id = ('00000006-0000-7000-8000-' || lpad(to_hex(d.g + 4294967296), 12, '0'))::uuid,
                 ag_database_id = ('00000007-0000-7000-8000-' || lpad(to_hex(d.s + 4294967296), 12, '0'))::uuid
             from d where x.id = d.id",
        )
        .bind(a.ag_vms)
        .execute(&mut *conn)
        .await
    })
    .await?;
    // Items: 0.1% soft-deleted, 1% stopped with data retained, the rest protected; in the
    // big vault 0.1% under Bronze, 10% under Silver, the rest Gold; 5% auto-protected;
    // last log backups 0-39 minutes ago (some breach the 15-minute policy's RPO).
    step(
        "protected items",
        sqlx::query(
            "insert into protected_items (id, vault_id, database_id, item_key, policy_id, state, auto_protected,
                                          protected_name, last_full_id, chain, last_full_at, last_log_at, created_at,
                                          deleted_at, purge_after)
             select ('00000004-0000-7000-8000-' || lpad(to_hex(d.s + 4294967296), 12, '0'))::uuid,
                    case when d.s < $1 then $2::uuid else $3::uuid end, d.id, d.item_key,
                    case when d.s >= $1 then $7::uuid when d.s % 1000 = 1 then $6::uuid
                         when d.s % 10 = 2 then $5::uuid else $4::uuid end,
                    case when d.s % 1000 = 7 then 'soft_deleted' when d.s % 100 = 3 then 'stopped_retain'
                         else 'protected' end,
                    d.s % 20 = 0, d.name,
                    ('00000005-0000-7000-8000-' || lpad(to_hex(d.s + 4294967296), 12, '0'))::uuid,
                    jsonb_build_object('base', jsonb_build_object('point_id',
                                                                  ('00000005-0000-7000-8000-' || lpad(to_hex(d.s + 4294967296), 12, '0'))::uuid,
                                                                  'checkpoint_lsn', '1000', 'first_lsn', '1000',
                                                                  'last_lsn', '1000', 'guid', null),
                                       'log_end', '1100', 'log_anchored', true, 'anchor', '1000', 'fork', null,
                                       'needs', 'nothing'),
                    $8::timestamptz - interval '1 day', $8::timestamptz - make_interval(mins => (d.s % 40)::int),
                    $8::timestamptz - interval '30 days',
                    case when d.s % 1000 = 7 then $8::timestamptz - interval '1 day' end,
                    case when d.s % 1000 = 7 then $8::timestamptz + interval '13 days' end
             from (select id, item_key, name, ('x' || right(id::text, 12))::bit(48)::int8 - 4294967296 as s
                   from sql_databases) d",
        )
        .bind(big_items)
        .bind(big_vault)
        .bind(rpo_vault)
        .bind(policies[&("big", "Gold")])
        .bind(policies[&("big", "Silver")])
        .bind(policies[&("big", "Bronze")])
        .bind(policies[&("rpo", "Gold")])
        .bind(now)
        .execute(&mut *conn),
    )
    .await?;
    // Recovery points: a full per item a day ago (kind 5), and for the first `deep_items`
    // items of the RPO vault a log every 15 minutes since (kind 8, n = item * 10000 + k).
    step(
        "recovery points",
        sqlx::query(
            "insert into recovery_points (id, protected_item_id, job_id, backup_type, started_at, backup_time, log_from,
                                          first_lsn, last_lsn, database_backup_lsn, size_bytes, full_id, expires_at,
                                          chain_until, vm_id)
             select ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                    ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, null, 'full',
                    $1::timestamptz - interval '1 day 5 minutes', $1::timestamptz - interval '1 day', null,
                    1000, 1000, 900, 1073741824, null, $1::timestamptz + interval '6 days',
                    $1::timestamptz + interval '7 days', null
             from generate_series(0, $2::int8 - 1) s",
        )
        .bind(now)
        .bind(a.items)
        .execute(&mut *conn),
    )
    .await?;
    step(
        "log recovery points",
        sqlx::query(
            "insert into recovery_points (id, protected_item_id, job_id, backup_type, started_at, backup_time, log_from,
                                          first_lsn, last_lsn, database_backup_lsn, size_bytes, full_id, expires_at,
                                          vm_id)
             select ('00000008-0000-7000-8000-' || lpad(to_hex(s * 10000 + k + 4294967296), 12, '0'))::uuid,
                    ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, null, 'log',
                    t - interval '1 minute', t, t - interval '15 minutes',
                    1000 + (k - 1) * 100, 1000 + k * 100, 1000, 1048576,
                    ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                    $1::timestamptz + interval '6 days', null
             from generate_series($2::int8, $2::int8 + $3::int8 - 1) s, generate_series(1, $4::int8) k,
                  lateral (select $1::timestamptz - interval '1 day' + make_interval(mins => (k * 15)::int) as t) x",
        )
        .bind(now)
        .bind(big_items)
        .bind(a.deep_items)
        .bind(a.logs_per_item)
        .execute(&mut *conn),
    )
    .await?;
    // Jobs: `jobs` over the last 60 days, UUIDv7 ids from their creation time, round-robin
    // over the VMs. Kinds: 90% log, 6% full, 2% differential, 1% discovery, 0.8% configure
    // protection, 0.2% restore. Statuses: 1% failed, 0.5% cancelled, 1% with warnings, the
    // rest completed, but the newest `queued_jobs` are queued (with their queue rows).
    step(
        "jobs",
        sqlx::query(
            "insert into jobs (id, vm_id, subscription_id, vault_id, kind, status, priority, items, payload, attempts,
                               max_attempts, created_at, started_at, finished_at, updated_at, error_code, error_message)
             select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                                   placing substring(int8send((extract(epoch from t) * 1000)::int8) from 3)
                                                   from 1 for 6), 52, 1), 53, 1), 'hex')::uuid,
                    ('00000001-0000-7000-8000-' || lpad(to_hex(v + 4294967296), 12, '0'))::uuid, 'sub-1',
                    case when v <= $3 then $4::uuid else $5::uuid end, kind,
                    case when g > $1 - $6 then 'queued' when h < 10 then 'failed' when h < 15 then 'cancelled'
                         when h < 25 then 'completed_with_warnings' else 'completed' end,
                    case when kind = 'backup_full' and g % 10 = 0 then 0 else 1 end,
                    case when kind like 'backup%' or kind = 'restore' then
                         jsonb_build_array(jsonb_build_object('instance', 'MSSQLSERVER', 'database', 'db' || g % 50,
                                                              'protected_item_id', ('00000004-0000-7000-8000-' || lpad(to_hex(g % 50 + 4294967296), 12, '0'))))
                         else '[]' end,
                    '{}', case when g > $1 - $6 then 0 else 1 end, 3, t,
                    case when g <= $1 - $6 then t + interval '1 second' end,
                    case when g <= $1 - $6 then t + interval '2 minutes' end,
                    case when g <= $1 - $6 then t + interval '2 minutes' else t end,
                    case when g <= $1 - $6 and h < 10 then 'agent_error' end,
                    case when g <= $1 - $6 and h < 10 then 'the backup failed' end
             from generate_series(1, $1::int8) g,
                  lateral (select $7::timestamptz - interval '60 days' + (interval '60 days') * (g::float8 / $1) as t,
                                  (g * 7919) % $2 + 1 as v, (g * 31) % 1000 as h,
                                  case when g % 1000 < 900 then 'backup_log' when g % 1000 < 960 then 'backup_full'
                                       when g % 1000 < 980 then 'backup_differential' when g % 1000 < 990 then 'discovery'
                                       when g % 1000 < 998 then 'configure_protection' else 'restore' end as kind) x",
        )
        .bind(a.jobs)
        .bind(a.vms)
        .bind(big_vms)
        .bind(big_vault)
        .bind(rpo_vault)
        .bind(a.queued_jobs)
        .bind(now)
        .execute(&mut *conn),
    )
    .await?;
    step(
        "queue rows of the queued jobs",
        sqlx::query(
            "insert into job_queue (job_id, vm_id, kind, priority, run_at, max_attempts, target_instance, target_database,
                                    created_at)
             select id, vm_id, kind, priority, created_at + interval '1 day', max_attempts,
                    case when kind = 'restore' then 'MSSQLSERVER' end,
                    case when kind = 'restore' then 'restored-' || id end, created_at
             from jobs where status = 'queued'",
        )
        .execute(&mut *conn),
    )
    .await?;
    step("secondary indexes", recreate(conn, &dropped)).await?;
    sqlx::query("set session_replication_role = origin")
        .execute(&mut *conn)
        .await?;
    Ok(Fixture {
        big_vault,
        rpo_vault,
        big_items,
        big_vms,
        vms: a.vms,
        items: a.items,
        deep_items: a.deep_items,
        ag_vms: a.ag_vms,
        built_at: now,
    })
}

/// A random position in a list: the cursor to start a page at.
type Jump = Box<dyn Fn(&mut StdRng) -> Uuid + Send + Sync>;

/// One kind of page: how to make its path for a reader, and whether the fixture promises
/// items on its first page.
struct PageKind {
    name: String,
    path: Box<dyn Fn(&mut StdRng) -> String + Send + Sync>,
    /// Has `next_cursor` (followed `--deep-pages` times).
    paged: bool,
    /// Where a deep position can be jumped to directly: a cursor for a random position.
    jump: Option<Jump>,
    non_empty: bool,
}

fn kinds(f: &Fixture) -> Vec<PageKind> {
    let f = Arc::new(f.clone());
    let mut k: Vec<PageKind> = Vec::new();
    let big = f.big_vault;
    let item_jump = {
        let f = f.clone();
        move |r: &mut StdRng| fixture_id(4, r.random_range(0..f.big_items))
    };
    let items = |name: &str, query: String| PageKind {
        name: format!("protected items{name}"),
        path: {
            let q = query.clone();
            Box::new(move |_| format!("/v1/vaults/{big}/protected-items?limit=50{q}"))
        },
        paged: true,
        jump: Some(Box::new(item_jump.clone())),
        non_empty: true,
    };
    k.push(items("", String::new()));
    k.push(items(", state=protected", "&state=protected".into()));
    k.push(items(
        ", state=stopped_retain",
        "&state=stopped_retain".into(),
    ));
    k.push(items(", state=soft_deleted", "&state=soft_deleted".into()));
    k.push(items(", policy=Silver (10%)", "&policy=Silver".into()));
    k.push(items(", policy=Bronze (0.1%)", "&policy=Bronze".into()));
    k.push(items(
        ", auto_protected=true (5%)",
        "&auto_protected=true".into(),
    ));
    {
        let f = f.clone();
        k.push(PageKind {
            name: "protected items, vm_id".into(),
            path: Box::new(move |r| {
                let vm = fixture_id(1, r.random_range(1..=f.big_vms));
                format!("/v1/vaults/{big}/protected-items?limit=50&vm_id={vm}")
            }),
            paged: true,
            jump: None,
            non_empty: true,
        });
    }
    {
        let f = f.clone();
        k.push(PageKind {
            name: "protected items, availability_group_id".into(),
            path: Box::new(move |r| {
                let ag = fixture_id(6, r.random_range(1..=f.ag_vms));
                format!("/v1/vaults/{big}/protected-items?limit=50&availability_group_id={ag}")
            }),
            paged: true,
            jump: None,
            non_empty: true,
        });
    }
    let job_jump = {
        let f = f.clone();
        move |r: &mut StdRng| {
            let back = r.random_range(0..60 * 86_400_000i64);
            let at = f.built_at - chrono::Duration::milliseconds(back);
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                at.timestamp() as u64,
                at.timestamp_subsec_nanos(),
            );
            Uuid::new_v7(ts)
        }
    };
    let jobs = |name: &str, query: &str| PageKind {
        name: format!("jobs{name}"),
        path: {
            let q = query.to_owned();
            Box::new(move |_| format!("/v1/jobs?limit=50{q}"))
        },
        paged: true,
        jump: Some(Box::new(job_jump.clone())),
        non_empty: true,
    };
    k.push(jobs("", ""));
    k.push(jobs(", status=completed", "&status=completed"));
    k.push(jobs(", status=failed (1%)", "&status=failed"));
    k.push(jobs(", status=cancelled (0.5%)", "&status=cancelled"));
    k.push(jobs(", status=queued (newest)", "&status=queued"));
    k.push(jobs(", kind=backup_full (6%)", "&kind=backup_full"));
    k.push(jobs(", kind=restore (0.2%)", "&kind=restore"));
    {
        let f = f.clone();
        k.push(PageKind {
            name: "jobs, vm_id".into(),
            path: Box::new(move |r| {
                let vm = fixture_id(1, r.random_range(1..=f.vms));
                format!("/v1/jobs?limit=50&vm_id={vm}")
            }),
            paged: true,
            jump: None,
            non_empty: true,
        });
    }
    {
        let f = f.clone();
        k.push(PageKind {
            name: "jobs, created in a 1-hour window".into(),
            path: Box::new(move |r| {
                let from = f.built_at - chrono::Duration::minutes(r.random_range(60..59 * 1440));
                let to = from + chrono::Duration::hours(1);
                format!(
                    "/v1/jobs?limit=50&created_after={}&created_before={}",
                    from.format("%Y-%m-%dT%H:%M:%SZ"),
                    to.format("%Y-%m-%dT%H:%M:%SZ")
                )
            }),
            paged: true,
            jump: None,
            non_empty: true,
        });
    }
    {
        let f = f.clone();
        let rpo = f.rpo_vault;
        k.push(PageKind {
            name: "recovery points of an item with a day of logs".into(),
            path: Box::new(move |r| {
                let item = fixture_id(4, f.big_items + r.random_range(0..f.deep_items));
                format!("/v1/vaults/{rpo}/protected-items/{item}/recovery-points")
            }),
            paged: false,
            jump: None,
            non_empty: true,
        });
    }
    {
        let f = f.clone();
        k.push(PageKind {
            name: "recovery points of an item with one full".into(),
            path: Box::new(move |r| {
                let s = loop {
                    let s = r.random_range(0..f.big_items);
                    if !soft_deleted(s) {
                        break s;
                    }
                };
                format!(
                    "/v1/vaults/{big}/protected-items/{}/recovery-points",
                    fixture_id(4, s)
                )
            }),
            paged: false,
            jump: None,
            non_empty: true,
        });
    }
    {
        let f = f.clone();
        let rpo = f.rpo_vault;
        // The first page counts the whole vault; the later ones (deep) only read their page.
        k.push(PageKind {
            name: "RPO report of the 100k-item vault".into(),
            path: Box::new(move |_| format!("/v1/vaults/{rpo}/rpo?limit=50")),
            paged: true,
            jump: Some(Box::new(move |r: &mut StdRng| {
                fixture_id(4, r.random_range(f.big_items..f.items))
            })),
            non_empty: true,
        });
    }
    let plain = |name: &str, path: String, paged: bool, non_empty: bool| PageKind {
        name: name.into(),
        path: Box::new(move |_| path.clone()),
        paged,
        jump: None,
        non_empty,
    };
    k.push(plain("VMs", "/v1/vms?limit=50".into(), true, true));
    k.push(plain(
        "VMs, registered=true",
        "/v1/vms?limit=50&registered=true&resource_group=rg-bench".into(),
        true,
        true,
    ));
    k.push(plain(
        "policies of a vault",
        format!("/v1/vaults/{big}/policies?limit=20"),
        true,
        true,
    ));
    k.push(plain("vaults", "/v1/vaults?limit=50".into(), true, true));
    k.push(plain(
        "audit events",
        "/v1/audit-events?limit=50".into(),
        true,
        false,
    ));
    k
}

#[derive(Default, Clone)]
struct Samples {
    first: Vec<f64>,
    deep: Vec<f64>,
    empty_first: u64,
    items_first: u64,
}

#[derive(Debug, Clone)]
pub struct Dist {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn dist(v: &mut [f64]) -> Option<Dist> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Dist {
        n: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    })
}

/// One scan of a plan: node type, relation, index, rows out and rows its filter removed.
#[derive(Debug, Clone)]
pub struct Scan {
    pub node: String,
    pub relation: String,
    pub index: Option<String>,
    pub rows: f64,
    pub removed: f64,
    /// The relation has more than [`BIG_TABLE_ROWS`] rows.
    pub big: bool,
}

impl Scan {
    pub fn big_seq_scan(&self) -> bool {
        self.node == "Seq Scan" && self.big
    }
}

impl std::fmt::Display for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.node, self.relation)?;
        if let Some(i) = &self.index {
            write!(f, " ({i})")?;
        }
        write!(f, " {} rows", self.rows)?;
        if self.removed > 0.0 {
            write!(f, ", {} filtered out", self.removed)?;
        }
        Ok(())
    }
}

/// The plans of one statement a page ran: its text (shortened) and its scans.
#[derive(Debug, Clone)]
pub struct StatementPlan {
    pub query: String,
    pub scans: Vec<Scan>,
}

fn scans_of(node: &serde_json::Value, out: &mut Vec<Scan>) {
    let ty = node["Node Type"].as_str().unwrap_or_default();
    if let Some(rel) = node["Relation Name"].as_str() {
        out.push(Scan {
            node: ty.to_owned(),
            relation: rel.to_owned(),
            index: node["Index Name"].as_str().map(str::to_owned),
            rows: node["Actual Rows"].as_f64().unwrap_or(-1.0)
                * node["Actual Loops"].as_f64().unwrap_or(1.0),
            removed: node["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
                + node["Rows Removed by Index Recheck"]
                    .as_f64()
                    .unwrap_or(0.0),
            big: false,
        });
    } else if ty == "Bitmap Index Scan"
        && let Some(i) = node["Index Name"].as_str()
    {
        out.push(Scan {
            node: ty.to_owned(),
            relation: String::new(),
            index: Some(i.to_owned()),
            rows: node["Actual Rows"].as_f64().unwrap_or(-1.0),
            removed: 0.0,
            big: false,
        });
    }
    if let Some(children) = node["Plans"].as_array() {
        for c in children {
            scans_of(c, out);
        }
    }
}

/// The plans `auto_explain` wrote to the log between `from` and the end of the file.
fn plans_in_log(path: &Path, from: u64) -> anyhow::Result<Vec<StatementPlan>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let mut plans = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("plan:") {
        rest = &rest[at + 5..];
        let Some(open) = rest.find('{') else { break };
        let mut de =
            serde_json::Deserializer::from_str(&rest[open..]).into_iter::<serde_json::Value>();
        let Some(Ok(plan)) = de.next() else { continue };
        let query: String = plan["Query Text"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut scans = Vec::new();
        scans_of(&plan["Plan"], &mut scans);
        if !scans.is_empty() {
            plans.push(StatementPlan { query, scans });
        }
        rest = &rest[open + de.byte_offset()..];
    }
    Ok(plans)
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What a reader needs of a page: how many items it held and where the next one starts.
/// The items themselves are skipped, not built (a `serde_json::Value` allocates for every
/// field of every item): the load generator shares the two cores with the server and
/// Postgres.
#[derive(Debug, Default, serde::Deserialize)]
struct PageHead {
    items: Option<Vec<serde::de::IgnoredAny>>,
    next_cursor: Option<String>,
}

async fn get(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
) -> anyhow::Result<(PageHead, f64)> {
    let t = Instant::now();
    let res = client
        .get(server.url(path))
        .bearer_auth(&server.admin)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = res.status();
    let body = res.bytes().await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if status != reqwest::StatusCode::OK {
        bail!(
            "GET {path}: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(500)])
        );
    }
    Ok((serde_json::from_slice(&body)?, ms))
}

fn items_and_cursor(v: &PageHead) -> (usize, Option<String>) {
    (v.items.as_ref().map_or(0, Vec::len), v.next_cursor.clone())
}

fn with_cursor(path: &str, cursor: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}cursor={cursor}")
}

/// Each page kind read `--plan-reads` times, then once more (and one cursor page) with its
/// plans captured, on a server with `--plan-connections` database connections and `auto_explain` in its session; the plans of the last reads.
async fn capture_plans(
    bin: &Path,
    db: &BenchDb,
    kinds: &[PageKind],
    args: &ScaleArgs,
) -> anyhow::Result<BTreeMap<String, Vec<StatementPlan>>> {
    let log = args.postgres_log.as_path();
    let mut plans = BTreeMap::new();
    let pool = db.pool(1).await?;
    let big: std::collections::HashSet<String> = sqlx::query_scalar(
        "select relname::text from pg_class where relkind = 'r' and reltuples > $1",
    )
    .bind(BIG_TABLE_ROWS)
    .fetch_all(&pool)
    .await?
    .into_iter()
    .collect();
    pool.close().await;
    if log.as_os_str().is_empty() || std::fs::File::open(log).is_err() {
        eprintln!(
            "scale: cannot read Postgres's log {}; plans not checked",
            log.display()
        );
        return Ok(plans);
    }
    let url = format!(
        "{}?options[session_preload_libraries]=auto_explain&options[auto_explain.log_min_duration]=0\
         &options[auto_explain.log_format]=json&options[auto_explain.log_analyze]=on\
         &options[auto_explain.log_timing]=off",
        url_with_database(&db.url, &db.name)?
    );
    let server = Server::start(
        bin,
        &url,
        &Launch {
            args: server_args(&[
                "--db-max-connections",
                &args.plan_connections.to_string(),
                "--db-acquire-timeout",
                "60s",
            ]),
            ..Launch::default()
        },
    )?;
    let client = http_client(4)?;
    // The background tasks' first round (scheduler, sweep, pruning) runs at start: let it
    // pass, so that its statements do not land among a page's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut rng = StdRng::seed_from_u64(7);
    for k in kinds {
        let path = (k.path)(&mut rng);
        let mut cursor = None;
        for _ in 0..args.plan_reads {
            let (v, _) = get(&client, &server, &path).await?;
            cursor = items_and_cursor(&v).1;
        }
        let from = log_len(log);
        let (v, _) = get(&client, &server, &path).await?;
        cursor = items_and_cursor(&v).1.or(cursor);
        if let Some(c) = cursor {
            get(&client, &server, &with_cursor(&path, &c)).await?;
        }
        // The log is written by Postgres's logger, a moment after the statement.
        let mut len = log_len(log);
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = log_len(log);
            if now == len && now > from {
                break;
            }
            len = now;
        }
        let mut found = plans_in_log(log, from)?;
        for scan in found.iter_mut().flat_map(|p| p.scans.iter_mut()) {
            scan.big = big.contains(&scan.relation);
        }
        let mut seen = std::collections::HashSet::new();
        found.retain(|p| {
            seen.insert(format!(
                "{}{:?}",
                p.query,
                p.scans
                    .iter()
                    .map(|s| (&s.node, &s.relation, &s.index))
                    .collect::<Vec<_>>()
            ))
        });
        plans.insert(k.name.clone(), found);
    }
    drop(server);
    Ok(plans)
}

fn server_args(extra: &[&str]) -> Vec<String> {
    // No scheduler tick during the run (the fixture's items would all be due): the first
    // tick only starts each policy's schedule.
    let mut args = vec!["--scheduler-interval".to_owned(), "24h".to_owned()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

#[derive(Debug, Clone)]
pub struct PageResult {
    pub name: String,
    pub first: Option<Dist>,
    pub deep: Option<Dist>,
    pub items_per_first_page: f64,
    pub plans: Vec<StatementPlan>,
}

impl PageResult {
    pub fn p99(&self) -> f64 {
        self.first
            .iter()
            .chain(self.deep.iter())
            .map(|d| d.p99)
            .fold(0.0, f64::max)
    }

    pub fn seq_scans(&self) -> Vec<&Scan> {
        self.plans
            .iter()
            .flat_map(|p| p.scans.iter())
            .filter(|s| s.big_seq_scan())
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub args: ScaleArgs,
    pub build: Option<Duration>,
    pub size: String,
    pub pages: Vec<PageResult>,
    pub requests: u64,
    pub seconds: f64,
    pub plans_checked: bool,
    pub cpu: CpuSplit,
}

impl ScaleResult {
    pub fn met(&self, p: &PageResult) -> bool {
        p.p99() < self.args.goal_ms && (!self.plans_checked || p.seq_scans().is_empty())
    }

    pub fn summary(&self) -> String {
        let met = self.pages.iter().filter(|p| self.met(p)).count();
        let mut s = format!(
            "scale: {} of {} page kinds met p99 < {} ms and no sequential scan of a big table ({} items, {} VMs, {} jobs, {} readers; {} requests in {:.0} s = {:.0}/s; fixture {}{}) [{}]",
            met,
            self.pages.len(),
            self.args.goal_ms,
            self.args.items,
            self.args.vms,
            self.args.jobs,
            self.args.readers,
            self.requests,
            self.seconds,
            self.requests as f64 / self.seconds,
            self.size,
            self.build
                .map(|b| format!(", built in {:.0} s", b.as_secs_f64()))
                .unwrap_or_else(|| ", reused".into()),
            self.cpu
        );
        for p in &self.pages {
            let d = |d: &Option<Dist>| {
                d.as_ref().map_or("-".into(), |d| {
                    format!(
                        "p50 {:.1} p99 {:.1} max {:.1} ms (n {})",
                        d.p50, d.p99, d.max, d.n
                    )
                })
            };
            s.push_str(&format!(
                "\n  {:<48} first ({:.0} items): {:<40} deep: {:<40} {}",
                p.name,
                p.items_per_first_page,
                d(&p.first),
                d(&p.deep),
                if self.met(p) { "met" } else { "NOT MET" }
            ));
            for plan in &p.plans {
                let q: String = plan.query.chars().take(70).collect();
                s.push_str(&format!(
                    "\n      {q}…\n        {}",
                    plan.scans
                        .iter()
                        .map(|s| if s.big_seq_scan() {
                            format!("**{s}**")
                        } else {
                            s.to_string()
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        }
        s
    }

    /// Table rows and details for the report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "`scale`: {} protected items over {} VMs, {} jobs, RPO vault of {} items; {} readers for {} s ({} requests, {:.0}/s); fixture {}{}. CPU: {}.\n\n",
            self.args.items,
            self.args.vms,
            self.args.jobs,
            self.args.rpo_vault_items,
            self.args.readers,
            self.args.seconds,
            self.requests,
            self.requests as f64 / self.seconds,
            self.size,
            self.build
                .map(|b| format!(", built in {:.0} s", b.as_secs_f64()))
                .unwrap_or_else(|| ", reused".into()),
            self.cpu
        ));
        s.push_str("| Page | First page p50 / p99 / max (ms) | Next pages p50 / p99 / max (ms) | Scans (plan of the page's statements) | p99 < 100 ms, no seq scan |\n");
        s.push_str("| --- | --- | --- | --- | --- |\n");
        for p in &self.pages {
            let d = |d: &Option<Dist>| {
                d.as_ref().map_or("—".into(), |d| {
                    format!("{:.1} / {:.1} / {:.1}", d.p50, d.p99, d.max)
                })
            };
            let scans = p
                .plans
                .iter()
                .flat_map(|pl| pl.scans.iter())
                .filter(|s| s.relation != "vaults" && s.relation != "policies" || s.big_seq_scan())
                .map(|s| {
                    let t = format!(
                        "{} {}{}",
                        s.node,
                        s.relation,
                        s.index
                            .as_ref()
                            .map(|i| format!(" ({i})"))
                            .unwrap_or_default()
                    );
                    if s.big_seq_scan() {
                        format!("**{t}**")
                    } else {
                        t
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                p.name,
                d(&p.first),
                d(&p.deep),
                if self.plans_checked {
                    scans
                } else {
                    "not captured".into()
                },
                if self.met(p) {
                    "**met**"
                } else {
                    "**not met**"
                }
            ));
        }
        s
    }
}

pub async fn run(admin_url: &str, args: &ScaleArgs) -> anyhow::Result<ScaleResult> {
    let bin = server_bin(args.server_bin.as_deref())?;
    eprintln!("scale: building the fixture ({})", sizes_key(args));
    let (db, built) = build_fixture(admin_url, args).await?;
    if let Some(b) = built.build {
        eprintln!(
            "scale: fixture built in {:.1} s ({})",
            b.as_secs_f64(),
            built.size
        );
    }
    let result = measure(&bin, &db, &built, args).await;
    if args.keep {
        eprintln!("scale: keeping {} (--keep)", db.name);
    } else {
        db.drop_db().await;
    }
    result
}

async fn measure(
    bin: &Path,
    db: &BenchDb,
    built: &Built,
    args: &ScaleArgs,
) -> anyhow::Result<ScaleResult> {
    let kinds = Arc::new(kinds(&built.fixture));
    if args.migrate_until.is_none() {
        // Here rather than in the server, whose start would wait for the index builds of a
        // kept fixture; how long they take is what a large deployment's upgrade waits.
        let pool = db.pool(1).await?;
        let t = Instant::now();
        backvault_store::MIGRATOR.run(&pool).await?;
        eprintln!(
            "scale: migrations applied in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        pool.close().await;
    }
    let plans = capture_plans(bin, db, &kinds, args).await?;
    let plans_checked = !plans.is_empty();
    let server = Arc::new(Server::start(
        bin,
        &db.url,
        &Launch {
            args: server_args(&[]),
            ..Launch::default()
        },
    )?);
    let client = http_client(args.readers * 2)?;
    backvault_bench::sys::wait_until_quiet().await;
    let warmup = Duration::from_secs(5);
    let started = Instant::now();
    let measure_from = started + warmup;
    let deadline = measure_from + Duration::from_secs(args.seconds);
    let cpu_before = Arc::new(std::sync::Mutex::new(None::<CpuSnapshot>));
    let mut set = tokio::task::JoinSet::new();
    for reader in 0..args.readers {
        let (kinds, client, server, cpu_before) = (
            kinds.clone(),
            client.clone(),
            server.clone(),
            cpu_before.clone(),
        );
        let deep_pages = args.deep_pages;
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(reader as u64 + 1);
            let mut samples = vec![Samples::default(); kinds.len()];
            let mut requests = 0u64;
            let mut i = reader;
            while Instant::now() < deadline {
                let kind_index = i % kinds.len();
                i += 1;
                let k = &kinds[kind_index];
                let measuring = Instant::now() >= measure_from;
                if measuring {
                    let mut c = cpu_before.lock().expect("cpu lock");
                    if c.is_none() {
                        *c = Some(CpuSnapshot::take(DB_PREFIX, Some(server.pid)));
                    }
                }
                let path = (k.path)(&mut rng);
                let (v, ms) = get(&client, &server, &path)
                    .await
                    .with_context(|| k.name.clone())?;
                requests += u64::from(measuring);
                let (n, mut cursor) = items_and_cursor(&v);
                let s = &mut samples[kind_index];
                if measuring {
                    s.first.push(ms);
                    s.items_first += n as u64;
                    if n == 0 && k.non_empty && v.items.is_some() {
                        s.empty_first += 1;
                    }
                }
                if !k.paged {
                    continue;
                }
                if let Some(jump) = &k.jump {
                    let at = jump(&mut rng);
                    let (_, ms) = get(&client, &server, &with_cursor(&path, &at.to_string()))
                        .await
                        .with_context(|| k.name.clone())?;
                    if measuring {
                        s.deep.push(ms);
                        requests += 1;
                    }
                }
                for _ in 0..deep_pages {
                    let Some(c) = cursor.take() else { break };
                    let (v, ms) = get(&client, &server, &with_cursor(&path, &c))
                        .await
                        .with_context(|| k.name.clone())?;
                    cursor = items_and_cursor(&v).1;
                    if measuring {
                        s.deep.push(ms);
                        requests += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>((samples, requests))
        });
    }
    let mut all = vec![Samples::default(); kinds.len()];
    let mut requests = 0;
    while let Some(r) = set.join_next().await {
        let (samples, n) = r??;
        requests += n;
        for (a, s) in all.iter_mut().zip(samples) {
            a.first.extend(s.first);
            a.deep.extend(s.deep);
            a.empty_first += s.empty_first;
            a.items_first += s.items_first;
        }
    }
    let seconds = measure_from.elapsed().as_secs_f64();
    let cpu = match cpu_before.lock().expect("cpu lock").take() {
        Some(before) => CpuSnapshot::take(DB_PREFIX, Some(server.pid)).since(&before),
        None => bail!("no request was measured"),
    };
    drop(server);
    let mut pages = Vec::new();
    for (k, mut s) in kinds.iter().zip(all) {
        ensure!(
            s.empty_first == 0,
            "{}: {} first pages came back empty, the fixture has items for them",
            k.name,
            s.empty_first
        );
        let n = s.first.len().max(1) as f64;
        pages.push(PageResult {
            name: k.name.clone(),
            first: dist(&mut s.first),
            deep: dist(&mut s.deep),
            items_per_first_page: s.items_first as f64 / n,
            plans: plans.get(&k.name).cloned().unwrap_or_default(),
        });
    }
    Ok(ScaleResult {
        args: args.clone(),
        build: built.build,
        size: built.size.clone(),
        pages,
        requests,
        seconds,
        plans_checked,
        cpu,
    })
}
