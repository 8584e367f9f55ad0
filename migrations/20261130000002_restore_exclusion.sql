-- A restore's target on its queue row: the instance and database its payload names (else
-- its item's), so that
--  * at most one restore per target (VM, instance, database, ignoring case) is queued or
--    running: a second one is refused (`restore_in_progress`), by this unique index even
--    when two requests race;
--  * claims keep a backup of a database waiting while a restore of it is queued or
--    running, and a restore waiting while a backup of its database runs.
alter table job_queue add column target_instance text, add column target_database text;

-- Restores queued before this migration: the first of each target gets it (duplicates
-- from before the rule keep none and run as they were enqueued).
with targets as (
    select q.job_id, q.vm_id,
           coalesce(j.payload->>'target_instance', j.items->0->>'instance') as target_instance,
           coalesce(j.payload->>'target_database', j.items->0->>'database') as target_database
    from job_queue q join jobs j on j.id = q.job_id
    where q.kind = 'restore'
), firsts as (
    select distinct on (vm_id, lower(target_instance), lower(target_database))
           job_id, target_instance, target_database
    from targets
    order by vm_id, lower(target_instance), lower(target_database), job_id
)
update job_queue q set target_instance = f.target_instance, target_database = f.target_database
from firsts f where q.job_id = f.job_id;

create unique index job_queue_one_restore_per_target
    on job_queue (vm_id, lower(target_instance), lower(target_database))
    where kind = 'restore';
