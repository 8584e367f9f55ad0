-- Indexes for every list page at scale (1M protected items, 10M jobs): each filter of a
-- list reads an index in the list's order, so a page reads about as many rows as it shows,
-- however deep it is and however rare the filter's value.
--
-- On a large existing database these statements lock writes to their table while the index
-- builds (minutes for 10M jobs): sqlx runs a migration in a transaction, where `create
-- index concurrently` is not allowed. To avoid the pause, an operator can build the same
-- indexes beforehand with `create index concurrently if not exists` under these names; the
-- statements below then do nothing but the drops.

-- Jobs are listed newest first by (created_at, id). One index per filter with that order
-- behind the filter's column; a time window is a range of `jobs_created`. The columns are
-- set at creation and never change, except `status` (and `vm_id` of a queued group job
-- moved to another replica), whose indexes replace the old (status, created_at) and
-- (vm_id, created_at) ones. `jobs_finished` goes: pruning walks `jobs_created` instead
-- (a job finished before the cutoff was created before it), so completing a job no longer
-- changes an indexed column besides `status`.
drop index if exists jobs_status_created;
drop index if exists jobs_vm_created;
drop index if exists jobs_finished;
create index if not exists jobs_created on jobs (created_at, id);
create index if not exists jobs_status_created_id on jobs (status, created_at, id);
create index if not exists jobs_kind_created on jobs (kind, created_at, id);
create index if not exists jobs_vm_created_id on jobs (vm_id, created_at, id);

-- Protected items of a vault in id order, per state and per policy (a policy belongs to
-- one vault). Neither column changes when a backup is recorded.
create index if not exists protected_items_vault_state on protected_items (vault_id, state, id);
create index if not exists protected_items_policy_id on protected_items (policy_id, id);

-- The databases of a VM (the items filter by VM, a VM's inventory, the cascade when a VM
-- goes) and of an availability group.
create index if not exists sql_databases_vm on sql_databases (vm_id);
create index if not exists sql_databases_availability_group on sql_databases (availability_group_id)
    where availability_group_id is not null;
