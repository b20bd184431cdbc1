-- One row rewritten by readiness checks: proves the store can commit now
-- (not full, not read-only, not locked).
CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  INTEGER NOT NULL
);
