-- Listings filtered by workflow and status (dead letters of a workflow)
-- walk their index newest first instead of every run of the workflow, and
-- the status figures (counts per workflow and status, the last success and
-- failure) are ranges of an index instead of a scan of the history.
CREATE INDEX runs_by_workflow_status_created ON runs (workflow, status, created_at DESC, id DESC);
CREATE INDEX runs_by_workflow_status_finished ON runs (workflow, status, finished_at);
