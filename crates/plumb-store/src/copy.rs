//! Moving a whole store to another backend (`plumb store copy`): which
//! tables hold plumb's state, in an order that satisfies their references,
//! and each column's kind, so one backend can read rows and another write
//! them without either knowing what the rows mean.
//!
//! Every table that holds state is listed in [`TABLES`] (or, if it holds
//! nothing worth keeping, in [`NOT_COPIED`]): a test compares the list with
//! the SQLite schema, so a feature that adds a table cannot forget the
//! copy. Rows travel unchanged — sealed secrets stay sealed under the same
//! key, the audit chain keeps its hashes, the instance secret comes along
//! (so tokens, challenges and `audit verify` work on the target), and a run
//! that was interrupted keeps its journal and resumes on the target.

use async_trait::async_trait;

use crate::StoreError;

/// A column's kind, as both backends store it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A 64-bit integer (times, counters).
    Int,
    /// Text (ids, JSON documents).
    Text,
    /// A flag (SQLite keeps it as 0/1).
    Bool,
    /// Bytes (sealed secrets).
    Bytes,
}

/// One value of a row on its way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// A flag.
    Bool(bool),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// A table to copy.
#[derive(Debug)]
pub struct Table {
    /// Its name, the same on every backend.
    pub name: &'static str,
    /// Its columns, in the order rows carry them.
    pub columns: &'static [(&'static str, Kind)],
    /// Its primary key: rows are read in this order, a batch at a time
    /// after the last key read.
    pub key: &'static [&'static str],
    /// Every new store creates this table's one row: the copy replaces it
    /// with the source's.
    pub singleton: bool,
}

impl Table {
    /// The key of `row` (one of this table's rows).
    #[must_use]
    pub fn key_of(&self, row: &[Cell]) -> Vec<Cell> {
        self.key
            .iter()
            .filter_map(|k| self.columns.iter().position(|(c, _)| c == k))
            .filter_map(|i| row.get(i).cloned())
            .collect()
    }

    /// The columns as a SQL list.
    #[must_use]
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

use Kind::{Bool, Bytes, Int, Text};

/// Every table that holds plumb's state, referenced tables first.
pub const TABLES: &[Table] = &[
    Table {
        name: "workflow_versions",
        key: &["hash"],
        columns: &[
            ("hash", Text),
            ("workflow", Text),
            ("file", Text),
            ("source", Text),
            ("created_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "runs",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("workflow", Text),
            ("version", Text),
            ("trigger_payload", Text),
            ("status", Text),
            ("claims", Int),
            ("created_at", Int),
            ("started_at", Int),
            ("finished_at", Int),
            ("updated_at", Int),
            ("error", Text),
            ("failed_step", Text),
            ("failed_item", Int),
            ("failed_attempt", Int),
            ("failed_status_code", Int),
            ("lease_owner", Text),
            ("lease_expires_at", Int),
            ("max_concurrency", Int),
            ("replays", Int),
            ("strikes", Int),
            ("last_error", Text),
            ("not_before", Int),
            ("heartbeat", Int),
            ("lease_ms", Int),
            ("payloads_purged_at", Int),
            ("cursor", Text),
        ],
        singleton: false,
    },
    Table {
        name: "steps",
        key: &["run_id", "step_id", "item"],
        columns: &[
            ("run_id", Text),
            ("step_id", Text),
            ("item", Int),
            ("status", Text),
            ("attempt", Int),
            ("state", Text),
            ("output", Text),
            ("error", Text),
            ("status_code", Int),
            ("started_at", Int),
            ("finished_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "step_attempts",
        key: &["run_id", "step_id", "item", "round", "attempt"],
        columns: &[
            ("run_id", Text),
            ("step_id", Text),
            ("item", Int),
            ("round", Int),
            ("attempt", Int),
            ("started_at", Int),
            ("finished_at", Int),
            ("status_code", Int),
            ("error", Text),
            ("retryable", Bool),
        ],
        singleton: false,
    },
    Table {
        name: "lineage",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("record_key", Text),
            ("workflow", Text),
            ("run_id", Text),
            ("step_id", Text),
            ("item", Int),
            ("event", Text),
            ("attempt", Int),
            ("idempotency_key", Text),
            ("effect", Text),
            ("detail", Text),
            ("at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "dedupe_keys",
        key: &["workflow", "key"],
        columns: &[
            ("workflow", Text),
            ("key", Text),
            ("run_id", Text),
            ("created_at", Int),
            ("expires_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "cursors",
        key: &["workflow"],
        columns: &[
            ("workflow", Text),
            ("value", Text),
            ("version", Int),
            ("updated_at", Int),
            ("updated_by", Text),
        ],
        singleton: false,
    },
    Table {
        name: "polls",
        key: &["workflow"],
        columns: &[
            ("workflow", Text),
            ("next_poll_at", Int),
            ("owner", Text),
            ("lease_until", Int),
            ("last_poll_at", Int),
            ("last_success_at", Int),
            ("last_new_item_at", Int),
            ("last_error", Text),
            ("failures", Int),
        ],
        singleton: false,
    },
    Table {
        name: "schedule_fires",
        key: &["workflow", "slot"],
        columns: &[
            ("workflow", Text),
            ("slot", Int),
            ("run_id", Text),
            ("fired_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "alerts",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("run_id", Text),
            ("workflow", Text),
            ("channel", Text),
            ("payload", Text),
            ("status", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_error", Text),
            ("created_at", Int),
            ("delivered_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "secrets",
        key: &["name"],
        columns: &[
            ("name", Text),
            ("nonce", Bytes),
            ("ciphertext", Bytes),
            ("key_id", Text),
            ("created_at", Int),
            ("rotated_at", Int),
            ("updated_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "api_tokens",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("name", Text),
            ("role", Text),
            ("token_hash", Text),
            ("created_at", Int),
            ("revoked_at", Int),
        ],
        singleton: false,
    },
    Table {
        name: "audit_log",
        key: &["seq"],
        columns: &[
            ("seq", Int),
            ("at", Int),
            ("actor", Text),
            ("action", Text),
            ("subject", Text),
            ("details", Text),
            ("prev_hash", Text),
            ("hash", Text),
        ],
        singleton: false,
    },
    Table {
        name: "audit_head",
        key: &["id"],
        columns: &[("id", Int), ("seq", Int), ("hash", Text)],
        singleton: true,
    },
    Table {
        name: "instance",
        key: &["id"],
        columns: &[("id", Int), ("secret", Text)],
        singleton: true,
    },
    Table {
        name: "deployments",
        key: &["kind", "name"],
        columns: &[
            ("kind", Text),
            ("name", Text),
            ("version", Text),
            ("file", Text),
            ("deployed_at", Int),
        ],
        singleton: false,
    },
];

/// Tables that hold nothing worth moving: `health` is a scratch row that
/// `/readyz` overwrites; `processes` lists the processes running on the
/// source, all stopped for the copy.
pub const NOT_COPIED: &[&str] = &["health", "processes"];

/// How many rows travel together.
pub const BATCH: u32 = 500;

/// A store rows can be read from, table by table.
#[async_trait]
pub trait CopySource: Send + Sync {
    /// Up to `limit` rows of `table` in key order, after the key `after`
    /// (the first rows when `None`).
    async fn read_rows(
        &self,
        table: &'static Table,
        after: Option<Vec<Cell>>,
        limit: u32,
    ) -> Result<Vec<Vec<Cell>>, StoreError>;
}

/// How many rows of a table were copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The table.
    pub table: &'static str,
    /// Its rows.
    pub rows: u64,
}

/// A store a whole copy can be written into.
#[async_trait]
pub trait CopyTarget: Send + Sync {
    /// Copies every table of `source` in one transaction: all of it, or
    /// (on any error) nothing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Rejected`] when this store already holds runs,
    /// secrets, tokens or audit entries (a copy goes into a new store);
    /// any error of either store.
    async fn copy_from(&self, source: &dyn CopySource) -> Result<Vec<Copied>, StoreError>;
}
