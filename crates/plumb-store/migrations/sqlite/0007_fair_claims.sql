-- Claims visit the workflows with queued runs one after another (a backlog
-- of one workflow must not starve the others): the next workflow after a
-- name, and its oldest queued run, are each one step down this index.
CREATE INDEX runs_queued_by_workflow ON runs (workflow, created_at, id) WHERE status = 'queued';
