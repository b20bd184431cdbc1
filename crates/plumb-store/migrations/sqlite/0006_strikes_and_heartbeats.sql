-- Poison runs: `strikes` counts claims that did not end cleanly (a crash, a
-- panic, a journal the store kept refusing), the current claim included. A
-- run past `serve.max_crashes` strikes fails for good instead of crashing
-- its workers forever. `last_error` says why the last execution stopped;
-- `not_before` holds the run back after a strike (backoff).
ALTER TABLE runs ADD COLUMN strikes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN last_error TEXT;
ALTER TABLE runs ADD COLUMN not_before INTEGER;

-- Leases end by observation, not by comparing wall clocks: every claim and
-- renewal bumps `heartbeat`, and a watcher that sees the same value for
-- `lease_ms` on its own monotonic clock expires the lease.
ALTER TABLE runs ADD COLUMN heartbeat INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN lease_ms INTEGER;

-- Runs leased before this version carry an expiry but no duration: give
-- them the default, so a watcher can judge them.
UPDATE runs SET lease_ms = 30000 WHERE lease_owner IS NOT NULL;
