-- Availability groups become what an administrator protects (docs/rules.md, "Availability
-- groups"): a group is known by its group id, each VM reports its own replica, and a group
-- database exists once, however many replicas report it, and is protected at most once.
--
-- Data migrated:
--  * A group keeps its row; its own id stands in for the group id no agent reported yet
--    (agents that predate group ids are matched by name, service `inventory`).
--  * `secondary` becomes `prefer_secondary` and `any` becomes `any_replica`: the same
--    SQL Server settings (`SECONDARY`, `NONE`) under the names the API now uses.
--  * Each VM whose databases were in a group becomes a replica: primary where the group's
--    replica list said so (the first such VM when several did), else secondary; healthy,
--    priority 50 (SQL Server's default) until its next discovery says otherwise.
--  * Rows that stood for the same group database (same group, same name) now share one
--    `ag_databases` row. Where more than one of them was protected, one item survives: a
--    protecting one before a stopped one, then the one with the latest recovery point,
--    then the oldest. The others' recovery points move to it (a backup set it already
--    holds is not duplicated), their unfinished jobs now name it, and they are deleted.
--    The survivor is attached to the primary's copy where the primary reports one.

alter table availability_groups add column group_id uuid;
update availability_groups set group_id = id;
alter table availability_groups alter column group_id set not null;
drop index availability_groups_name_key;
create unique index availability_groups_group_key on availability_groups (subscription_id, group_id);
create index availability_groups_name on availability_groups (subscription_id, lower(name));

alter table availability_groups drop constraint availability_groups_backup_preference_check;
update availability_groups
set backup_preference = case backup_preference when 'secondary' then 'prefer_secondary'
                                               when 'any' then 'any_replica'
                                               else backup_preference end;
alter table availability_groups add constraint availability_groups_backup_preference_check
    check (backup_preference in ('primary', 'secondary_only', 'prefer_secondary', 'any_replica'));

-- Where each backup of the group's databases goes now (`domain::availability::route`):
-- full and differential to `primary_vm_id`, log and copy-only full to `preferred_vm_id`;
-- when none can take it, the column is null and `*_unroutable` says why (the failed job's
-- message). Refreshed by every discovery of a replica and every scheduler tick.
alter table availability_groups
    add column primary_vm_id uuid references vms (id) on delete set null,
    add column primary_unroutable text,
    add column preferred_vm_id uuid references vms (id) on delete set null,
    add column preferred_unroutable text,
    add column routed_at timestamptz;

-- The twin of `domain::availability::placement` (tested against it): SQL Server takes full
-- (not copy-only) and differential backups on the primary only.
create function backvault_backup_placement(kind text, copy_only boolean) returns text
    language sql immutable parallel safe
    as $$ select case when kind = 'backup_log' or (kind = 'backup_full' and copy_only) then 'preferred'
                      else 'primary_only' end $$;

create table ag_replicas (
    availability_group_id  uuid not null references availability_groups (id) on delete cascade,
    vm_id                  uuid not null references vms (id) on delete cascade,
    instance_id            uuid not null references sql_instances (id) on delete cascade,
    role                   text not null check (role in ('primary', 'secondary', 'resolving')),
    synchronization_health text not null check (synchronization_health in ('healthy', 'partially_healthy', 'not_healthy')),
    backup_priority        smallint not null check (backup_priority between 0 and 100),
    reported_at            timestamptz not null default now(),
    primary key (availability_group_id, vm_id)
);
create index ag_replicas_vm on ag_replicas (vm_id);

insert into ag_replicas (availability_group_id, vm_id, instance_id, role, synchronization_health, backup_priority)
select distinct on (d.availability_group_id, d.vm_id)
       d.availability_group_id, d.vm_id, d.instance_id,
       case when exists (select 1 from jsonb_array_elements(ag.replicas) r
                         where lower(r ->> 'vm_name') = lower(v.name)
                           and lower(r ->> 'resource_group') = lower(v.resource_group)
                           and coalesce((r ->> 'primary')::boolean, false))
            then 'primary' else 'secondary' end,
       'healthy', 50
from sql_databases d
join availability_groups ag on ag.id = d.availability_group_id
join vms v on v.id = d.vm_id
where d.gone_at is null
order by d.availability_group_id, d.vm_id, d.id;

update ag_replicas r set role = 'secondary'
where role = 'primary'
  and exists (select 1 from ag_replicas o
              where o.availability_group_id = r.availability_group_id and o.role = 'primary'
                and o.vm_id < r.vm_id);

-- A group has one primary: a VM that reports itself primary demotes any other that last did.
create unique index ag_replicas_one_primary on ag_replicas (availability_group_id) where role = 'primary';

create table ag_databases (
    id                    uuid primary key,
    availability_group_id uuid not null references availability_groups (id) on delete cascade,
    name                  text not null,
    created_at            timestamptz not null default now()
);
create unique index ag_databases_name_key on ag_databases (availability_group_id, name);

insert into ag_databases (id, availability_group_id, name)
select backvault_uuid_v7(), availability_group_id, name
from sql_databases
where availability_group_id is not null
group by availability_group_id, name;

-- Each replica's copy points at its group database. `item_key` is what a protected item
-- protects: the group database for a copy in a group, else the database itself.
alter table sql_databases add column ag_database_id uuid references ag_databases (id) on delete restrict;
create index sql_databases_ag_database on sql_databases (ag_database_id) where ag_database_id is not null;

create temporary table ag_item_merge as
select p.id as item_id, a.id as ag_database_id,
       row_number() over (partition by a.id
                          order by (p.state not like 'stopped%') desc,
                                   (select max(rp.backup_time) from recovery_points rp
                                    where rp.protected_item_id = p.id) desc nulls last,
                                   p.created_at, p.id) as rank
from protected_items p
join sql_databases d on d.id = p.database_id
join ag_databases a on a.availability_group_id = d.availability_group_id and a.name = d.name;

create temporary table ag_item_survivor as
select l.item_id as loser, s.item_id as survivor
from ag_item_merge l
join ag_item_merge s on s.ag_database_id = l.ag_database_id and s.rank = 1
where l.rank > 1;

update recovery_points rp set protected_item_id = m.survivor
from ag_item_survivor m
where rp.protected_item_id = m.loser
  and not exists (select 1 from recovery_points kept
                  where kept.protected_item_id = m.survivor and kept.backup_set_uuid = rp.backup_set_uuid);

update jobs j
set items = (select jsonb_agg(case when m.survivor is null then e
                                   else jsonb_set(e, '{protected_item_id}', to_jsonb(m.survivor)) end
                              order by x.n)
             from jsonb_array_elements(j.items) with ordinality as x (e, n)
             left join ag_item_survivor m on m.loser::text = e ->> 'protected_item_id')
where j.status in ('queued', 'in_progress')
  and exists (select 1 from jsonb_array_elements(j.items) e
              join ag_item_survivor m on m.loser::text = e ->> 'protected_item_id');

delete from protected_items p using ag_item_survivor m where p.id = m.loser;

update sql_databases d set ag_database_id = a.id
from ag_databases a
where a.availability_group_id = d.availability_group_id and a.name = d.name;

update protected_items p set database_id = primary_copy.id
from sql_databases d, sql_databases primary_copy, ag_replicas r
where d.id = p.database_id and d.ag_database_id is not null
  and primary_copy.ag_database_id = d.ag_database_id and primary_copy.gone_at is null
  and r.availability_group_id = primary_copy.availability_group_id and r.vm_id = primary_copy.vm_id
  and r.role = 'primary';

drop table ag_item_survivor, ag_item_merge;

alter table sql_databases
    add column item_key uuid generated always as (coalesce(ag_database_id, id)) stored,
    add constraint sql_databases_item_key unique (id, item_key);
create index sql_databases_item_key_lookup on sql_databases (item_key);

-- The database-level guarantee against double protection: an item protects one item key,
-- and its database row must carry that key, so no replica's copy of a group database can
-- be protected beside the group database itself. ON UPDATE CASCADE: a database joining or
-- leaving a group takes its item along (history kept).
alter table protected_items add column item_key uuid;
update protected_items p set item_key = d.item_key from sql_databases d where d.id = p.database_id;
alter table protected_items
    alter column item_key set not null,
    drop constraint protected_items_database_key,
    add constraint protected_items_item_key unique (item_key),
    add constraint protected_items_database_item_key foreign key (database_id, item_key)
        references sql_databases (id, item_key) on update cascade;
create index protected_items_database on protected_items (database_id);

-- Where each backup ran (the VM whose agent took it), and per item where each type last
-- ran: for a group database, which replica.
alter table recovery_points add column vm_id uuid;
alter table protected_items add column last_backup_vms jsonb not null default '{}';

-- Jobs of a group's databases are per group, so that a failover re-routes whole jobs.
alter table jobs add column availability_group_id uuid references availability_groups (id) on delete set null;
create index jobs_availability_group_queued on jobs (availability_group_id)
    where availability_group_id is not null and status in ('queued', 'in_progress');

-- The replica list is the primary's; the preference, too.
comment on column availability_groups.replicas is
    'Every replica (vm_name, resource_group, instance) as the last primary (or first reporter) listed them.';
