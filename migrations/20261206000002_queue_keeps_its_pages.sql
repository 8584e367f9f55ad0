-- Vacuum (backvault's own every 10 s, and autovacuum's) ends by cutting empty pages off the
-- end of the table, and for that takes the table's exclusive lock: while it holds it, no
-- claim, completion or enqueue gets past the queue. The queue empties its last pages
-- whenever a backlog drains, so that happened in most vacuums: in a steady run with
-- `pg_stat_statements`, the 10 s vacuum took 2.6 to 5.1 s (normally about 60 ms) in the
-- minutes when every queue statement ran slowest. The queue keeps its pages instead; the
-- next backlog fills them again, and vacuum still marks them free.
alter table job_queue set (vacuum_truncate = false);
