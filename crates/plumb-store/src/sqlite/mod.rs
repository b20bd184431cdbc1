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
use rusqlite::{Connection, ErrorCode, OpenFlags, Row, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::writes::{DEADLINE_GRACE, DEADLINE_MISSED, WITHDRAWN};
use crate::{CancelResult, Claim, ReplayResult, Run, SecretWriteResult, Store, StoreError, now_ms};

mod alerts;
mod audit;
mod copy;
mod cursors;
mod deployments;
mod lineage;
mod polls;
mod processes;
mod retention;
mod runs;
mod schedules;
mod secrets;

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
    /// The workflow this process last claimed a run of: the next claim
    /// looks at the workflows after it first (see `WorkflowWalk`).
    claimed_from: Mutex<String>,
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
        plan_once(&conn).map_err(map_err)?;
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

/// One write, as handed to the writer thread: a write of one module (each
/// module's `Write` converts into it).
#[derive(Debug)]
enum Op {
    Runs(runs::Write),
    Secrets(secrets::Write),
    Audit(audit::Write),
    Deployments(deployments::Write),
    Schedules(schedules::Write),
    Alerts(alerts::Write),
    Processes(processes::Write),
    Retention(retention::Write),
    Cursors(cursors::Write),
    Polls(polls::Write),
    Lineage(lineage::Write),
    Ping,
    Close,
}

impl Op {
    /// A new run's commit deadline: its sender stops waiting then.
    fn deadline(&self) -> Option<std::time::Instant> {
        match self {
            Op::Runs(runs::Write::CreateRun(run)) => run.deadline,
            _ => None,
        }
    }

    /// The id of the run this write creates, if it does and a late commit
    /// of it must be withdrawn. A run with a dedupe key never is: its
    /// sender's retry finds the key and is answered with this run, which
    /// then must run (withdrawing it would lose the event).
    fn created_run(&self) -> Option<&str> {
        match self {
            Op::Runs(runs::Write::CreateRun(run)) if run.dedupe.is_none() => Some(run.id.as_str()),
            _ => None,
        }
    }

    /// A claim: applied before the runs created in the same batch.
    fn is_claim(&self) -> bool {
        matches!(
            self,
            Op::Runs(runs::Write::Claim { .. } | runs::Write::ClaimNext { .. })
        )
    }
}

/// What a write returns to its caller.
#[derive(Debug)]
enum Done {
    Unit,
    Rows(usize),
    Claim(Claim),
    MaybeRun(Option<Box<Run>>),
    Cancel(CancelResult),
    Replay(ReplayResult),
    Secret(SecretWriteResult),
    Cursor(Option<crate::Cursor>),
    Json(serde_json::Value),
    Poll(Option<crate::PollClaim>),
    PollCommitted(crate::PollCommitted),
    Flag(bool),
    Names(Vec<String>),
    Purged(crate::Purged, crate::PurgePosition),
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
    include_str!("../../migrations/sqlite/0001_runs_and_journal.sql"),
    include_str!("../../migrations/sqlite/0002_queue_schedules_alerts.sql"),
    include_str!("../../migrations/sqlite/0003_health.sql"),
    include_str!("../../migrations/sqlite/0004_queue_index.sql"),
    include_str!("../../migrations/sqlite/0005_secrets_tokens_audit.sql"),
    include_str!("../../migrations/sqlite/0006_strikes_and_heartbeats.sql"),
    include_str!("../../migrations/sqlite/0007_fair_claims.sql"),
    include_str!("../../migrations/sqlite/0008_processes.sql"),
    include_str!("../../migrations/sqlite/0009_retention.sql"),
    include_str!("../../migrations/sqlite/0010_listing_indexes.sql"),
    include_str!("../../migrations/sqlite/0011_lean_run_indexes.sql"),
    include_str!("../../migrations/sqlite/0012_dedupe_keys.sql"),
    include_str!("../../migrations/sqlite/0013_sync_state.sql"),
    include_str!("../../migrations/sqlite/0014_lineage.sql"),
    include_str!("../../migrations/sqlite/0015_process_connections.sql"),
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
            claimed_from: Mutex::new(String::new()),
        })
    }

    /// The workflow this process last claimed a run of.
    fn claimed_from(&self) -> String {
        self.claimed_from
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default()
    }

    /// Notes that this process claimed a run of `workflow`.
    fn claimed(&self, workflow: &str) {
        if let Ok(mut w) = self.claimed_from.lock() {
            workflow.clone_into(&mut w);
        }
    }

    /// The file this store lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: impl Into<Op>) -> Result<Done, StoreError> {
        let op = op.into();
        let deadline = op.deadline();
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
        let grace = deadline + DEADLINE_GRACE;
        match tokio::time::timeout_at(grace.into(), &mut rx).await {
            Ok(answer) => {
                answer.map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?
            }
            Err(_) => {
                rx.close();
                match rx.try_recv() {
                    Ok(answer) => answer,
                    Err(_) => Err(StoreError::Unavailable(DEADLINE_MISSED.into())),
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

/// Plans each statement once, whatever values are bound to it later (the
/// query planner stability guarantee). Otherwise SQLite may look at a bound
/// value while planning and then plan the statement again whenever that
/// parameter is bound anew: the claim statements were parsed and planned
/// on every claim (measured: 6% of a busy serve's CPU).
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map(|_| ())
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
    // Each write of a batch runs in a savepoint, whose journal of original
    // pages is a temporary file: in memory it is a copy, not a write
    // system call per page (measured: a fifth of a busy serve's CPU). A
    // batch is bounded, so is this memory.
    conn.pragma_update(None, "temp_store", "memory")
        .map_err(|e| e.to_string())?;
    plan_once(&conn).map_err(|e| e.to_string())?;
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
    batch.sort_by_key(|job| !job.op.is_claim());
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
                 error = ?3 WHERE id = ?1 AND status = 'queued'",
            )
            .and_then(|mut st| st.execute(params![id, now_ms(), WITHDRAWN]));
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
        let expired = job
            .op
            .deadline()
            .is_some_and(|d| std::time::Instant::now() > d);
        if job.reply.is_closed() || expired {
            results.push(Err(StoreError::Unavailable(DEADLINE_MISSED.into())));
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
                let late_run = job
                    .op
                    .deadline()
                    .and(job.op.created_run())
                    .map(str::to_owned);
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
    e.clone()
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

impl crate::rows::Columns for Row<'_> {
    type Error = rusqlite::Error;

    fn text(&self, col: &str) -> rusqlite::Result<String> {
        self.get(col)
    }

    fn opt_text(&self, col: &str) -> rusqlite::Result<Option<String>> {
        self.get(col)
    }

    fn int(&self, col: &str) -> rusqlite::Result<i64> {
        self.get(col)
    }

    fn opt_int(&self, col: &str) -> rusqlite::Result<Option<i64>> {
        self.get(col)
    }

    fn flag(&self, col: &str) -> rusqlite::Result<bool> {
        self.get(col)
    }

    fn bytes(&self, col: &str) -> rusqlite::Result<Vec<u8>> {
        self.get(col)
    }

    fn invalid(e: StoreError) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e))
    }
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

/// Performs one write inside the writer's open transaction.
fn apply(tx: &Transaction<'_>, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::Runs(w) => runs::apply(tx, w),
        Op::Secrets(w) => secrets::apply(tx, w),
        Op::Audit(w) => audit::apply(tx, w),
        Op::Deployments(w) => deployments::apply(tx, w),
        Op::Schedules(w) => schedules::apply(tx, w),
        Op::Alerts(w) => alerts::apply(tx, w),
        Op::Processes(w) => processes::apply(tx, w),
        Op::Retention(w) => retention::apply(tx, w),
        Op::Cursors(w) => cursors::apply(tx, w),
        Op::Polls(w) => polls::apply(tx, w),
        Op::Lineage(w) => lineage::apply(tx, w),
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

#[async_trait]
impl Store for SqliteStore {
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
