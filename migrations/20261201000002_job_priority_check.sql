-- A job's priority is a `domain::jobs::Priority` rank (0 on demand, 1 scheduled): reading
-- any other value is a decode error, so the tables refuse to hold one.
-- `crates/store/tests/twins.rs` checks these sets against `Priority::ALL`.
alter table jobs add constraint jobs_priority_known check (priority in (0, 1));
alter table job_queue add constraint job_queue_priority_known check (priority in (0, 1));
