-- Vaults and their SQL backup policies.

create table vaults (
    id              uuid primary key,
    subscription_id text not null,
    resource_group  text not null,
    name            text not null,
    region          text not null,
    description     text not null default '',
    version         bigint not null default 1,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

-- Azure treats vault and resource-group names case-insensitively.
create unique index vaults_name_key on vaults (subscription_id, lower(resource_group), lower(name));

create table policies (
    id         uuid primary key,
    -- Protected items and auto-protection intents will reference policies with
    -- `on delete restrict`; the vault's own cascade removes policies only with the vault.
    vault_id   uuid not null references vaults (id) on delete cascade,
    name       text not null,
    spec       jsonb not null,
    version    bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create unique index policies_name_key on policies (vault_id, lower(name));

-- A retried create (same principal, same Idempotency-Key) returns the stored first
-- response. Rows older than a day are pruned.
create table idempotency_keys (
    subject       text not null,
    key           text not null,
    request_hash  bytea not null,
    response      jsonb,
    created_at    timestamptz not null default now(),
    primary key (subject, key)
);
