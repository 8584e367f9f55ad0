//! `sweep`: how fast the retention sweep (`Service::sweep_recovery_points`) removes a
//! million expired recovery points (10,000 items × a full and 99 logs), with fulls tied
//! to their last log or a second after it, and that fulls with a live dependent survive.

use std::time::Instant;

use anyhow::ensure;
use backvault_bench::db::BenchDb;
use chrono::Utc;
use clap::Parser;

use crate::quiet::wait_quiet;
use crate::{
    CpuMeter, Ctx, DB_PREFIX, bench_service, cpu_line, points_count, secs, vacuum_analyze,
};

#[derive(Parser, Clone)]
pub struct SweepArgs {
    /// Protected items holding the expired points.
    #[arg(long, default_value_t = 10_000)]
    items: u64,
    /// Points per item: one full and the rest logs depending on it.
    #[arg(long, default_value_t = 100)]
    points_per_item: u64,
}

pub async fn run(ctx: &Ctx, args: &SweepArgs) -> anyhow::Result<String> {
    let fx = BenchDb::create(&ctx.admin_url, DB_PREFIX, "sweep_fx", None).await?;
    let outcome = async {
        let expected = sweep_fixture(args, &fx).await?;
        let mut lines = Vec::new();
        for variant in [SweepVariant::AsRecorded, SweepVariant::FullsLast] {
            let copy = fx.copy("sweep_run").await?;
            let line = sweep_run(ctx, &copy, variant, expected).await;
            copy.drop_db().await;
            let line = line.unwrap_or_else(|e| format!("sweep {}: FAILED: {e:#}", variant.label()));
            println!("{line}");
            lines.push(line);
        }
        Ok::<_, anyhow::Error>(lines.join("\n"))
    }
    .await;
    fx.drop_db().await;
    outcome
}

/// Guard items: their full expired long ago, but a log depending on it is live.
const GUARD_ITEMS: i64 = 20;

#[derive(Clone, Copy)]
enum SweepVariant {
    /// Fulls' chain_until is their last log's expiry, as `fulls_extend_chain` keeps it:
    /// a full and its last log have the same delete_after.
    AsRecorded,
    /// Fulls' chain_until one second later, so each full sorts after all its logs.
    FullsLast,
}

impl SweepVariant {
    fn label(self) -> &'static str {
        match self {
            SweepVariant::AsRecorded => "as recorded (full ties its last log)",
            SweepVariant::FullsLast => "fulls 1 s after their last log",
        }
    }
}

/// Builds the fixture; returns how many points a sweep must remove.
async fn sweep_fixture(args: &SweepArgs, db: &BenchDb) -> anyhow::Result<i64> {
    let started = Instant::now();
    let pool = db.pool(4).await?;
    backvault_store::MIGRATOR.run(&pool).await?;
    let vms = (args.items / 10).max(1) as i64;
    let items = args.items as i64;
    let logs = args.points_per_item.saturating_sub(1) as i64;
    // A month ago: every point below expired days ago (7-day retention).
    let base = Utc::now() - chrono::Duration::days(30);
    let mut tx = pool.begin().await?;
    sqlx::query!("set local synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let (vault_id, policy_id) = crate::vault_and_policy(&mut tx).await?;
    // Set-based bulk seeding below: no store function writes rows by the thousand.
    // One more VM (0) for the guard items.
    sqlx::query!(
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model, vault_id)
         select ('00000001-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, 'sub-1', 'rg-bench',
                'bench-vm-' || lpad(g::text, 5, '0'), 'westeurope', 'resource_manager', $1::uuid
         from generate_series(0, $2::int8) g",
        vault_id,
        vms,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "insert into sql_instances (id, vm_id, name, version)
         select ('00000002-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid,
                ('00000001-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, 'MSSQLSERVER', '2019'
         from generate_series(0, $1::int8) g",
        vms,
    )
    .execute(&mut *tx)
    .await?;
    // Items 0..items on VMs 1..=vms; guard items -1..=-GUARD_ITEMS on VM 0.
    sqlx::query!(
        "insert into sql_databases (id, vm_id, instance_id, name, recovery_model)
         select ('00000003-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                ('00000001-0000-7000-8000-'
                 || lpad(to_hex((case when s < 0 then 0 else s % $2::int8 + 1 end) + 4294967296), 12, '0'))::uuid,
                ('00000002-0000-7000-8000-'
                 || lpad(to_hex((case when s < 0 then 0 else s % $2::int8 + 1 end) + 4294967296), 12, '0'))::uuid,
                'db' || s, 'full'
         from generate_series(-$3::int8, $1::int8 - 1) s",
        items,
        vms,
        GUARD_ITEMS,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"insert into protected_items (id, vault_id, database_id, policy_id, state, protected_name, chain)
           select ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, $2::uuid,
                  ('00000003-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, $3::uuid, 'protected',
                  'db' || s, '{"needs": "nothing"}'
           from generate_series(-$4::int8, $1::int8 - 1) s"#,
        items,
        vault_id,
        policy_id,
        GUARD_ITEMS,
    )
    .execute(&mut *tx)
    .await?;
    // Per item a full at `base` and `logs` 15-minute logs on it, each kept 7 days; the
    // full's chain_until is its last log's expiry (as fulls_extend_chain keeps it).
    // Inserted in time order, as they would have been recorded.
    sqlx::query!(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, expires_at, chain_until)
         select ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, 'full',
                $2::timestamptz, $2::timestamptz, 1000, 1005, 1000, 1073741824,
                $2::timestamptz + interval '7 days', $2::timestamptz + interval '7 days' + $3::float8 * interval '15 minutes'
         from generate_series(0, $1::int8 - 1) s",
        items,
        base,
        logs as f64,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, log_from, first_lsn,
                                      last_lsn, database_backup_lsn, size_bytes, full_id, expires_at)
         select ('00000006-0000-7000-8000-' || lpad(to_hex((k * 1000000000 + s) + 4294967296), 12, '0'))::uuid,
                ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, 'log',
                $2::timestamptz + k * interval '15 minutes', $2::timestamptz + k * interval '15 minutes',
                $2::timestamptz + (k - 1) * interval '15 minutes', 995 + k * 10, 1005 + k * 10, 1000, 1048576,
                ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                $2::timestamptz + k * interval '15 minutes' + interval '7 days'
         from generate_series(1, $3::int8) k, generate_series(0, $1::int8 - 1) s
         order by k, s",
        items,
        base,
        logs,
    )
    .execute(&mut *tx)
    .await?;
    // Guard items: an expired full with an expired and a live log. Half keep chain_until
    // as fulls_extend_chain would (the live log's expiry); half have it stale (in the
    // past), so only the sweep's own check keeps the full.
    sqlx::query!(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, expires_at, chain_until)
         select ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, 'full',
                $1::timestamptz, $1::timestamptz, 1000, 1005, 1000, 1073741824, $1::timestamptz + interval '7 days',
                case when s % 2 = 0 then now() + interval '1 day' else $1::timestamptz + interval '8 days' end
         from generate_series(-$2::int8, -1) s",
        base,
        GUARD_ITEMS,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "insert into recovery_points (id, protected_item_id, backup_type, started_at, backup_time, first_lsn, last_lsn,
                                      database_backup_lsn, size_bytes, full_id, expires_at)
         select ('00000007-0000-7000-8000-' || lpad(to_hex((s * 10 + k) + 4294967296), 12, '0'))::uuid,
                ('00000004-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid, 'log',
                $1::timestamptz + k * interval '1 day', $1::timestamptz + k * interval '1 day',
                995 + k * 10, 1005 + k * 10, 1000, 1048576,
                ('00000005-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                case when k = 1 then $1::timestamptz + interval '8 days' else now() + interval '1 day' end
         from generate_series(-$2::int8, -1) s, generate_series(1, 2) k",
        base,
        GUARD_ITEMS,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    vacuum_analyze(&pool).await?;
    let points = sqlx::query!(
        r#"select count(*) as "total!", count(*) filter (where delete_after < now()) as "expired!"
           from recovery_points"#
    )
    .fetch_one(&pool)
    .await?;
    let (total, expired) = (points.total, points.expired);
    let size = sqlx::query_scalar!(
        r#"select pg_size_pretty(pg_total_relation_size('recovery_points')) as "size!""#
    )
    .fetch_one(&pool)
    .await?;
    eprintln!(
        "sweep: fixture of {total} points ({expired} with delete_after in the past, recovery_points {size}) built in {:.1} s",
        secs(started.elapsed())
    );
    pool.close().await;
    Ok(items * (logs + 1) + GUARD_ITEMS)
}

async fn sweep_run(
    ctx: &Ctx,
    db: &BenchDb,
    variant: SweepVariant,
    expected_removed: i64,
) -> anyhow::Result<String> {
    let pool = db.pool(4).await?;
    if let SweepVariant::FullsLast = variant {
        sqlx::query!(
            "update recovery_points set chain_until = chain_until + interval '1 second'
             where backup_type = 'full' and delete_after < now()"
        )
        .execute(&pool)
        .await?;
        vacuum_analyze(&pool).await?;
    }
    let total = points_count(&pool).await?;
    let service = bench_service(pool.clone());
    let conditions = wait_quiet(ctx, "sweep").await;
    let cpu = CpuMeter::start(None);
    let t = Instant::now();
    let swept: anyhow::Result<u64> = service.sweep_recovery_points().await.map_err(Into::into);
    let took = t.elapsed();
    let split = cpu.stop();
    let cores = split.busy_cores();
    let conditions = format!("{conditions}; {}", cpu_line(&split));
    let removed = match swept {
        Ok(n) => n,
        Err(e) => {
            let left = points_count(&pool).await?;
            pool.close().await;
            let removed = total - left;
            return Ok(format!(
                "sweep {}: FAILED after {:.1} s, {removed} of {expected_removed} expired points removed ({:.0} points/s until then): {e}; {conditions}, {cores:.1} cores busy",
                variant.label(),
                secs(took),
                removed as f64 / secs(took),
            ));
        }
    };
    let left = points_count(&pool).await?;
    let guards = sqlx::query!(
        r#"select count(*) filter (where r.backup_type = 'full') as "fulls!",
                  count(*) filter (where r.backup_type = 'log' and r.expires_at > now()) as "live!"
           from recovery_points r join protected_items p on p.id = r.protected_item_id
           where p.protected_name like 'db-%'"#
    )
    .fetch_one(&pool)
    .await?;
    let (guard_fulls, guard_live) = (guards.fulls, guards.live);
    ensure!(
        removed as i64 == expected_removed,
        "the sweep removed {removed} points, expected {expected_removed}"
    );
    ensure!(
        guard_fulls == GUARD_ITEMS && guard_live == GUARD_ITEMS && left == 2 * GUARD_ITEMS,
        "after the sweep: {left} points left, {guard_fulls} guarded fulls, {guard_live} live logs (expected {}, {GUARD_ITEMS}, {GUARD_ITEMS})",
        2 * GUARD_ITEMS
    );
    pool.close().await;
    let rate = removed as f64 / secs(took);
    let line = format!(
        "sweep {}: {removed} expired points removed in {:.1} s = {rate:.0} points/s (batches of up to 10,000); {GUARD_ITEMS} fulls with a live dependent kept (half with a stale chain_until); {conditions}, {cores:.1} cores busy",
        variant.label(),
        secs(took),
    );
    Ok(line)
}
