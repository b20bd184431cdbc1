-- Sealed secrets: XChaCha20-Poly1305 ciphertexts, never plaintext. key_id is
-- the fingerprint of the master key that sealed the value.
CREATE TABLE secrets (
    name        TEXT PRIMARY KEY,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    key_id      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    rotated_at  INTEGER,
    updated_at  INTEGER NOT NULL
);

-- API tokens: only a SHA-256 of the token is kept.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- The audit log: append-only, each entry carrying the hash of the one
-- before it (a hash chain over a canonical encoding), so an edited,
-- deleted, reordered or inserted entry breaks the chain.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

-- The chain's head, moved in the same transaction as each append. New
-- entries chain from here, not from the last row, so deleting entries at
-- the end leaves a gap that `plumb audit verify` reports.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);

-- A random secret of this store, readable by whoever can read the store
-- file: a server proves it serves this store by an HMAC of a challenge
-- with it, before the CLI hands it an API token.
CREATE TABLE instance (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    secret  TEXT NOT NULL
);
INSERT INTO instance (id, secret) VALUES (1, lower(hex(randomblob(32))));

-- What is deployed: the version (SHA-256 of the file) of plumb.yaml and of
-- each workflow last started or reloaded, so a change is audited once.
CREATE TABLE deployments (
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    file         TEXT NOT NULL,
    deployed_at  INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
