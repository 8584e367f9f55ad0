-- Since migration 20261205000001 an attempt row is inserted once, when its attempt ends,
-- and is not updated afterwards (only a row an older server opened at its claim is
-- updated, once). The half page that migration 20261204000001 kept free on each page for
-- the update no longer has a use: new pages are filled. Pages written before keep their
-- room.
alter table job_attempts set (fillfactor = 100);
