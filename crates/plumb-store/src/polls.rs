//! Poll triggers: which process polls a workflow now (a lease, so polls of
//! one workflow never overlap and each is made once across processes), and
//! the one transaction that commits a poll's new runs, the keys of the
//! items it saw and its advanced cursor together — a crash at any point
//! neither loses nor doubles an item.
//!
//! Seen keys share `dedupe_keys` with webhook dedupe (a key, the run it
//! started, and until when it counts); the cursor is the workflow's row in
//! `cursors`, moved by compare-and-set like a run's.

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::{Millis, NewAlert, NewRun, StoreError};

/// What a process holds while it polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollClaim {
    /// The workflow's committed cursor (`null` before the first).
    pub cursor: Value,
    /// Its version (0 before the first).
    pub cursor_version: i64,
    /// Failed polls in a row before this one.
    pub failures: u32,
}

/// A successful poll, committed whole.
#[derive(Clone, Debug)]
pub struct PollCommit {
    /// The workflow.
    pub workflow: String,
    /// The lease holder.
    pub owner: String,
    /// The runs of the new items.
    pub runs: Vec<NewRun>,
    /// Each new item's key (SHA-256 hex) and the index in `runs` of the
    /// run it started.
    pub seen: Vec<(String, usize)>,
    /// Until when the keys count.
    pub seen_until: Millis,
    /// The cursor to move to, from the version the poll read; `None`
    /// leaves it.
    pub cursor: Option<(i64, Value)>,
    /// When the next poll is due.
    pub next_poll_at: Millis,
}

/// What committing a poll did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollCommitted {
    /// The runs, keys and cursor are committed.
    Committed,
    /// The cursor changed since the poll read it (an operator set it):
    /// no run, key or cursor was committed; the poll is released and due,
    /// and the next one reads the new cursor.
    CursorMoved,
}

/// A polling workflow, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PollState {
    /// The workflow.
    pub workflow: String,
    /// When the next poll is due.
    pub next_poll_at: Millis,
    /// When it last polled (successfully or not).
    pub last_poll_at: Option<Millis>,
    /// When a poll last succeeded.
    pub last_success_at: Option<Millis>,
    /// When a poll last found a new item.
    pub last_new_item_at: Option<Millis>,
    /// Why the last poll failed, if it did.
    pub last_error: Option<String>,
    /// Failed polls in a row.
    pub failures: u32,
    /// Who holds the poll now, if anyone (a process's owner id).
    #[serde(skip)]
    pub owner: Option<String>,
}

/// Poll leases and commits.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written; [`StoreError::LeaseLost`] when the caller no longer holds the
/// poll.
#[async_trait]
pub trait PollStore: Send + Sync + 'static {
    /// Takes the poll of `workflow` for `lease_ms` if it is due and nobody
    /// holds it; `None` otherwise.
    async fn claim_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<PollClaim>, StoreError>;

    /// Extends the caller's lease; `false` when it no longer holds it.
    async fn renew_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Which of `keys` (SHA-256 hex) were seen within their window.
    async fn seen_keys(&self, workflow: &str, keys: &[String]) -> Result<Vec<bool>, StoreError>;

    /// Commits a poll whole and releases the lease.
    async fn commit_poll(&self, commit: &PollCommit) -> Result<PollCommitted, StoreError>;

    /// Records a failed poll (with `alerts` in the same transaction) and
    /// releases the lease.
    async fn fail_poll(
        &self,
        workflow: &str,
        owner: &str,
        error: &str,
        next_poll_at: Millis,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError>;

    /// Every polling workflow's state.
    async fn poll_states(&self) -> Result<Vec<PollState>, StoreError>;
}

/// The run id alerts of a failed poll carry (there is no run).
#[must_use]
pub fn poll_alert_subject(workflow: &str) -> String {
    format!("poll:{workflow}")
}
