-- Retention: when a run's payloads were blanked, and the ended runs of a
-- workflow by when they ended (what a purge walks).
ALTER TABLE runs ADD COLUMN payloads_purged_at INTEGER;
CREATE INDEX runs_ended ON runs (workflow, finished_at) WHERE finished_at IS NOT NULL;
