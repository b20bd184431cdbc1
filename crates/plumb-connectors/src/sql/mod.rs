//! The SQL connectors: one statement (or a batch of them in one
//! transaction) with bind parameters, on a pool opened on first use and
//! shared by every step of the connection. One module per database:
//! [`postgres`] and [`mysql`] (MariaDB too) through sqlx, [`sqlite`]
//! through the SQLite library the store uses.
//!
//! Values reach the database only as parameters: JSON `null`, booleans,
//! integers, floats and strings bind as themselves, objects and arrays as
//! JSON. Rows come back typed (`{rows: [{column: value}], rows_affected}`:
//! integers and floats as numbers, exact decimals as strings, timestamps as
//! RFC 3339, json as JSON, bytes as base64); a column of a type not read
//! here is named in a permanent error with the fix (cast it in the query).
//! Failures are classified by each driver: connection loss, serialization
//! failures, deadlocks, too many connections and lock timeouts are
//! retryable; constraint, syntax and type errors are permanent and name the
//! code and the constraint.
//!
//! With `exactly_once`, a step's idempotency key and output are recorded in
//! a table of the target database in the same transaction as its write; a
//! step whose key is there already returns the recorded output instead of
//! writing again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumb_core::model::SqlDriver;
use serde_json::Value;
use sha2::Digest;
use sqlx::Row;

use crate::ActionError;

pub mod mysql;
pub mod postgres;
pub mod sqlite;

/// Effect records deleted per statement by [`SqlPools::purge_effects`].
pub const PURGE_BATCH: u64 = 1000;

/// The most rows one statement may return into a step's output.
pub const MAX_ROWS: usize = 100_000;

/// Where a pool goes.
pub struct Target<'a> {
    /// The connection's name, for messages.
    pub connection: &'a str,
    /// Which database.
    pub driver: SqlDriver,
    /// The full URL, password included (never shown); for SQLite, the
    /// database file's path.
    pub url: &'a str,
    /// Connections in the pool.
    pub pool: u32,
    /// Timeout of a statement and of getting a connection.
    pub timeout: Duration,
    /// With `exactly_once`: where the step's key is recorded with the write.
    pub effect: Option<Effect<'a>>,
}

/// An `exactly_once` write's record in the target database.
pub struct Effect<'a> {
    /// The table (validated as a plain name when the project loaded).
    pub table: &'a str,
    /// The step's idempotency key.
    pub key: &'a str,
    /// The run.
    pub run_id: &'a str,
    /// The step.
    pub step_id: &'a str,
}

/// An open pool of one of the databases.
#[derive(Clone)]
enum Pool {
    Postgres(sqlx::PgPool),
    Mysql(sqlx_mysql::MySqlPool),
    Sqlite(sqlite::Db),
}

/// Pools by connection, opened on first use.
#[derive(Default)]
pub struct SqlPools {
    pools: Mutex<HashMap<String, Pool>>,
    /// Effects tables known to exist, by connection and table.
    tables: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for SqlPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqlPools")
    }
}

/// Why a statement (or an element of a batch) failed.
struct Failure {
    /// The element of a batch that failed (the batch rolled back).
    index: Option<usize>,
    error: ActionError,
}

impl From<ActionError> for Failure {
    fn from(error: ActionError) -> Self {
        Self { index: None, error }
    }
}

fn unusable() -> ActionError {
    ActionError::Permanent {
        message: "the connection pools are unusable (a thread panicked)".to_owned(),
        status: None,
    }
}

impl SqlPools {
    /// The pool for `target`, opened on first use (a changed URL opens a new
    /// one: a rotated password takes effect).
    fn pool(&self, target: &Target<'_>) -> Result<Pool, ActionError> {
        let key = format!(
            "{}:{}",
            target.connection,
            hex::encode(sha2::Sha256::digest(target.url.as_bytes()))
        );
        let mut pools = self.pools.lock().map_err(|_| unusable())?;
        if let Some(pool) = pools.get(&key) {
            return Ok(pool.clone());
        }
        let pool = match target.driver {
            SqlDriver::Postgres => Pool::Postgres(postgres::open(target)?),
            SqlDriver::Mysql => Pool::Mysql(mysql::open(target)?),
            SqlDriver::Sqlite => Pool::Sqlite(sqlite::Db::new(target)),
        };
        let prefix = format!("{}:", target.connection);
        pools.retain(|k, _| !k.starts_with(&prefix));
        // A new URL may be another database: its effects table is not
        // known to exist.
        if let Ok(mut tables) = self.tables.lock() {
            tables.retain(|k| !k.starts_with(&prefix));
        }
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    /// Closes every pool (shutdown), waiting for connections in use.
    pub async fn close(&self) {
        for pool in self.take_all() {
            close(pool).await;
        }
    }

    /// Forgets every pool (a reload: connections may have changed); they
    /// close in the background once their statements finish, and the next
    /// step opens a fresh one.
    pub fn reset(&self) {
        let pools = self.take_all();
        if pools.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for pool in pools {
                    close(pool).await;
                }
            });
        }
    }

    fn take_all(&self) -> Vec<Pool> {
        if let Ok(mut tables) = self.tables.lock() {
            tables.clear();
        }
        match self.pools.lock() {
            Ok(mut p) => p.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Runs one statement with `params`; the step's output
    /// (`{rows, rows_affected}`).
    ///
    /// # Errors
    ///
    /// Retryable or permanent as the module doc says.
    pub async fn execute(
        &self,
        target: &Target<'_>,
        query: &str,
        params: Vec<Value>,
    ) -> Result<Value, ActionError> {
        self.run(target, query, vec![params], false).await
    }

    /// Runs the statement once per element of `batch` (each a list of
    /// parameters) in **one** transaction: all of them commit, or none (a
    /// failing element is named by its index). The output is
    /// `{rows_affected, elements}`.
    ///
    /// # Errors
    ///
    /// As [`SqlPools::execute`], the message naming the failed element.
    pub async fn execute_batch(
        &self,
        target: &Target<'_>,
        query: &str,
        batch: Vec<Vec<Value>>,
    ) -> Result<Value, ActionError> {
        self.run(target, query, batch, true).await
    }

    async fn run(
        &self,
        target: &Target<'_>,
        query: &str,
        statements: Vec<Vec<Value>>,
        batch: bool,
    ) -> Result<Value, ActionError> {
        let pool = self.pool(target)?;
        let elements = statements.len();
        let work = Work {
            query,
            statements,
            batch,
            effect: target.effect.as_ref(),
        };
        let known = target
            .effect
            .as_ref()
            .map(|e| format!("{}:{}", target.connection, e.table));
        let created = known
            .as_ref()
            .is_none_or(|k| self.tables.lock().is_ok_and(|t| t.contains(k)));
        let run = async {
            match &pool {
                Pool::Postgres(p) => run_sqlx(p, target, &work, created).await,
                Pool::Mysql(p) => run_sqlx(p, target, &work, created).await,
                Pool::Sqlite(db) => db.run(target, &work, created).await,
            }
        };
        let result = tokio::time::timeout(target.timeout, run).await;
        if let (Ok(Ok(_)), Some(known)) = (&result, known)
            && let Ok(mut t) = self.tables.lock()
        {
            t.insert(known);
        }
        match result {
            Err(_) => Err(ActionError::Retryable {
                message: format!(
                    "the {} did not finish within {} s (if it was committing, it may have committed: `exactly_once` makes the retry safe)",
                    if batch {
                        format!("batch of {elements}")
                    } else {
                        "statement".to_owned()
                    },
                    target.timeout.as_secs_f64()
                ),
                status: None,
                retry_after: None,
            }),
            Ok(Ok(output)) => Ok(output),
            // A failed element rolls the batch back; a failure around the
            // transaction itself (its commit) leaves the outcome unknown,
            // and the message must not claim otherwise.
            Ok(Err(Failure {
                index: Some(i),
                error,
            })) => Err(error.map_message(|m| {
                format!("element {i} of {elements}: {m} (nothing of the batch was committed)")
            })),
            Ok(Err(Failure { index: None, error })) if batch => {
                Err(error.map_message(|m| format!("the batch's transaction: {m}")))
            }
            Ok(Err(Failure { error, .. })) => Err(error),
        }
    }
}

impl SqlPools {
    /// Deletes the `exactly_once` records of `table` committed before
    /// `before` (the retention job), a batch at a time; how many went.
    /// Records are read by a run resumed after a crash or replayed from
    /// the dead-letter list; the caller keeps them longer than the runs
    /// that wrote them are kept.
    ///
    /// # Errors
    ///
    /// As [`SqlPools::execute`].
    pub async fn purge_effects(
        &self,
        target: &Target<'_>,
        table: &str,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, ActionError> {
        let pool = self.pool(target)?;
        // RFC 3339 with a fixed width, so SQLite's text comparison orders it.
        let bound = match target.driver {
            SqlDriver::Mysql => before.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            _ => before.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        };
        let mut total = 0;
        loop {
            let batch = async {
                match &pool {
                    Pool::Postgres(p) => purge_sqlx(p, target, table, &bound).await,
                    Pool::Mysql(p) => purge_sqlx(p, target, table, &bound).await,
                    Pool::Sqlite(db) => db.purge(target, table, &bound).await,
                }
            };
            let deleted = tokio::time::timeout(target.timeout, batch)
                .await
                .map_err(|_| ActionError::Retryable {
                    message: format!("purging `{table}` did not finish in time"),
                    status: None,
                    retry_after: None,
                })??;
            total += deleted;
            if deleted < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

async fn purge_sqlx<DB: Dialect>(
    pool: &sqlx::Pool<DB>,
    target: &Target<'_>,
    table: &str,
    bound: &str,
) -> Result<u64, ActionError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut args = DB::Arguments::default();
    DB::bind(&mut args, &Value::String(bound.to_owned())).map_err(|e| ActionError::Permanent {
        message: format!("the retention bound cannot be bound: {e}"),
        status: None,
    })?;
    let sql = sqlx::AssertSqlSafe(DB::purge_effects(table));
    match sqlx::query_with::<DB, _>(sql, args).execute(pool).await {
        Ok(done) => Ok(DB::affected(&done)),
        // Never used yet: nothing to purge.
        Err(sqlx::Error::Database(db)) if DB::judge(db.as_ref()).0.contains(DB::NO_TABLE) => Ok(0),
        Err(e) => Err(classify::<DB>(target.connection, &e)),
    }
}

async fn close(pool: Pool) {
    match pool {
        Pool::Postgres(p) => p.close().await,
        Pool::Mysql(p) => p.close().await,
        Pool::Sqlite(db) => db.close(),
    }
}

/// What one step asks of its database.
struct Work<'a> {
    query: &'a str,
    /// The parameters of each statement: one for a plain step, one per
    /// element for a batch.
    statements: Vec<Vec<Value>>,
    batch: bool,
    effect: Option<&'a Effect<'a>>,
}

impl Work<'_> {
    /// The output of a batch that ran.
    fn batch_output(&self, affected: u64) -> Value {
        serde_json::json!({ "rows_affected": affected, "elements": self.statements.len() })
    }
}

/// The message of a statement returning more than [`MAX_ROWS`] rows.
fn too_many_rows() -> ActionError {
    ActionError::Permanent {
        message: format!(
            "the statement returned more rows than a step keeps ({MAX_ROWS}): add a LIMIT, or page with the cursor (nothing was committed)"
        ),
        status: None,
    }
}

/// A column whose type a sql step does not read: the fix is a cast
/// (`cast`, written for the database).
fn unread_column(name: &str, ty: &str, cast: &str) -> ActionError {
    ActionError::Permanent {
        message: format!(
            "column `{name}` is of type {ty}, which a sql step does not read yet: cast it in the query (`{cast}`)"
        ),
        status: None,
    }
}

/// A column whose value the driver could not decode.
fn undecodable_column(name: &str, e: &sqlx::Error) -> ActionError {
    ActionError::Permanent {
        message: format!("column `{name}` cannot be read: {e}"),
        status: None,
    }
}

/// Bytes as a column value: base64.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A recorded output as the step's output, marked `already_committed`.
fn already_committed(text: Option<String>) -> Value {
    let mut output = text
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    if let Value::Object(map) = &mut output {
        map.insert("already_committed".into(), Value::Bool(true));
    }
    output
}

/// What a database reached through sqlx says in its own dialect.
trait Dialect: sqlx::Database {
    /// Binds one JSON value as its natural SQL type.
    fn bind(args: &mut Self::Arguments, value: &Value) -> Result<(), sqlx::error::BoxDynError>;
    /// One result row as a JSON object.
    fn row_json(row: &Self::Row) -> Result<Value, ActionError>;
    /// The rows a statement changed.
    fn affected(done: &Self::QueryResult) -> u64;
    /// What [`Dialect::judge`] shows for a table that does not exist.
    const NO_TABLE: &'static str;
    /// A database error's code as the message shows it (`SQLSTATE 23505`),
    /// and whether another try may pass.
    fn judge(db: &dyn sqlx::error::DatabaseError) -> (String, bool);
    /// `CREATE TABLE IF NOT EXISTS` for the effects table.
    fn effects_ddl(table: &str) -> String;
    /// The recorded output (as text) of the key bound first.
    fn select_effect(table: &str) -> String;
    /// Records key, run, step and output (text); when the key is there,
    /// it changes no row or fails as [`Dialect::already_exists`] says.
    fn insert_effect(table: &str) -> String;
    /// Deletes up to [`PURGE_BATCH`] records committed before the time
    /// bound first (RFC 3339, UTC).
    fn purge_effects(table: &str) -> String;
    /// Whether an error says only that what was being created exists
    /// already: the effects table (another process created it at the same
    /// moment) or the effect's key (another attempt recorded it).
    fn already_exists(e: &sqlx::Error) -> bool;
}

/// What a driver error means for the step. The message never carries the
/// URL (the engine redacts secret values from it too).
fn classify<DB: Dialect>(connection: &str, e: &sqlx::Error) -> ActionError {
    match e {
        sqlx::Error::Database(db) => {
            let (code, retryable) = DB::judge(db.as_ref());
            let constraint = db
                .constraint()
                .map(|c| format!(", constraint `{c}`"))
                .unwrap_or_default();
            let message = format!("{} ({code}{constraint})", db.message());
            database_error(message, retryable)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => unreachable_database(connection, e),
        other => ActionError::Permanent {
            message: format!("connection `{connection}`: {other}"),
            status: None,
        },
    }
}

/// An error the database reported, retryable or not as its driver judged.
fn database_error(message: String, retryable: bool) -> ActionError {
    if retryable {
        ActionError::Retryable {
            message,
            status: None,
            retry_after: None,
        }
    } else {
        ActionError::Permanent {
            message,
            status: None,
        }
    }
}

/// The database could not be reached (or went away): retryable.
fn unreachable_database(connection: &str, e: &dyn std::fmt::Display) -> ActionError {
    ActionError::Retryable {
        message: format!("cannot reach the database of connection `{connection}`: {e}"),
        status: None,
        retry_after: None,
    }
}

fn args_of<DB: Dialect>(index: usize, params: &[Value]) -> Result<DB::Arguments, Failure> {
    let mut args = DB::Arguments::default();
    for (i, value) in params.iter().enumerate() {
        DB::bind(&mut args, value).map_err(|e| Failure {
            index: Some(index),
            error: ActionError::Permanent {
                message: format!("parameter {} cannot be bound: {e}", i + 1),
                status: None,
            },
        })?;
    }
    Ok(args)
}

/// One step's statements in one transaction on a sqlx pool, with its
/// effect recorded when the connection is `exactly_once`.
async fn run_sqlx<DB: Dialect>(
    pool: &sqlx::Pool<DB>,
    target: &Target<'_>,
    work: &Work<'_>,
    created: bool,
) -> Result<Value, Failure>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let db = |index| {
        move |e: sqlx::Error| Failure {
            index,
            error: classify::<DB>(target.connection, &e),
        }
    };
    let mut bound = Vec::with_capacity(work.statements.len());
    for (index, params) in work.statements.iter().enumerate() {
        bound.push(args_of::<DB>(index, params)?);
    }
    if let (Some(effect), false) = (work.effect, created) {
        let ddl = sqlx::AssertSqlSafe(DB::effects_ddl(effect.table));
        match sqlx::query::<DB>(ddl).execute(pool).await {
            Err(e) if !DB::already_exists(&e) => {
                // A user without CREATE rights is refused even when the
                // table exists (PostgreSQL and MySQL check the privilege
                // first): a table created beforehand, as the README
                // offers, is used as it is.
                let probe = format!("SELECT 1 FROM {} WHERE 1 = 0", effect.table);
                if sqlx::query::<DB>(sqlx::AssertSqlSafe(probe))
                    .execute(pool)
                    .await
                    .is_err()
                {
                    return Err(db(None)(e));
                }
            }
            _ => {}
        }
    }
    let mut tx = pool.begin().await.map_err(db(None))?;
    if let Some(effect) = work.effect
        && let Some(done) = recorded_sqlx::<DB>(&mut tx, effect)
            .await
            .map_err(db(None))?
    {
        return Ok(done);
    }
    let output = if work.batch {
        let mut affected = 0_u64;
        for (index, args) in bound.into_iter().enumerate() {
            let done = sqlx::query_with::<DB, _>(sqlx::AssertSqlSafe(work.query.to_owned()), args)
                .execute(&mut *tx)
                .await
                .map_err(db(Some(index)))?;
            affected += DB::affected(&done);
        }
        work.batch_output(affected)
    } else {
        use futures::StreamExt;
        let args = bound.pop().unwrap_or_default();
        let query = sqlx::query_with::<DB, _>(sqlx::AssertSqlSafe(work.query.to_owned()), args);
        let mut stream = sqlx::Executor::fetch_many(&mut *tx, query);
        let mut rows = Vec::new();
        let mut affected = 0_u64;
        while let Some(item) = stream.next().await {
            match item.map_err(db(None))? {
                sqlx::Either::Left(done) => affected += DB::affected(&done),
                sqlx::Either::Right(row) => {
                    if rows.len() == MAX_ROWS {
                        return Err(too_many_rows().into());
                    }
                    rows.push(DB::row_json(&row)?);
                }
            }
        }
        drop(stream);
        serde_json::json!({ "rows": rows, "rows_affected": affected })
    };
    if let Some(effect) = work.effect {
        let mut args = DB::Arguments::default();
        let text = output.to_string();
        for value in [effect.key, effect.run_id, effect.step_id, &text] {
            DB::bind(&mut args, &Value::String(value.to_owned())).map_err(|e| {
                Failure::from(ActionError::Permanent {
                    message: format!("the effect cannot be recorded: {e}"),
                    status: None,
                })
            })?;
        }
        let sql = sqlx::AssertSqlSafe(DB::insert_effect(effect.table));
        let meanwhile = match sqlx::query_with::<DB, _>(sql, args).execute(&mut *tx).await {
            Ok(done) => DB::affected(&done) == 0,
            Err(e) if DB::already_exists(&e) => true,
            Err(e) => return Err(db(None)(e)),
        };
        if meanwhile {
            // Recorded meanwhile by another attempt: that one counts.
            drop(tx);
            let mut conn = pool.acquire().await.map_err(db(None))?;
            return recorded_sqlx::<DB>(&mut conn, effect)
                .await
                .map_err(db(None))?
                .ok_or_else(|| {
                    db(None)(sqlx::Error::Protocol(
                        "the effect's record vanished".to_owned(),
                    ))
                });
        }
    }
    tx.commit().await.map_err(db(None))?;
    Ok(output)
}

/// The output an `exactly_once` step's write recorded, if it committed
/// before.
async fn recorded_sqlx<DB: Dialect>(
    conn: &mut DB::Connection,
    effect: &Effect<'_>,
) -> Result<Option<Value>, sqlx::Error>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let mut args = DB::Arguments::default();
    DB::bind(&mut args, &Value::String(effect.key.to_owned())).map_err(sqlx::Error::Encode)?;
    let sql = sqlx::AssertSqlSafe(DB::select_effect(effect.table));
    let row = sqlx::query_with::<DB, _>(sql, args)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => Ok(Some(already_committed(
            row.try_get::<Option<String>, _>(0)?,
        ))),
    }
}

/// Shared pools, for the engine.
pub type SharedPools = Arc<SqlPools>;
