-- The VM inventory, jobs (the history users see) and the dispatch queue (the hot rows
-- agents claim).

create table vms (
    id                   uuid primary key,
    subscription_id      text not null,
    resource_group       text not null,
    name                 text not null,
    region               text not null,
    deployment_model     text not null check (deployment_model in ('resource_manager', 'classic')),
    agent_installed      boolean not null default false,
    agent_version        text,
    dotnet_version       text,
    sql_iaas_extension   boolean not null default false,
    other_backup_product boolean not null default false,
    last_seen_at         timestamptz,
    -- Bumped by every enrollment: agent tokens carry it, so older tokens stop working.
    token_generation     bigint not null default 0,
    version              bigint not null default 1,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now()
);

-- Several VMs may share a name in different resource groups, not in one.
create unique index vms_identity_key on vms (subscription_id, lower(resource_group), lower(name));

create table jobs (
    id               uuid primary key,
    vm_id            uuid not null references vms (id) on delete cascade,
    subscription_id  text not null,
    vault_id         uuid references vaults (id) on delete set null,
    kind             text not null check (kind in ('discovery', 'configure_protection', 'backup_full',
                                                   'backup_differential', 'backup_log', 'restore')),
    status           text not null check (status in ('queued', 'in_progress', 'completed',
                                                     'completed_with_warnings', 'failed', 'cancelled')),
    priority         smallint not null,
    items            jsonb not null default '[]',
    payload          jsonb not null default '{}',
    result           jsonb,
    warnings         jsonb not null default '[]',
    error_code       text,
    error_message    text,
    attempts         int not null default 0,
    max_attempts     int not null,
    cancel_requested boolean not null default false,
    created_at       timestamptz not null default now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz not null default now(),
    constraint jobs_items_at_most_50 check (jsonb_array_length(items) <= 50)
);

create index jobs_vm_created on jobs (vm_id, created_at desc);
create index jobs_status_created on jobs (status, created_at desc);
create index jobs_finished on jobs (finished_at) where finished_at is not null;

create table job_attempts (
    job_id        uuid not null references jobs (id) on delete cascade,
    attempt       int not null,
    lease         bigint not null,
    started_at    timestamptz not null,
    ended_at      timestamptz,
    outcome       text check (outcome in ('completed', 'failed', 'lease_expired', 'cancelled')),
    error_code    text,
    error_message text,
    primary key (job_id, attempt)
);

-- Only pending and running jobs live here; finished ones are deleted, so the table stays
-- as small as the backlog. Heartbeats touch only unindexed columns (HOT updates).
create table job_queue (
    job_id           uuid primary key references jobs (id) on delete cascade,
    vm_id            uuid not null,
    kind             text not null,
    priority         smallint not null,
    run_at           timestamptz not null,
    running          boolean not null default false,
    lease            bigint not null default 0,
    lease_expires_at timestamptz,
    attempt          int not null default 0,
    max_attempts     int not null,
    cancel_requested boolean not null default false,
    progress         jsonb
) with (fillfactor = 70);

create index job_queue_claimable on job_queue (vm_id, priority, run_at) where not running;
create index job_queue_running on job_queue (vm_id) where running;
