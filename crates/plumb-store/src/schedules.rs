//! Schedule slots: each slot of a workflow's schedule is recorded once,
//! with the run it starts, so a slot fires once across restarts and
//! processes.

use async_trait::async_trait;

use crate::{Millis, NewRun, StoreError};

/// Recorded schedule slots.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait ScheduleStore: Send + Sync + 'static {
    /// The latest schedule slot recorded for a workflow (fired or skipped).
    async fn last_fire(&self, workflow: &str) -> Result<Option<Millis>, StoreError>;

    /// Records a schedule slot and, with `run`, the run it starts, in one
    /// transaction. `false` when the slot was already recorded (a restart or
    /// another process got there first): nothing is created then.
    async fn record_fire(
        &self,
        workflow: &str,
        slot: Millis,
        run: Option<&NewRun>,
    ) -> Result<bool, StoreError>;
}
