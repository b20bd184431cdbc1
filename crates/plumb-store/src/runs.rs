//! Runs, their journal and the queue: what a run is, how it is claimed,
//! leased, journalled, ended, cancelled and replayed, and the workflow
//! versions runs are pinned to.

use std::fmt;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::{Millis, NewAlert, StoreError};

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, waiting for a worker.
    Queued,
    /// Leased by a worker (or interrupted and waiting to be resumed).
    Running,
    /// Ended: every step succeeded.
    Succeeded,
    /// Ended: a step failed for good.
    Failed,
    /// Ended: stopped on request.
    Cancelled,
}

impl RunStatus {
    /// The status as stored and shown.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the run has ended.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Parses a stored status.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError::Corrupt`] for an unknown value.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            other => return Err(StoreError::Corrupt(format!("unknown run status `{other}`"))),
        })
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a step (or `for_each` item) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// An attempt started and has no outcome yet. After a crash this is the
    /// step that was in flight: it may have had its effect, so it is re-sent
    /// with the same idempotency key.
    Running,
    /// Committed outcome: succeeded, `output` holds the result.
    Succeeded,
    /// Committed outcome: failed for good, `error` says why.
    Failed,
}

impl StepStatus {
    /// The status as stored and shown.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// Whether this is a committed outcome.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Running)
    }

    /// Parses a stored status.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError::Corrupt`] for an unknown value.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown step status `{other}`"
                )));
            }
        })
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The exact workflow file a run is pinned to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkflowVersion {
    /// SHA-256 of `source`, hex.
    pub hash: String,
    /// Workflow name.
    pub workflow: String,
    /// File path relative to the project.
    pub file: String,
    /// The file text.
    pub source: String,
    /// When first stored.
    pub created_at: Millis,
}

/// A run to create.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Run id (UUIDv7 text).
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Version hash; must already be stored.
    pub version: String,
    /// The trigger document.
    pub trigger: Value,
    /// `Some(owner)` creates the run already leased and running (a foreground
    /// `plumb run`); `None` creates it queued.
    pub lease: Option<Lease>,
    /// The workflow's concurrency limit, enforced when runs are claimed.
    pub max_concurrency: Option<u32>,
    /// Commit only before this instant, or not at all: a webhook that has
    /// answered `503` must not have its run committed afterwards. `None`
    /// waits as long as it takes.
    pub deadline: Option<std::time::Instant>,
    /// The event's dedupe key: committed with the run, so a second delivery
    /// of the event within the key's window creates nothing and gets
    /// [`StoreError::Duplicate`] naming the first run.
    pub dedupe: Option<Dedupe>,
}

/// A trigger's dedupe key (see [`NewRun::dedupe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedupe {
    /// The key, unique per workflow (the engine stores a digest of the
    /// evaluated key).
    pub key: String,
    /// When the key stops counting: a delivery after it starts a new run.
    pub expires_at: Millis,
}

/// A lease on a run.
///
/// When a run is claimed the store records a [`ClaimToken`] (the owner id
/// and the claim's number) as its holder, and the claimed [`Run`]'s
/// `lease_owner` is that token: every fenced write of that execution uses
/// it. Two executions of one run — even in the same process — hold
/// different tokens, so the older one is fenced off.
///
/// A lease ends only when its holder ends or releases the run, or when a
/// process that watched the lease saw it go unrenewed for `ttl_ms` on its
/// own monotonic clock and expired it ([`RunStore::expire_lease`]). Wall
/// clocks of different processes are never compared: a clock step cannot
/// free a live lease. `lease_expires_at` is kept for people to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it: the process's owner id when claiming, the claim's
    /// token (`lease_owner` of the claimed run) when renewing.
    pub owner: String,
    /// How long the lease lasts without a heartbeat, in milliseconds.
    pub ttl_ms: i64,
}

/// A run under lease, as a watcher sees it: its holder and how many times
/// the lease was taken or renewed so far. A watcher that sees the same
/// `heartbeat` for `ttl_ms` knows the holder stopped renewing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasedRun {
    /// The run.
    pub id: String,
    /// The holder's claim token.
    pub holder: String,
    /// Bumped by every claim and renewal.
    pub heartbeat: i64,
    /// The holder's lease duration.
    pub ttl_ms: i64,
    /// Claims of the run that did not end cleanly, this one included.
    pub strikes: u32,
}

/// How an execution gives a run back without ending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// It was interrupted on purpose (shutdown, Ctrl-C): the claim does not
    /// count as a strike, and the run may be claimed again at once.
    Clean,
    /// It could not go on (the store refused its journal, it panicked): the
    /// strike stays, and the run waits until `not_before`.
    Failed {
        /// Why, kept with the run and shown if it becomes a poison run.
        error: String,
        /// Earliest time the run may be claimed again.
        not_before: Millis,
    },
}

/// Why a run failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// The failing step.
    pub step: Option<String>,
    /// The failing `for_each` item, if one.
    pub item: Option<u32>,
    /// Attempts made.
    pub attempt: Option<u32>,
    /// HTTP status of the last attempt, if any.
    pub status_code: Option<u16>,
}

/// A stored run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Run {
    /// Run id.
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Version hash.
    pub version: String,
    /// The trigger document.
    pub trigger: Value,
    /// Status.
    pub status: RunStatus,
    /// How many times a process has claimed it (1 + resumes).
    pub claims: u32,
    /// Claims that did not end cleanly, the current one included: the
    /// executions that crashed, panicked or could not write their journal.
    pub strikes: u32,
    /// Why the last execution stopped without ending the run, if known.
    pub last_error: Option<String>,
    /// Earliest time the run may be claimed again (backoff after a strike).
    pub not_before: Option<Millis>,
    /// Why part of this run's record cannot be read, if it cannot: such a
    /// run is failed as soon as it is claimed.
    pub unreadable: Option<String>,
    /// How many times it was replayed from the dead-letter list.
    pub replays: u32,
    /// Created.
    pub created_at: Millis,
    /// First claimed.
    pub started_at: Option<Millis>,
    /// Ended.
    pub finished_at: Option<Millis>,
    /// Last change.
    pub updated_at: Millis,
    /// Why it failed or was cancelled.
    pub failure: Option<Failure>,
    /// Current lease holder.
    pub lease_owner: Option<String>,
    /// Current lease expiry.
    pub lease_expires_at: Option<Millis>,
    /// For a workflow with a cursor: the cursor the run started from
    /// (`{"from": {"value", "version"}}`, pinned when it first executes)
    /// and, once it succeeded, what became of it (`moved`, `to`, `note`).
    pub cursor: Option<Value>,
}

/// One row of the step journal.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// The run.
    pub run_id: String,
    /// The step id.
    pub step_id: String,
    /// `for_each` item index, or `None` for the step as a whole.
    pub item: Option<u32>,
    /// Status.
    pub status: StepStatus,
    /// Attempt number of the latest attempt (1-based).
    pub attempt: u32,
    /// Step-private durable state: the item list of a `for_each`, the wake-up
    /// time of a `sleep`. Kept when a later write has none.
    pub state: Option<Value>,
    /// The output, once succeeded.
    pub output: Option<Value>,
    /// The error, once failed.
    pub error: Option<String>,
    /// HTTP status of the latest attempt, if any.
    pub status_code: Option<u16>,
    /// When the first attempt started.
    pub started_at: Millis,
    /// When the outcome was committed.
    pub finished_at: Option<Millis>,
}

/// A failed attempt, kept for the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptFailure {
    /// The run.
    pub run_id: String,
    /// The step.
    pub step_id: String,
    /// The item, if any.
    pub item: Option<u32>,
    /// The replay round (0 for the first execution).
    pub round: u32,
    /// Which attempt.
    pub attempt: u32,
    /// When it started.
    pub started_at: Millis,
    /// When it failed.
    pub finished_at: Millis,
    /// HTTP status, if any.
    pub status_code: Option<u16>,
    /// What went wrong.
    pub error: String,
    /// Whether it was retried (or would have been, had attempts remained).
    pub retryable: bool,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every step succeeded.
    Succeeded,
    /// Every step succeeded, and the workflow's cursor moves with the
    /// run's end, in the same transaction (SPEC G7).
    SucceededMovingCursor(crate::CursorMove),
    /// A step failed for good.
    Failed(Failure),
    /// Stopped on request.
    Cancelled(String),
}

/// The result of trying to claim a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The caller now holds the lease; the run as it is now.
    Claimed(Box<Run>),
    /// Another process holds the lease.
    Busy {
        /// Who holds it (a claim token).
        owner: String,
        /// Until when, by the holder's clock.
        expires_at: Millis,
        /// The lease's heartbeat count (see [`LeasedRun`]).
        heartbeat: i64,
        /// The holder's lease duration.
        ttl_ms: i64,
    },
    /// The run has already ended.
    Ended(RunStatus),
    /// No such run.
    NotFound,
}

/// Health of one workflow, from its runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkflowStats {
    /// Workflow name.
    pub workflow: String,
    /// Runs waiting for a worker.
    pub queued: u64,
    /// Runs in progress (or interrupted, waiting to resume).
    pub running: u64,
    /// Failed runs: the dead-letter list.
    pub dead_letters: u64,
    /// When a run last succeeded.
    pub last_success_at: Option<Millis>,
    /// When a run last failed.
    pub last_failure_at: Option<Millis>,
}

/// What `cancel_run` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "status")]
pub enum CancelResult {
    /// The run is now cancelled.
    Cancelled,
    /// It had already ended.
    AlreadyEnded(RunStatus),
    /// No such run.
    NotFound,
}

/// What `replay_run` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "status")]
pub enum ReplayResult {
    /// The run is queued again; it resumes at its failed step.
    Replayed,
    /// Only failed runs can be replayed.
    NotFailed(RunStatus),
    /// No such run.
    NotFound,
}

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only this status.
    pub status: Option<RunStatus>,
    /// At most this many (newest first).
    pub limit: u32,
}

/// Runs, the journal and the queue.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written; journal writes also return [`StoreError::LeaseLost`] when the
/// caller no longer holds the run.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Stores a workflow version if it is not stored yet.
    async fn put_workflow_version(&self, version: &WorkflowVersion) -> Result<(), StoreError>;

    /// A stored workflow version.
    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError>;

    /// Commits a new run. When this returns, the run is durable.
    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError>;

    /// One run.
    async fn run(&self, id: &str) -> Result<Option<Run>, StoreError>;

    /// Runs, newest first.
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError>;

    /// Ids of runs that start with `prefix` (at most `limit`), so a person
    /// can name a run by the first few characters of its id, as with git.
    async fn run_ids_with_prefix(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;

    /// Takes the lease of a queued or running run if nobody holds it, or if
    /// the holder and heartbeat are exactly `steal_from` (the caller has
    /// established that this holder is dead, or stopped renewing). An
    /// explicit claim ignores the run's backoff (`not_before`).
    async fn claim_run(
        &self,
        id: &str,
        lease: &Lease,
        steal_from: Option<(&str, i64)>,
    ) -> Result<Claim, StoreError>;

    /// Extends the caller's lease. `false` when the caller no longer holds it.
    async fn renew_lease(&self, id: &str, lease: &Lease) -> Result<bool, StoreError>;

    /// Gives up the lease without ending the run, so another process can
    /// resume it (at once after a clean release, after its backoff
    /// otherwise).
    async fn release_run(&self, id: &str, owner: &str, how: &Release) -> Result<(), StoreError>;

    /// The run's journal.
    async fn journal(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError>;

    /// The outputs of a `for_each` step's items, by index, as JSON text
    /// (`null` for an item without one): each item's output is stored once,
    /// in its own row, and the list is assembled only when a later step
    /// reads it — straight from the text, without a second copy.
    async fn item_outputs(&self, run_id: &str, step_id: &str) -> Result<Vec<String>, StoreError>;

    /// Writes (inserts or replaces) one journal row; fenced by the lease.
    async fn record_step(&self, owner: &str, record: &StepRecord) -> Result<(), StoreError>;

    /// Keeps a failed attempt for the timeline; fenced by the lease.
    async fn record_attempt_failure(
        &self,
        owner: &str,
        failure: &AttemptFailure,
    ) -> Result<(), StoreError>;

    /// Every failed attempt of a run.
    async fn attempt_failures(&self, run_id: &str) -> Result<Vec<AttemptFailure>, StoreError>;

    /// Ends a run and releases its lease; fenced by the lease. The last
    /// step's outcome (when given) and the alerts are committed in the same
    /// transaction: a failure is never recorded without the alerts that
    /// report it, and the last step costs no commit of its own.
    async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &RunOutcome,
        last_step: Option<&StepRecord>,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError>;

    /// Takes the oldest claimable run: running with no lease (released or
    /// expired) and past its backoff, else queued; and whose workflow is
    /// under its concurrency limit.
    async fn claim_next(&self, lease: &Lease) -> Result<Option<Run>, StoreError>;

    /// Runs that are `running` under a lease, with their holders and
    /// heartbeats: watchers find the holders that died or stopped renewing.
    async fn leased_runs(&self) -> Result<Vec<LeasedRun>, StoreError>;

    /// Ends a lease whose holder is dead or stopped renewing, if the run is
    /// still exactly as `seen` (same holder, same heartbeat): the run can
    /// then be claimed from `not_before` on. `false` if it changed.
    async fn expire_lease(
        &self,
        seen: &LeasedRun,
        reason: &str,
        not_before: Millis,
    ) -> Result<bool, StoreError>;

    /// Cancels a queued or running run. A worker executing it stops at its
    /// next journal write or heartbeat. Audited as `actor`.
    async fn cancel_run(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<CancelResult, StoreError>;

    /// Queues a failed run again, keeping its id (so its idempotency keys)
    /// and every succeeded step: it resumes at the step that failed, and a
    /// failed `for_each` re-runs only its failed items.
    /// Audited as `actor`.
    async fn replay_run(&self, id: &str, actor: &str) -> Result<ReplayResult, StoreError>;

    /// Run counts and last outcomes per workflow.
    async fn workflow_stats(&self) -> Result<Vec<WorkflowStats>, StoreError>;

    /// Queued, running and failed runs per workflow: cheap (it reads no
    /// finished run), for gauges sampled often.
    async fn open_counts(&self) -> Result<Vec<WorkflowStats>, StoreError>;

    /// Fires when another process may have made a run claimable (a new
    /// run, a released lease, a replay), where the backend can tell across
    /// processes (PostgreSQL's `LISTEN`/`NOTIFY`), so idle workers start it
    /// at once instead of at their next poll. `None`: claimers poll. Never
    /// needed for correctness: a lost signal costs one poll interval.
    fn work_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}
