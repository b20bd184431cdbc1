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

use std::collections::HashMap;

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
    /// Dedupe keys past their window deleted (by a whole pass; a batch
    /// of runs leaves it at 0).
    pub dedupe_keys: u64,
}

/// Where a purge pass has got to in each range of runs it walks — per
/// workflow, the ended runs of each ended status, and the runs whose
/// payloads may be blanked — carried from one batch to the next, so each
/// batch's lookup starts where the last one ended rather than at the
/// oldest run. On PostgreSQL an index keeps the entries of deleted and
/// blanked rows until a vacuum, and a lookup from the start stepped over
/// all of them: a purge of 1M old runs slowed from 2,600 to 210 runs/s
/// (bench/w10.sh). A new position starts at the oldest run; a run a pass
/// skipped (a writer held it) is found by the next pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgePosition(HashMap<(String, &'static str), Millis>);

impl PurgePosition {
    /// Where the range `lane` of `workflow` resumes: its runs that ended
    /// at or after this.
    pub(crate) fn from(&self, workflow: &str, lane: &'static str) -> Millis {
        self.0
            .get(&(workflow.to_owned(), lane))
            .copied()
            .unwrap_or(Millis::MIN)
    }

    /// Records that the range `lane` of `workflow` was walked up to runs
    /// that ended at `to` (inclusive: runs ending at the same moment as the
    /// last one taken may still be there).
    pub(crate) fn advance(&mut self, workflow: &str, lane: &'static str, to: Millis) {
        let at = self.0.entry((workflow.to_owned(), lane)).or_insert(to);
        *at = (*at).max(to);
    }
}

/// The ended statuses a purge deletes, each one range of the index on
/// `(workflow, status, finished_at)`, walked in order of `finished_at`.
pub(crate) const ENDED: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The range of runs whose payloads may be blanked (`runs_to_blank`).
pub(crate) const BLANK: &str = "blank";

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
    /// cancelled runs that ended before `payloads_before`. Each lookup
    /// starts at `position` and moves it on (see [`PurgePosition`]): a
    /// pass hands the same position to each of its batches.
    async fn purge(
        &self,
        scope: &PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
        position: &mut PurgePosition,
    ) -> Result<Purged, StoreError>;

    /// Deletes up to `limit` dedupe keys whose window ended before `now`
    /// (one transaction), and says how many.
    async fn purge_dedupe_keys(&self, now: Millis, limit: u32) -> Result<u64, StoreError>;

    /// The store's size and its oldest kept run.
    async fn store_size(&self) -> Result<StoreSize, StoreError>;

    /// Whether every write waits for the one before it (SQLite's one
    /// writer): a purge batch then holds up every webhook that arrives
    /// while it runs, and must be kept short. On a store with row locks
    /// (PostgreSQL) a batch only locks the old runs it takes.
    fn one_writer(&self) -> bool {
        false
    }
}
