-- Fewer indexes on runs, each write of a run maintains every one of them:
-- runs_by_workflow_status is a prefix of runs_by_workflow_status_created,
-- and a purge finds old ended runs through runs_by_workflow_status_finished.
DROP INDEX runs_by_workflow_status;
DROP INDEX runs_ended;
-- The runs whose payloads a purge may still blank: only those, so the runs
-- already blanked (most of a month's history) are never walked again.
CREATE INDEX runs_to_blank ON runs (workflow, finished_at)
    WHERE payloads_purged_at IS NULL AND status IN ('succeeded', 'cancelled');
