-- Fewer indexes on runs, each write of a run maintains every one of them:
-- runs_by_workflow_status is a prefix of runs_by_workflow_status_created,
-- and a purge finds old ended runs through runs_by_workflow_status_finished.
-- runs_ended also made SQLite re-plan the claim statements on every call:
-- a partial index `WHERE finished_at IS NOT NULL` has the planner compare
-- the statement's bound values against it, so each new `now` expired the
-- plan (measured: 6% of a busy serve's CPU re-parsing SQL).
DROP INDEX runs_by_workflow_status;
DROP INDEX runs_ended;
-- The runs whose payloads a purge may still blank: only those, so the runs
-- already blanked (most of a month's history) are never walked again.
CREATE INDEX runs_to_blank ON runs (workflow, finished_at)
    WHERE payloads_purged_at IS NULL AND status IN ('succeeded', 'cancelled');
