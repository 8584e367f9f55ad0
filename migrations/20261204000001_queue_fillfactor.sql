-- Room on the page for the new versions of rows the queue updates.
--
-- A job's history row is updated twice (claimed, then finished) and neither update is HOT
-- (`status` is indexed). On a full page (fillfactor 100) each new version goes to another
-- page: the table grows by a page for every few dozen jobs claimed or finished, and each
-- such update touches two heap pages. With room left on the page the new version stays
-- on it, and the next access prunes the dead one and reuses its room. In the `queue`
-- benchmark's fixture the table ends no larger than it did at fillfactor 100: the
-- updates had spread it to the same size.
alter table jobs set (fillfactor = 70);

-- An attempt row is inserted at the claim and updated at the end of the attempt. Its key
-- does not change, so the update is HOT if the page has room for the new version; on full
-- pages almost none were (31 of 120,000 in the `queue` fixture), each adding an index
-- entry, and the table doubled all the same. Attempts of one claim share pages and end
-- together, so half of each page is kept free.
alter table job_attempts set (fillfactor = 50);
