-- Registration of VMs with vaults, their discovered SQL inventory, protected items and
-- auto-protection intents.

alter table vms
    add column vault_id uuid references vaults (id) on delete restrict,
    add column registered_at timestamptz,
    -- When the periodic discovery is next due; replicas claim due VMs with SKIP LOCKED.
    add column next_discovery_at timestamptz;

create index vms_vault on vms (vault_id) where vault_id is not null;
create index vms_discovery_due on vms (next_discovery_at) where vault_id is not null;

create table sql_instances (
    id         uuid primary key,
    vm_id      uuid not null references vms (id) on delete cascade,
    name       text not null,
    version    text not null,
    gone_at    timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index sql_instances_name_key on sql_instances (vm_id, lower(name));

create table availability_groups (
    id                uuid primary key,
    subscription_id   text not null,
    name              text not null,
    backup_preference text not null check (backup_preference in ('primary', 'secondary', 'any')),
    -- Replicas across VMs, as the last discovery that saw the group reported them.
    replicas          jsonb not null default '[]',
    gone_at           timestamptz,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);
create unique index availability_groups_name_key on availability_groups (subscription_id, lower(name));

create table sql_databases (
    id                    uuid primary key,
    vm_id                 uuid not null references vms (id) on delete cascade,
    instance_id           uuid not null references sql_instances (id) on delete cascade,
    availability_group_id uuid references availability_groups (id) on delete set null,
    name                  text not null,
    recovery_model        text not null check (recovery_model in ('full', 'bulk_logged', 'simple')),
    system                boolean not null default false,
    read_only             boolean not null default false,
    size_bytes            bigint not null default 0,
    -- Set when a discovery no longer reports the database; its history is kept.
    gone_at               timestamptz,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now()
);
-- Exact names: SQL Server allows two databases differing only by case (we flag them).
create unique index sql_databases_name_key on sql_databases (instance_id, name);

create table auto_protection_intents (
    id                    uuid primary key,
    vault_id              uuid not null references vaults (id) on delete restrict,
    policy_id             uuid not null references policies (id) on delete restrict,
    instance_id           uuid references sql_instances (id) on delete cascade,
    availability_group_id uuid references availability_groups (id) on delete cascade,
    created_at            timestamptz not null default now(),
    constraint auto_protection_one_target check ((instance_id is null) <> (availability_group_id is null))
);
create unique index auto_protection_instance_key on auto_protection_intents (instance_id) where instance_id is not null;
create unique index auto_protection_ag_key on auto_protection_intents (availability_group_id) where availability_group_id is not null;

create table protected_items (
    id                   uuid primary key,
    vault_id             uuid not null references vaults (id) on delete restrict,
    -- One vault per database: a database is protected at most once.
    database_id          uuid not null references sql_databases (id) on delete restrict,
    policy_id            uuid references policies (id) on delete restrict,
    state                text not null check (state in ('protecting', 'protected', 'protection_failed',
                                                        'stopped_retain', 'stopped_retain_per_policy')),
    auto_protection_id   uuid references auto_protection_intents (id) on delete set null,
    -- Survives disabling the intent: the item was protected by auto-protection.
    auto_protected       boolean not null default false,
    -- The name as protected; a later discovery with another casing is flagged, not renamed.
    protected_name       text not null,
    casing_changed       boolean not null default false,
    version              bigint not null default 1,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    constraint protected_items_database_key unique (database_id),
    constraint protected_items_policy_while_protected check (state like 'stopped%' or policy_id is not null)
);
create index protected_items_vault on protected_items (vault_id, id);
