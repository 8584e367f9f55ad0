-- Claims look for restores separately (they have their own per-VM cap); without this
-- index that search reads every pending row of the VM.
create index job_queue_claimable_restores on job_queue (vm_id, priority, run_at) where not running and kind = 'restore';
