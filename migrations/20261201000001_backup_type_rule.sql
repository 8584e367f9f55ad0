-- Which backup types a database takes at all: master takes fulls only, and a database in
-- the simple recovery model has no log to back up. The SQL twin of
-- `domain::configure::backup_type_allowed`, so the scheduler's set-based statement skips
-- what the rule refuses; a test checks the two agree over generated inputs. A plain SQL
-- expression, so the planner inlines it.
create function backvault_backup_type_allowed(database text, recovery_model text, kind text)
returns boolean
language sql immutable parallel safe
as $$
    select not (kind in ('backup_differential', 'backup_log') and lower(database) = 'master'
                or kind = 'backup_log' and recovery_model = 'simple')
$$;
