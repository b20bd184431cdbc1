-- The processes sharing the store, for `plumb workers` (display only: a
-- lease's liveness is its own heartbeat).
CREATE TABLE processes (
    owner       TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    version     TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    runs        INTEGER NOT NULL,
    capacity    INTEGER NOT NULL,
    beat_at     INTEGER NOT NULL
);
