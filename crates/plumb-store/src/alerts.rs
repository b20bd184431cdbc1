//! Alerts: written with the failure they report (in the run's final
//! transaction), then delivered with retries by whichever process gets
//! each attempt first.

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::{Millis, StoreError};

/// An alert to deliver, written with the failure it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAlert {
    /// Alert id (UUIDv7 text); also its idempotency key.
    pub id: String,
    /// The channel's name in `plumb.yaml`.
    pub channel: String,
    /// The JSON body to send.
    pub payload: Value,
}

/// Where an alert is in its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// Not delivered yet; will be tried (again) at `next_attempt_at`.
    Pending,
    /// Delivered.
    Delivered,
    /// Given up after repeated failures; shown by `plumb status`.
    Failed,
}

impl AlertStatus {
    /// As stored.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored status.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] for an unknown value.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => Self::Pending,
            "delivered" => Self::Delivered,
            "failed" => Self::Failed,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown alert status `{other}`"
                )));
            }
        })
    }
}

/// A stored alert.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    /// Alert id.
    pub id: String,
    /// The failed run.
    pub run_id: String,
    /// Its workflow.
    pub workflow: String,
    /// Channel name.
    pub channel: String,
    /// Body.
    pub payload: Value,
    /// Delivery state.
    pub status: AlertStatus,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_attempt_at: Millis,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the failure was recorded.
    pub created_at: Millis,
    /// When delivered.
    pub delivered_at: Option<Millis>,
}

/// What became of a delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertAttempt {
    /// Delivered.
    Delivered,
    /// Failed; try again at this time.
    RetryAt {
        /// Why it failed.
        error: String,
        /// When to try again.
        at: Millis,
    },
    /// Failed for the last time.
    GaveUp {
        /// Why it failed.
        error: String,
    },
}

/// Alerts waiting for delivery and their attempts.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait AlertStore: Send + Sync + 'static {
    /// Pending alerts due at `now`, oldest first.
    async fn due_alerts(&self, now: Millis, limit: u32) -> Result<Vec<Alert>, StoreError>;

    /// Takes delivery attempt number `attempts + 1` of a due alert for the
    /// caller: the alert is not due again before `until`, so no other
    /// deliverer (another process) sends it meanwhile. `false` when it is
    /// no longer due at `now` with that many attempts (another deliverer
    /// took or recorded it). A deliverer that dies while sending leaves
    /// the alert due again at `until`.
    async fn claim_alert(
        &self,
        id: &str,
        attempts: u32,
        now: Millis,
        until: Millis,
    ) -> Result<bool, StoreError>;

    /// Records the result of delivery attempt number `attempts + 1`; `false`
    /// when another deliverer recorded that attempt first (its result wins).
    async fn record_alert_attempt(
        &self,
        id: &str,
        attempts: u32,
        result: &AlertAttempt,
    ) -> Result<bool, StoreError>;

    /// Alerts not delivered (pending or given up), newest first.
    async fn undelivered_alerts(&self, limit: u32) -> Result<Vec<Alert>, StoreError>;
}
