-- Claims walk the queue in (created_at, id) order within a status; an index
-- in exactly that order lets `LIMIT 1` stop at the first row instead of
-- sorting the whole backlog.
CREATE INDEX runs_queue ON runs (status, created_at, id);
DROP INDEX runs_by_status;
