-- Enrollment tokens on record. A token's `jti` is its row's id: enrollment consumes one of
-- its uses in the enrolling transaction, so a single-use token enrolls one VM however many
-- requests race with it, and an admin can list and revoke what is outstanding. The token
-- itself is never stored.
create table enrollment_tokens (
    id              uuid        primary key,
    subscription_id text        not null,
    -- Bound to one VM (both set): only that VM may enroll with it, and it may re-enroll a
    -- VM that already has an agent (a reinstalled one), replacing that agent's token.
    vm_name         text,
    resource_group  text,
    created_by      text        not null,
    created_at      timestamptz not null default now(),
    expires_at      timestamptz not null,
    max_uses        integer     not null default 1 check (max_uses between 1 and 100),
    uses            integer     not null default 0 check (uses between 0 and max_uses),
    revoked_at      timestamptz,
    check ((vm_name is null) = (resource_group is null))
);

-- Pruning finds long-expired tokens by expiry.
create index enrollment_tokens_expires_at on enrollment_tokens (expires_at);

-- Revoked user tokens by `jti`, kept until the latest the token could expire; every
-- replica holds the live rows in memory and learns of new ones through NOTIFY.
create table revoked_tokens (
    jti        uuid        primary key,
    expires_at timestamptz not null,
    revoked_by text        not null,
    revoked_at timestamptz not null default now()
);

create index revoked_tokens_expires_at on revoked_tokens (expires_at);
