//! Stored rows to values, once for every backend.
//!
//! A backend implements [`Columns`] for its driver's row type (a column by
//! name, as text, a whole number, a flag or bytes); the mappings below turn
//! such a row into a [`Run`], a [`StepRecord`], an [`Alert`], … So both
//! backends read the same column names into the same fields, and decide
//! the same way what an unreadable value means: a run whose trigger
//! document does not decode is returned with [`Run::unreadable`] set (it
//! fails on its own), while any other bad value is the backend's decode
//! error (`StoreError::Corrupt` once mapped).
//!
//! Whole numbers are read as `i64` (SQLite's INTEGER, PostgreSQL's BIGINT)
//! and narrowed here; a count that does not fit reads as 0, as before.

use serde_json::Value;

use crate::json::from_json_text;
use crate::{
    Alert, AlertStatus, ApiToken, AttemptFailure, AuditEntry, Failure, LeasedRun, Role, Run,
    RunStatus, SealedSecret, SecretMeta, StepRecord, StepStatus, StoreError, WorkflowStats,
    WorkflowVersion,
};

/// A row of a query result, read by column name.
pub(crate) trait Columns {
    /// The driver's error (a column missing, of another type, or a value
    /// [`Columns::invalid`] refused).
    type Error: std::fmt::Display;

    /// A TEXT column that is never NULL.
    fn text(&self, col: &str) -> Result<String, Self::Error>;
    /// A TEXT column.
    fn opt_text(&self, col: &str) -> Result<Option<String>, Self::Error>;
    /// A whole-number column that is never NULL.
    fn int(&self, col: &str) -> Result<i64, Self::Error>;
    /// A whole-number column.
    fn opt_int(&self, col: &str) -> Result<Option<i64>, Self::Error>;
    /// A flag (SQLite's 0/1, PostgreSQL's BOOLEAN).
    fn flag(&self, col: &str) -> Result<bool, Self::Error>;
    /// A bytes column (BLOB, BYTEA).
    fn bytes(&self, col: &str) -> Result<Vec<u8>, Self::Error>;
    /// A value that was read but means nothing valid, as the driver's error.
    fn invalid(e: StoreError) -> Self::Error;

    /// A JSON column (stored as text).
    fn json(&self, col: &str) -> Result<Option<Value>, Self::Error> {
        self.opt_text(col)?
            .map(|t| from_json_text(&t, col).map_err(Self::invalid))
            .transpose()
    }

    /// A small count or number; one that does not fit reads as `None`.
    fn opt_u32(&self, col: &str) -> Result<Option<u32>, Self::Error> {
        Ok(self.opt_int(col)?.and_then(|v| u32::try_from(v).ok()))
    }

    /// An HTTP status.
    fn opt_u16(&self, col: &str) -> Result<Option<u16>, Self::Error> {
        Ok(self.opt_int(col)?.and_then(|v| u16::try_from(v).ok()))
    }

    /// A `for_each` item index (stored as -1 for the step as a whole).
    fn item(&self, col: &str) -> Result<Option<u32>, Self::Error> {
        Ok(item_from_db(self.int(col)?))
    }
}

/// The stored form of a `for_each` item index: -1 is the step as a whole
/// (a primary key column cannot be NULL).
pub(crate) fn item_to_db(item: Option<u32>) -> i64 {
    item.map_or(-1, i64::from)
}

/// See [`item_to_db`].
pub(crate) fn item_from_db(item: i64) -> Option<u32> {
    u32::try_from(item).ok()
}

/// The run ids that start with `prefix` are those `>= low` and `< high`
/// in byte order; `None` when no run id can. Run ids are UUIDs: a prefix
/// is hex digits and dashes, and every id starting with it sorts below the
/// prefix followed by `~`.
pub(crate) fn run_id_range(prefix: &str) -> Option<(String, String)> {
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None;
    }
    let low = prefix.to_ascii_lowercase();
    let high = format!("{low}~");
    Some((low, high))
}

/// The columns [`run`] reads, in a `SELECT` list.
pub(crate) const RUN_COLUMNS: &str = "id, workflow, version, trigger_payload, status, claims, \
    strikes, last_error, not_before, replays, created_at, started_at, finished_at, updated_at, \
    error, failed_step, failed_item, failed_attempt, failed_status_code, lease_owner, \
    lease_expires_at, cursor";

/// A run ([`RUN_COLUMNS`]).
pub(crate) fn run<R: Columns>(row: &R) -> Result<Run, R::Error> {
    let status = RunStatus::parse(&row.text("status")?).map_err(R::invalid)?;
    // A trigger document that does not decode must not stop a claim or a
    // listing: the run is returned with the reason, and fails on its own.
    let (trigger, unreadable) = match row.json("trigger_payload") {
        Ok(t) => (t.unwrap_or(Value::Null), None),
        Err(e) => (
            Value::Null,
            Some(format!("its trigger document cannot be read ({e})")),
        ),
    };
    Ok(Run {
        id: row.text("id")?,
        workflow: row.text("workflow")?,
        version: row.text("version")?,
        trigger,
        status,
        claims: row.opt_u32("claims")?.unwrap_or(0),
        strikes: row.opt_u32("strikes")?.unwrap_or(0),
        last_error: row.opt_text("last_error")?,
        not_before: row.opt_int("not_before")?,
        unreadable,
        replays: row.opt_u32("replays")?.unwrap_or(0),
        created_at: row.int("created_at")?,
        started_at: row.opt_int("started_at")?,
        finished_at: row.opt_int("finished_at")?,
        updated_at: row.int("updated_at")?,
        failure: match row.opt_text("error")? {
            Some(message) => Some(Failure {
                message,
                step: row.opt_text("failed_step")?,
                item: row.opt_u32("failed_item")?,
                attempt: row.opt_u32("failed_attempt")?,
                status_code: row.opt_u16("failed_status_code")?,
            }),
            None => None,
        },
        lease_owner: row.opt_text("lease_owner")?,
        lease_expires_at: row.opt_int("lease_expires_at")?,
        // Like the trigger: a record that does not decode reads as none
        // rather than stopping a listing.
        cursor: row.json("cursor").ok().flatten(),
    })
}

/// The columns [`step`] reads.
pub(crate) const STEP_COLUMNS: &str = "run_id, step_id, item, status, attempt, state, output, \
    error, status_code, started_at, finished_at";

/// A journal row ([`STEP_COLUMNS`]).
pub(crate) fn step<R: Columns>(row: &R) -> Result<StepRecord, R::Error> {
    Ok(StepRecord {
        run_id: row.text("run_id")?,
        step_id: row.text("step_id")?,
        item: row.item("item")?,
        status: StepStatus::parse(&row.text("status")?).map_err(R::invalid)?,
        attempt: row.opt_u32("attempt")?.unwrap_or(0),
        state: row.json("state")?,
        output: row.json("output")?,
        error: row.opt_text("error")?,
        status_code: row.opt_u16("status_code")?,
        started_at: row.int("started_at")?,
        finished_at: row.opt_int("finished_at")?,
    })
}

/// The columns [`attempt_failure`] reads.
pub(crate) const ATTEMPT_COLUMNS: &str = "run_id, step_id, item, round, attempt, started_at, \
    finished_at, status_code, error, retryable";

/// A failed attempt ([`ATTEMPT_COLUMNS`]).
pub(crate) fn attempt_failure<R: Columns>(row: &R) -> Result<AttemptFailure, R::Error> {
    Ok(AttemptFailure {
        run_id: row.text("run_id")?,
        step_id: row.text("step_id")?,
        item: row.item("item")?,
        round: row.opt_u32("round")?.unwrap_or(0),
        attempt: row.opt_u32("attempt")?.unwrap_or(0),
        started_at: row.int("started_at")?,
        finished_at: row.int("finished_at")?,
        status_code: row.opt_u16("status_code")?,
        error: row.text("error")?,
        retryable: row.flag("retryable")?,
    })
}

/// A run under lease: `id, lease_owner, heartbeat, lease_ms, strikes`.
pub(crate) fn leased_run<R: Columns>(row: &R) -> Result<LeasedRun, R::Error> {
    Ok(LeasedRun {
        id: row.text("id")?,
        holder: row.text("lease_owner")?,
        heartbeat: row.int("heartbeat")?,
        // Leases taken before durations were recorded had the default.
        ttl_ms: row.opt_int("lease_ms")?.unwrap_or(30_000),
        strikes: row.opt_u32("strikes")?.unwrap_or(0),
    })
}

/// A workflow version: `hash, workflow, file, source, created_at`.
pub(crate) fn workflow_version<R: Columns>(row: &R) -> Result<WorkflowVersion, R::Error> {
    Ok(WorkflowVersion {
        hash: row.text("hash")?,
        workflow: row.text("workflow")?,
        file: row.text("file")?,
        source: row.text("source")?,
        created_at: row.int("created_at")?,
    })
}

/// One workflow's counts: `workflow, queued, running, dead_letters,
/// last_success_at, last_failure_at`.
/// Run counts and last outcomes per workflow, read from indexes only: the
/// workflows are found by skipping from one name to the next
/// (`runs_by_workflow`), and each figure is a range of
/// `runs_by_workflow_status_*`. The time grows with the number of
/// workflows and of open runs and dead letters, never with the succeeded
/// history. The same statement on SQLite and PostgreSQL.
pub(crate) const WORKFLOW_STATS: &str = "WITH RECURSIVE w(workflow) AS ( \
        SELECT min(workflow) FROM runs \
        UNION ALL \
        SELECT (SELECT min(r.workflow) FROM runs r WHERE r.workflow > w.workflow) \
        FROM w WHERE w.workflow IS NOT NULL) \
    SELECT w.workflow AS workflow, \
      (SELECT count(*) FROM runs r WHERE r.workflow = w.workflow AND r.status = 'queued') AS queued, \
      (SELECT count(*) FROM runs r WHERE r.workflow = w.workflow AND r.status = 'running') AS running, \
      (SELECT count(*) FROM runs r WHERE r.workflow = w.workflow AND r.status = 'failed') AS dead_letters, \
      (SELECT max(r.finished_at) FROM runs r WHERE r.workflow = w.workflow AND r.status = 'succeeded') \
        AS last_success_at, \
      (SELECT max(r.finished_at) FROM runs r WHERE r.workflow = w.workflow AND r.status = 'failed') \
        AS last_failure_at \
    FROM w WHERE w.workflow IS NOT NULL ORDER BY w.workflow";

/// The workflows that have runs in the store, in name order: one index
/// lookup per workflow (skipping from one name to the next), never a walk
/// of the runs.
pub(crate) const STORED_WORKFLOWS: &str = "WITH RECURSIVE w(workflow) AS ( \
        SELECT min(workflow) FROM runs \
        UNION ALL \
        SELECT (SELECT min(r.workflow) FROM runs r WHERE r.workflow > w.workflow) \
        FROM w WHERE w.workflow IS NOT NULL) \
    SELECT workflow FROM w WHERE workflow IS NOT NULL";

/// The workflows a purge of `scope` covers, out of those with runs stored:
/// the one named, or every one not named (never a condition like
/// `workflow NOT IN (…)`, which no index can serve and which read every
/// ended run of the store once a minute).
pub(crate) fn purge_workflows(scope: &crate::PurgeScope, stored: Vec<String>) -> Vec<String> {
    match scope {
        crate::PurgeScope::Workflow(name) => vec![name.clone()],
        crate::PurgeScope::Others(names) => {
            stored.into_iter().filter(|w| !names.contains(w)).collect()
        }
    }
}

/// A row of [`WORKFLOW_STATS`].
pub(crate) fn workflow_stats<R: Columns>(row: &R) -> Result<WorkflowStats, R::Error> {
    let count = |col: &str| -> Result<u64, R::Error> {
        Ok(u64::try_from(row.opt_int(col)?.unwrap_or(0)).unwrap_or(0))
    };
    Ok(WorkflowStats {
        workflow: row.text("workflow")?,
        queued: count("queued")?,
        running: count("running")?,
        dead_letters: count("dead_letters")?,
        last_success_at: row.opt_int("last_success_at")?,
        last_failure_at: row.opt_int("last_failure_at")?,
    })
}

/// Open runs per workflow, from `(workflow, status, count)` rows of the
/// statuses `queued`, `running` and `failed`.
pub(crate) fn open_counts(rows: Vec<(String, String, i64)>) -> Vec<WorkflowStats> {
    let mut out: Vec<WorkflowStats> = Vec::new();
    for (workflow, status, n) in rows {
        let n = u64::try_from(n).unwrap_or(0);
        let i = match out.iter().position(|s| s.workflow == workflow) {
            Some(i) => i,
            None => {
                out.push(WorkflowStats {
                    workflow,
                    ..WorkflowStats::default()
                });
                out.len() - 1
            }
        };
        match status.as_str() {
            "queued" => out[i].queued = n,
            "running" => out[i].running = n,
            _ => out[i].dead_letters = n,
        }
    }
    out
}

/// The outputs of a `for_each` step's items by index, from `(item,
/// output)` rows in item order: `null` for an item without one.
pub(crate) fn item_outputs(rows: Vec<(i64, Option<String>)>) -> Vec<String> {
    let len = rows
        .last()
        .and_then(|(i, _)| usize::try_from(*i).ok())
        .map_or(0, |i| i + 1);
    let mut out = vec!["null".to_owned(); len];
    for (item, output) in rows {
        if let (Ok(i), Some(text)) = (usize::try_from(item), output)
            && let Some(slot) = out.get_mut(i)
        {
            *slot = text;
        }
    }
    out
}

/// The columns [`alert`] reads.
pub(crate) const ALERT_COLUMNS: &str = "id, run_id, workflow, channel, payload, status, \
    attempts, next_attempt_at, last_error, created_at, delivered_at";

/// An alert ([`ALERT_COLUMNS`]).
pub(crate) fn alert<R: Columns>(row: &R) -> Result<Alert, R::Error> {
    Ok(Alert {
        id: row.text("id")?,
        run_id: row.text("run_id")?,
        workflow: row.text("workflow")?,
        channel: row.text("channel")?,
        payload: row.json("payload")?.unwrap_or(Value::Null),
        status: AlertStatus::parse(&row.text("status")?).map_err(R::invalid)?,
        attempts: row.opt_u32("attempts")?.unwrap_or(0),
        next_attempt_at: row.int("next_attempt_at")?,
        last_error: row.opt_text("last_error")?,
        created_at: row.int("created_at")?,
        delivered_at: row.opt_int("delivered_at")?,
    })
}

/// The columns [`audit_entry`] reads.
pub(crate) const AUDIT_COLUMNS: &str = "seq, at, actor, action, subject, details, prev_hash, hash";

/// An audit entry ([`AUDIT_COLUMNS`]).
pub(crate) fn audit_entry<R: Columns>(row: &R) -> Result<AuditEntry, R::Error> {
    Ok(AuditEntry {
        seq: row.int("seq")?,
        at: row.int("at")?,
        actor: row.text("actor")?,
        action: row.text("action")?,
        subject: row.text("subject")?,
        details: row.json("details")?.unwrap_or(Value::Null),
        prev_hash: row.text("prev_hash")?,
        hash: row.text("hash")?,
    })
}

/// An API token: `id, name, role, created_at, revoked_at`.
pub(crate) fn token<R: Columns>(row: &R) -> Result<ApiToken, R::Error> {
    Ok(ApiToken {
        id: row.text("id")?,
        name: row.text("name")?,
        role: Role::parse(&row.text("role")?).map_err(R::invalid)?,
        created_at: row.int("created_at")?,
        revoked_at: row.opt_int("revoked_at")?,
    })
}

/// A secret's metadata: `name, key_id, created_at, rotated_at`.
pub(crate) fn secret_meta<R: Columns>(row: &R) -> Result<SecretMeta, R::Error> {
    Ok(SecretMeta {
        name: row.text("name")?,
        key_id: row.text("key_id")?,
        created_at: row.int("created_at")?,
        rotated_at: row.opt_int("rotated_at")?,
    })
}

/// A sealed secret with its metadata: [`secret_meta`]'s columns and
/// `nonce, ciphertext`.
pub(crate) fn secret<R: Columns>(row: &R) -> Result<(SealedSecret, SecretMeta), R::Error> {
    let meta = secret_meta(row)?;
    Ok((
        SealedSecret {
            nonce: row.bytes("nonce")?,
            ciphertext: row.bytes("ciphertext")?,
            key_id: meta.key_id.clone(),
        },
        meta,
    ))
}
