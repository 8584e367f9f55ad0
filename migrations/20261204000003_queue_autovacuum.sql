-- The hot queue turns over its whole content many times a minute while staying as small
-- as the backlog, so autovacuum's default trigger (20 % of the table's rows) fires either
-- constantly or, after a burst, too late. On servers that run autovacuum, vacuum it by row
-- count instead, without cost-based sleeps. backvault also vacuums it itself every 10 s
-- (service/src/background.rs), for servers where autovacuum is off or falls behind.
alter table job_queue set (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
