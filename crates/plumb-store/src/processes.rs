//! The processes that share a store (`plumb serve`, `plumb worker`), each
//! recording a heartbeat with what it holds, so `plumb workers` can list
//! the live ones. Only for people to read: a lease's liveness is its own
//! heartbeat, never this list.

use async_trait::async_trait;
use serde::Serialize;

use crate::{Millis, StoreError};

/// What a process reports about itself on each beat.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessBeat {
    /// Its lease owner id (unique per process run).
    pub owner: String,
    /// `serve` or `worker`.
    pub role: String,
    /// Its host name.
    pub host: String,
    /// Its process id (on `host`).
    pub pid: u32,
    /// The plumb version it runs.
    pub version: String,
    /// When it started.
    pub started_at: Millis,
    /// Runs it is executing now.
    pub runs: u32,
    /// Most runs it executes at once (`serve.workers`).
    pub capacity: u32,
    /// The state of its broker connections (its queue consumers), as a
    /// JSON array of objects.
    pub connections: serde_json::Value,
}

/// A process as last reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessInfo {
    /// Its lease owner id.
    pub owner: String,
    /// `serve` or `worker`.
    pub role: String,
    /// Its host name.
    pub host: String,
    /// Its process id (on `host`).
    pub pid: u32,
    /// The plumb version it runs.
    pub version: String,
    /// When it started.
    pub started_at: Millis,
    /// Runs it was executing at its last beat.
    pub runs: u32,
    /// Most runs it executes at once.
    pub capacity: u32,
    /// The state of its broker connections at its last beat (a JSON
    /// array; empty for a process that consumes no queue).
    pub connections: serde_json::Value,
    /// Its last beat, on the store's clock (PostgreSQL's, for processes on
    /// several hosts).
    pub beat_at: Millis,
}

/// The processes sharing the store.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait ProcessStore: Send + Sync + 'static {
    /// Records that the process is alive now, with what it holds.
    async fn beat(&self, beat: &ProcessBeat) -> Result<(), StoreError>;

    /// The processes that beat at or after `since` (store clock), by role
    /// and host.
    async fn processes(&self, since: Millis) -> Result<Vec<ProcessInfo>, StoreError>;

    /// Forgets the process `owner` (it stopped cleanly), and every process
    /// whose last beat is older than `before` (it stopped long ago).
    async fn forget_processes(&self, owner: &str, before: Millis) -> Result<(), StoreError>;

    /// The store's clock now (PostgreSQL's; this host's for SQLite): the
    /// clock `beat_at` is read on.
    async fn store_now(&self) -> Result<Millis, StoreError>;
}

/// A stored `connections` column: a JSON array (anything else, which only
/// a hand-edited row could hold, reads as none).
pub(crate) fn connections_of(text: &str) -> serde_json::Value {
    match serde_json::from_str(text) {
        Ok(v @ serde_json::Value::Array(_)) => v,
        _ => serde_json::Value::Array(Vec::new()),
    }
}
