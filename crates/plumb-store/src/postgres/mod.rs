//! The PostgreSQL store: many plumb processes (`plumb serve`, `plumb
//! worker`) sharing one database.
//!
//! # Transactions
//!
//! Every write is one transaction on a connection of the pool, committed
//! before the call returns: "the call returned" means "durable", as on
//! SQLite. There is no batching of our own: PostgreSQL already groups the
//! WAL flushes of commits that arrive together.
//!
//! Everything that must hold across processes is decided by PostgreSQL's
//! locks, never by a process's memory:
//!
//! * Journal writes are fenced in the statement that writes them: the
//!   run's row must have `lease_owner` = the caller's claim token and
//!   status `running`, and that row is locked (`FOR NO KEY UPDATE`) until the write
//!   commits, so a claim or expiry that takes the lease waits for it (and
//!   a write that waited for a claim sees the new holder and is refused).
//! * Claims lock their candidate `FOR UPDATE SKIP LOCKED`, so concurrent
//!   claimers never take the same run and never wait for each other. A
//!   workflow's concurrency limit is checked under a transaction-scoped
//!   advisory lock on the workflow's name (see `runs.rs`).
//! * The audit chain's head row is locked by every append, so appends from
//!   many processes queue and the chain never forks.
//! * A rekey locks the secrets table against every other secret write
//!   while it checks the version it was given.
//!
//! # New runs with a deadline
//!
//! A webhook's run is committed before its deadline or not at all, decided
//! once, as on SQLite (see `SqliteStore::write`): the insert and commit run
//! in a task of their own; the caller waits until the deadline plus a
//! short grace and then answers [`StoreError::Unavailable`]. If that
//! transaction commits all the same, nobody is left to tell, so the task
//! withdraws the run at once (cancelled as "withdrawn", only while still
//! queued): its sender was told "not accepted" and will send it again. A
//! run that another process claimed in the moment between that commit and
//! its withdrawal is kept: a duplicate, never a loss.
//!
//! # Schema
//!
//! `migrations/postgres/`, embedded in the binary and applied at connect in
//! one transaction under a fixed advisory lock, so processes starting at
//! once migrate once; `plumb_schema_version` holds how many scripts were
//! applied. The row format is SQLite's (see the migration's header): ids
//! and JSON as text, times as epoch milliseconds.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
pub use plumb_core::store_url::PostgresOptions;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Postgres, Row, Transaction};

use crate::rows::Columns;
use crate::{Store, StoreError, now_ms};

mod alerts;
mod audit;
mod copy;
mod cursors;
mod deployments;
mod intake;
mod lineage;
mod polls;
mod processes;
mod retention;
mod runs;
mod schedules;
mod secrets;

/// How long a call waits for a free connection before the store reports
/// [`StoreError::Unavailable`]. Shorter than a webhook's commit deadline
/// would make little sense of it; longer would hide a database that is down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one script per version, applied in order.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_fair_claims.sql"),
    include_str!("../../migrations/postgres/0003_processes.sql"),
    include_str!("../../migrations/postgres/0004_retention.sql"),
    include_str!("../../migrations/postgres/0005_listing_indexes.sql"),
    include_str!("../../migrations/postgres/0006_lean_run_indexes.sql"),
    include_str!("../../migrations/postgres/0007_dedupe_keys.sql"),
    include_str!("../../migrations/postgres/0008_sync_state.sql"),
    include_str!("../../migrations/postgres/0009_lineage.sql"),
    include_str!("../../migrations/postgres/0010_process_connections.sql"),
];

/// The advisory lock every migrating process takes (fixed, so processes of
/// every version agree on it): "plumbmig" in ASCII.
const MIGRATION_LOCK: i64 = 0x706c_756d_626d_6967;

/// A PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Where it is, without the password.
    location: String,
    /// The workflow this process last claimed a run of: the next claim
    /// looks at the workflows after it first (see `WorkflowWalk`).
    claimed_from: std::sync::Arc<std::sync::Mutex<String>>,
    /// Fired by `LISTEN plumb_work_…` (see [`RunStore::work_signal`]).
    ///
    /// [`RunStore::work_signal`]: crate::RunStore::work_signal
    work: std::sync::Arc<tokio::sync::Notify>,
    /// Whether new work is announced with `NOTIFY` and listened for
    /// (`notify=false` in the URL turns both off).
    notify: bool,
    /// The task that listens, if any; stopped when the last handle goes.
    listener: std::sync::Arc<Listening>,
    /// New runs with a deadline (webhooks), committed in batches (see
    /// `intake`).
    intake: tokio::sync::mpsc::Sender<intake::Pending>,
}

/// The listening task, aborted when dropped.
#[derive(Debug)]
struct Listening(Option<tokio::task::JoinHandle<()>>);

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Listens for this schema's `plumb_work_…` notifications for as long as it runs, and
/// wakes idle claimers on each; reconnects with a backoff when the
/// connection is lost (claimers poll meanwhile, so nothing waits for it).
async fn listen(pool: PgPool, work: std::sync::Arc<tokio::sync::Notify>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let channel = sqlx::query_scalar::<_, String>(
            "SELECT 'plumb_work_' || left(md5(current_schema()), 16)",
        )
        .fetch_one(&pool)
        .await;
        let listening = match channel {
            Ok(channel) => match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(mut listener) => listener.listen(&channel).await.map(|()| listener),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match listening {
            Ok(mut listener) => {
                pause = Duration::from_millis(100);
                // Whatever was sent while not listening.
                work.notify_waiters();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => {
                            // Every idle claimer, and the next one to wait
                            // if none is waiting right now.
                            work.notify_waiters();
                            work.notify_one();
                        }
                        // The connection was lost and is listening again:
                        // what was sent meanwhile is unknown.
                        Ok(None) => work.notify_waiters(),
                        Err(e) => {
                            tracing::debug!(error = %e, "Listening for new runs failed; idle workers poll meanwhile.");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "Could not listen for new runs; idle workers poll meanwhile.");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Shows where the store is and never the connection options, which hold
/// the password.
impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`),
    /// with `password` when given (it takes precedence over one in the
    /// URL), and applies pending migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Open`] when the URL is not valid, the database cannot
    /// be reached or refuses the login, or the schema cannot be migrated —
    /// including a database migrated by a newer plumb. No message ever
    /// holds the password.
    pub async fn connect(
        url: &str,
        password: Option<String>,
        settings: PostgresOptions,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Open {
            // The URL may carry a password: it is not repeated.
            location: "the PostgreSQL URL".into(),
            message: format!("the URL is not valid: {e}"),
        })?;
        let options = match password {
            Some(password) => options.password(&password),
            None => options,
        };
        Self::connect_with_settings(options, settings).await
    }

    /// Connects with `options` as given (tests set `search_path` to a
    /// schema of their own), and applies pending migrations.
    ///
    /// # Errors
    ///
    /// As [`PgStore::connect`].
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        Self::connect_with_settings(options, PostgresOptions::default()).await
    }

    /// Connects with `options` and plumb's `settings` (pool size, whether
    /// to listen), and applies pending migrations.
    ///
    /// # Errors
    ///
    /// As [`PgStore::connect`].
    pub async fn connect_with_settings(
        options: PgConnectOptions,
        settings: PostgresOptions,
    ) -> Result<Self, StoreError> {
        let location = location(&options);
        let open = |message: String| StoreError::Open {
            location: location.clone(),
            message,
        };
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| Box::pin(async move { prepare_session(conn).await }))
            .connect_lazy_with(options.clone());
        // The pool's first session does the start-up checks and stays open
        // for the queries that follow: a separate connection for them would
        // cost a server process more (most of a short command's time). It
        // also proves at start that the session settings are accepted (a
        // pooler in front of the database may refuse them), rather than as
        // a 503 on every later request.
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                pool.close().await;
                return Err(open(why_not_connected(&options, e).await));
            }
        };
        // Text is stored as given: a database in another encoding would
        // refuse the first emoji of a webhook body, long after start-up.
        let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| open(e.to_string()))?;
        if !encoding.eq_ignore_ascii_case("UTF8") {
            return Err(open(format!(
                "the database's encoding is {encoding}; plumb needs UTF8 \
                 (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)"
            )));
        }
        migrate(&mut conn)
            .await
            .map_err(|e| open(format!("migrating the store: {e}")))?;
        // Back in the pool before the first query: dropped, it would return
        // from a task of its own (after a ping), and a query right after
        // would find the pool empty and open a second server process.
        conn.return_to_pool().await;
        let work = std::sync::Arc::new(tokio::sync::Notify::new());
        let listener = std::sync::Arc::new(Listening(
            (settings.notify && settings.listen)
                .then(|| tokio::spawn(listen(pool.clone(), std::sync::Arc::clone(&work)))),
        ));
        let intake = intake::start(pool.clone(), settings.notify);
        Ok(Self {
            pool,
            location,
            claimed_from: std::sync::Arc::default(),
            work,
            notify: settings.notify,
            listener,
            intake,
        })
    }

    /// Whether this process hears of new work through `LISTEN` (see
    /// [`crate::RunStore::work_signal`]).
    fn listening(&self) -> bool {
        self.listener.0.is_some()
    }

    /// Where the store is (`postgres://user@host:port/db`), without the
    /// password: for messages and logs.
    #[must_use]
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Begins a write.
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(map_err)
    }
}

/// Where the store is, for messages: never the password.
fn location(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    )
}

/// Why the pool could not open its first session, in the driver's words.
/// The pool retries a refused connection until its acquire timeout (a
/// database still starting up) and then reports only that it timed out:
/// one direct attempt names the cause (refused, unknown host, …).
async fn why_not_connected(options: &PgConnectOptions, pool_error: sqlx::Error) -> String {
    if !matches!(pool_error, sqlx::Error::PoolTimedOut) {
        return pool_error.to_string();
    }
    // Bounded: a host that drops packets would otherwise hold the command
    // for the system's TCP timeout (minutes).
    match tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(options)).await {
        Err(_) => format!(
            "no answer from the database within {} s (is the host reachable?)",
            ACQUIRE_TIMEOUT.as_secs()
        ),
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            format!(
                "no connection within {} s (the database answers now: try again)",
                ACQUIRE_TIMEOUT.as_secs()
            )
        }
    }
}

/// Applies the pending migrations in one transaction that first takes
/// [`MIGRATION_LOCK`]: processes starting at once queue on it, the first
/// migrates, and the others then find nothing left to do.
async fn migrate(conn: &mut PgConnection) -> Result<(), String> {
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    // Nearly always the schema is current: one read says so without the
    // lock and the transaction (five round trips fewer for every
    // command). A missing table, an older version or any error takes the
    // locked path, which decides.
    let current: Option<i64> =
        sqlx::query_scalar("SELECT version FROM plumb_schema_version WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .ok()
            .flatten();
    if current == Some(known) {
        return Ok(());
    }
    let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
    // The session's `lock_timeout` is for runs, not for this: the other
    // processes starting at once wait for as long as the first one takes
    // to migrate (an index built over millions of runs), and a migration
    // waits for whatever a running older process holds.
    sqlx::raw_sql("SET LOCAL lock_timeout = 0")
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS plumb_schema_version (\
         id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    let current: i64 = sqlx::query_scalar("SELECT version FROM plumb_schema_version WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    if current > known {
        return Err(format!(
            "the store has schema version {current}, newer than this plumb knows ({known}); upgrade plumb"
        ));
    }
    if current == known {
        return tx.commit().await.map_err(|e| e.to_string());
    }
    for (i, script) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let version = i + 1;
        sqlx::raw_sql(*script)
            .execute(&mut *tx)
            .await
            .map_err(|e| format!("applying schema version {version}: {e}"))?;
    }
    sqlx::query(
        "INSERT INTO plumb_schema_version (id, version) VALUES (1, $1) \
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
    )
    .bind(known)
    .execute(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    tracing::info!(version = known, "Migrated the PostgreSQL store.");
    Ok(())
}

/// Maps a driver error to what it means for the caller.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Connection exceptions, insufficient resources (disk full, too
            // many connections), the server shutting down or restarting.
            // Also a read-only transaction (a standby after a failover),
            // system I/O errors, a statement cancelled by the server, and a
            // session the server ended for idling or timing out.
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("58")
                    || matches!(
                        code,
                        "57P01" | "57P02" | "57P03" | "57P05" | "57014" | "25006" | "25P03"
                    ) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            // Serialization failure, deadlock, lock not available: another
            // writer won this time.
            Some("40001" | "40P01" | "55P03") => StoreError::Busy(e.to_string()),
            // A NUL character in text, a value past PostgreSQL's limits:
            // the write itself can never be stored.
            Some("22021" | "54000") => StoreError::Rejected(e.to_string()),
            _ => StoreError::Other(e.to_string()),
        },
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// Settings of every session of the pool, applied as it connects.
///
/// * A process that stops between two statements of a transaction
///   (SIGSTOP, a long pause, a frozen VM) keeps its row locks until it
///   wakes, and every other process that needs those rows would wait as
///   long: the server ends such a session after a few seconds, which rolls
///   the transaction back (the stalled process then finds its lease gone).
/// * No lock wait lasts forever (the error is `Busy`: retried).
/// * A commit is durable when it returns (SPEC G1), whatever the server's
///   or the role's default: `synchronous_commit = off` is raised to `on`.
///
/// Only the pool's sessions: migration waits for its lock as long as
/// another process migrates.
async fn prepare_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "SET idle_in_transaction_session_timeout = '5s'; SET lock_timeout = '10s'; \
         SELECT set_config('synchronous_commit', 'on', false) \
         WHERE current_setting('synchronous_commit') = 'off'",
    )
    .execute(conn)
    .await
    .map(|_| ())
}

/// Free text (an error, a reason) as PostgreSQL stores it: a text value
/// cannot hold a NUL character (SQLite's can), and an upstream's error body
/// may contain one; it becomes U+FFFD rather than failing the write, which
/// would turn a retryable failure into a permanent one.
fn no_nul(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// A statement built from constant parts (column lists, lanes), never from
/// input: values are always bound.
fn sql(text: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(text)
}

/// A statement with its values bound.
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Every row of `query`, mapped.
async fn fetch_all<T>(
    query: PgQuery<'_>,
    pool: &PgPool,
    map: impl Fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let found = query.fetch_all(pool).await.map_err(map_err)?;
    found.iter().map(map).collect()
}

/// The row of `query`, if any, mapped.
async fn fetch_optional<T>(
    query: PgQuery<'_>,
    pool: &PgPool,
    map: impl Fn(&PgRow) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let found = query.fetch_optional(pool).await.map_err(map_err)?;
    found.as_ref().map(map).transpose()
}

/// A fenced write that matched no row: the caller lost the lease.
fn fenced(rows: u64, run_id: &str) -> Result<(), StoreError> {
    if rows == 0 {
        Err(StoreError::LeaseLost {
            run_id: run_id.to_owned(),
        })
    } else {
        Ok(())
    }
}

impl Columns for PgRow {
    type Error = StoreError;

    fn text(&self, col: &str) -> Result<String, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn int(&self, col: &str) -> Result<i64, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn flag(&self, col: &str) -> Result<bool, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn bytes(&self, col: &str) -> Result<Vec<u8>, StoreError> {
        self.try_get(col).map_err(map_err)
    }

    fn invalid(e: StoreError) -> StoreError {
        e
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO health (id, checked_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn close(&self) {
        if let Some(task) = &self.listener.0 {
            task.abort();
        }
        self.pool.close().await;
    }
}
