-- Each process reports the state of its broker connections (queue
-- consumers) with its heartbeat, as a JSON array, so `plumb status` read
-- from the store shows every process's connections.
ALTER TABLE processes ADD COLUMN connections TEXT NOT NULL DEFAULT '[]';
