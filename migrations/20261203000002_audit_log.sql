-- The audit log: who did what, when, from where, and how it ended. Append-only: rows are
-- never updated, and only a retention purge deletes them, once they are a year old.
create table audit_events (
    -- Both stamped by the database at insert (trigger below), never by a replica's clock:
    -- ids sort by time across replicas, and no event can be backdated.
    id           uuid primary key default backvault_uuid_v7(),
    at           timestamptz not null default now(),
    -- Who: the verified token's subject, role and id (`jti`; agent tokens have none).
    -- Absent for a token that was refused, and for the server's own background work.
    subject      text,
    role         text check (role in ('admin', 'operator', 'reader', 'approver', 'auditor', 'agent', 'enrollment')),
    token_id     uuid,
    -- What: the OpenAPI operation id, or a dotted name for the server's own work
    -- (`audit_log.purge`).
    operation    text not null,
    method       text,
    -- The route template (`/v1/vaults/{vault_id}`), never the raw path.
    path         text,
    resource     text,
    request_id   text,
    -- From where: the TCP peer, and the User-Agent header as sent (cut, control
    -- characters dropped).
    client_addr  inet,
    user_agent   text,
    -- How it ended. No status: no answer was sent (the client went away, or the request
    -- timed out), so whether it took effect is unknown.
    status       int check (status between 100 and 599),
    problem_code text,
    -- `{"field": {"before": .., "after": ..}}` for the fields a change changed.
    changes      jsonb check (jsonb_typeof(changes) = 'object'),
    details      jsonb check (jsonb_typeof(details) = 'object'),
    constraint audit_events_route check ((method is null) = (path is null))
);

-- The list pages newest first by id within each filter.
create index audit_events_subject on audit_events (subject, id);
create index audit_events_token on audit_events (token_id, id) where token_id is not null;
create index audit_events_operation on audit_events (operation, id);
create index audit_events_resource on audit_events (resource, id) where resource is not null;
create index audit_events_status on audit_events (status, id);
create index audit_events_problem on audit_events (problem_code, id) where problem_code is not null;
-- Time windows of the list, and the retention purge.
create index audit_events_at on audit_events (at);

create function backvault_audit_stamp() returns trigger
    language plpgsql
    as $$
        begin
            new.id := backvault_uuid_v7();
            new.at := now();
            return new;
        end
    $$;

create trigger audit_events_stamp before insert on audit_events
    for each row execute function backvault_audit_stamp();

-- The guarantee holds for every role that is not the table's owner or a superuser (they
-- can disable triggers): docs/security.md, "Audit log", says how to deploy for that.
create function backvault_audit_append_only() returns trigger
    language plpgsql
    as $$
        begin
            raise exception 'audit_events is append-only: % is not allowed', tg_op
                using errcode = 'insufficient_privilege';
        end
    $$;

create trigger audit_events_no_update before update on audit_events
    for each statement execute function backvault_audit_append_only();

create trigger audit_events_no_truncate before truncate on audit_events
    for each statement execute function backvault_audit_append_only();

-- 365 days: the domain's `audit::MIN_RETENTION_DAYS` (crates/store/tests/audit.rs checks
-- the two agree).
create function backvault_audit_retained() returns trigger
    language plpgsql
    as $$
        begin
            if old.at > now() - interval '365 days' then
                raise exception 'audit_events keeps every event 365 days: the event % of % may not be deleted yet', old.id, old.at
                    using errcode = 'insufficient_privilege';
            end if;
            return old;
        end
    $$;

create trigger audit_events_retained before delete on audit_events
    for each row execute function backvault_audit_retained();
