-- The processes sharing the store, for `plumb workers` (display only: a
-- lease's liveness is its own heartbeat). `beat_at` is the server's clock.
CREATE TABLE processes (
    owner       TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    version     TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    runs        BIGINT NOT NULL,
    capacity    BIGINT NOT NULL,
    beat_at     BIGINT NOT NULL
);
