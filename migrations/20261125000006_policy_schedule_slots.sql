-- Slot cursors per policy and backup type instead of per protected item: a scheduler tick
-- then writes only the jobs it enqueues, not a row per protected database. Whether a
-- database's previous scheduled job of a type is still queued or running is read from the
-- queue itself, so the per-item pending flags go too.

alter table protected_items
    drop column next_full_at,
    drop column next_differential_at,
    drop column next_log_at,
    drop column full_pending,
    drop column differential_pending,
    drop column log_pending;

-- Every slot a policy fired, per backup type. The primary key is what makes a duplicate
-- impossible: a replica claims a slot by inserting its row, and a second replica racing
-- for the same slot conflicts and does nothing. The newest row of a policy and type holds
-- the next slot; a row at '-infinity' only starts the schedule (a policy seen for the
-- first time, or one whose schedule changed, waits for its next slot).
create table schedule_slots (
    policy_id uuid        not null references policies (id) on delete cascade,
    kind      text        not null check (kind in ('backup_full', 'backup_differential', 'backup_log')),
    -- The slot fired; after downtime, the first one missed (the missed ones fire once).
    slot_at   timestamptz not null,
    next_at   timestamptz not null,
    fired_at  timestamptz not null default now(),
    jobs      int         not null default 0,
    items     int         not null default 0,
    primary key (policy_id, kind, slot_at)
);

-- The job (from 0) of the i-th of n items split evenly into jobs of at most max_items:
-- the domain crate's `batch_of`, for set-based statements. Plain SQL so it is inlined.
create function backvault_batch_of(i bigint, n bigint, max_items int) returns bigint
    language sql immutable parallel safe
    as $$ select i * ((n + max_items - 1) / max_items) / n $$;

-- A time-ordered UUID (version 7), as the service makes them, for rows made in SQL: job
-- ids sort by creation, which the jobs list relies on.
create function backvault_uuid_v7() returns uuid
    language sql volatile parallel safe
    as $$
        select encode(
            set_bit(set_bit(
                overlay(uuid_send(gen_random_uuid())
                        placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::int8) from 3)
                        from 1 for 6),
                52, 1), 53, 1),
            'hex')::uuid
    $$;
