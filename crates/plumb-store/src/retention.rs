//! Retention: a store whose size follows what is kept, not everything that
//! ever ran. Ended runs past their workflow's `retention.runs` are deleted
//! with every row that hangs off them; succeeded and cancelled runs past
//! `retention.payloads` lose their trigger payload and step outputs (status,
//! timings, errors and keys stay). Queued and running runs are never
//! touched, dead letters keep their payloads (a replay needs them) until
//! their run goes, and the audit log is never purged.
//!
//! A purge works in small batches, each one transaction: a SIGKILL loses at
//! most the batch in flight (rolled back), and intake never waits behind a
//! long purge. Two processes purging at once only share the work.

use async_trait::async_trait;
use serde::Serialize;

use crate::{Millis, StoreError};

/// Whose runs a purge looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurgeScope {
    /// The runs of one workflow.
    Workflow(String),
    /// The runs of every workflow not named here (workflows no longer in
    /// the project, under the project's default retention).
    Others(Vec<String>),
}

/// What one purge batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    /// Runs deleted.
    pub runs: u64,
    /// Runs whose payloads were blanked.
    pub payloads: u64,
}

/// How big the store is, and how far back it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreSize {
    /// Bytes the store's tables and indexes take.
    pub bytes: u64,
    /// When the oldest kept run was created.
    pub oldest_run_at: Option<Millis>,
}

/// Purging what retention no longer keeps.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    /// One batch, in one transaction: deletes up to `limit` ended runs of
    /// `scope` that ended before `runs_before` (with their journal,
    /// attempts and alerts; schedule slots keep their record without the
    /// run), and blanks the payloads of up to `limit` succeeded or
    /// cancelled runs that ended before `payloads_before`.
    async fn purge(
        &self,
        scope: &PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
    ) -> Result<Purged, StoreError>;

    /// The store's size and its oldest kept run.
    async fn store_size(&self) -> Result<StoreSize, StoreError>;
}
