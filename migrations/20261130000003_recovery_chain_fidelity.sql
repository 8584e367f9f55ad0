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

-- Points flagged before the reason was recorded.
update recovery_points set chain_break = case backup_type when 'differential' then 'differential_base_unknown'
                                                          else 'log_chain_broken' end
where chain_gap;

alter table recovery_points
    drop column chain_gap,
    add column chain_gap boolean generated always as (chain_break is not null) stored;

create unique index recovery_points_backup_set on recovery_points (protected_item_id, backup_set_uuid)
    where backup_set_uuid is not null;

-- domain::chain::ChainState, as JSON (LSNs as decimal strings). An empty chain needs a
-- full, as a new item does.
alter table protected_items add column chain jsonb not null default '{}';

-- Items protected before: their latest full is the differential base, their latest log
-- (or that full's end, before any log) where the next log continues.
update protected_items p set chain = jsonb_strip_nulls(jsonb_build_object(
    'base', (select jsonb_build_object('point_id', f.id, 'first_lsn', f.first_lsn::text, 'last_lsn', f.last_lsn::text)
             from recovery_points f where f.id = p.last_full_id),
    'log_end', p.last_log_lsn::text,
    'log_anchored', p.last_log_lsn is not null and p.last_full_id is not null,
    'anchor', (select f.last_lsn::text from recovery_points f where f.id = p.last_full_id),
    'needs', case when p.needs_full then 'full' else 'nothing' end));

-- What the scheduler acts on, derived from the chain so the two cannot disagree: no
-- usable full (the next backup of any type is a full), or a broken log chain with the
-- differential base intact (the next log slot runs as a differential).
alter table protected_items
    drop column last_full_first_lsn,
    drop column last_log_lsn,
    drop column needs_full,
    add column needs_full boolean generated always as (coalesce(chain ->> 'needs', 'full') = 'full') stored,
    add column needs_differential boolean generated always as (coalesce(chain ->> 'needs', 'full') = 'differential') stored;
