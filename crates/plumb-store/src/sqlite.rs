//! The SQLite store: one file, WAL mode, `synchronous=FULL` by default.
//!
//! # Group commit
//!
//! Every write goes to one writer task that owns the only write connection.
//! The task takes whatever writes are waiting — one, or hundreds from
//! concurrent webhooks and workers — runs them in a single transaction and
//! commits once: one WAL fsync for the whole batch. Each caller is answered
//! only after that commit, so "the call returned" still means "durable", but
//! the cost of the fsync is shared. Under no load a batch is one write and
//! nothing waits; under load, batches grow by themselves.
//!
//! A write whose caller has already given up (a webhook that timed out and
//! answered 503) is skipped rather than committed behind its back.
//!
//! Within a batch each write sees the ones before it. A write that fails on
//! its own (a constraint) fails alone; a failure of the database itself
//! (locked past the busy timeout, disk full, read-only, I/O) rolls back the
//! batch and fails every write in it.
//!
//! Reads go through a small pool so listing runs never waits on a commit.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqlSafeStr};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Alert, AlertAttempt, AlertStatus, AttemptFailure, CancelResult, Claim, Failure, Lease, Millis,
    NewAlert, NewRun, ReplayResult, Run, RunFilter, RunOutcome, RunStatus, StepRecord, StepStatus,
    Store, StoreError, WorkflowStats, WorkflowVersion, now_ms,
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
/// reports [`StoreError::Busy`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

/// A SQLite-backed [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    reader: SqlitePool,
    path: PathBuf,
}

/// One write, as handed to the writer task.
#[derive(Debug)]
enum Op {
    PutVersion(WorkflowVersion),
    CreateRun(NewRun),
    Claim {
        id: String,
        lease: Lease,
        steal_from: Option<String>,
    },
    ClaimNext(Lease),
    Renew {
        id: String,
        lease: Lease,
    },
    Release {
        id: String,
        owner: String,
    },
    RecordStep {
        owner: String,
        record: StepRecord,
    },
    RecordAttempt {
        owner: String,
        failure: AttemptFailure,
    },
    Finish {
        id: String,
        owner: String,
        outcome: RunOutcome,
        alerts: Vec<NewAlert>,
    },
    Cancel {
        id: String,
        reason: String,
    },
    Replay {
        id: String,
    },
    Fire {
        workflow: String,
        slot: Millis,
        run: Option<NewRun>,
    },
    AlertAttempt {
        id: String,
        result: AlertAttempt,
    },
    Ping,
    Close,
}

#[derive(Debug)]
enum Done {
    Unit,
    Rows(u64),
    Claim(Claim),
    MaybeRun(Option<Box<Run>>),
    Cancel(CancelResult),
    Replay(ReplayResult),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("op", &self.op).finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`, applies pending
    /// migrations and starts the writer task on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError::Open`] when the file cannot be opened or
    /// migrated.
    pub async fn open(path: &Path, synchronous: Synchronous) -> Result<Self, StoreError> {
        let open_error = |e: &dyn std::fmt::Display| StoreError::Open {
            location: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.exists()
        {
            std::fs::create_dir_all(parent).map_err(|e| open_error(&e))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| open_error(&e))?;
        migrator()
            .run(&mut conn)
            .await
            .map_err(|e| open_error(&e))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| open_error(&e))?;
        let (tx, rx) = mpsc::channel(16 * MAX_BATCH);
        tokio::spawn(writer_loop(conn, rx));
        Ok(Self {
            writer: tx,
            reader,
            path: path.to_owned(),
        })
    }

    /// The file this store lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?
    }
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            "runs and journal".into(),
            MigrationType::Simple,
            include_str!("../migrations/sqlite/0001_runs_and_journal.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "queue, schedules, alerts".into(),
            MigrationType::Simple,
            include_str!("../migrations/sqlite/0002_queue_schedules_alerts.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "health".into(),
            MigrationType::Simple,
            include_str!("../migrations/sqlite/0003_health.sql").into_sql_str(),
            false,
        ),
    ])
}

/// The writer task: batches, one transaction per batch.
async fn writer_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
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
            commit_batch(&mut conn, &mut batch).await;
        }
        if closing {
            break;
        }
    }
    let _ = conn.close().await;
}

async fn commit_batch(conn: &mut SqliteConnection, batch: &mut Vec<Job>) {
    if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        let e = map_err(e);
        for job in batch.drain(..) {
            let _ = job.reply.send(Err(clone_err(&e)));
        }
        return;
    }
    let mut results: Vec<Result<Done, StoreError>> = Vec::with_capacity(batch.len());
    let mut fatal: Option<StoreError> = None;
    for job in batch.iter() {
        // Waiting for the lock may have outlasted a caller's deadline: a
        // webhook that already answered 503 must not be committed now.
        if job.reply.is_closed() {
            results.push(Err(StoreError::Unavailable("the caller gave up".into())));
            continue;
        }
        let r = apply(conn, &job.op).await;
        if let Err(e) = &r
            && e.is_transient()
        {
            fatal = Some(clone_err(e));
            break;
        }
        results.push(r);
    }
    let committed = match fatal {
        Some(e) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            Err(e)
        }
        None => match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                Err(map_err(e))
            }
        },
    };
    match committed {
        Ok(()) => {
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
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
        StoreError::Other(m) => StoreError::Other(m.clone()),
    }
}

/// Maps a driver error to what it means for the caller.
fn map_err(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        let primary = db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .map(|c| c & 0xff);
        return match primary {
            // SQLITE_BUSY, SQLITE_LOCKED
            Some(5 | 6) => StoreError::Busy(db.message().to_owned()),
            // SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN
            Some(8 | 10 | 13 | 14) => StoreError::Unavailable(db.message().to_owned()),
            // SQLITE_CORRUPT, SQLITE_NOTADB
            Some(11 | 26) => StoreError::Corrupt(db.message().to_owned()),
            _ => StoreError::Other(db.message().to_owned()),
        };
    }
    match e {
        sqlx::Error::Io(io) => StoreError::Unavailable(io.to_string()),
        sqlx::Error::PoolTimedOut => StoreError::Busy("timed out waiting for a connection".into()),
        other => StoreError::Other(other.to_string()),
    }
}

fn to_json_text(v: &Value) -> String {
    v.to_string()
}

fn from_json_text(s: Option<String>) -> Result<Option<Value>, StoreError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(e.to_string())))
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

fn get<'r, T>(row: &'r SqliteRow, col: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Corrupt(format!("column `{col}`: {e}")))
}

fn run_from_row(row: &SqliteRow) -> Result<Run, StoreError> {
    let status = RunStatus::parse(&get::<String>(row, "status")?)?;
    let error: Option<String> = get(row, "error")?;
    let trigger = from_json_text(Some(get(row, "trigger_payload")?))?.unwrap_or(Value::Null);
    Ok(Run {
        id: get(row, "id")?,
        workflow: get(row, "workflow")?,
        version: get(row, "version")?,
        trigger,
        status,
        claims: opt_u32(Some(get(row, "claims")?)).unwrap_or(0),
        replays: opt_u32(Some(get(row, "replays")?)).unwrap_or(0),
        created_at: get(row, "created_at")?,
        started_at: get(row, "started_at")?,
        finished_at: get(row, "finished_at")?,
        updated_at: get(row, "updated_at")?,
        failure: match error {
            Some(message) => Some(Failure {
                message,
                step: get(row, "failed_step")?,
                item: opt_u32(get(row, "failed_item")?),
                attempt: opt_u32(get(row, "failed_attempt")?),
                status_code: opt_u16(get(row, "failed_status_code")?),
            }),
            None => None,
        },
        lease_owner: get(row, "lease_owner")?,
        lease_expires_at: get(row, "lease_expires_at")?,
    })
}

fn step_from_row(row: &SqliteRow) -> Result<StepRecord, StoreError> {
    Ok(StepRecord {
        run_id: get(row, "run_id")?,
        step_id: get(row, "step_id")?,
        item: item_from_db(get(row, "item")?),
        status: StepStatus::parse(&get::<String>(row, "status")?)?,
        attempt: opt_u32(Some(get(row, "attempt")?)).unwrap_or(0),
        state: from_json_text(get(row, "state")?)?,
        output: from_json_text(get(row, "output")?)?,
        error: get(row, "error")?,
        status_code: opt_u16(get(row, "status_code")?),
        started_at: get(row, "started_at")?,
        finished_at: get(row, "finished_at")?,
    })
}

fn alert_from_row(row: &SqliteRow) -> Result<Alert, StoreError> {
    Ok(Alert {
        id: get(row, "id")?,
        run_id: get(row, "run_id")?,
        workflow: get(row, "workflow")?,
        channel: get(row, "channel")?,
        payload: from_json_text(Some(get(row, "payload")?))?.unwrap_or(Value::Null),
        status: AlertStatus::parse(&get::<String>(row, "status")?)?,
        attempts: opt_u32(Some(get(row, "attempts")?)).unwrap_or(0),
        next_attempt_at: get(row, "next_attempt_at")?,
        last_error: get(row, "last_error")?,
        created_at: get(row, "created_at")?,
        delivered_at: get(row, "delivered_at")?,
    })
}

const RUN_COLUMNS: &str = "id, workflow, version, trigger_payload, status, claims, replays, \
    created_at, started_at, finished_at, updated_at, error, failed_step, failed_item, \
    failed_attempt, failed_status_code, lease_owner, lease_expires_at";

const ALERT_COLUMNS: &str = "id, run_id, workflow, channel, payload, status, attempts, \
    next_attempt_at, last_error, created_at, delivered_at";

/// Performs one write inside the writer's open transaction.
async fn apply(conn: &mut SqliteConnection, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::PutVersion(v) => {
            sqlx::query(
                "INSERT INTO workflow_versions (hash, workflow, file, source, created_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&v.hash)
            .bind(&v.workflow)
            .bind(&v.file)
            .bind(&v.source)
            .bind(v.created_at)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::CreateRun(run) => {
            insert_run(conn, run).await?;
            Ok(Done::Unit)
        }
        Op::Claim {
            id,
            lease,
            steal_from,
        } => claim(conn, id, lease, steal_from.as_deref())
            .await
            .map(Done::Claim),
        Op::ClaimNext(lease) => claim_next(conn, lease).await.map(Done::MaybeRun),
        Op::Renew { id, lease } => {
            let done = sqlx::query(
                "UPDATE runs SET lease_expires_at = $3 \
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            )
            .bind(id)
            .bind(&lease.owner)
            .bind(lease.expires_at)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok(Done::Rows(done.rows_affected()))
        }
        Op::Release { id, owner } => {
            sqlx::query(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 \
                 WHERE id = $1 AND lease_owner = $2",
            )
            .bind(id)
            .bind(owner)
            .bind(now_ms())
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::RecordStep { owner, record: r } => {
            let done = sqlx::query(
                "INSERT INTO steps (run_id, step_id, item, status, attempt, state, output, error, \
                 status_code, started_at, finished_at) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 \
                 WHERE EXISTS (SELECT 1 FROM runs WHERE id = $1 AND lease_owner = $12 AND status = 'running') \
                 ON CONFLICT (run_id, step_id, item) DO UPDATE SET \
                 status = excluded.status, attempt = excluded.attempt, \
                 state = COALESCE(excluded.state, steps.state), output = excluded.output, \
                 error = excluded.error, status_code = excluded.status_code, \
                 started_at = excluded.started_at, finished_at = excluded.finished_at",
            )
            .bind(&r.run_id)
            .bind(&r.step_id)
            .bind(item_to_db(r.item))
            .bind(r.status.as_str())
            .bind(i64::from(r.attempt))
            .bind(r.state.as_ref().map(to_json_text))
            .bind(r.output.as_ref().map(to_json_text))
            .bind(r.error.as_deref())
            .bind(r.status_code.map(i64::from))
            .bind(r.started_at)
            .bind(r.finished_at)
            .bind(owner)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            fenced(done.rows_affected(), &r.run_id)
        }
        Op::RecordAttempt { owner, failure: f } => {
            let done = sqlx::query(
                "INSERT INTO step_attempts (run_id, step_id, item, round, attempt, started_at, \
                 finished_at, status_code, error, retryable) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 \
                 WHERE EXISTS (SELECT 1 FROM runs WHERE id = $1 AND lease_owner = $11 AND status = 'running') \
                 ON CONFLICT (run_id, step_id, item, round, attempt) DO UPDATE SET \
                 finished_at = excluded.finished_at, status_code = excluded.status_code, \
                 error = excluded.error, retryable = excluded.retryable",
            )
            .bind(&f.run_id)
            .bind(&f.step_id)
            .bind(item_to_db(f.item))
            .bind(i64::from(f.round))
            .bind(i64::from(f.attempt))
            .bind(f.started_at)
            .bind(f.finished_at)
            .bind(f.status_code.map(i64::from))
            .bind(&f.error)
            .bind(f.retryable)
            .bind(owner)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            fenced(done.rows_affected(), &f.run_id)
        }
        Op::Finish {
            id,
            owner,
            outcome,
            alerts,
        } => finish(conn, id, owner, outcome, alerts).await,
        Op::Cancel { id, reason } => cancel(conn, id, reason).await.map(Done::Cancel),
        Op::Replay { id } => replay(conn, id).await.map(Done::Replay),
        Op::Fire {
            workflow,
            slot,
            run,
        } => {
            let inserted = sqlx::query(
                "INSERT INTO schedule_fires (workflow, slot, run_id, fired_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (workflow, slot) DO NOTHING",
            )
            .bind(workflow)
            .bind(slot)
            .bind(run.as_ref().map(|r| r.id.as_str()))
            .bind(now_ms())
            .execute(&mut *conn)
            .await
            .map_err(map_err)?
            .rows_affected();
            if inserted == 1
                && let Some(run) = run
            {
                insert_run(conn, run).await?;
            }
            Ok(Done::Rows(inserted))
        }
        Op::AlertAttempt { id, result } => {
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
            sqlx::query(
                "UPDATE alerts SET status = $2, attempts = attempts + 1, next_attempt_at = $3, \
                 last_error = COALESCE($4, last_error), delivered_at = $5 WHERE id = $1",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(next)
            .bind(error)
            .bind(delivered)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::Ping => {
            sqlx::query(
                "INSERT INTO health (id, checked_at) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            )
            .bind(now_ms())
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Op::Close => Ok(Done::Unit),
    }
}

fn fenced(rows: u64, run_id: &str) -> Result<Done, StoreError> {
    if rows == 0 {
        Err(StoreError::LeaseLost {
            run_id: run_id.to_owned(),
        })
    } else {
        Ok(Done::Rows(rows))
    }
}

async fn insert_run(conn: &mut SqliteConnection, run: &NewRun) -> Result<(), StoreError> {
    let now = now_ms();
    let (status, owner, expires, started, claims) = match &run.lease {
        Some(l) => (
            RunStatus::Running,
            Some(l.owner.as_str()),
            Some(l.expires_at),
            Some(now),
            1_i64,
        ),
        None => (RunStatus::Queued, None, None, None, 0),
    };
    sqlx::query(
        "INSERT INTO runs (id, workflow, version, trigger_payload, status, claims, created_at, \
         started_at, updated_at, lease_owner, lease_expires_at, max_concurrency) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9, $10, $11)",
    )
    .bind(&run.id)
    .bind(&run.workflow)
    .bind(&run.version)
    .bind(to_json_text(&run.trigger))
    .bind(status.as_str())
    .bind(claims)
    .bind(now)
    .bind(started)
    .bind(owner)
    .bind(expires)
    .bind(run.max_concurrency.map(i64::from))
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn select_run(conn: &mut SqliteConnection, id: &str) -> Result<Option<Run>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    row.as_ref().map(run_from_row).transpose()
}

async fn claim(
    conn: &mut SqliteConnection,
    id: &str,
    lease: &Lease,
    steal_from: Option<&str>,
) -> Result<Claim, StoreError> {
    let now = now_ms();
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE runs SET status = 'running', claims = claims + 1, \
         started_at = COALESCE(started_at, $2), updated_at = $2, \
         lease_owner = $3, lease_expires_at = $4 \
         WHERE id = $1 AND status IN ('queued', 'running') \
         AND (lease_owner IS NULL OR lease_expires_at < $2 OR lease_owner = $5) \
         RETURNING {RUN_COLUMNS}"
    )))
    .bind(id)
    .bind(now)
    .bind(&lease.owner)
    .bind(lease.expires_at)
    .bind(steal_from)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    if let Some(row) = row {
        return Ok(Claim::Claimed(Box::new(run_from_row(&row)?)));
    }
    Ok(match select_run(conn, id).await? {
        None => Claim::NotFound,
        Some(run) if run.status.is_terminal() => Claim::Ended(run.status),
        Some(run) => Claim::Busy {
            owner: run.lease_owner.unwrap_or_default(),
            expires_at: run.lease_expires_at.unwrap_or(0),
        },
    })
}

async fn claim_next(
    conn: &mut SqliteConnection,
    lease: &Lease,
) -> Result<Option<Box<Run>>, StoreError> {
    let now = now_ms();
    // Interrupted runs (running, no live lease) first, then the queue, oldest
    // first; skipping any workflow already at its concurrency limit.
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE runs SET status = 'running', claims = claims + 1, \
         started_at = COALESCE(started_at, $1), updated_at = $1, \
         lease_owner = $2, lease_expires_at = $3 \
         WHERE id = ( \
           SELECT c.id FROM ( \
             SELECT id, workflow, max_concurrency, 0 AS lane, created_at FROM runs \
               WHERE status = 'running' AND (lease_owner IS NULL OR lease_expires_at < $1) \
             UNION ALL \
             SELECT id, workflow, max_concurrency, 1 AS lane, created_at FROM runs \
               WHERE status = 'queued' \
           ) AS c \
           WHERE c.max_concurrency IS NULL OR ( \
             SELECT count(*) FROM runs x WHERE x.workflow = c.workflow AND x.status = 'running' \
               AND x.lease_owner IS NOT NULL AND x.lease_expires_at >= $1) < c.max_concurrency \
           ORDER BY c.lane, c.created_at, c.id LIMIT 1) \
         RETURNING {RUN_COLUMNS}"
    )))
    .bind(now)
    .bind(&lease.owner)
    .bind(lease.expires_at)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    row.as_ref()
        .map(|r| run_from_row(r).map(Box::new))
        .transpose()
}

async fn finish(
    conn: &mut SqliteConnection,
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
    let done = sqlx::query(
        "UPDATE runs SET status = $3, finished_at = $4, updated_at = $4, \
         error = $5, failed_step = $6, failed_item = $7, failed_attempt = $8, \
         failed_status_code = $9, lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND lease_owner = $2 AND status = 'running' \
         RETURNING workflow",
    )
    .bind(id)
    .bind(owner)
    .bind(status.as_str())
    .bind(now)
    .bind(has_failure.then_some(f.message.as_str()))
    .bind(f.step.as_deref())
    .bind(f.item.map(i64::from))
    .bind(f.attempt.map(i64::from))
    .bind(f.status_code.map(i64::from))
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    let Some(row) = done else {
        return Err(StoreError::LeaseLost {
            run_id: id.to_owned(),
        });
    };
    let workflow: String = get(&row, "workflow")?;
    for alert in alerts {
        sqlx::query(
            "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
             next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
        )
        .bind(&alert.id)
        .bind(id)
        .bind(&workflow)
        .bind(&alert.channel)
        .bind(to_json_text(&alert.payload))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    Ok(Done::Unit)
}

async fn cancel(
    conn: &mut SqliteConnection,
    id: &str,
    reason: &str,
) -> Result<CancelResult, StoreError> {
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE runs SET status = 'cancelled', finished_at = $2, updated_at = $2, error = $3, \
         lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .bind(now)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    if done.rows_affected() == 1 {
        return Ok(CancelResult::Cancelled);
    }
    Ok(match select_run(conn, id).await? {
        None => CancelResult::NotFound,
        Some(run) => CancelResult::AlreadyEnded(run.status),
    })
}

async fn replay(conn: &mut SqliteConnection, id: &str) -> Result<ReplayResult, StoreError> {
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE runs SET status = 'queued', replays = replays + 1, updated_at = $2, \
         finished_at = NULL, error = NULL, failed_step = NULL, failed_item = NULL, \
         failed_attempt = NULL, failed_status_code = NULL, lease_owner = NULL, \
         lease_expires_at = NULL WHERE id = $1 AND status = 'failed'",
    )
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    if done.rows_affected() == 0 {
        return Ok(match select_run(conn, id).await? {
            None => ReplayResult::NotFound,
            Some(run) => ReplayResult::NotFailed(run.status),
        });
    }
    // A failed `for_each` keeps its committed item list (so indices and
    // keys stay the same) and becomes "in progress" again; every other
    // failed row is removed so the step, or item, runs afresh. Succeeded
    // rows stay: they are not run again.
    sqlx::query(
        "UPDATE steps SET status = 'running', error = NULL, finished_at = NULL, output = NULL \
         WHERE run_id = $1 AND status = 'failed' AND item = -1 AND state IS NOT NULL",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    sqlx::query("DELETE FROM steps WHERE run_id = $1 AND status = 'failed'")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    Ok(ReplayResult::Replayed)
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_workflow_version(&self, v: &WorkflowVersion) -> Result<(), StoreError> {
        self.write(Op::PutVersion(v.clone())).await.map(|_| ())
    }

    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT hash, workflow, file, source, created_at FROM workflow_versions WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.map(|r| {
            Ok(WorkflowVersion {
                hash: get(&r, "hash")?,
                workflow: get(&r, "workflow")?,
                file: get(&r, "file")?,
                source: get(&r, "source")?,
                created_at: get(&r, "created_at")?,
            })
        })
        .transpose()
    }

    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        self.write(Op::CreateRun(run.clone())).await.map(|_| ())
    }

    async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let limit = if filter.limit == 0 { 50 } else { filter.limit };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM runs \
             WHERE ($1 IS NULL OR workflow = $1) AND ($2 IS NULL OR status = $2) \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        )))
        .bind(filter.workflow.as_deref())
        .bind(filter.status.map(RunStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(run_from_row).collect()
    }

    async fn claim_run(
        &self,
        id: &str,
        lease: &Lease,
        steal_from: Option<&str>,
    ) -> Result<Claim, StoreError> {
        match self
            .write(Op::Claim {
                id: id.to_owned(),
                lease: lease.clone(),
                steal_from: steal_from.map(str::to_owned),
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

    async fn release_run(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        self.write(Op::Release {
            id: id.to_owned(),
            owner: owner.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn journal(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, step_id, item, status, attempt, state, output, error, status_code, \
             started_at, finished_at FROM steps WHERE run_id = $1 ORDER BY started_at, step_id, item",
        )
        .bind(run_id)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(step_from_row).collect()
    }

    async fn record_step(&self, owner: &str, record: &StepRecord) -> Result<(), StoreError> {
        self.write(Op::RecordStep {
            owner: owner.to_owned(),
            record: record.clone(),
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
        let rows = sqlx::query(
            "SELECT run_id, step_id, item, round, attempt, started_at, finished_at, status_code, \
             error, retryable FROM step_attempts WHERE run_id = $1 \
             ORDER BY started_at, step_id, item, round, attempt",
        )
        .bind(run_id)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(AttemptFailure {
                    run_id: get(r, "run_id")?,
                    step_id: get(r, "step_id")?,
                    item: item_from_db(get(r, "item")?),
                    round: opt_u32(Some(get(r, "round")?)).unwrap_or(0),
                    attempt: opt_u32(Some(get(r, "attempt")?)).unwrap_or(0),
                    started_at: get(r, "started_at")?,
                    finished_at: get(r, "finished_at")?,
                    status_code: opt_u16(get(r, "status_code")?),
                    error: get(r, "error")?,
                    retryable: get(r, "retryable")?,
                })
            })
            .collect()
    }

    async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &RunOutcome,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        self.write(Op::Finish {
            id: id.to_owned(),
            owner: owner.to_owned(),
            outcome: outcome.clone(),
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

    async fn leased_runs(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, lease_owner FROM runs WHERE status = 'running' AND lease_owner IS NOT NULL",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| Ok((get(r, "id")?, get(r, "lease_owner")?)))
            .collect()
    }

    async fn cancel_run(&self, id: &str, reason: &str) -> Result<CancelResult, StoreError> {
        match self
            .write(Op::Cancel {
                id: id.to_owned(),
                reason: reason.to_owned(),
            })
            .await?
        {
            Done::Cancel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn replay_run(&self, id: &str) -> Result<ReplayResult, StoreError> {
        match self.write(Op::Replay { id: id.to_owned() }).await? {
            Done::Replay(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn last_fire(&self, workflow: &str) -> Result<Option<Millis>, StoreError> {
        let row = sqlx::query("SELECT max(slot) AS slot FROM schedule_fires WHERE workflow = $1")
            .bind(workflow)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        get(&row, "slot")
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE status = 'pending' AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at, id LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn record_alert_attempt(
        &self,
        id: &str,
        result: &AlertAttempt,
    ) -> Result<(), StoreError> {
        self.write(Op::AlertAttempt {
            id: id.to_owned(),
            result: result.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn undelivered_alerts(&self, limit: u32) -> Result<Vec<Alert>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE status IN ('pending', 'failed') \
             ORDER BY created_at DESC, id DESC LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter().map(alert_from_row).collect()
    }

    async fn workflow_stats(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT workflow, \
               sum(status = 'queued') AS queued, sum(status = 'running') AS running, \
               sum(status = 'failed') AS failed, \
               max(CASE WHEN status = 'succeeded' THEN finished_at END) AS last_success, \
               max(CASE WHEN status = 'failed' THEN finished_at END) AS last_failure \
             FROM runs GROUP BY workflow ORDER BY workflow",
        )
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let count = |c: &str| -> Result<u64, StoreError> {
                    Ok(u64::try_from(get::<i64>(r, c)?).unwrap_or(0))
                };
                Ok(WorkflowStats {
                    workflow: get(r, "workflow")?,
                    queued: count("queued")?,
                    running: count("running")?,
                    dead_letters: count("failed")?,
                    last_success_at: get(r, "last_success")?,
                    last_failure_at: get(r, "last_failure")?,
                })
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.write(Op::Ping).await.map(|_| ())
    }

    async fn close(&self) {
        let _ = self.write(Op::Close).await;
        self.reader.close().await;
    }
}

fn unexpected(done: &Done) -> StoreError {
    StoreError::Other(format!(
        "the writer answered {done:?} to a different request"
    ))
}
