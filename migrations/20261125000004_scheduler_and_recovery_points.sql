-- Scheduling state per protected item, and recovery points with their recovery chain.

alter table protected_items
    -- The next slot of each backup type; null until the scheduler first sees the item
    -- (then set to the next slot after that moment: no backup fires on creation).
    add column next_full_at         timestamptz,
    add column next_differential_at timestamptz,
    add column next_log_at          timestamptz,
    -- A job of that type is queued or running: a due slot is coalesced, not stacked.
    add column full_pending         boolean not null default false,
    add column differential_pending boolean not null default false,
    add column log_pending          boolean not null default false,
    -- No usable full in the chain (new item, or a broken log chain): the next scheduled
    -- backup of any type runs as a full.
    add column needs_full           boolean not null default true,
    add column last_full_id         uuid,
    add column last_full_first_lsn  numeric(40, 0),
    add column last_log_lsn         numeric(40, 0),
    add column last_full_at         timestamptz,
    add column last_differential_at timestamptz,
    add column last_log_at          timestamptz;

create index protected_items_policy on protected_items (policy_id) where state = 'protected';

create table recovery_points (
    id                  uuid primary key,
    protected_item_id   uuid not null references protected_items (id) on delete cascade,
    job_id              uuid,
    backup_type         text not null check (backup_type in ('full', 'copy_only_full', 'differential', 'log')),
    started_at          timestamptz not null,
    backup_time         timestamptz not null,
    -- A log point restores to any instant in (log_from, backup_time].
    log_from            timestamptz,
    first_lsn           numeric(40, 0) not null,
    last_lsn            numeric(40, 0) not null,
    database_backup_lsn numeric(40, 0) not null,
    size_bytes          bigint not null,
    -- The full this point restores on top of (differentials and logs).
    -- NO ACTION (checked at the end of the statement): a sweep may delete a full together
    -- with its expired dependents, never a full a live point still needs.
    full_id             uuid references recovery_points (id),
    -- The point's own expiry; null while retained without a policy.
    expires_at          timestamptz,
    -- On-demand and copy-only fulls carry their own retention; policy changes leave them be.
    fixed_retention     boolean not null default false,
    -- For a full: kept at least this long because of the points that depend on it.
    chain_until         timestamptz,
    -- The log chain broke before this point (another tool took a log backup).
    chain_gap           boolean not null default false,
    created_at          timestamptz not null default now(),
    -- When the sweep may remove it: never while retained without expiry.
    delete_after        timestamptz generated always as (
        case when expires_at is null then null else greatest(expires_at, coalesce(chain_until, expires_at)) end
    ) stored
);

create index recovery_points_item_time on recovery_points (protected_item_id, backup_time);
create index recovery_points_full on recovery_points (full_id) where full_id is not null;
create index recovery_points_delete_after on recovery_points (delete_after) where delete_after is not null;
