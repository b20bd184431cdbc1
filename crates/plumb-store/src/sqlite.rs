//! The SQLite store: one file, WAL mode, `synchronous=FULL` by default.
//!
//! Writes go through a single connection (SQLite has one writer anyway;
//! keeping it in-process avoids `SQLITE_BUSY` between our own connections),
//! reads through a small pool so `plumb runs list` never waits on a commit.
//! Every write is one statement — one transaction, one WAL fsync — so a
//! journal row is durable when the call returns.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr};

use crate::{
    AttemptFailure, Claim, Failure, Lease, Millis, NewRun, Run, RunFilter, RunOutcome, RunStatus,
    StepRecord, StepStatus, Store, StoreError, WorkflowVersion, now_ms,
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

/// A SQLite-backed [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path` and applies
    /// pending migrations.
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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| open_error(&e))?;
        migrator().run(&writer).await.map_err(|e| open_error(&e))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| open_error(&e))?;
        Ok(Self {
            writer,
            reader,
            path: path.to_owned(),
        })
    }

    /// The file this store lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "runs and journal".into(),
        MigrationType::Simple,
        include_str!("../migrations/sqlite/0001_runs_and_journal.sql").into_sql_str(),
        false,
    )])
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

const RUN_COLUMNS: &str = "id, workflow, version, trigger_payload, status, claims, created_at, \
    started_at, finished_at, updated_at, error, failed_step, failed_item, failed_attempt, \
    failed_status_code, lease_owner, lease_expires_at";

#[async_trait]
impl Store for SqliteStore {
    async fn put_workflow_version(&self, v: &WorkflowVersion) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workflow_versions (hash, workflow, file, source, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&v.hash)
        .bind(&v.workflow)
        .bind(&v.file)
        .bind(&v.source)
        .bind(v.created_at)
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
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
             started_at, updated_at, lease_owner, lease_expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9, $10)",
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
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
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
        let now = now_ms();
        // One statement: the check and the take are atomic under SQLite's
        // single writer, so two claimers can never both win.
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
        .fetch_optional(&self.writer)
        .await
        .map_err(map_err)?;
        if let Some(row) = row {
            return Ok(Claim::Claimed(Box::new(run_from_row(&row)?)));
        }
        Ok(match self.run(id).await? {
            None => Claim::NotFound,
            Some(run) if run.status.is_terminal() => Claim::Ended(run.status),
            Some(run) => Claim::Busy {
                owner: run.lease_owner.unwrap_or_default(),
                expires_at: run.lease_expires_at.unwrap_or(0),
            },
        })
    }

    async fn renew_lease(&self, id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE runs SET lease_expires_at = $3 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(&lease.owner)
        .bind(lease.expires_at)
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_run(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 \
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .bind(now_ms())
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
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

    async fn record_step(&self, owner: &str, r: &StepRecord) -> Result<(), StoreError> {
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
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost {
                run_id: r.run_id.clone(),
            });
        }
        Ok(())
    }

    async fn record_attempt_failure(
        &self,
        owner: &str,
        f: &AttemptFailure,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO step_attempts (run_id, step_id, item, attempt, started_at, finished_at, \
             status_code, error, retryable) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
             WHERE EXISTS (SELECT 1 FROM runs WHERE id = $1 AND lease_owner = $10 AND status = 'running') \
             ON CONFLICT (run_id, step_id, item, attempt) DO UPDATE SET \
             finished_at = excluded.finished_at, status_code = excluded.status_code, \
             error = excluded.error, retryable = excluded.retryable",
        )
        .bind(&f.run_id)
        .bind(&f.step_id)
        .bind(item_to_db(f.item))
        .bind(i64::from(f.attempt))
        .bind(f.started_at)
        .bind(f.finished_at)
        .bind(f.status_code.map(i64::from))
        .bind(&f.error)
        .bind(f.retryable)
        .bind(owner)
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost {
                run_id: f.run_id.clone(),
            });
        }
        Ok(())
    }

    async fn attempt_failures(&self, run_id: &str) -> Result<Vec<AttemptFailure>, StoreError> {
        let rows = sqlx::query(
            "SELECT run_id, step_id, item, attempt, started_at, finished_at, status_code, error, \
             retryable FROM step_attempts WHERE run_id = $1 ORDER BY started_at, step_id, item, attempt",
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
    ) -> Result<(), StoreError> {
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
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
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
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost {
                run_id: id.to_owned(),
            });
        }
        Ok(())
    }
}
