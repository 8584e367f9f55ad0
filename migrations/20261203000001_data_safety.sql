-- Data safety (docs/security.md): soft delete, vault immutability (lock), retention bounds,
-- guards (multi-user authorization) and their approvals. The rules are
-- `domain::safety`; the columns' value sets are tested against its enums.

create table guards (
    id              uuid primary key,
    subscription_id text not null,
    name            text not null,
    -- The operations beyond the always-guarded ones that need an approval.
    operations      text[] not null default '{}'
        check (operations <@ array['stop_protection_delete_data', 'shorten_retention', 'unregister_vm',
                                   'delete_vault']::text[]),
    created_at      timestamptz not null default now()
);
create unique index guards_name_key on guards (subscription_id, lower(name));

alter table vaults
    add column soft_delete text not null default 'enabled'
        check (soft_delete in ('enabled', 'disabled', 'always_on')),
    add column soft_delete_days int not null default 14 check (soft_delete_days between 14 and 180),
    add column immutability text not null default 'disabled'
        check (immutability in ('disabled', 'enabled', 'locked')),
    add column locked_at timestamptz,
    add column min_retention_days int check (min_retention_days between 1 and 36159),
    add column max_retention_days int check (max_retention_days between 1 and 36159),
    add column guard_id uuid references guards (id) on delete restrict,
    add constraint vaults_lock_has_time check ((immutability = 'locked') = (locked_at is not null));

-- A lock past its cooling-off window holds whatever the application says: no statement
-- may unlock the vault or change its bounds, and none may delete it while it holds points
-- (that refusal is the foreign keys', below).
create function backvault_vault_lock_guard() returns trigger language plpgsql as $$
begin
    if old.immutability = 'locked' and old.locked_at + interval '72 hours' <= now()
       and (new.immutability <> 'locked' or new.locked_at is distinct from old.locked_at
            or new.min_retention_days is distinct from old.min_retention_days
            or new.max_retention_days is distinct from old.max_retention_days) then
        raise exception 'vault % is locked', old.id using errcode = 'P0001', constraint = 'vault_locked';
    end if;
    if old.soft_delete = 'always_on' and new.soft_delete <> 'always_on' then
        raise exception 'soft delete is always on for vault %', old.id
            using errcode = 'P0001', constraint = 'soft_delete_always_on';
    end if;
    return new;
end $$;
create trigger vaults_lock_guard before update on vaults
    for each row execute function backvault_vault_lock_guard();

create table approvals (
    id           uuid primary key,
    vault_id     uuid not null references vaults (id) on delete cascade,
    guard_id     uuid not null references guards (id) on delete cascade,
    operation    text not null check (operation in ('disable_soft_delete', 'disable_immutability', 'remove_guard',
                                                    'stop_protection_delete_data', 'shorten_retention',
                                                    'unregister_vm', 'delete_vault')),
    resource_id  uuid not null,
    requested_by text not null,
    requested_at timestamptz not null default now(),
    reason       text not null default '',
    status       text not null default 'pending' check (status in ('pending', 'granted', 'denied', 'used')),
    decided_by   text,
    decided_at   timestamptz,
    -- Pending: when the request lapses; granted: when the grant does.
    expires_at   timestamptz not null,
    used_at      timestamptz,
    constraint approvals_decided check ((status = 'pending') = (decided_by is null)),
    constraint approvals_not_self check (decided_by is distinct from requested_by)
);
create index approvals_vault on approvals (vault_id, id);

-- Soft-deleted items: stopped by a user's deletion, kept until `purge_after`.
alter table protected_items drop constraint protected_items_state_check;
alter table protected_items
    add constraint protected_items_state_check
        check (state in ('protecting', 'protected', 'protection_failed', 'stopped_retain',
                         'stopped_retain_per_policy', 'soft_deleted')),
    add column deleted_at timestamptz,
    add column purge_after timestamptz,
    add constraint protected_items_soft_deleted_until check ((state = 'soft_deleted') = (purge_after is not null));
create index protected_items_purge on protected_items (purge_after) where purge_after is not null;

-- What the purge removed, so that a late undelete is told the data is gone (410), not
-- that it never existed.
create table purged_items (
    id        uuid primary key,
    vault_id  uuid not null,
    purged_at timestamptz not null default now()
);

-- Immutability holds below the application too: a statement that deletes a recovery point
-- of an immutable vault before the point may go, or brings its expiry forward, fails.
-- Statement-level with transition tables: one check per statement, so the retention sweep
-- pays once per batch, not once per point.
create function backvault_points_immutable_delete() returns trigger language plpgsql as $$
begin
    if exists (select 1 from gone g
               join protected_items p on p.id = g.protected_item_id
               join vaults v on v.id = p.vault_id
               where v.immutability <> 'disabled'
                 and (g.delete_after is null or g.delete_after > now())) then
        raise exception 'recovery points of an immutable vault are kept until they expire'
            using errcode = 'P0001', constraint = 'recovery_point_immutable';
    end if;
    return null;
end $$;
create trigger recovery_points_immutable_delete after delete on recovery_points
    referencing old table as gone for each statement
    execute function backvault_points_immutable_delete();

create function backvault_points_immutable_update() returns trigger language plpgsql as $$
begin
    if exists (select 1 from before_change o
               join after_change n on n.id = o.id
               join protected_items p on p.id = n.protected_item_id
               join vaults v on v.id = p.vault_id
               where v.immutability <> 'disabled'
                 and (o.expires_at is null and n.expires_at is not null
                      or n.expires_at < o.expires_at)) then
        raise exception 'an immutable vault never brings a recovery point''s expiry forward'
            using errcode = 'P0001', constraint = 'recovery_point_immutable';
    end if;
    return null;
end $$;
create trigger recovery_points_immutable_update after update on recovery_points
    referencing old table as before_change new table as after_change for each statement
    execute function backvault_points_immutable_update();
