-- A claim writes only the queue row. The job's history row and its attempt row are written
-- once each attempt, when it ends (completed, failed, retried, lease expired, cancelled):
-- `status` is indexed, so no update of `jobs` is HOT, and each one writes a new entry into
-- every index of the history; the claim's was one of two per job. While a job runs its
-- history row says `queued`; reads show `in_progress` where the queue row runs
-- (`backvault_job_status`, the twin of `domain::jobs::JobStatus::as_seen`).

-- The first claim of the job and the start of the current attempt, kept by the queue row
-- until the attempt ends. `created_at` is the job's (both rows are inserted in one
-- transaction, whose `now()` both defaults take): the running jobs are listed newest first
-- from the queue's small index, however many newer jobs the history holds.
alter table job_queue
    add column started_at timestamptz,
    add column attempt_started_at timestamptz,
    add column created_at timestamptz not null default now();

update job_queue q set created_at = j.created_at from jobs j where j.id = q.job_id;

-- Partial on a predicate no queue statement but the list implies (`lease > 0` holds for
-- every row ever claimed): the claim's count of a VM's running jobs (`running`) and a
-- completion's lookup by primary key (`running is true`) must not read it. Planned on
-- statistics taken while nothing ran, either read every running row once per VM or per
-- completion through an index whose predicate matched theirs.
create index job_queue_running_created on job_queue (created_at, job_id) where running and lease > 0;

update job_queue q set started_at = j.started_at
from jobs j where j.id = q.job_id and j.started_at is not null;

update job_queue q set attempt_started_at = a.started_at
from job_attempts a where a.job_id = q.job_id and a.attempt = q.attempt and q.running;

update jobs j set status = 'queued'
from job_queue q where q.job_id = j.id and j.status = 'in_progress';

-- `running` is null for a job out of the queue (a left join). A plain SQL expression, so
-- the planner inlines it.
create function backvault_job_status(stored text, running boolean) returns text
language sql immutable parallel safe
as $$
    select case when running then 'in_progress' else stored end
$$;
