//! The SQLite store: one file, WAL mode, `synchronous=FULL` by default.
//!
//! # Group commit
//!
//! Every write goes to one writer thread that owns the only write
//! connection. The thread takes whatever writes are waiting — one, or
//! hundreds from concurrent webhooks and workers — runs them in a single
//! transaction and commits once: one WAL fsync for the whole batch. Each
//! caller is answered only after that commit, so "the call returned" still
//! means "durable", but the cost of the fsync is shared. Under no load a
//! batch is one write and nothing waits; under load, batches grow by
//! themselves.
//!
//! The writer is a plain OS thread running SQLite synchronously: a batch
//! of hundreds of statements costs no thread handoff per statement, only one
//! per caller (the request in, the answer out).
//!
//! A write whose caller has already given up (a webhook that timed out and
//! answered 503) is skipped rather than committed behind its back. A run
//! created with a deadline whose caller gave up *while* the batch was
//! committing (a stalled disk) is withdrawn — cancelled as "withdrawn" —
//! in its own transaction right after that commit, before any claim can
//! take it (claims in the same batch are applied before the batch's new
//! runs): its sender was told "not accepted" and will send it again. The
//! answer is decided once, on the caller's side (see `SqliteStore::write`),
//! so a run is never both refused and kept by this process. Ways left to a
//! duplicate, never a loss: a caller whose own task is starved past the
//! grace period after the store answered in time, and another process
//! sharing the file (a `plumb worker`) that claims the run in the
//! milliseconds between that commit and its withdrawal.
//!
//! Within a batch each write sees the ones before it. A write that fails on
//! its own (a constraint) fails alone; a failure of the database itself
//! (locked past the busy timeout, disk full, read-only, I/O) rolls back the
//! batch and fails every write in it.
//!
//! Reads use a small pool of read connections on tokio's blocking threads,
//! so listing runs never waits on a commit.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior,
    params,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    Alert, AlertAttempt, AlertStatus, ApiToken, AttemptFailure, AuditEntry, CancelResult, Claim,
    ClaimToken, Deployed, Failure, Lease, LeasedRun, Millis, NewAlert, NewAuditEntry, NewRun,
    Release, ReplayResult, Role, Run, RunFilter, RunOutcome, RunStatus, SealedSecret, SecretMeta,
    SecretWrite, SecretWriteResult, StepRecord, StepStatus, Store, StoreError, WorkflowStats,
    WorkflowVersion, now_ms,
};

/// How hard SQLite works to make each commit durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// fsync the WAL on every commit: a committed row survives power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: survives a process crash (SIGKILL), may
    /// lose the last commits on power loss. Faster; opt-in only.
    Normal,
}

impl FromStr for Synchronous {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            other => Err(format!(
                "unknown synchronous mode `{other}` (use `full` or `normal`)"
            )),
        }
    }
}

/// How long a write waits for another process's lock before the store
/// reports [`StoreError::Busy`]. Shorter than a webhook's commit deadline,
/// so a locked store is reported (503) rather than waited out.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Read connections kept open.
const READERS: usize = 4;

/// A SQLite-backed [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    path: PathBuf,
}

#[derive(Debug)]
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(map_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(map_err)?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < READERS
        {
            idle.push(conn);
        }
    }
}

/// One write, as handed to the writer thread.
#[derive(Debug)]
enum Op {
    PutVersion(WorkflowVersion),
    CreateRun(NewRun),
    Claim {
        id: String,
        lease: Lease,
        steal_from: Option<(String, i64)>,
    },
    ClaimNext(Lease),
    Renew {
        id: String,
        lease: Lease,
    },
    Release {
        id: String,
        owner: String,
        how: Release,
    },
    Expire {
        seen: LeasedRun,
        reason: String,
        not_before: Millis,
    },
    RecordStep {
        owner: String,
        record: EncodedStep,
    },
    RecordAttempt {
        owner: String,
        failure: AttemptFailure,
    },
    Finish {
        id: String,
        owner: String,
        outcome: RunOutcome,
        last_step: Option<EncodedStep>,
        alerts: Vec<NewAlert>,
    },
    Cancel {
        id: String,
        reason: String,
        actor: String,
    },
    Replay {
        id: String,
        actor: String,
    },
    PutSecret {
        name: String,
        sealed: SealedSecret,
        mode: SecretWrite,
        actor: String,
    },
    DeleteSecret {
        name: String,
        actor: String,
    },
    Rekey {
        resealed: Vec<(String, SealedSecret)>,
        expected_version: String,
        actor: String,
    },
    CreateToken {
        token: ApiToken,
        hash: String,
        actor: String,
    },
    RevokeToken {
        name: String,
        actor: String,
    },
    Audit(NewAuditEntry),
    Deploy {
        items: Vec<Deployed>,
        actor: String,
    },
    Fire {
        workflow: String,
        slot: Millis,
        run: Option<NewRun>,
    },
    AlertAttempt {
        id: String,
        attempts: u32,
        result: AlertAttempt,
    },
    Ping,
    Close,
}

#[derive(Debug)]
enum Done {
    Unit,
    Rows(usize),
    Claim(Claim),
    MaybeRun(Option<Box<Run>>),
    Cancel(CancelResult),
    Replay(ReplayResult),
    Secret(SecretWriteResult),
    Flag(bool),
    Names(Vec<String>),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The schema, one script per version, applied in order. The database's
/// `user_version` is the number of scripts applied; each script runs in the
/// same transaction as the version bump, so a crash mid-migration leaves
/// the previous version intact.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_runs_and_journal.sql"),
    include_str!("../migrations/sqlite/0002_queue_schedules_alerts.sql"),
    include_str!("../migrations/sqlite/0003_health.sql"),
    include_str!("../migrations/sqlite/0004_queue_index.sql"),
    include_str!("../migrations/sqlite/0005_secrets_tokens_audit.sql"),
    include_str!("../migrations/sqlite/0006_strikes_and_heartbeats.sql"),
];

/// Applies the pending migrations, if any, in one transaction that takes
/// the write lock and then reads the schema version again: processes starting at once on
/// a new file wait for each other, and the first one migrates while the
/// others find nothing left to do.
fn migrate(conn: &mut Connection) -> Result<(), String> {
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    // Up to date (the usual case): nothing to lock. Opening the store must
    // not wait behind a long write of a running server.
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if current == known {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| format!("taking the store's write lock: {e}"))?;
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if current > known {
        return Err(format!(
            "the store has schema version {current}, newer than this plumb knows ({known}); upgrade plumb"
        ));
    }
    if current == known {
        return Ok(());
    }
    for (i, script) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let version = i + 1;
        tx.execute_batch(script)
            .map_err(|e| format!("applying schema version {version}: {e}"))?;
    }
    tx.pragma_update(None, "user_version", known)
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`, applies pending
    /// migrations and starts the writer thread.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError::Open`] when the file cannot be opened or
    /// migrated.
    pub async fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_writer(&path, synchronous))
                .await
                .map_err(|e| StoreError::Other(e.to_string()))?
        };
        let conn = opened.map_err(|message| StoreError::Open {
            location: path.display().to_string(),
            message,
        })?;
        let (tx, rx) = mpsc::channel(16 * MAX_BATCH);
        std::thread::Builder::new()
            .name("plumb-store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Open {
                location: path.display().to_string(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            writer: tx,
            readers: Arc::new(ReaderPool {
                path: path.clone(),
                idle: Mutex::new(Vec::new()),
            }),
            path,
        })
    }

    /// The file this store lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let deadline = match &op {
            Op::CreateRun(run) => run.deadline,
            _ => None,
        };
        let (reply, mut rx) = oneshot::channel();
        self.writer
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        let Some(deadline) = deadline else {
            return rx
                .await
                .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?;
        };
        // The answer is decided exactly once: either it arrived in time, or
        // the channel is closed first and the writer — finding nobody to
        // tell — withdraws the run if its commit lands after all. An answer
        // that raced the close is still taken, never dropped.
        let grace = deadline + Duration::from_millis(250);
        match tokio::time::timeout_at(grace.into(), &mut rx).await {
            Ok(answer) => {
                answer.map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?
            }
            Err(_) => {
                rx.close();
                match rx.try_recv() {
                    Ok(answer) => answer,
                    Err(_) => Err(StoreError::Unavailable(
                        "the store could not commit before the deadline".into(),
                    )),
                }
            }
        }
    }

    /// Runs a read on a pooled read connection, off the async threads.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?
    }
}

fn open_writer(path: &Path, synchronous: Synchronous) -> Result<Connection, String> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let mut conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| e.to_string())?;
    conn.pragma_update(None, "journal_mode", "wal")
        .map_err(|e| e.to_string())?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        },
    )
    .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(|e| e.to_string())?;
    conn.set_prepared_statement_cache_capacity(64);
    migrate(&mut conn).map_err(|e| format!("migrating the store: {e}"))?;
    Ok(conn)
}

/// The writer thread: batches, one transaction per batch.
fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut withdraw: Vec<String> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Callers that gave up (timed out) do not want their write anymore.
        batch.retain(|job| !job.reply.is_closed());
        let closing = batch.iter().any(|j| matches!(j.op, Op::Close));
        if !batch.is_empty() {
            commit_batch(&mut conn, &mut batch, &mut withdraw);
        }
        if closing {
            break;
        }
    }
    let _ = conn.close();
}

fn commit_batch(conn: &mut Connection, batch: &mut Vec<Job>, withdraw: &mut Vec<String>) {
    // Claims go before the runs created in the same batch: a claim must
    // never take a run whose sender may yet be told "not accepted" (the
    // writes of one batch come from callers that did not wait for each
    // other, so their order is free).
    batch.sort_by_key(|job| !matches!(job.op, Op::Claim { .. } | Op::ClaimNext(_)));
    commit_jobs(conn, batch, withdraw);
    // Runs committed behind their senders' backs are withdrawn at once, in
    // a transaction of their own, before the next batch's claims can see
    // them; if that fails too they are tried again first thing next batch.
    if !withdraw.is_empty() {
        commit_jobs(conn, &mut Vec::new(), withdraw);
    }
}

fn commit_jobs(conn: &mut Connection, batch: &mut Vec<Job>, withdraw: &mut Vec<String>) {
    let tx = match Transaction::new(conn, TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = map_err(e);
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(clone_err(&e)));
            }
            return;
        }
    };
    let mut results: Vec<Result<Done, StoreError>> = Vec::with_capacity(batch.len());
    let mut fatal: Option<StoreError> = None;
    for id in withdraw.iter() {
        let withdrawn = tx
            .prepare_cached(
                "UPDATE runs SET status = 'cancelled', finished_at = ?2, updated_at = ?2, \
                 error = 'withdrawn: its sender was told it was not accepted (the store did not commit in time), so it will send it again' \
                 WHERE id = ?1 AND status = 'queued'",
            )
            .and_then(|mut st| st.execute(params![id, now_ms()]));
        if let Err(e) = withdrawn {
            fatal = Some(map_err(e));
            break;
        }
    }
    for job in batch.iter() {
        if fatal.is_some() {
            break;
        }
        // Waiting for the lock may have outlasted a caller's deadline: a
        // write that may no longer be committed is skipped. One applied here
        // is committed below and its caller told so, however late.
        let expired = match &job.op {
            Op::CreateRun(run) => run.deadline.is_some_and(|d| std::time::Instant::now() > d),
            _ => false,
        };
        if job.reply.is_closed() || expired {
            results.push(Err(StoreError::Unavailable(
                "the store could not commit before the deadline".into(),
            )));
            continue;
        }
        // Each write in its own savepoint: one that fails is undone whole
        // (a half-applied schedule fire or claim must not be committed).
        if let Err(e) = tx.execute_batch("SAVEPOINT job") {
            fatal = Some(map_err(e));
            break;
        }
        let r = apply(&tx, &job.op);
        let settled = match &r {
            Ok(_) => tx.execute_batch("RELEASE job"),
            Err(_) => tx.execute_batch("ROLLBACK TO job; RELEASE job"),
        };
        if let Err(e) = settled {
            fatal = Some(map_err(e));
            break;
        }
        if let Err(e) = &r
            && (e.is_transient() || tx.is_autocommit())
        {
            // The database itself failed (or SQLite already rolled the
            // transaction back): nothing in this batch can be committed.
            fatal = Some(clone_err(e));
            break;
        }
        results.push(r);
    }
    let committed = match fatal {
        Some(e) => {
            let _ = tx.rollback();
            Err(e)
        }
        None => tx.commit().map_err(map_err),
    };
    match committed {
        Ok(()) => {
            withdraw.clear();
            for (job, result) in batch.drain(..).zip(results) {
                let late_run = match &job.op {
                    Op::CreateRun(run) if run.deadline.is_some() => Some(run.id.clone()),
                    _ => None,
                };
                // The caller stopped waiting while this commit was under
                // way: it answered "not accepted", so the run is withdrawn.
                if let (Err(Ok(_)), Some(id)) = (job.reply.send(result), late_run) {
                    tracing::warn!(run_id = %id, "A run committed after its sender was answered 503; withdrawing it.");
                    withdraw.push(id);
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, writes = batch.len(), "The store could not commit; every write of the batch failed.");
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(clone_err(&e)));
            }
        }
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Open { location, message } => StoreError::Open {
            location: location.clone(),
            message: message.clone(),
        },
        StoreError::Busy(m) => StoreError::Busy(m.clone()),
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::LeaseLost { run_id } => StoreError::LeaseLost {
            run_id: run_id.clone(),
        },
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Rejected(m) => StoreError::Rejected(m.clone()),
        StoreError::Other(m) => StoreError::Other(m.clone()),
    }
}

/// Maps a driver error to what it means for the caller.
fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Busy(e.to_string()),
            ErrorCode::ReadOnly
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory => StoreError::Unavailable(e.to_string()),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Other(e.to_string()),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::InvalidColumnName(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

/// Deepest nesting the store writes. serde_json reads back at most 127
/// levels; what enters plumb is held to [`plumb_core::limits::MAX_DEPTH`]
/// (64), plus the few levels plumb wraps around it. This is the last line
/// of defence: a record that would not read back is refused, not stored.
const MAX_STORED_DEPTH: usize = 120;

/// Largest JSON text stored in one column (SQLite refuses rows over 1 GB;
/// what enters plumb is held to far less).
const MAX_STORED_BYTES: usize = 256 * 1024 * 1024;

/// A JSON value as stored, once it is known to read back.
fn to_json_text(v: &Value, what: &str) -> Result<String, StoreError> {
    let m = plumb_core::limits::measure(v, MAX_STORED_DEPTH, MAX_STORED_BYTES);
    if m.depth > MAX_STORED_DEPTH {
        return Err(StoreError::Rejected(format!(
            "{what} nests more than {MAX_STORED_DEPTH} levels deep and would not read back"
        )));
    }
    let text = v.to_string();
    if text.len() > MAX_STORED_BYTES {
        return Err(StoreError::Rejected(format!(
            "{what} is larger than {} as JSON",
            plumb_core::limits::human_bytes(MAX_STORED_BYTES)
        )));
    }
    Ok(text)
}

fn opt_json_text(v: Option<&Value>, what: &str) -> Result<Option<String>, StoreError> {
    v.map(|v| to_json_text(v, what)).transpose()
}

/// A JSON column that does not decode names the column and why.
#[derive(Debug, thiserror::Error)]
#[error("column `{column}` holds JSON that cannot be read: {error}")]
struct BadJson {
    column: String,
    error: serde_json::Error,
}

fn json_col(row: &Row<'_>, col: &str) -> rusqlite::Result<Option<Value>> {
    let text: Option<String> = row.get(col)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                Type::Text,
                Box::new(BadJson {
                    column: col.to_owned(),
                    error,
                }),
            )
        })
    })
    .transpose()
}

fn item_to_db(item: Option<u32>) -> i64 {
    item.map_or(-1, i64::from)
}

fn item_from_db(item: i64) -> Option<u32> {
    u32::try_from(item).ok()
}

fn opt_u16(v: Option<i64>) -> Option<u16> {
    v.and_then(|v| u16::try_from(v).ok())
}

fn opt_u32(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

fn parse_col<T>(r: Result<T, StoreError>) -> rusqlite::Result<T> {
    r.map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e)))
}

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    let status = parse_col(RunStatus::parse(&row.get::<_, String>("status")?))?;
    let error: Option<String> = row.get("error")?;
    // A trigger document that does not decode must not stop a claim or a
    // listing: the run is returned with the reason, and fails on its own.
    let (trigger, unreadable) = match json_col(row, "trigger_payload") {
        Ok(t) => (t.unwrap_or(Value::Null), None),
        Err(e) => (
            Value::Null,
            Some(format!("its trigger document cannot be read ({e})")),
        ),
    };
    Ok(Run {
        id: row.get("id")?,
        workflow: row.get("workflow")?,
        version: row.get("version")?,
        trigger,
        status,
        claims: opt_u32(row.get("claims")?).unwrap_or(0),
        strikes: opt_u32(row.get("strikes")?).unwrap_or(0),
        last_error: row.get("last_error")?,
        not_before: row.get("not_before")?,
        unreadable,
        replays: opt_u32(row.get("replays")?).unwrap_or(0),
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
        updated_at: row.get("updated_at")?,
        failure: match error {
            Some(message) => Some(Failure {
                message,
                step: row.get("failed_step")?,
                item: opt_u32(row.get("failed_item")?),
                attempt: opt_u32(row.get("failed_attempt")?),
                status_code: opt_u16(row.get("failed_status_code")?),
            }),
            None => None,
        },
        lease_owner: row.get("lease_owner")?,
        lease_expires_at: row.get("lease_expires_at")?,
    })
}

fn step_from_row(row: &Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        run_id: row.get("run_id")?,
        step_id: row.get("step_id")?,
        item: item_from_db(row.get("item")?),
        status: parse_col(StepStatus::parse(&row.get::<_, String>("status")?))?,
        attempt: opt_u32(row.get("attempt")?).unwrap_or(0),
        state: json_col(row, "state")?,
        output: json_col(row, "output")?,
        error: row.get("error")?,
        status_code: opt_u16(row.get("status_code")?),
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
    })
}

fn alert_from_row(row: &Row<'_>) -> rusqlite::Result<Alert> {
    Ok(Alert {
        id: row.get("id")?,
        run_id: row.get("run_id")?,
        workflow: row.get("workflow")?,
        channel: row.get("channel")?,
        payload: json_col(row, "payload")?.unwrap_or(Value::Null),
        status: parse_col(AlertStatus::parse(&row.get::<_, String>("status")?))?,
        attempts: opt_u32(row.get("attempts")?).unwrap_or(0),
        next_attempt_at: row.get("next_attempt_at")?,
        last_error: row.get("last_error")?,
        created_at: row.get("created_at")?,
        delivered_at: row.get("delivered_at")?,
    })
}

const RUN_COLUMNS: &str = "id, workflow, version, trigger_payload, status, claims, strikes, \
    last_error, not_before, replays, created_at, started_at, finished_at, updated_at, error, \
    failed_step, failed_item, failed_attempt, failed_status_code, lease_owner, lease_expires_at";

const ALERT_COLUMNS: &str = "id, run_id, workflow, channel, payload, status, attempts, \
    next_attempt_at, last_error, created_at, delivered_at";

/// Performs one write inside the writer's open transaction.
fn apply(tx: &Transaction<'_>, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::PutVersion(v) => {
            tx.prepare_cached(
                "INSERT INTO workflow_versions (hash, workflow, file, source, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (hash) DO NOTHING",
            )
            .and_then(|mut st| {
                st.execute(params![v.hash, v.workflow, v.file, v.source, v.created_at])
            })
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::CreateRun(run) => {
            insert_run(tx, run)?;
            Ok(Done::Unit)
        }
        Op::Claim {
            id,
            lease,
            steal_from,
        } => claim(
            tx,
            id,
            lease,
            steal_from.as_ref().map(|(h, b)| (h.as_str(), *b)),
        )
        .map(Done::Claim),
        Op::ClaimNext(lease) => claim_next(tx, lease).map(Done::MaybeRun),
        Op::Renew { id, lease } => tx
            .prepare_cached(
                "UPDATE runs SET lease_expires_at = ?3, lease_ms = ?4, heartbeat = heartbeat + 1 \
                 WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    lease.owner,
                    now_ms().saturating_add(lease.ttl_ms),
                    lease.ttl_ms
                ])
            })
            .map(Done::Rows)
            .map_err(map_err),
        Op::Release { id, owner, how } => {
            match how {
                // A clean release takes this claim's strike back.
                Release::Clean => tx
                    .prepare_cached(
                        "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                         updated_at = ?3, strikes = max(strikes - 1, 0), not_before = NULL \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .and_then(|mut st| st.execute(params![id, owner, now_ms()])),
                Release::Failed { error, not_before } => tx
                    .prepare_cached(
                        "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                         updated_at = ?3, last_error = ?4, not_before = ?5 \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .and_then(|mut st| st.execute(params![id, owner, now_ms(), error, not_before])),
            }
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::Expire {
            seen,
            reason,
            not_before,
        } => tx
            .prepare_cached(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4, \
                 last_error = ?5, not_before = ?6 \
                 WHERE id = ?1 AND lease_owner = ?2 AND heartbeat = ?3 AND status = 'running'",
            )
            .and_then(|mut st| {
                st.execute(params![
                    seen.id,
                    seen.holder,
                    seen.heartbeat,
                    now_ms(),
                    reason,
                    not_before
                ])
            })
            .map(Done::Rows)
            .map_err(map_err),
        Op::RecordStep { owner, record } => record_step(tx, owner, record),
        Op::RecordAttempt { owner, failure: f } => {
            let rows = tx
                .prepare_cached(
                    "INSERT INTO step_attempts (run_id, step_id, item, round, attempt, started_at, \
                     finished_at, status_code, error, retryable) \
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 \
                     WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_owner = ?11 AND status = 'running') \
                     ON CONFLICT (run_id, step_id, item, round, attempt) DO UPDATE SET \
                     finished_at = excluded.finished_at, status_code = excluded.status_code, \
                     error = excluded.error, retryable = excluded.retryable",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        f.run_id,
                        f.step_id,
                        item_to_db(f.item),
                        i64::from(f.round),
                        i64::from(f.attempt),
                        f.started_at,
                        f.finished_at,
                        f.status_code.map(i64::from),
                        f.error,
                        f.retryable,
                        owner,
                    ])
                })
                .map_err(map_err)?;
            fenced(rows, &f.run_id)
        }
        Op::Finish {
            id,
            owner,
            outcome,
            last_step,
            alerts,
        } => {
            if let Some(record) = last_step {
                record_step(tx, owner, record)?;
            }
            finish(tx, id, owner, outcome, alerts)
        }
        Op::Cancel { id, reason, actor } => {
            let result = cancel(tx, id, reason)?;
            if result == CancelResult::Cancelled {
                append_audit(
                    tx,
                    &NewAuditEntry::new(
                        actor,
                        "run.cancelled",
                        id,
                        serde_json::json!({ "reason": reason }),
                    ),
                )?;
            }
            Ok(Done::Cancel(result))
        }
        Op::Replay { id, actor } => {
            let result = replay(tx, id)?;
            if result == ReplayResult::Replayed {
                append_audit(
                    tx,
                    &NewAuditEntry::new(actor, "run.replayed", id, serde_json::json!({})),
                )?;
            }
            Ok(Done::Replay(result))
        }
        Op::PutSecret {
            name,
            sealed,
            mode,
            actor,
        } => put_secret(tx, name, sealed, *mode, actor).map(Done::Secret),
        Op::DeleteSecret { name, actor } => {
            let rows = tx
                .prepare_cached("DELETE FROM secrets WHERE name = ?1")
                .and_then(|mut st| st.execute(params![name]))
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(
                    tx,
                    &NewAuditEntry::new(actor, "secret.deleted", name, serde_json::json!({})),
                )?;
            }
            Ok(Done::Flag(rows == 1))
        }
        Op::Rekey {
            resealed,
            expected_version,
            actor,
        } => rekey(tx, resealed, expected_version, actor).map(|()| Done::Unit),
        Op::CreateToken { token, hash, actor } => {
            let rows = tx
                .prepare_cached(
                    "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        token.id,
                        token.name,
                        token.role.as_str(),
                        hash,
                        token.created_at
                    ])
                })
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(
                    tx,
                    &NewAuditEntry::new(
                        actor,
                        "token.created",
                        &token.name,
                        serde_json::json!({ "role": token.role.as_str(), "id": token.id }),
                    ),
                )?;
            }
            Ok(Done::Flag(rows == 1))
        }
        Op::RevokeToken { name, actor } => {
            let rows = tx
                .prepare_cached(
                    "UPDATE api_tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                )
                .and_then(|mut st| st.execute(params![name, now_ms()]))
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(
                    tx,
                    &NewAuditEntry::new(actor, "token.revoked", name, serde_json::json!({})),
                )?;
            }
            Ok(Done::Flag(rows == 1))
        }
        Op::Audit(entry) => append_audit(tx, entry).map(|()| Done::Unit),
        Op::Deploy { items, actor } => record_deployment(tx, items, actor).map(Done::Names),
        Op::Fire {
            workflow,
            slot,
            run,
        } => {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO schedule_fires (workflow, slot, run_id, fired_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (workflow, slot) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![workflow, slot, run.as_ref().map(|r| r.id.as_str()), now_ms()])
                })
                .map_err(map_err)?;
            if inserted == 1
                && let Some(run) = run
            {
                insert_run(tx, run)?;
            }
            Ok(Done::Rows(inserted))
        }
        Op::AlertAttempt {
            id,
            attempts,
            result,
        } => {
            let now = now_ms();
            let (status, next, error, delivered) = match result {
                AlertAttempt::Delivered => (AlertStatus::Delivered, now, None, Some(now)),
                AlertAttempt::RetryAt { error, at } => {
                    (AlertStatus::Pending, *at, Some(error.as_str()), None)
                }
                AlertAttempt::GaveUp { error } => {
                    (AlertStatus::Failed, now, Some(error.as_str()), None)
                }
            };
            tx.prepare_cached(
                "UPDATE alerts SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3, \
                 last_error = COALESCE(?4, last_error), delivered_at = ?5 \
                 WHERE id = ?1 AND status = 'pending' AND attempts = ?6",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    status.as_str(),
                    next,
                    error,
                    delivered,
                    i64::from(*attempts)
                ])
            })
            .map(Done::Rows)
            .map_err(map_err)
        }
        Op::Ping => {
            tx.prepare_cached(
                "INSERT INTO health (id, checked_at) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            )
            .and_then(|mut st| st.execute(params![now_ms()]))
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::Close => Ok(Done::Unit),
    }
}

/// A journal row with its JSON already encoded, by the caller's thread: the
/// writer thread only binds text, and no copy of a large output travels to
/// it.
#[derive(Debug)]
struct EncodedStep {
    run_id: String,
    step_id: String,
    item: Option<u32>,
    status: StepStatus,
    attempt: u32,
    state: Option<String>,
    output: Option<String>,
    error: Option<String>,
    status_code: Option<u16>,
    started_at: Millis,
    finished_at: Option<Millis>,
}

impl EncodedStep {
    fn new(r: &StepRecord) -> Result<Self, StoreError> {
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

fn record_step(tx: &Transaction<'_>, owner: &str, r: &EncodedStep) -> Result<Done, StoreError> {
    let (state, output) = (&r.state, &r.output);
    let rows = tx
        .prepare_cached(
            "INSERT INTO steps (run_id, step_id, item, status, attempt, state, output, error, \
             status_code, started_at, finished_at) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 \
             WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_owner = ?12 AND status = 'running') \
             ON CONFLICT (run_id, step_id, item) DO UPDATE SET \
             status = excluded.status, attempt = excluded.attempt, \
             state = COALESCE(excluded.state, steps.state), output = excluded.output, \
             error = excluded.error, status_code = excluded.status_code, \
             started_at = excluded.started_at, finished_at = excluded.finished_at",
        )
        .and_then(|mut st| {
            st.execute(params![
                r.run_id,
                r.step_id,
                item_to_db(r.item),
                r.status.as_str(),
                i64::from(r.attempt),
                state,
                output,
                r.error,
                r.status_code.map(i64::from),
                r.started_at,
                r.finished_at,
                owner,
            ])
        })
        .map_err(map_err)?;
    fenced(rows, &r.run_id)
}

/// Appends an audit entry, chained to the last one, inside the caller's
/// transaction (so the change and its record commit together).
fn append_audit(tx: &Transaction<'_>, e: &NewAuditEntry) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(map_err)?;
    let (last_seq, prev) = last.unwrap_or_else(|| (0, crate::audit::GENESIS.to_owned()));
    let seq = last_seq + 1;
    let at = now_ms();
    let hash =
        crate::audit::entry_hash(&prev, seq, at, &e.actor, &e.action, &e.subject, &e.details);
    tx.prepare_cached(
        "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            seq,
            at,
            e.actor,
            e.action,
            e.subject,
            crate::audit::canonical_json(&e.details),
            prev,
            hash
        ])
    })
    .map_err(map_err)?;
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )
    .and_then(|mut st| st.execute(params![seq, hash]))
    .map_err(map_err)?;
    Ok(())
}

fn record_deployment(
    tx: &Transaction<'_>,
    items: &[Deployed],
    actor: &str,
) -> Result<Vec<String>, StoreError> {
    let recorded: Vec<(String, String, String)> = tx
        .prepare_cached("SELECT kind, name, version FROM deployments")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(map_err)?;
    let mut changed = Vec::new();
    let now = now_ms();
    for item in items {
        let before = recorded
            .iter()
            .find(|(k, n, _)| *k == item.kind && *n == item.name)
            .map(|(_, _, v)| v.as_str());
        if before == Some(item.version.as_str()) {
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO deployments (kind, name, version, file, deployed_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (kind, name) DO UPDATE SET version = excluded.version, file = excluded.file, \
             deployed_at = excluded.deployed_at",
        )
        .and_then(|mut st| st.execute(params![item.kind, item.name, item.version, item.file, now]))
        .map_err(map_err)?;
        let action = match item.kind.as_str() {
            "config" => "config.changed",
            "connection" => "connection.changed",
            _ => "workflow.deployed",
        };
        append_audit(
            tx,
            &NewAuditEntry::new(
                actor,
                action,
                &item.name,
                serde_json::json!({ "file": item.file, "version": item.version, "previous": before }),
            ),
        )?;
        changed.push(format!("{}:{}", item.kind, item.name));
    }
    for (kind, name, version) in &recorded {
        if kind == "config" || items.iter().any(|i| i.kind == *kind && i.name == *name) {
            continue;
        }
        tx.prepare_cached("DELETE FROM deployments WHERE kind = ?1 AND name = ?2")
            .and_then(|mut st| st.execute(params![kind, name]))
            .map_err(map_err)?;
        append_audit(
            tx,
            &NewAuditEntry::new(
                actor,
                &format!("{kind}.removed"),
                name,
                serde_json::json!({ "previous": version }),
            ),
        )?;
        changed.push(format!("{kind}:{name}"));
    }
    Ok(changed)
}

fn put_secret(
    tx: &Transaction<'_>,
    name: &str,
    sealed: &SealedSecret,
    mode: SecretWrite,
    actor: &str,
) -> Result<SecretWriteResult, StoreError> {
    let exists: bool = tx
        .prepare_cached("SELECT 1 FROM secrets WHERE name = ?1")
        .and_then(|mut st| st.exists(params![name]))
        .map_err(map_err)?;
    // Checked in the writing transaction, so a rekey that commits while
    // the value is being typed cannot leave it under a retired key.
    let other_key: Option<String> = tx
        .prepare_cached("SELECT key_id FROM secrets WHERE name <> ?1 AND key_id <> ?2 LIMIT 1")
        .and_then(|mut st| {
            st.query_row(params![name, sealed.key_id], |r| r.get(0))
                .optional()
        })
        .map_err(map_err)?;
    if let Some(stored) = other_key {
        return Ok(SecretWriteResult::KeyMismatch { stored });
    }
    let now = now_ms();
    let (sql, result, action) = match (mode, exists) {
        (SecretWrite::Create, true) => return Ok(SecretWriteResult::AlreadyExists),
        (SecretWrite::Rotate, false) => return Ok(SecretWriteResult::NotFound),
        (SecretWrite::Create, false) => (
            "INSERT INTO secrets (name, nonce, ciphertext, key_id, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            SecretWriteResult::Created,
            "secret.set",
        ),
        (SecretWrite::Rotate, true) => (
            "UPDATE secrets SET nonce = ?2, ciphertext = ?3, key_id = ?4, rotated_at = ?5, \
             updated_at = ?5 WHERE name = ?1",
            SecretWriteResult::Rotated,
            "secret.rotated",
        ),
    };
    tx.prepare_cached(sql)
        .and_then(|mut st| {
            st.execute(params![
                name,
                sealed.nonce,
                sealed.ciphertext,
                sealed.key_id,
                now
            ])
        })
        .map_err(map_err)?;
    append_audit(
        tx,
        &NewAuditEntry::new(
            actor,
            action,
            name,
            serde_json::json!({ "key_id": sealed.key_id }),
        ),
    )?;
    Ok(result)
}

fn rekey(
    tx: &Transaction<'_>,
    resealed: &[(String, SealedSecret)],
    expected_version: &str,
    actor: &str,
) -> Result<(), StoreError> {
    if secrets_version(tx)? != expected_version {
        return Err(StoreError::Other(
            "a secret was set, rotated or deleted while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    let stored: Vec<String> = query_all(tx, "SELECT name FROM secrets ORDER BY name", [], |r| {
        r.get(0)
    })?;
    let mut given: Vec<&str> = resealed.iter().map(|(n, _)| n.as_str()).collect();
    given.sort_unstable();
    if given != stored.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(StoreError::Other(
            "the secrets changed while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    let now = now_ms();
    for (name, sealed) in resealed {
        tx.prepare_cached(
            "UPDATE secrets SET nonce = ?2, ciphertext = ?3, key_id = ?4, updated_at = ?5 WHERE name = ?1",
        )
        .and_then(|mut st| st.execute(params![name, sealed.nonce, sealed.ciphertext, sealed.key_id, now]))
        .map_err(map_err)?;
    }
    let key_id = resealed
        .first()
        .map(|(_, s)| s.key_id.clone())
        .unwrap_or_default();
    append_audit(
        tx,
        &NewAuditEntry::new(
            actor,
            "secrets.rekeyed",
            "*",
            serde_json::json!({ "secrets": resealed.len(), "key_id": key_id }),
        ),
    )
}

/// Every seal draws a fresh random nonce, so the nonces change on each
/// set, rotation and rekey, even within one millisecond.
fn secrets_version(conn: &Connection) -> Result<String, StoreError> {
    // Built here in name order: group_concat's order is not guaranteed.
    let rows: Vec<(String, Vec<u8>)> = query_all(
        conn,
        "SELECT name, nonce FROM secrets ORDER BY name",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for (name, nonce) in &rows {
        sha2::Digest::update(&mut h, name.as_bytes());
        sha2::Digest::update(&mut h, [0]);
        sha2::Digest::update(&mut h, nonce);
    }
    Ok(format!(
        "{}:{}",
        rows.len(),
        hex::encode(sha2::Digest::finalize(h))
    ))
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get("id")?,
        name: r.get("name")?,
        role: parse_col(Role::parse(&r.get::<_, String>("role")?))?,
        created_at: r.get("created_at")?,
        revoked_at: r.get("revoked_at")?,
    })
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get("seq")?,
        at: r.get("at")?,
        actor: r.get("actor")?,
        action: r.get("action")?,
        subject: r.get("subject")?,
        details: json_col(r, "details")?.unwrap_or(Value::Null),
        prev_hash: r.get("prev_hash")?,
        hash: r.get("hash")?,
    })
}

/// Every row of a cached query, mapped.
fn query_all<T, P, F>(conn: &Connection, sql: &str, params: P, map: F) -> Result<Vec<T>, StoreError>
where
    P: rusqlite::Params,
    F: FnMut(&Row<'_>) -> rusqlite::Result<T>,
{
    conn.prepare_cached(sql)
        .and_then(|mut st| st.query_map(params, map)?.collect())
        .map_err(map_err)
}

fn fenced(rows: usize, run_id: &str) -> Result<Done, StoreError> {
    if rows == 0 {
        Err(StoreError::LeaseLost {
            run_id: run_id.to_owned(),
        })
    } else {
        Ok(Done::Rows(rows))
    }
}

fn insert_run(tx: &Transaction<'_>, run: &NewRun) -> Result<(), StoreError> {
    let now = now_ms();
    let trigger = to_json_text(&run.trigger, "the trigger document")?;
    // A run created leased (a foreground `plumb run`) is claim number 1.
    let (status, owner, expires, ttl, started, claims) = match &run.lease {
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
    tx.prepare_cached(
        "INSERT INTO runs (id, workflow, version, trigger_payload, status, claims, strikes, \
         heartbeat, created_at, started_at, updated_at, lease_owner, lease_expires_at, lease_ms, \
         max_concurrency) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?7, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut st| {
        st.execute(params![
            run.id,
            run.workflow,
            run.version,
            trigger,
            status.as_str(),
            claims,
            now,
            started,
            owner,
            expires,
            ttl,
            run.max_concurrency.map(i64::from),
        ])
    })
    .map_err(map_err)?;
    Ok(())
}

fn select_run(conn: &Connection, id: &str) -> Result<Option<Run>, StoreError> {
    conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))
        .and_then(|mut st| st.query_row(params![id], run_from_row).optional())
        .map_err(map_err)
}

fn claim(
    tx: &Transaction<'_>,
    id: &str,
    lease: &Lease,
    steal_from: Option<(&str, i64)>,
) -> Result<Claim, StoreError> {
    /// The lease columns of the run being claimed.
    struct Current {
        status: String,
        claims: i64,
        holder: Option<String>,
        heartbeat: i64,
        expires_at: Option<i64>,
        ttl_ms: Option<i64>,
    }
    let current: Option<Current> = tx
        .prepare_cached(
            "SELECT status, claims, lease_owner, heartbeat, lease_expires_at, lease_ms \
             FROM runs WHERE id = ?1",
        )
        .and_then(|mut st| {
            st.query_row(params![id], |r| {
                Ok(Current {
                    status: r.get(0)?,
                    claims: r.get(1)?,
                    holder: r.get(2)?,
                    heartbeat: r.get(3)?,
                    expires_at: r.get(4)?,
                    ttl_ms: r.get(5)?,
                })
            })
            .optional()
        })
        .map_err(map_err)?;
    let Some(current) = current else {
        return Ok(Claim::NotFound);
    };
    let status = RunStatus::parse(&current.status)?;
    if status.is_terminal() {
        return Ok(Claim::Ended(status));
    }
    if let Some(holder) = current.holder
        && steal_from != Some((holder.as_str(), current.heartbeat))
    {
        return Ok(Claim::Busy {
            owner: holder,
            expires_at: current.expires_at.unwrap_or(0),
            heartbeat: current.heartbeat,
            ttl_ms: current.ttl_ms.unwrap_or(0),
        });
    }
    let claims = current.claims;
    take_lease(tx, id, claims, lease).map(|run| Claim::Claimed(Box::new(run)))
}

/// Gives `lease.owner` the run's next claim: a fresh token, a new heartbeat
/// and a strike that a clean end or release takes back.
fn take_lease(
    tx: &Transaction<'_>,
    id: &str,
    claims: i64,
    lease: &Lease,
) -> Result<Run, StoreError> {
    let now = now_ms();
    let claim = u32::try_from(claims.saturating_add(1)).unwrap_or(u32::MAX);
    let token = ClaimToken::new(&lease.owner, claim).to_string();
    tx.prepare_cached(&format!(
        "UPDATE runs SET status = 'running', claims = ?2, strikes = strikes + 1, \
         heartbeat = heartbeat + 1, started_at = COALESCE(started_at, ?3), updated_at = ?3, \
         lease_owner = ?4, lease_expires_at = ?5, lease_ms = ?6 \
         WHERE id = ?1 RETURNING {RUN_COLUMNS}"
    ))
    .and_then(|mut st| {
        st.query_row(
            params![
                id,
                i64::from(claim),
                now,
                token,
                now.saturating_add(lease.ttl_ms),
                lease.ttl_ms
            ],
            run_from_row,
        )
    })
    .map_err(map_err)
}

/// A claim candidate `r` whose workflow is under its concurrency limit: a
/// run counts against it while anyone holds its lease.
const UNDER_LIMIT: &str = "(r.max_concurrency IS NULL OR (SELECT count(*) FROM runs x \
    WHERE x.workflow = r.workflow AND x.status = 'running' AND x.lease_owner IS NOT NULL) \
    < r.max_concurrency)";

fn claim_next(tx: &Transaction<'_>, lease: &Lease) -> Result<Option<Box<Run>>, StoreError> {
    // Interrupted runs (running, lease released or expired, backoff over)
    // first, then the queue, oldest first; skipping any workflow already at
    // its concurrency limit. One statement per lane, so each walks its
    // index and stops at the first match.
    //
    // A backoff is at most a minute (see the engine's crash backoff), so a
    // `not_before` more than two minutes ahead was written by a clock that
    // runs ahead of this one: it is ignored rather than obeyed, or that
    // clock would park the run for as long as it is wrong.
    let lanes = [
        "r.status = 'running' AND r.lease_owner IS NULL \
         AND (r.not_before IS NULL OR r.not_before <= ?1 OR r.not_before > ?1 + 120000)",
        "r.status = 'queued' AND (r.not_before IS NULL OR r.not_before <= ?1 \
         OR r.not_before > ?1 + 120000)",
    ];
    let now = now_ms();
    for lane in lanes {
        let sql = format!(
            "SELECT r.id, r.claims FROM runs r WHERE {lane} AND {UNDER_LIMIT} \
             ORDER BY r.created_at, r.id LIMIT 1"
        );
        let found: Option<(String, i64)> = tx
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(params![now], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(map_err)?;
        if let Some((id, claims)) = found {
            return take_lease(tx, &id, claims, lease).map(|run| Some(Box::new(run)));
        }
    }
    Ok(None)
}

fn finish(
    tx: &Transaction<'_>,
    id: &str,
    owner: &str,
    outcome: &RunOutcome,
    alerts: &[NewAlert],
) -> Result<Done, StoreError> {
    let now: Millis = now_ms();
    let (status, failure) = match outcome {
        RunOutcome::Succeeded => (RunStatus::Succeeded, None),
        RunOutcome::Failed(f) => (RunStatus::Failed, Some(f.clone())),
        RunOutcome::Cancelled(why) => (
            RunStatus::Cancelled,
            Some(Failure {
                message: why.clone(),
                ..Failure::default()
            }),
        ),
    };
    let f = failure.unwrap_or_default();
    let has_failure = !f.message.is_empty();
    let workflow: Option<String> = tx
        .prepare_cached(
            "UPDATE runs SET status = ?3, finished_at = ?4, updated_at = ?4, \
             error = ?5, failed_step = ?6, failed_item = ?7, failed_attempt = ?8, \
             failed_status_code = ?9, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running' \
             RETURNING workflow",
        )
        .and_then(|mut st| {
            st.query_row(
                params![
                    id,
                    owner,
                    status.as_str(),
                    now,
                    has_failure.then_some(f.message.as_str()),
                    f.step,
                    f.item.map(i64::from),
                    f.attempt.map(i64::from),
                    f.status_code.map(i64::from),
                ],
                |row| row.get(0),
            )
            .optional()
        })
        .map_err(map_err)?;
    let Some(workflow) = workflow else {
        return Err(StoreError::LeaseLost {
            run_id: id.to_owned(),
        });
    };
    for alert in alerts {
        let payload = to_json_text(&alert.payload, "an alert")?;
        tx.prepare_cached(
            "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
             next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
        )
        .and_then(|mut st| st.execute(params![alert.id, id, workflow, alert.channel, payload, now]))
        .map_err(map_err)?;
    }
    Ok(Done::Unit)
}

fn cancel(tx: &Transaction<'_>, id: &str, reason: &str) -> Result<CancelResult, StoreError> {
    let rows = tx
        .prepare_cached(
            "UPDATE runs SET status = 'cancelled', finished_at = ?2, updated_at = ?2, error = ?3, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND status IN ('queued', 'running')",
        )
        .and_then(|mut st| st.execute(params![id, now_ms(), reason]))
        .map_err(map_err)?;
    if rows == 1 {
        return Ok(CancelResult::Cancelled);
    }
    Ok(match select_run(tx, id)? {
        None => CancelResult::NotFound,
        Some(run) => CancelResult::AlreadyEnded(run.status),
    })
}

fn replay(tx: &Transaction<'_>, id: &str) -> Result<ReplayResult, StoreError> {
    let rows = tx
        .prepare_cached(
            "UPDATE runs SET status = 'queued', replays = replays + 1, updated_at = ?2, \
             finished_at = NULL, error = NULL, failed_step = NULL, failed_item = NULL, \
             failed_attempt = NULL, failed_status_code = NULL, lease_owner = NULL, \
             lease_expires_at = NULL, strikes = 0, last_error = NULL, not_before = NULL \
             WHERE id = ?1 AND status = 'failed'",
        )
        .and_then(|mut st| st.execute(params![id, now_ms()]))
        .map_err(map_err)?;
    if rows == 0 {
        return Ok(match select_run(tx, id)? {
            None => ReplayResult::NotFound,
            Some(run) => ReplayResult::NotFailed(run.status),
        });
    }
    // A failed `for_each` keeps its committed item list (so indices and
    // keys stay the same) and becomes "in progress" again; every other
    // failed row is removed so the step, or item, runs afresh. Succeeded
    // rows stay: they are not run again.
    tx.prepare_cached(
        "UPDATE steps SET status = 'running', error = NULL, finished_at = NULL, output = NULL \
         WHERE run_id = ?1 AND status = 'failed' AND item = -1 AND state IS NOT NULL",
    )
    .and_then(|mut st| st.execute(params![id]))
    .map_err(map_err)?;
    tx.prepare_cached("DELETE FROM steps WHERE run_id = ?1 AND status = 'failed'")
        .and_then(|mut st| st.execute(params![id]))
        .map_err(map_err)?;
    Ok(ReplayResult::Replayed)
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_workflow_version(&self, v: &WorkflowVersion) -> Result<(), StoreError> {
        self.write(Op::PutVersion(v.clone())).await.map(|_| ())
    }

    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError> {
        let hash = hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT hash, workflow, file, source, created_at FROM workflow_versions WHERE hash = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![hash], |r| {
                    Ok(WorkflowVersion {
                        hash: r.get("hash")?,
                        workflow: r.get("workflow")?,
                        file: r.get("file")?,
                        source: r.get("source")?,
                        created_at: r.get("created_at")?,
                    })
                })
                .optional()
            })
            .map_err(map_err)
        })
        .await
    }

    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        self.write(Op::CreateRun(run.clone())).await.map(|_| ())
    }

    async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| select_run(conn, &id)).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let limit = if filter.limit == 0 { 50 } else { filter.limit };
        let workflow = filter.workflow.clone();
        let status = filter.status.map(RunStatus::as_str);
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs \
                 WHERE (?1 IS NULL OR workflow = ?1) AND (?2 IS NULL OR status = ?2) \
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
                ),
                params![workflow, status, i64::from(limit)],
                run_from_row,
            )
        })
        .await
    }

    async fn run_ids_with_prefix(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        // Run ids are UUIDs: a prefix is hex digits and dashes, and every
        // id starting with it sorts below the prefix followed by `~`.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Ok(Vec::new());
        }
        let low = prefix.to_ascii_lowercase();
        let high = format!("{low}~");
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id FROM runs WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3",
                params![low, high, i64::from(limit)],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn claim_run(
        &self,
        id: &str,
        lease: &Lease,
        steal_from: Option<(&str, i64)>,
    ) -> Result<Claim, StoreError> {
        match self
            .write(Op::Claim {
                id: id.to_owned(),
                lease: lease.clone(),
                steal_from: steal_from.map(|(h, b)| (h.to_owned(), b)),
            })
            .await?
        {
            Done::Claim(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn renew_lease(&self, id: &str, lease: &Lease) -> Result<bool, StoreError> {
        match self
            .write(Op::Renew {
                id: id.to_owned(),
                lease: lease.clone(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn release_run(&self, id: &str, owner: &str, how: &Release) -> Result<(), StoreError> {
        self.write(Op::Release {
            id: id.to_owned(),
            owner: owner.to_owned(),
            how: how.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn journal(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            query_all(conn, "SELECT run_id, step_id, item, status, attempt, state, output, error, status_code, \
                 started_at, finished_at FROM steps WHERE run_id = ?1 ORDER BY started_at, step_id, item", params![run_id], step_from_row)
        })
        .await
    }

    async fn item_outputs(&self, run_id: &str, step_id: &str) -> Result<Vec<String>, StoreError> {
        let (run_id, step_id) = (run_id.to_owned(), step_id.to_owned());
        self.read(move |conn| {
            let rows: Vec<(i64, Option<String>)> = query_all(
                conn,
                "SELECT item, output FROM steps WHERE run_id = ?1 AND step_id = ?2 AND item >= 0 \
                 ORDER BY item",
                params![run_id, step_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let len = rows
                .last()
                .and_then(|(i, _)| usize::try_from(*i).ok())
                .map_or(0, |i| i + 1);
            let mut out = vec!["null".to_owned(); len];
            for (item, output) in rows {
                if let (Ok(i), Some(text)) = (usize::try_from(item), output) {
                    out[i] = text;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn record_step(&self, owner: &str, record: &StepRecord) -> Result<(), StoreError> {
        self.write(Op::RecordStep {
            owner: owner.to_owned(),
            record: EncodedStep::new(record)?,
        })
        .await
        .map(|_| ())
    }

    async fn record_attempt_failure(
        &self,
        owner: &str,
        failure: &AttemptFailure,
    ) -> Result<(), StoreError> {
        self.write(Op::RecordAttempt {
            owner: owner.to_owned(),
            failure: failure.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn attempt_failures(&self, run_id: &str) -> Result<Vec<AttemptFailure>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT run_id, step_id, item, round, attempt, started_at, finished_at, status_code, \
                 error, retryable FROM step_attempts WHERE run_id = ?1 \
                 ORDER BY started_at, step_id, item, round, attempt",
            )
            .and_then(|mut st| {
                st.query_map(params![run_id], |r| {
                    Ok(AttemptFailure {
                        run_id: r.get("run_id")?,
                        step_id: r.get("step_id")?,
                        item: item_from_db(r.get("item")?),
                        round: opt_u32(r.get("round")?).unwrap_or(0),
                        attempt: opt_u32(r.get("attempt")?).unwrap_or(0),
                        started_at: r.get("started_at")?,
                        finished_at: r.get("finished_at")?,
                        status_code: opt_u16(r.get("status_code")?),
                        error: r.get("error")?,
                        retryable: r.get("retryable")?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(map_err)
        })
        .await
    }

    async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &RunOutcome,
        last_step: Option<&StepRecord>,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        self.write(Op::Finish {
            id: id.to_owned(),
            owner: owner.to_owned(),
            outcome: outcome.clone(),
            last_step: last_step.map(EncodedStep::new).transpose()?,
            alerts: alerts.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn claim_next(&self, lease: &Lease) -> Result<Option<Run>, StoreError> {
        match self.write(Op::ClaimNext(lease.clone())).await? {
            Done::MaybeRun(r) => Ok(r.map(|b| *b)),
            other => Err(unexpected(&other)),
        }
    }

    async fn leased_runs(&self) -> Result<Vec<LeasedRun>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, lease_owner, heartbeat, lease_ms, strikes FROM runs \
                 WHERE status = 'running' AND lease_owner IS NOT NULL",
                [],
                |r| {
                    Ok(LeasedRun {
                        id: r.get(0)?,
                        holder: r.get(1)?,
                        heartbeat: r.get(2)?,
                        ttl_ms: r.get::<_, Option<i64>>(3)?.unwrap_or(30_000),
                        strikes: opt_u32(r.get(4)?).unwrap_or(0),
                    })
                },
            )
        })
        .await
    }

    async fn expire_lease(
        &self,
        seen: &LeasedRun,
        reason: &str,
        not_before: Millis,
    ) -> Result<bool, StoreError> {
        match self
            .write(Op::Expire {
                seen: seen.clone(),
                reason: reason.to_owned(),
                not_before,
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn cancel_run(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<CancelResult, StoreError> {
        match self
            .write(Op::Cancel {
                id: id.to_owned(),
                reason: reason.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Cancel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn replay_run(&self, id: &str, actor: &str) -> Result<ReplayResult, StoreError> {
        match self
            .write(Op::Replay {
                id: id.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Replay(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn put_secret(
        &self,
        name: &str,
        sealed: &SealedSecret,
        mode: SecretWrite,
        actor: &str,
    ) -> Result<SecretWriteResult, StoreError> {
        match self
            .write(Op::PutSecret {
                name: name.to_owned(),
                sealed: sealed.clone(),
                mode,
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Secret(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn secret(&self, name: &str) -> Result<Option<(SealedSecret, SecretMeta)>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT name, nonce, ciphertext, key_id, created_at, rotated_at FROM secrets WHERE name = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![name], |r| {
                    Ok((
                        SealedSecret {
                            nonce: r.get("nonce")?,
                            ciphertext: r.get("ciphertext")?,
                            key_id: r.get("key_id")?,
                        },
                        SecretMeta {
                            name: r.get("name")?,
                            key_id: r.get("key_id")?,
                            created_at: r.get("created_at")?,
                            rotated_at: r.get("rotated_at")?,
                        },
                    ))
                })
                .optional()
            })
            .map_err(map_err)
        })
        .await
    }

    async fn list_secrets(&self) -> Result<Vec<SecretMeta>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT name, key_id, created_at, rotated_at FROM secrets ORDER BY name",
                [],
                |r| {
                    Ok(SecretMeta {
                        name: r.get("name")?,
                        key_id: r.get("key_id")?,
                        created_at: r.get("created_at")?,
                        rotated_at: r.get("rotated_at")?,
                    })
                },
            )
        })
        .await
    }

    async fn delete_secret(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        match self
            .write(Op::DeleteSecret {
                name: name.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn rekey_secrets(
        &self,
        resealed: &[(String, SealedSecret)],
        expected_version: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.write(Op::Rekey {
            resealed: resealed.to_vec(),
            expected_version: expected_version.to_owned(),
            actor: actor.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn secrets_version(&self) -> Result<String, StoreError> {
        self.read(secrets_version).await
    }

    async fn create_token(
        &self,
        token: &ApiToken,
        token_hash: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        match self
            .write(Op::CreateToken {
                token: token.clone(),
                hash: token_hash.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn revoke_token(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        match self
            .write(Op::RevokeToken {
                name: name.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let token_hash = token_hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens WHERE token_hash = ?1",
            )
            .and_then(|mut st| st.query_row(params![token_hash], token_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at, name",
                [],
                token_from_row,
            )
        })
        .await
    }

    async fn append_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError> {
        self.write(Op::Audit(entry.clone())).await.map(|_| ())
    }

    async fn record_deployment(
        &self,
        items: &[Deployed],
        actor: &str,
    ) -> Result<Vec<String>, StoreError> {
        match self
            .write(Op::Deploy {
                items: items.to_vec(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Names(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit_log \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                params![after_seq, i64::from(limit)],
                audit_from_row,
            )
        })
        .await
    }

    async fn deployed_version(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        self.read(move |conn| {
            conn.prepare_cached("SELECT version FROM deployments WHERE kind = ?1 AND name = ?2")
                .and_then(|mut st| st.query_row(params![kind, name], |r| r.get(0)).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn instance_secret(&self) -> Result<String, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT secret FROM instance WHERE id = 1")
                .and_then(|mut st| st.query_row([], |r| r.get(0)))
                .map_err(map_err)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
                .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn last_fire(&self, workflow: &str) -> Result<Option<Millis>, StoreError> {
        let workflow = workflow.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT max(slot) FROM schedule_fires WHERE workflow = ?1")
                .and_then(|mut st| st.query_row(params![workflow], |r| r.get(0)))
                .map_err(map_err)
        })
        .await
    }

    async fn record_fire(
        &self,
        workflow: &str,
        slot: Millis,
        run: Option<&NewRun>,
    ) -> Result<bool, StoreError> {
        match self
            .write(Op::Fire {
                workflow: workflow.to_owned(),
                slot,
                run: run.cloned(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn due_alerts(&self, now: Millis, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.read(move |conn| {
            query_all(conn, &format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE status = 'pending' AND next_attempt_at <= ?1 \
                 ORDER BY next_attempt_at, id LIMIT ?2"
            ), params![now, i64::from(limit)], alert_from_row)
        })
        .await
    }

    async fn record_alert_attempt(
        &self,
        id: &str,
        attempts: u32,
        result: &AlertAttempt,
    ) -> Result<bool, StoreError> {
        match self
            .write(Op::AlertAttempt {
                id: id.to_owned(),
                attempts,
                result: result.clone(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn undelivered_alerts(&self, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts WHERE status IN ('pending', 'failed') \
                 ORDER BY created_at DESC, id DESC LIMIT ?1"
                ),
                params![i64::from(limit)],
                alert_from_row,
            )
        })
        .await
    }

    async fn workflow_stats(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT workflow, \
                   sum(status = 'queued'), sum(status = 'running'), sum(status = 'failed'), \
                   max(CASE WHEN status = 'succeeded' THEN finished_at END), \
                   max(CASE WHEN status = 'failed' THEN finished_at END) \
                 FROM runs GROUP BY workflow ORDER BY workflow",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    let count = |i: usize| -> rusqlite::Result<u64> {
                        Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
                    };
                    Ok(WorkflowStats {
                        workflow: r.get(0)?,
                        queued: count(1)?,
                        running: count(2)?,
                        dead_letters: count(3)?,
                        last_success_at: r.get(4)?,
                        last_failure_at: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(map_err)
        })
        .await
    }

    async fn open_counts(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT workflow, status, count(*) FROM runs \
                 WHERE status IN ('queued', 'running', 'failed') GROUP BY workflow, status",
            )
            .and_then(|mut st| {
                let mut out: Vec<WorkflowStats> = Vec::new();
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?;
                for row in rows {
                    let (workflow, status, n) = row?;
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
                Ok(out)
            })
            .map_err(map_err)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.write(Op::Ping).await.map(|_| ())
    }

    async fn close(&self) {
        let _ = self.write(Op::Close).await;
        if let Ok(mut idle) = self.readers.idle.lock() {
            idle.clear();
        }
    }
}

fn unexpected(done: &Done) -> StoreError {
    StoreError::Other(format!(
        "the writer answered {done:?} to a different request"
    ))
}
