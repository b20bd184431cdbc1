//! Workflow cursors (SPEC G7): the watermark of an incremental sync, moved
//! only in the transaction that ends a run successfully, and only forward
//! from where that run started.
//!
//! Each workflow's cursor has a `version`, 0 before anything was committed.
//! A run pins the cursor it starts from ([`CursorStore::pin_cursor`]); its
//! successful end moves the cursor as a compare-and-set against that
//! version ([`crate::RunOutcome::SucceededMovingCursor`]). A run whose
//! starting cursor is no longer current (a dead letter replayed after
//! newer runs succeeded, or an operator's `plumb cursor set` meanwhile)
//! succeeds without moving it, and its record says so.

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Millis, StoreError};

/// The most JSON a cursor may hold: it is a watermark, copied into every
/// run's record and every status answer.
pub const MAX_CURSOR_BYTES: usize = 64 * 1024;

/// A workflow's committed cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cursor {
    /// The workflow.
    pub workflow: String,
    /// The committed value (`null` after a reset).
    pub value: Value,
    /// Moves so far (each success that moved it, each set or reset).
    pub version: i64,
    /// When it last changed.
    pub updated_at: Millis,
    /// What changed it last: `run:<id>`, or the operator.
    pub updated_by: String,
}

/// Where a run's cursor goes when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorMove {
    /// The value the workflow's `cursor` expression yielded; `null` leaves
    /// the cursor where it is.
    pub value: Value,
}

/// Workflow cursors.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait CursorStore: Send + Sync + 'static {
    /// A workflow's committed cursor; `None` before the first.
    async fn cursor(&self, workflow: &str) -> Result<Option<Cursor>, StoreError>;

    /// Every committed cursor, by workflow.
    async fn cursors(&self) -> Result<Vec<Cursor>, StoreError>;

    /// Sets (or with `null`, resets) a workflow's cursor by hand, as a new
    /// version: runs in progress then succeed without moving it. Audited
    /// as `actor` (`cursor.set` / `cursor.reset`) in the same transaction.
    async fn set_cursor(
        &self,
        workflow: &str,
        value: &Value,
        actor: &str,
    ) -> Result<Cursor, StoreError>;

    /// The cursor run `run_id` starts from, pinned in its record the first
    /// time it executes and the same on every resume:
    /// `{"from": {"value", "version"}}`. Fenced by the lease.
    async fn pin_cursor(&self, run_id: &str, owner: &str) -> Result<Value, StoreError>;
}

/// A run's pinned cursor record.
pub(crate) fn pinned(value: Value, version: i64) -> Value {
    json!({ "from": { "value": value, "version": version } })
}

/// The version a pinned record starts from (0 when it cannot be read: the
/// compare-and-set then fails unless nothing was ever committed).
pub(crate) fn pinned_version(record: Option<&Value>) -> i64 {
    record
        .and_then(|r| r.pointer("/from/version"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// What a successful run's end did to the cursor, added to its record:
/// `moved` to `to`, or kept with the reason. `current` is the version
/// found when the move did not apply.
pub(crate) fn outcome(
    record: Option<&Value>,
    wanted: &Value,
    moved_to: Option<i64>,
    current: Option<i64>,
) -> Value {
    let mut record = record.cloned().unwrap_or_else(|| json!({}));
    let from = pinned_version(Some(&record));
    let (moved, note) = match (moved_to, wanted) {
        (Some(_), _) => (true, None),
        (None, Value::Null) => (
            false,
            Some("the cursor expression yielded null: the cursor stays where it was".to_owned()),
        ),
        (None, _) => (
            false,
            Some(format!(
                "not moved: the cursor moved on since this run started (version {from}, now {}); an older run never moves it back",
                current.unwrap_or(0)
            )),
        ),
    };
    if let Value::Object(map) = &mut record {
        map.insert("moved".into(), Value::Bool(moved));
        if let Some(version) = moved_to {
            map.insert("to".into(), json!({ "value": wanted, "version": version }));
        }
        if let Some(note) = note {
            map.insert("note".into(), Value::String(note));
        }
    }
    record
}
