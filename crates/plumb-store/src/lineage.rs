//! Record lineage: which runs, steps and `for_each` items touched a
//! business record (a workflow's `record_key`), in time order — every
//! acceptance, dedupe hit, retry, outcome, dead letter and replay. Rows
//! belong to their run and go with it when retention purges it.

use async_trait::async_trait;
use serde::Serialize;

use crate::{Millis, StoreError};

/// The longest record key kept: a key is an id, not a document.
pub const MAX_RECORD_KEY_BYTES: usize = 512;

/// The most `dedupe_hit` events kept per run: a sender repeating one event
/// forever must not grow the index without bound (the run's own record
/// already says the event was accepted once).
pub const MAX_DEDUPE_HITS: u32 = 100;

/// The most entries one trace returns.
pub const MAX_TRACE: u32 = 10_000;

/// One event in a record's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineageEntry {
    /// Unique, time-ordered (UUIDv7).
    pub id: String,
    /// The business record.
    pub record_key: String,
    /// The workflow.
    pub workflow: String,
    /// The run (for a dedupe hit, the run the first delivery started).
    pub run_id: String,
    /// The step, for a step's or item's event.
    pub step_id: Option<String>,
    /// The `for_each` item.
    pub item: Option<u32>,
    /// What happened: `accepted`, `dedupe_hit`, `retry`, `succeeded`,
    /// `failed`, `dead_letter`, `replayed`, `cancelled`.
    pub event: String,
    /// The attempt, for a step's event.
    pub attempt: Option<u32>,
    /// The step's idempotency key (`<run_id>:<step_id>[:<item>]`).
    pub idempotency_key: Option<String>,
    /// What the effect did: `HTTP 201`, `3 rows`.
    pub effect: Option<String>,
    /// The error, for a failure or retry.
    pub detail: Option<String>,
    /// When.
    pub at: Millis,
}

/// The lineage index.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait LineageStore: Send + Sync + 'static {
    /// Appends events (their runs must exist).
    async fn record_lineage(&self, entries: &[LineageEntry]) -> Result<(), StoreError>;

    /// A record's events, oldest first, at most `limit` (the newest are
    /// kept when there are more), optionally of one workflow.
    async fn trace(
        &self,
        record_key: &str,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageEntry>, StoreError>;
}

/// The columns of `lineage`, in the order the backends read them.
pub(crate) const COLUMNS: &str = "id, record_key, workflow, run_id, step_id, item, event, attempt, \
    idempotency_key, effect, detail, at";

/// In a replay's transaction: a `replayed` event (`$2`, the actor, as its
/// detail; `$3` the time) for each record run `$1` was accepted for. Its id
/// is the run's, the replay's number and the key: one per replay and key.
pub(crate) const REPLAYED: &str = "INSERT INTO lineage (id, record_key, workflow, run_id, event, detail, at) \
    SELECT l.run_id || ':replay:' || r.replays || ':' || l.record_key, l.record_key, l.workflow, \
    l.run_id, 'replayed', 'replayed by ' || $2, $3 \
    FROM lineage l JOIN runs r ON r.id = l.run_id \
    WHERE l.run_id = $1 AND l.event = 'accepted' ON CONFLICT (id) DO NOTHING";

/// In a cancellation's transaction: a `cancelled` event (`$2` the actor,
/// `$3` the reason, `$4` the time) for each record run `$1` was accepted
/// for.
pub(crate) const CANCELLED: &str = "INSERT INTO lineage (id, record_key, workflow, run_id, event, detail, at) \
    SELECT run_id || ':cancelled:' || record_key, record_key, workflow, run_id, 'cancelled', \
    'cancelled by ' || $2 || ': ' || $3, $4 \
    FROM lineage WHERE run_id = $1 AND event = 'accepted' ON CONFLICT (id) DO NOTHING";

/// Refuses a key that would not be useful to look up.
pub(crate) fn check(entries: &[LineageEntry]) -> Result<(), StoreError> {
    for e in entries {
        if e.record_key.len() > MAX_RECORD_KEY_BYTES {
            return Err(StoreError::Rejected(format!(
                "a record key of {} bytes (at most {MAX_RECORD_KEY_BYTES})",
                e.record_key.len()
            )));
        }
    }
    Ok(())
}
