//! What each write decides, apart from its SQL, once for every backend.
//!
//! A backend's module holds its statements and its transactions; the
//! decisions behind them live here, so SQLite and PostgreSQL cannot drift
//! apart on what they mean: which answer a claim gets and which token it
//! records, the columns of a new run and of a run's end, what an alert
//! attempt sets, when a rekey is refused, what a deployment audits, how an
//! audit entry is chained, and the texts a caller or a person reads.

use std::time::Duration;

use crate::audit::{GENESIS, canonical_json, entry_hash};
use crate::json::{opt_json_text, to_json_text};
use crate::{
    AlertAttempt, AlertStatus, ApiToken, Claim, ClaimToken, Deployed, Failure, Lease, Millis,
    NewAuditEntry, NewRun, RunOutcome, RunStatus, SealedSecret, StepRecord, StepStatus, StoreError,
    now_ms,
};

/// How long past a new run's deadline its caller still waits for the
/// commit's answer before deciding "not accepted".
pub(crate) const DEADLINE_GRACE: Duration = Duration::from_millis(250);

/// The answer to a write with a deadline that did not commit in time.
pub(crate) const DEADLINE_MISSED: &str = "the store could not commit before the deadline";

/// Why a run committed behind its sender's back was cancelled.
pub(crate) const WITHDRAWN: &str = "withdrawn: its sender was told it was not accepted (the store did not commit in time), so it will send it again";

/// Most workflows one claim looks at before it gives up for this call (the
/// next call goes on from where it stopped).
pub(crate) const MAX_WORKFLOWS_PER_CLAIM: usize = 64;

/// The order in which a claim visits the workflows that have queued runs:
/// round-robin by name, starting after the workflow this process claimed
/// from last, so a backlog of one workflow never starves the others; oldest
/// first within a workflow. One round at most per call.
#[derive(Debug)]
pub(crate) struct WorkflowWalk {
    start: String,
    cursor: String,
    wrapped: bool,
    left: usize,
}

/// What a claim does next on its walk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Visit {
    /// Try this workflow's oldest claimable queued run.
    Try(String),
    /// Look again from the lowest name (the walk wrapped around).
    Again,
    /// Every workflow was visited: nothing to claim now.
    Done,
}

impl WorkflowWalk {
    /// A walk that starts after `after` (empty: from the lowest name).
    pub(crate) fn new(after: &str) -> Self {
        Self {
            start: after.to_owned(),
            cursor: after.to_owned(),
            wrapped: false,
            left: MAX_WORKFLOWS_PER_CLAIM,
        }
    }

    /// The bound of the next lookup: the lowest workflow with queued runs
    /// whose name is greater than this.
    pub(crate) fn cursor(&self) -> &str {
        &self.cursor
    }

    /// Given that lookup's answer, where to go.
    pub(crate) fn next(&mut self, found: Option<String>) -> Visit {
        if self.left == 0 {
            return Visit::Done;
        }
        self.left -= 1;
        match found {
            None if !self.wrapped && !self.start.is_empty() => {
                self.wrapped = true;
                self.cursor.clear();
                Visit::Again
            }
            None => Visit::Done,
            Some(w) if self.wrapped && w > self.start => Visit::Done,
            Some(w) => {
                self.cursor.clone_from(&w);
                Visit::Try(w)
            }
        }
    }
}

/// A journal row with its JSON already encoded, by the caller's task: the
/// statement only binds text, and a large output is encoded once.
#[derive(Debug)]
pub(crate) struct EncodedStep {
    pub(crate) run_id: String,
    pub(crate) step_id: String,
    pub(crate) item: Option<u32>,
    pub(crate) status: StepStatus,
    pub(crate) attempt: u32,
    pub(crate) state: Option<String>,
    pub(crate) output: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) status_code: Option<u16>,
    pub(crate) started_at: Millis,
    pub(crate) finished_at: Option<Millis>,
}

impl EncodedStep {
    /// Encodes a journal row, refusing JSON that would not read back.
    pub(crate) fn new(r: &StepRecord) -> Result<Self, StoreError> {
        let what = format!("the journal row of step `{}`", r.step_id);
        Ok(Self {
            run_id: r.run_id.clone(),
            step_id: r.step_id.clone(),
            item: r.item,
            status: r.status,
            attempt: r.attempt,
            state: opt_json_text(r.state.as_ref(), &what)?,
            output: opt_json_text(r.output.as_ref(), &what)?,
            error: r.error.clone(),
            status_code: r.status_code,
            started_at: r.started_at,
            finished_at: r.finished_at,
        })
    }
}

/// The columns of a new run's row.
#[derive(Debug)]
pub(crate) struct NewRunRow {
    pub(crate) trigger: String,
    pub(crate) status: RunStatus,
    /// Claims so far; also its strikes and heartbeat.
    pub(crate) claims: i64,
    pub(crate) now: Millis,
    pub(crate) started_at: Option<Millis>,
    pub(crate) lease_owner: Option<String>,
    pub(crate) lease_expires_at: Option<Millis>,
    pub(crate) lease_ms: Option<i64>,
    pub(crate) max_concurrency: Option<i64>,
}

impl NewRunRow {
    /// The row of `run`, its trigger encoded (or refused).
    pub(crate) fn new(run: &NewRun) -> Result<Self, StoreError> {
        let now = now_ms();
        let trigger = to_json_text(&run.trigger, "the trigger document")?;
        // A run created leased (a foreground `plumb run`) is claim number 1.
        let (status, lease_owner, lease_expires_at, lease_ms, started_at, claims) = match &run.lease
        {
            Some(l) => (
                RunStatus::Running,
                Some(ClaimToken::new(&l.owner, 1).to_string()),
                Some(now.saturating_add(l.ttl_ms)),
                Some(l.ttl_ms),
                Some(now),
                1_i64,
            ),
            None => (RunStatus::Queued, None, None, None, None, 0),
        };
        Ok(Self {
            trigger,
            status,
            claims,
            now,
            started_at,
            lease_owner,
            lease_expires_at,
            lease_ms,
            max_concurrency: run.max_concurrency.map(i64::from),
        })
    }
}

/// The lease columns of a run being claimed.
pub(crate) struct LeaseState {
    pub(crate) status: String,
    pub(crate) claims: i64,
    pub(crate) holder: Option<String>,
    pub(crate) heartbeat: i64,
    pub(crate) expires_at: Option<Millis>,
    pub(crate) ttl_ms: Option<i64>,
}

/// The columns [`LeaseState::read`] reads.
pub(crate) const LEASE_STATE_COLUMNS: &str =
    "status, claims, lease_owner, heartbeat, lease_expires_at, lease_ms";

impl LeaseState {
    /// Reads [`LEASE_STATE_COLUMNS`].
    pub(crate) fn read<R: crate::rows::Columns>(row: &R) -> Result<Self, R::Error> {
        Ok(Self {
            status: row.text("status")?,
            claims: row.int("claims")?,
            holder: row.opt_text("lease_owner")?,
            heartbeat: row.int("heartbeat")?,
            expires_at: row.opt_int("lease_expires_at")?,
            ttl_ms: row.opt_int("lease_ms")?,
        })
    }
}

/// What an explicit claim does with the run as it found it.
pub(crate) enum ClaimStep {
    /// Answer this without writing.
    Answer(Claim),
    /// Take the lease: the run has had `claims` claims so far.
    Take(i64),
}

/// Decides an explicit claim ([`crate::RunStore::claim_run`]): the lease
/// is taken if nobody holds it, or if the holder and heartbeat are exactly
/// `steal_from`.
pub(crate) fn decide_claim(
    current: Option<LeaseState>,
    steal_from: Option<(&str, i64)>,
) -> Result<ClaimStep, StoreError> {
    let Some(current) = current else {
        return Ok(ClaimStep::Answer(Claim::NotFound));
    };
    let status = RunStatus::parse(&current.status)?;
    if status.is_terminal() {
        return Ok(ClaimStep::Answer(Claim::Ended(status)));
    }
    if let Some(holder) = current.holder
        && steal_from != Some((holder.as_str(), current.heartbeat))
    {
        return Ok(ClaimStep::Answer(Claim::Busy {
            owner: holder,
            expires_at: current.expires_at.unwrap_or(0),
            heartbeat: current.heartbeat,
            ttl_ms: current.ttl_ms.unwrap_or(0),
        }));
    }
    Ok(ClaimStep::Take(current.claims))
}

/// The lease columns a claim writes: the run's next claim number, a fresh
/// token for it, and the lease's times.
pub(crate) struct NextLease {
    pub(crate) claim: i64,
    pub(crate) token: String,
    pub(crate) now: Millis,
    pub(crate) expires_at: Millis,
    pub(crate) ttl_ms: i64,
}

impl NextLease {
    /// The claim after `claims` claims, by `lease.owner`.
    pub(crate) fn new(claims: i64, lease: &Lease) -> Self {
        let now = now_ms();
        let claim = u32::try_from(claims.saturating_add(1)).unwrap_or(u32::MAX);
        Self {
            claim: i64::from(claim),
            token: ClaimToken::new(&lease.owner, claim).to_string(),
            now,
            expires_at: now.saturating_add(lease.ttl_ms),
            ttl_ms: lease.ttl_ms,
        }
    }
}

/// The columns a run's end writes.
pub(crate) struct Ending {
    pub(crate) status: RunStatus,
    pub(crate) now: Millis,
    /// The failure's message (`error`), when it has one.
    pub(crate) error: Option<String>,
    pub(crate) failure: Failure,
}

impl Ending {
    /// How `outcome` is stored.
    pub(crate) fn new(outcome: &RunOutcome) -> Self {
        let (status, failure) = match outcome {
            RunOutcome::Succeeded | RunOutcome::SucceededMovingCursor(_) => {
                (RunStatus::Succeeded, Failure::default())
            }
            RunOutcome::Failed(f) => (RunStatus::Failed, f.clone()),
            RunOutcome::Cancelled(why) => (
                RunStatus::Cancelled,
                Failure {
                    message: why.clone(),
                    ..Failure::default()
                },
            ),
        };
        Self {
            status,
            now: now_ms(),
            error: (!failure.message.is_empty()).then(|| failure.message.clone()),
            failure,
        }
    }

    /// `failed_item`, `failed_attempt` and `failed_status_code`.
    pub(crate) fn numbers(&self) -> (Option<i64>, Option<i64>, Option<i64>) {
        (
            self.failure.item.map(i64::from),
            self.failure.attempt.map(i64::from),
            self.failure.status_code.map(i64::from),
        )
    }
}

/// What a delivery attempt sets on its alert.
pub(crate) struct AlertUpdate<'a> {
    pub(crate) status: AlertStatus,
    pub(crate) next_attempt_at: Millis,
    pub(crate) error: Option<&'a str>,
    pub(crate) delivered_at: Option<Millis>,
}

impl<'a> AlertUpdate<'a> {
    /// The columns `result` sets.
    pub(crate) fn new(result: &'a AlertAttempt) -> Self {
        let now = now_ms();
        let (status, next_attempt_at, error, delivered_at) = match result {
            AlertAttempt::Delivered => (AlertStatus::Delivered, now, None, Some(now)),
            AlertAttempt::RetryAt { error, at } => {
                (AlertStatus::Pending, *at, Some(error.as_str()), None)
            }
            AlertAttempt::GaveUp { error } => {
                (AlertStatus::Failed, now, Some(error.as_str()), None)
            }
        };
        Self {
            status,
            next_attempt_at,
            error,
            delivered_at,
        }
    }
}

/// The secrets' version from `(name, nonce)` in name order. Every seal
/// draws a fresh random nonce, so the nonces change on each set, rotation
/// and rekey, even within one millisecond.
pub(crate) fn secrets_version_of(rows: &[(String, Vec<u8>)]) -> String {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for (name, nonce) in rows {
        sha2::Digest::update(&mut h, name.as_bytes());
        sha2::Digest::update(&mut h, [0]);
        sha2::Digest::update(&mut h, nonce);
    }
    format!("{}:{}", rows.len(), hex::encode(sha2::Digest::finalize(h)))
}

/// Refuses a rekey unless the secrets are still at `expected` (`current`
/// is their version now, read in the rekey's transaction) and `resealed`
/// names exactly the `stored` secrets (in name order).
pub(crate) fn check_rekey(
    current: &str,
    expected: &str,
    stored: &[String],
    resealed: &[(String, SealedSecret)],
) -> Result<(), StoreError> {
    if current != expected {
        return Err(StoreError::Other(
            "a secret was set, rotated or deleted while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    let mut given: Vec<&str> = resealed.iter().map(|(n, _)| n.as_str()).collect();
    given.sort_unstable();
    if given != stored.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(StoreError::Other(
            "the secrets changed while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    Ok(())
}

/// The audit entries the store writes with the change they record.
pub(crate) mod entries {
    use serde_json::json;

    use super::{ApiToken, NewAuditEntry, SealedSecret};

    /// A run cancelled on request.
    pub(crate) fn run_cancelled(actor: &str, id: &str, reason: &str) -> NewAuditEntry {
        NewAuditEntry::new(actor, "run.cancelled", id, json!({ "reason": reason }))
    }

    /// A workflow's cursor set (`cursor.set`) or reset (`cursor.reset`) by
    /// hand.
    pub(crate) fn cursor_set(
        actor: &str,
        workflow: &str,
        value: &serde_json::Value,
        version: i64,
    ) -> NewAuditEntry {
        let action = if value.is_null() {
            "cursor.reset"
        } else {
            "cursor.set"
        };
        NewAuditEntry::new(
            actor,
            action,
            workflow,
            json!({ "value": value, "version": version }),
        )
    }

    /// A failed run queued again.
    pub(crate) fn run_replayed(actor: &str, id: &str) -> NewAuditEntry {
        NewAuditEntry::new(actor, "run.replayed", id, json!({}))
    }

    /// A secret set (`secret.set`) or rotated (`secret.rotated`).
    pub(crate) fn secret_written(
        actor: &str,
        action: &str,
        name: &str,
        key_id: &str,
    ) -> NewAuditEntry {
        NewAuditEntry::new(actor, action, name, json!({ "key_id": key_id }))
    }

    /// A secret deleted.
    pub(crate) fn secret_deleted(actor: &str, name: &str) -> NewAuditEntry {
        NewAuditEntry::new(actor, "secret.deleted", name, json!({}))
    }

    /// Every secret sealed under a new key.
    pub(crate) fn secrets_rekeyed(
        actor: &str,
        resealed: &[(String, SealedSecret)],
    ) -> NewAuditEntry {
        let key_id = resealed
            .first()
            .map(|(_, s)| s.key_id.clone())
            .unwrap_or_default();
        NewAuditEntry::new(
            actor,
            "secrets.rekeyed",
            "*",
            json!({ "secrets": resealed.len(), "key_id": key_id }),
        )
    }

    /// An API token created.
    pub(crate) fn token_created(actor: &str, token: &ApiToken) -> NewAuditEntry {
        NewAuditEntry::new(
            actor,
            "token.created",
            &token.name,
            json!({ "role": token.role.as_str(), "id": token.id }),
        )
    }

    /// An API token revoked.
    pub(crate) fn token_revoked(actor: &str, name: &str) -> NewAuditEntry {
        NewAuditEntry::new(actor, "token.revoked", name, json!({}))
    }
}

/// One change a deployment records.
pub(crate) enum DeployChange<'a> {
    /// Record this version of the item.
    Upsert(&'a Deployed),
    /// Forget the recorded `(kind, name)`.
    Remove(String, String),
}

/// What a deployment of `items` changes, given the `(kind, name, version)`
/// rows recorded: each change with its audit entry and its `kind:name`.
/// Items whose version is recorded already change nothing; recorded
/// connections and workflows missing from `items` are removed (the config
/// is never removed: it is always deployed).
pub(crate) fn plan_deployment<'a>(
    recorded: &[(String, String, String)],
    items: &'a [Deployed],
    actor: &str,
) -> Vec<(DeployChange<'a>, NewAuditEntry, String)> {
    let mut changes = Vec::new();
    for item in items {
        let before = recorded
            .iter()
            .find(|(k, n, _)| *k == item.kind && *n == item.name)
            .map(|(_, _, v)| v.as_str());
        if before == Some(item.version.as_str()) {
            continue;
        }
        let action = match item.kind.as_str() {
            "config" => "config.changed",
            "connection" => "connection.changed",
            _ => "workflow.deployed",
        };
        let entry = NewAuditEntry::new(
            actor,
            action,
            &item.name,
            serde_json::json!({ "file": item.file, "version": item.version, "previous": before }),
        );
        changes.push((
            DeployChange::Upsert(item),
            entry,
            format!("{}:{}", item.kind, item.name),
        ));
    }
    for (kind, name, version) in recorded {
        if kind == "config" || items.iter().any(|i| i.kind == *kind && i.name == *name) {
            continue;
        }
        let entry = NewAuditEntry::new(
            actor,
            &format!("{kind}.removed"),
            name,
            serde_json::json!({ "previous": version }),
        );
        changes.push((
            DeployChange::Remove(kind.clone(), name.clone()),
            entry,
            format!("{kind}:{name}"),
        ));
    }
    changes
}

/// An audit entry ready to insert: chained to the head it was read from.
pub(crate) struct Chained {
    pub(crate) seq: i64,
    pub(crate) at: Millis,
    pub(crate) details: String,
    pub(crate) prev_hash: String,
    pub(crate) hash: String,
}

impl Chained {
    /// Chains `e` after the head `(seq, hash)`, or starts the chain.
    pub(crate) fn new(head: Option<(i64, String)>, e: &NewAuditEntry) -> Self {
        let (last_seq, prev_hash) = head.unwrap_or_else(|| (0, GENESIS.to_owned()));
        let seq = last_seq + 1;
        let at = now_ms();
        let hash = entry_hash(
            &prev_hash, seq, at, &e.actor, &e.action, &e.subject, &e.details,
        );
        Self {
            seq,
            at,
            details: canonical_json(&e.details),
            prev_hash,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Visit, WorkflowWalk};

    /// Runs a walk over `queued` (workflows with queued runs), every try
    /// failing, and returns the workflows it tried in order.
    fn tried(after: &str, queued: &[&str]) -> Vec<String> {
        let mut walk = WorkflowWalk::new(after);
        let mut out = Vec::new();
        loop {
            let found = queued
                .iter()
                .filter(|w| **w > walk.cursor())
                .min()
                .map(|w| (*w).to_owned());
            match walk.next(found) {
                Visit::Try(w) => out.push(w),
                Visit::Again => {}
                Visit::Done => return out,
            }
        }
    }

    #[test]
    fn a_walk_visits_every_workflow_once_starting_after_the_last_claimed() {
        assert_eq!(tried("", &["a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(tried("b", &["a", "b", "c"]), ["c", "a", "b"]);
        assert_eq!(tried("c", &["a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(tried("zz", &["a"]), ["a"]);
        assert!(tried("b", &[]).is_empty());
    }

    #[test]
    fn a_walk_is_bounded() {
        let many: Vec<String> = (0..1000).map(|i| format!("w{i:04}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(tried("", &refs).len(), super::MAX_WORKFLOWS_PER_CLAIM);
    }
}
