-- The recovery chain in SQL Server's terms: every backupset fact an agent reports, the
-- chain state as the domain's state machine keeps it, and what the scheduler must heal.

alter table recovery_points
    add column checkpoint_lsn         numeric(25, 0),
    add column differential_base_lsn  numeric(25, 0),
    add column differential_base_guid uuid,
    -- msdb's identifier: a re-reported backup set is recorded once per item.
    add column backup_set_uuid        uuid,
    add column begins_log_chain       boolean,
    add column has_bulk_logged_data   boolean not null default false,
    add column recovery_model         text check (recovery_model in ('full', 'bulk_logged', 'simple')),
    add column recovery_fork_guid     uuid,
    add column fork_point_lsn         numeric(25, 0),
    add column database_guid          uuid,
    -- Why the point does not continue the chain (domain::chain::ChainBreak).
    add column chain_break            text,
    -- Checks the server could not make for lack of facts (first-version agents).
    add column unverified             text[] not null default '{}';

create unique index recovery_points_backup_set on recovery_points (protected_item_id, backup_set_uuid)
    where backup_set_uuid is not null;

alter table protected_items
    -- domain::chain::ChainState, as JSON (LSNs as decimal strings).
    add column chain              jsonb not null default '{}',
    -- The log chain broke with the differential base intact: the next log slot runs as a
    -- differential.
    add column needs_differential boolean not null default false,
    drop column last_full_first_lsn,
    drop column last_log_lsn;
