//! What the engine reports while it runs, for live progress and logs.

use std::time::Duration;

use plumb_store::{Failure, RunStatus};

/// One thing that happened during a run.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEvent {
    /// The run started (or resumed) in this process. Emitted before any step
    /// executes, so the run id is known even if the process dies at once.
    Started {
        /// Run id.
        run_id: String,
        /// Workflow name.
        workflow: String,
        /// Version hash.
        version: String,
        /// Whether this continues an earlier, interrupted execution.
        resumed: bool,
    },
    /// A step's committed outcome was found in the journal; it is not run
    /// again.
    StepRestored {
        /// Step id.
        step_id: String,
    },
    /// An attempt started.
    StepStarted {
        /// Step id.
        step_id: String,
        /// `for_each` item.
        item: Option<u32>,
        /// Attempt number (1-based).
        attempt: u32,
        /// Step kind (`http`, `jq`, …).
        kind: &'static str,
    },
    /// An attempt failed and will be retried.
    StepRetrying {
        /// Step id.
        step_id: String,
        /// `for_each` item.
        item: Option<u32>,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
        /// Wait before the next attempt.
        delay: Duration,
    },
    /// A step (or item) succeeded and its outcome is committed.
    StepSucceeded {
        /// Step id.
        step_id: String,
        /// `for_each` item.
        item: Option<u32>,
        /// Attempts used.
        attempts: u32,
        /// Time from the first attempt's start to the commit.
        elapsed: Duration,
        /// A short description of the output (`HTTP 200`, `3 items`).
        summary: String,
    },
    /// A step (or item) failed for good and its outcome is committed.
    StepFailed {
        /// Step id.
        step_id: String,
        /// `for_each` item.
        item: Option<u32>,
        /// Attempts used.
        attempts: u32,
        /// Why.
        error: String,
    },
    /// The run ended.
    Finished {
        /// Run id.
        run_id: String,
        /// Workflow name.
        workflow: String,
        /// Terminal status.
        status: RunStatus,
        /// Why it failed, if it did.
        failure: Option<Failure>,
        /// Time spent in this process.
        elapsed: Duration,
    },
    /// This process stopped working on the run without ending it; it can be
    /// resumed.
    Interrupted {
        /// Run id.
        run_id: String,
        /// Why.
        reason: String,
    },
}

/// Receives [`RunEvent`]s. Called inline on the run's task: keep it fast.
pub trait Observer: Send + Sync {
    /// One event.
    fn on_event(&self, event: &RunEvent);
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {
    fn on_event(&self, _event: &RunEvent) {}
}
