//! Set-based seeding of large fixtures: VMs with one SQL instance each and databases spread
//! evenly over them, shared by the `recovery tick` and `backvault-bench scale` fixtures.
//!
//! Fixture ids are ascending per kind of row, as UUIDv7s created one after another would be
//! (random ids would scatter every index insert, which real ids do not): id `n` of kind `k`
//! is `0000000k-0000-7000-8000-<n + 2^32 in 12 hex digits>` ([`fixture_id`]), written out in
//! each statement as `('0000000k-0000-7000-8000-' || lpad(to_hex(n + 4294967296), 12, '0'))::uuid`.
//! Kinds: 1 VM, 2 SQL instance, 3 database, 4 protected item, 5 full recovery point.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Id `n` of fixture row kind `kind` (see the module documentation).
pub fn fixture_id(kind: u8, n: i64) -> Uuid {
    format!("{kind:08x}-0000-7000-8000-{:012x}", n + (1 << 32))
        .parse()
        .expect("a well-formed fixture id")
}

/// A block of the inventory: VMs `first_vm..first_vm + vms` (numbered from 1) registered
/// with `vault_id`, and databases `first_db..first_db + databases` (numbered from 0) spread
/// evenly over them: database `s` is on VM `first_vm + (s - first_db) * vms / databases`.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub vault_id: Uuid,
    pub first_vm: i64,
    pub vms: i64,
    pub first_db: i64,
    pub databases: i64,
}

impl Block {
    /// The VM (its number) database `s` of this block is on, as the seeding computes it.
    pub fn vm_of(&self, s: i64) -> i64 {
        self.first_vm + (s - self.first_db) * self.vms / self.databases
    }
}

/// Inserts the block's VMs (one `MSSQLSERVER` instance each, agent heard at `now`, next
/// discovery 8 hours later) and databases (full recovery model, 1 GiB).
pub async fn seed_inventory(
    conn: &mut PgConnection,
    b: Block,
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    // Set-based bulk seeding: no store function writes rows by the thousand.
    sqlx::query(
        "insert into vms (id, subscription_id, resource_group, name, region, deployment_model, agent_installed,
                          agent_version, dotnet_version, sql_iaas_extension, last_seen_at, vault_id, registered_at,
                          next_discovery_at)
         select ('00000001-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, 'sub-1', 'rg-bench',
                'bench-vm-' || lpad(g::text, 5, '0'), 'westeurope', 'resource_manager', true, '1.0.0', '4.8', true,
                $2::timestamptz, $1::uuid, $2::timestamptz, $2::timestamptz + interval '8 hours'
         from generate_series($3::int8, $3::int8 + $4::int8 - 1) g",
    )
    .bind(b.vault_id)
    .bind(now)
    .bind(b.first_vm)
    .bind(b.vms)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "insert into sql_instances (id, vm_id, name, version)
         select ('00000002-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid,
                ('00000001-0000-7000-8000-' || lpad(to_hex(g + 4294967296), 12, '0'))::uuid, 'MSSQLSERVER', '2019'
         from generate_series($1::int8, $1::int8 + $2::int8 - 1) g",
    )
    .bind(b.first_vm)
    .bind(b.vms)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "insert into sql_databases (id, vm_id, instance_id, name, recovery_model, size_bytes)
         select ('00000003-0000-7000-8000-' || lpad(to_hex(s + 4294967296), 12, '0'))::uuid,
                ('00000001-0000-7000-8000-' || lpad(to_hex(v + 4294967296), 12, '0'))::uuid,
                ('00000002-0000-7000-8000-' || lpad(to_hex(v + 4294967296), 12, '0'))::uuid,
                'db' || lpad(s::text, 7, '0'), 'full', 1073741824
         from generate_series($1::int8, $1::int8 + $2::int8 - 1) s,
              lateral (select $3::int8 + (s - $1::int8) * $4::int8 / $2::int8 as v) vm",
    )
    .bind(b.first_db)
    .bind(b.databases)
    .bind(b.first_vm)
    .bind(b.vms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_sql_formula() {
        assert_eq!(
            fixture_id(4, 7).to_string(),
            "00000004-0000-7000-8000-000100000007"
        );
    }

    #[test]
    fn databases_spread_evenly() {
        let b = Block {
            vault_id: Uuid::nil(),
            first_vm: 1,
            vms: 20_000,
            first_db: 0,
            databases: 1_000_000,
        };
        assert_eq!(b.vm_of(0), 1);
        assert_eq!(b.vm_of(49), 1);
        assert_eq!(b.vm_of(50), 2);
        assert_eq!(b.vm_of(999_999), 20_000);
    }
}
