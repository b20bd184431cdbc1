-- Listings filtered by status (dead letters) or by workflow and status walk
-- their index newest first instead of every stored run, and the status
-- figures (counts per workflow and status, the last success and failure)
-- are ranges of an index instead of a scan of the history.
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);
CREATE INDEX runs_by_workflow_status_created ON runs (workflow, status, created_at DESC, id DESC);
CREATE INDEX runs_by_workflow_status_finished ON runs (workflow, status, finished_at);
