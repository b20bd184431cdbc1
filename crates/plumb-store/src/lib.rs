//! plumb's durable state: runs, the step journal, the queue, schedule slots,
//! alerts, sealed secrets, API tokens, the audit log and deployments.
//!
//! The store is split by concern, one module and one small trait each
//! ([`RunStore`], [`ScheduleStore`], [`AlertStore`], [`SecretStore`],
//! [`TokenStore`], [`AuditStore`], [`DeploymentStore`], [`ProcessStore`], [`RetentionStore`],
//! [`CursorStore`], [`PollStore`]); [`Store`] is all of
//! them together. Each backend mirrors that layout file for file
//! (`sqlite/runs.rs` holds every query of [`RunStore`] on SQLite,
//! `postgres/runs.rs` on PostgreSQL), so a reader finds any query in one
//! place and a new kind of state is one new module in each backend. Callers
//! bring the traits into scope with `use plumb_store::prelude::*`.
//!
//! The backends share everything that is not SQL: how a row becomes a value
//! (`rows`), the JSON limits (`json`), and what each write decides — claim
//! answers and tokens, the columns of a new run or a run's end, the
//! deployment diff, audit chaining (`writes`). [`SqliteStore`] is one file
//! with one writer thread; [`PgStore`] is many processes on one database,
//! each write one transaction, with PostgreSQL's locks deciding what must
//! hold across processes (see each backend's module doc).
//!
//! The store knows rows, not workflows: step ids, payloads and outputs are
//! opaque strings and JSON to it. It never sees a YAML file, an expression or
//! a network connection, and the engine never sees SQL or a driver error —
//! driver errors are mapped to [`StoreError`] at this boundary.
//!
//! # Invariants
//!
//! * A step row with a terminal status ([`StepStatus::is_terminal`]) is the
//!   committed outcome of that step (or `for_each` item). Once the call that
//!   wrote it returns, it survives SIGKILL and power loss (SQLite in WAL mode
//!   with `synchronous=FULL`; PostgreSQL with its default `synchronous_commit`).
//! * Journal writes are *fenced*: they succeed only while the writer holds the
//!   run's lease and the run is `running`. A process that lost its lease (it
//!   stalled, and another claimed the run) gets [`StoreError::LeaseLost`] and
//!   must stop, so two processes never interleave one run's journal.
//! * Times are Unix milliseconds.

use async_trait::async_trait;

pub mod alerts;
pub mod audit;
pub mod copy;
pub mod cursors;
pub mod deployments;
mod json;
pub mod lease;
pub mod lineage;
pub mod polls;
pub mod postgres;
pub mod processes;
pub mod retention;
mod rows;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod sqlite;
mod writes;

pub use alerts::{Alert, AlertAttempt, AlertStatus, AlertStore, NewAlert};
pub use audit::{AuditEntry, AuditProblem, AuditStore, NewAuditEntry};
pub use cursors::{Cursor, CursorMove, CursorStore};
pub use deployments::{Deployed, DeploymentStore};
pub use lease::{ClaimToken, OwnerId};
pub use lineage::{LineageEntry, LineageStore};
pub use polls::{PollClaim, PollCommit, PollCommitted, PollState, PollStore};
pub use postgres::PgStore;
pub use processes::{ProcessBeat, ProcessInfo, ProcessStore};
pub use retention::{PurgePosition, PurgeScope, Purged, RetentionStore, StoreSize};
pub use runs::{
    AttemptFailure, CancelResult, Claim, Dedupe, Failure, Lease, LeasedRun, NewRun, Release,
    ReplayResult, Run, RunFilter, RunOutcome, RunStatus, RunStore, StepRecord, StepStatus,
    WorkflowStats, WorkflowVersion,
};
pub use schedules::ScheduleStore;
pub use secrets::{
    ApiToken, Role, SealedSecret, SecretMeta, SecretStore, SecretWrite, SecretWriteResult,
    TokenStore,
};
pub use sqlite::{SqliteStore, Synchronous};

/// The store's traits, to bring their methods into scope:
/// `use plumb_store::prelude::*;`.
pub mod prelude {
    pub use crate::{
        AlertStore, AuditStore, CursorStore, DeploymentStore, LineageStore, ProcessStore,
        RetentionStore, RunStore, ScheduleStore, SecretStore, Store, TokenStore,
    };
}

/// Unix time in milliseconds.
pub type Millis = i64;

/// The current Unix time in milliseconds.
#[must_use]
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Errors from the store, already classified for the caller.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened or migrated.
    #[error("cannot open the store at {location}: {message}")]
    Open {
        /// Path or URL of the store.
        location: String,
        /// What went wrong.
        message: String,
    },
    /// The store is locked by another writer past the busy timeout. Retrying
    /// later may succeed.
    #[error("the store is busy (locked by another writer): {0}")]
    Busy(String),
    /// The store cannot commit: disk full, read-only file system, I/O error.
    #[error("the store cannot commit: {0}")]
    Unavailable(String),
    /// This process no longer holds the run's lease (or the run is no longer
    /// running); it must stop working on the run.
    #[error("run {run_id} is no longer leased to this process")]
    LeaseLost {
        /// The run.
        run_id: String,
    },
    /// A stored value could not be decoded.
    #[error("the store holds an unreadable record: {0}")]
    Corrupt(String),
    /// One write was refused because what it would store breaks a limit
    /// (it would not read back). Retrying the same write cannot succeed.
    #[error("the store refused the write: {0}")]
    Rejected(String),
    /// The run was not created: an event with the same dedupe key already
    /// started `run_id` within the key's window (see [`NewRun::dedupe`]).
    #[error("an event with the same dedupe key already started run {run_id}")]
    Duplicate {
        /// The run the first delivery started.
        run_id: String,
    },
    /// Anything else the database reported.
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether retrying the same operation later can succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Busy(_) | Self::Unavailable(_))
    }
}

/// The durable state of plumb: every concern's trait, on one backend.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait Store:
    RunStore
    + ScheduleStore
    + AlertStore
    + SecretStore
    + TokenStore
    + AuditStore
    + DeploymentStore
    + ProcessStore
    + RetentionStore
    + CursorStore
    + PollStore
    + LineageStore
    + Send
    + Sync
    + 'static
{
    /// Commits a tiny write: proves the store can commit right now.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Commits everything queued and stops accepting writes.
    async fn close(&self);
}
