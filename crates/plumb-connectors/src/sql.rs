//! The SQL connector (PostgreSQL): one statement with bind parameters, on a
//! pool opened on first use and shared by every step of the connection.
//!
//! Values reach the database only as parameters: JSON `null`, booleans,
//! integers, floats and strings bind as themselves, objects and arrays as
//! `jsonb`; `null` binds untyped, so the server infers its type. Rows come
//! back typed (`{rows: [{column: value}], rows_affected}`: integers and
//! floats as numbers, numerics as strings, timestamps as RFC 3339, json as
//! JSON, bytes as base64); a column of a type not read here is named in a
//! permanent error with the fix (cast it in the query). Failures are classified by SQLSTATE: connection loss,
//! serialization failures, deadlocks, too many connections and lock
//! timeouts are retryable; constraint, syntax and type errors are permanent
//! and name the SQLSTATE and constraint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use sha2::Digest;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgTypeInfo};
use sqlx::{Arguments, Column, Row, TypeInfo};

use crate::ActionError;

/// The most rows one statement may return into a step's output.
pub const MAX_ROWS: usize = 100_000;

/// Pools by connection, opened on first use.
#[derive(Default)]
pub struct SqlPools {
    pools: Mutex<HashMap<String, PgPool>>,
    /// Effects tables known to exist, by pool and table.
    tables: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for SqlPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqlPools")
    }
}

/// Where a pool goes: a URL (its password, if any, already in it).
pub struct Target<'a> {
    /// The connection's name, for messages.
    pub connection: &'a str,
    /// The full URL, password included: never shown.
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

impl SqlPools {
    /// The pool for `target`, opened on first use (a changed URL opens a new
    /// one: a rotated password takes effect).
    fn pool(&self, target: &Target<'_>) -> Result<PgPool, ActionError> {
        let key = format!(
            "{}:{}",
            target.connection,
            hex::encode(sha2::Sha256::digest(target.url.as_bytes()))
        );
        let mut pools = self.pools.lock().map_err(|_| ActionError::Permanent {
            message: "the connection pools are unusable (a thread panicked)".to_owned(),
            status: None,
        })?;
        if let Some(pool) = pools.get(&key) {
            return Ok(pool.clone());
        }
        // Never quote the URL: it may hold the password.
        let options: PgConnectOptions = target.url.parse().map_err(|_| ActionError::Permanent {
            message: format!(
                "the URL of connection `{}` is not a valid PostgreSQL URL",
                target.connection
            ),
            status: None,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(target.pool.max(1))
            .acquire_timeout(target.timeout)
            .connect_lazy_with(options);
        pools.retain(|k, _| !k.starts_with(&format!("{}:", target.connection)));
        pools.insert(key, pool.clone());
        Ok(pool)
    }

    /// Closes every pool (shutdown), waiting for connections in use.
    pub async fn close(&self) {
        for pool in self.take_all() {
            pool.close().await;
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
                    pool.close().await;
                }
            });
        }
    }

    fn take_all(&self) -> Vec<PgPool> {
        if let Ok(mut tables) = self.tables.lock() {
            tables.clear();
        }
        match self.pools.lock() {
            Ok(mut p) => p.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Runs one statement with `params`; the step's output.
    ///
    /// # Errors
    ///
    /// Retryable or permanent as the module doc says.
    pub async fn execute(
        &self,
        target: &Target<'_>,
        query: &str,
        params: &[Value],
    ) -> Result<Value, ActionError> {
        let pool = self.pool(target)?;
        let mut args = PgArguments::default();
        for (i, value) in params.iter().enumerate() {
            bind(&mut args, value).map_err(|e| ActionError::Permanent {
                message: format!("parameter ${} cannot be bound: {e}", i + 1),
                status: None,
            })?;
        }
        let sql = sqlx::AssertSqlSafe(query.to_owned());
        let effect = target.effect.as_ref();
        if let Some(effect) = effect {
            self.ensure_table(&pool, target, effect).await?;
        }
        let run = async {
            let mut tx = pool.begin().await?;
            if let Some(effect) = effect
                && let Some(done) = recorded(&mut tx, effect).await?
            {
                return Ok(Ok(done));
            }
            let (rows, affected, over) = fetch(&mut tx, sqlx::query_with(sql, args)).await?;
            if over {
                return Ok(Err(ActionError::Permanent {
                    message: format!(
                        "the statement returned more rows than a step keeps ({MAX_ROWS}): add a LIMIT, or page with the cursor (nothing was committed)"
                    ),
                    status: None,
                }));
            }
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                match row_json(row) {
                    Ok(v) => out.push(v),
                    Err(e) => return Ok(Err(e)),
                }
            }
            let output = serde_json::json!({ "rows": out, "rows_affected": affected });
            if let Some(effect) = effect
                && !record(&mut tx, effect, &output).await?
            {
                // Recorded meanwhile by another attempt: that one counts.
                drop(tx);
                let mut conn = pool.acquire().await?;
                return match recorded(&mut conn, effect).await? {
                    Some(done) => Ok(Ok(done)),
                    None => Err(sqlx::Error::Protocol(
                        "the effect's record vanished".to_owned(),
                    )),
                };
            }
            tx.commit().await?;
            Ok(Ok(output))
        };
        match tokio::time::timeout(target.timeout, run).await {
            Err(_) => Err(ActionError::Retryable {
                message: format!(
                    "the statement did not finish within {} s (if it was committing, it may have committed: `exactly_once` makes the retry safe)",
                    target.timeout.as_secs_f64()
                ),
                status: None,
                retry_after: None,
            }),
            Ok(Err(e)) => Err(classify(target.connection, &e)),
            Ok(Ok(result)) => result,
        }
    }

    /// Creates the effects table on first use (the README has its DDL for
    /// teams that create it themselves).
    async fn ensure_table(
        &self,
        pool: &PgPool,
        target: &Target<'_>,
        effect: &Effect<'_>,
    ) -> Result<(), ActionError> {
        let known = format!("{}:{}", target.connection, effect.table);
        if self.tables.lock().is_ok_and(|t| t.contains(&known)) {
            return Ok(());
        }
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, run_id text NOT NULL, \
             step_id text NOT NULL, output jsonb, committed_at timestamptz NOT NULL DEFAULT now())",
            effect.table
        );
        match sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(pool).await {
            Ok(_) => {}
            // Two processes creating it at once: the other one did.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("23505" | "42P07")) => {}
            Err(e) => return Err(classify(target.connection, &e)),
        }
        if let Ok(mut t) = self.tables.lock() {
            t.insert(known);
        }
        Ok(())
    }
}

/// Every row and the rows affected of one statement, stopping past
/// [`MAX_ROWS`] (`true`: over the limit; the rest never reaches memory).
async fn fetch<'q>(
    conn: &mut sqlx::PgConnection,
    query: sqlx::query::Query<'q, sqlx::Postgres, PgArguments>,
) -> Result<(Vec<PgRow>, u64, bool), sqlx::Error> {
    use futures::StreamExt;
    use sqlx::Executor;
    let mut stream = conn.fetch_many(query);
    let mut rows = Vec::new();
    let mut affected = 0_u64;
    while let Some(item) = stream.next().await {
        match item? {
            sqlx::Either::Left(done) => affected += done.rows_affected(),
            sqlx::Either::Right(row) => {
                if rows.len() == MAX_ROWS {
                    return Ok((rows, affected, true));
                }
                rows.push(row);
            }
        }
    }
    Ok((rows, affected, false))
}

/// The output an `exactly_once` step's write recorded, if it committed
/// before (marked `already_committed`).
async fn recorded(
    conn: &mut sqlx::PgConnection,
    effect: &Effect<'_>,
) -> Result<Option<Value>, sqlx::Error> {
    let sql = format!("SELECT output::text FROM {} WHERE key = $1", effect.table);
    let found: Option<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(effect.key)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(found.map(|text| {
        let mut output = text
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null);
        if let Value::Object(map) = &mut output {
            map.insert("already_committed".into(), Value::Bool(true));
        }
        output
    }))
}

/// Records an `exactly_once` write in its transaction; `false` when its
/// key was recorded meanwhile.
async fn record(
    conn: &mut sqlx::PgConnection,
    effect: &Effect<'_>,
    output: &Value,
) -> Result<bool, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {} (key, run_id, step_id, output) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (key) DO NOTHING",
        effect.table
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(effect.key)
        .bind(effect.run_id)
        .bind(effect.step_id)
        .bind(Jsonb(output.to_string()))
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

impl SqlPools {
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
        batch: &[Vec<Value>],
    ) -> Result<Value, ActionError> {
        let pool = self.pool(target)?;
        let mut bound = Vec::with_capacity(batch.len());
        for (index, params) in batch.iter().enumerate() {
            let mut args = PgArguments::default();
            for (i, value) in params.iter().enumerate() {
                bind(&mut args, value).map_err(|e| ActionError::Permanent {
                    message: format!("element {index}: parameter ${} cannot be bound: {e}", i + 1),
                    status: None,
                })?;
            }
            bound.push(args);
        }
        let effect = target.effect.as_ref();
        if let Some(effect) = effect {
            self.ensure_table(&pool, target, effect).await?;
        }
        let run = async {
            let mut tx = pool.begin().await.map_err(|e| (None, e))?;
            if let Some(effect) = effect
                && let Some(done) = recorded(&mut tx, effect).await.map_err(|e| (None, e))?
            {
                return Ok(done);
            }
            let mut affected = 0_u64;
            for (index, args) in bound.into_iter().enumerate() {
                let sql = sqlx::AssertSqlSafe(query.to_owned());
                let done = sqlx::query_with(sql, args)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| (Some(index), e))?;
                affected += done.rows_affected();
            }
            let output = serde_json::json!({
                "rows_affected": affected,
                "elements": batch.len(),
            });
            if let Some(effect) = effect
                && !record(&mut tx, effect, &output)
                    .await
                    .map_err(|e| (None, e))?
            {
                drop(tx);
                let mut conn = pool.acquire().await.map_err(|e| (None, e))?;
                return recorded(&mut conn, effect)
                    .await
                    .map_err(|e| (None, e))?
                    .ok_or_else(|| {
                        (
                            None,
                            sqlx::Error::Protocol("the effect's record vanished".to_owned()),
                        )
                    });
            }
            tx.commit().await.map_err(|e| (None, e))?;
            Ok::<_, (Option<usize>, sqlx::Error)>(output)
        };
        match tokio::time::timeout(target.timeout, run).await {
            Err(_) => Err(ActionError::Retryable {
                message: format!(
                    "the batch of {} did not finish within {} s (if it was committing, it may have committed: `exactly_once` makes the retry safe)",
                    batch.len(),
                    target.timeout.as_secs_f64()
                ),
                status: None,
                retry_after: None,
            }),
            Ok(Err((index, e))) => {
                let error = classify(target.connection, &e);
                // A failed element rolls the batch back; a failure around
                // the transaction itself (its commit) leaves the outcome
                // unknown, and the message must not claim otherwise.
                Err(match index {
                    Some(i) => error.map_message(|m| {
                        format!(
                            "element {i} of {}: {m} (nothing of the batch was committed)",
                            batch.len()
                        )
                    }),
                    None => error.map_message(|m| format!("the batch's transaction: {m}")),
                })
            }
            Ok(Ok(output)) => Ok(output),
        }
    }
}

/// A `null` the server types from context (`unknown`), so it fits any column.
struct Untyped;

impl sqlx::Type<sqlx::Postgres> for Untyped {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(705))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Untyped {
    fn encode_by_ref(
        &self,
        _buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

/// An object or array, bound as `jsonb` (its binary form is a version
/// byte, 1, then the JSON text).
struct Jsonb(String);

impl sqlx::Type<sqlx::Postgres> for Jsonb {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(3802))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Jsonb {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        buf.push(1);
        buf.extend_from_slice(self.0.as_bytes());
        Ok(sqlx::encode::IsNull::No)
    }
}

fn bind(args: &mut PgArguments, value: &Value) -> Result<(), sqlx::error::BoxDynError> {
    match value {
        Value::Null => args.add(Untyped),
        Value::Bool(b) => args.add(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => args.add(i),
            None => args.add(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => args.add(s.as_str()),
        other => args.add(Jsonb(other.to_string())),
    }
}

/// A `json` or `jsonb` column's value (binary `jsonb` starts with its
/// version byte).
fn json_column(row: &PgRow, i: usize, jsonb: bool) -> Result<Value, sqlx::Error> {
    use sqlx::ValueRef;
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let bytes = raw.as_bytes().map_err(sqlx::Error::Decode)?;
    let text = if jsonb {
        bytes.get(1..).unwrap_or_default()
    } else {
        bytes
    };
    serde_json::from_slice(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn row_json(row: &PgRow) -> Result<Value, ActionError> {
    let mut out = Map::new();
    for column in row.columns() {
        let name = column.name();
        let ty = column.type_info().name().to_owned();
        let i = column.ordinal();
        let value: Result<Value, sqlx::Error> = match ty.as_str() {
            "BOOL" => row
                .try_get::<Option<bool>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::Bool)),
            "INT2" => row
                .try_get::<Option<i16>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::from)),
            "INT4" => row
                .try_get::<Option<i32>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::from)),
            "INT8" => row
                .try_get::<Option<i64>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::from)),
            "FLOAT4" => row
                .try_get::<Option<f32>, _>(i)
                .map(|v| v.map_or(Value::Null, |f| Value::from(f64::from(f)))),
            "FLOAT8" => row
                .try_get::<Option<f64>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::from)),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => row
                .try_get::<Option<String>, _>(i)
                .map(|v| v.map_or(Value::Null, Value::String)),
            "JSON" => json_column(row, i, false),
            "JSONB" => json_column(row, i, true),
            // Exact decimals keep every digit: as text.
            "NUMERIC" => row
                .try_get::<Option<rust_decimal::Decimal>, _>(i)
                .map(|v| v.map_or(Value::Null, |d| Value::String(d.to_string()))),
            "TIMESTAMPTZ" => row
                .try_get::<Option<chrono::DateTime<chrono::Utc>>, _>(i)
                .map(|v| {
                    v.map_or(Value::Null, |t| {
                        Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                    })
                }),
            // Without a zone, as written (RFC 3339 without an offset).
            "TIMESTAMP" => row.try_get::<Option<chrono::NaiveDateTime>, _>(i).map(|v| {
                v.map_or(Value::Null, |t| {
                    Value::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string())
                })
            }),
            "DATE" => row
                .try_get::<Option<chrono::NaiveDate>, _>(i)
                .map(|v| v.map_or(Value::Null, |d| Value::String(d.to_string()))),
            "UUID" => row
                .try_get::<Option<uuid::Uuid>, _>(i)
                .map(|v| v.map_or(Value::Null, |u| Value::String(u.to_string()))),
            "BYTEA" => row.try_get::<Option<Vec<u8>>, _>(i).map(|v| {
                v.map_or(Value::Null, |b| {
                    use base64::Engine as _;
                    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
                })
            }),
            other => {
                return Err(ActionError::Permanent {
                    message: format!(
                        "column `{name}` is of type {other}, which a sql step does not read yet: cast it in the query (`{name}::text`)"
                    ),
                    status: None,
                });
            }
        };
        let value = value.map_err(|e| ActionError::Permanent {
            message: format!("column `{name}` cannot be read: {e}"),
            status: None,
        })?;
        out.insert(name.to_owned(), value);
    }
    Ok(Value::Object(out))
}

/// SQLSTATEs worth another try: serialization failure, deadlock, too many
/// connections, lock not available, and the server going away.
fn retryable_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "53300" | "55P03" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
}

/// What a driver error means for the step. The message never carries the
/// URL (the engine redacts secret values from it too).
fn classify(connection: &str, e: &sqlx::Error) -> ActionError {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let constraint = db
                .constraint()
                .map(|c| format!(", constraint `{c}`"))
                .unwrap_or_default();
            let message = format!("{} (SQLSTATE {code}{constraint})", db.message());
            if retryable_sqlstate(&code) {
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
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => ActionError::Retryable {
            message: format!("cannot reach the database of connection `{connection}`: {e}"),
            status: None,
            retry_after: None,
        },
        other => ActionError::Permanent {
            message: format!("connection `{connection}`: {other}"),
            status: None,
        },
    }
}

/// Shared pools, for the engine.
pub type SharedPools = Arc<SqlPools>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_that_may_pass_are_retryable() {
        for code in ["40001", "40P01", "53300", "55P03", "08006", "57P01"] {
            assert!(retryable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42601", "22P02", "42703"] {
            assert!(!retryable_sqlstate(code), "{code}");
        }
    }
}
