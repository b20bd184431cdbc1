//! SQLite: a database file of the project's, through the same SQLite
//! library as the store, on one connection per file (SQLite has one writer
//! at a time anyway) used from a blocking thread. Every step runs in an
//! `IMMEDIATE` transaction, so its effect record and its write are one
//! commit. Values bind as SQLite's own types (booleans as 0/1, objects and
//! arrays as JSON text); rows come back as stored, with a column declared
//! `BOOLEAN` read as a boolean, `JSON` as JSON and blobs as base64.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::{Value as Sql, ValueRef};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use serde_json::{Map, Value};

use super::{Failure, MAX_ROWS, Target, Work};
use crate::ActionError;

/// One database file's connection, opened on first use.
#[derive(Clone)]
pub(super) struct Db {
    path: PathBuf,
    conn: Arc<tokio::sync::Mutex<Option<Connection>>>,
}

/// Interrupts the statement of a step given up on (its timeout passed):
/// the blocking thread stops instead of holding the connection.
struct InterruptOnDrop(Option<rusqlite::InterruptHandle>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.interrupt();
        }
    }
}

impl Db {
    pub(super) fn new(target: &Target<'_>) -> Self {
        Self {
            path: PathBuf::from(target.url),
            conn: Arc::default(),
        }
    }

    /// Closes the connection once no step holds it.
    pub(super) fn close(self) {
        if let Ok(mut conn) = self.conn.try_lock() {
            conn.take();
        }
    }

    /// Deletes up to [`super::PURGE_BATCH`] effect records committed
    /// before `bound`.
    pub(super) async fn purge(
        &self,
        target: &Target<'_>,
        table: &str,
        bound: &str,
    ) -> Result<u64, ActionError> {
        let sql = format!(
            "DELETE FROM {table} WHERE key IN (SELECT key FROM {table} \
             WHERE committed_at < ?1 LIMIT {})",
            super::PURGE_BATCH
        );
        let bound = bound.to_owned();
        self.blocking(target, move |conn| {
            match conn.execute(&sql, [&bound]) {
                Ok(n) => Ok(Ok(n as u64)),
                // Never used yet: nothing to purge.
                Err(rusqlite::Error::SqliteFailure(_, Some(m)))
                    if m.starts_with("no such table") =>
                {
                    Ok(Ok(0))
                }
                Err(e) => Err((None, e)),
            }
        })
        .await
        .map_err(|f| f.error)
    }

    /// Runs `work` on the connection (opened on first use) in a blocking
    /// thread; a step given up on interrupts its statement.
    async fn blocking<T: Send + 'static>(
        &self,
        target: &Target<'_>,
        work: impl FnOnce(&mut Connection) -> Result<Result<T, Failure>, Failed> + Send + 'static,
    ) -> Result<T, Failure> {
        let mut guard = Arc::clone(&self.conn).lock_owned().await;
        if guard.is_none() {
            *guard = Some(open(&self.path, target.timeout).map_err(|e| {
                Failure::from(ActionError::Permanent {
                    message: format!(
                        "connection `{}` cannot open {}: {e}",
                        target.connection,
                        self.path.display()
                    ),
                    status: None,
                })
            })?);
        }
        let mut interrupt = InterruptOnDrop(guard.as_ref().map(Connection::get_interrupt_handle));
        let joined = tokio::task::spawn_blocking(move || {
            let Some(conn) = guard.as_mut() else {
                return Ok(Err(Failure::from(ActionError::Permanent {
                    message: "the database connection is closed".to_owned(),
                    status: None,
                })));
            };
            work(conn)
        })
        .await;
        // Finished: nothing to interrupt.
        interrupt.0 = None;
        let result = joined.map_err(|e| {
            Failure::from(ActionError::Permanent {
                message: format!("the statement's thread failed: {e}"),
                status: None,
            })
        })?;
        result
            .map_err(|(index, e)| Failure {
                index,
                error: classify(target.connection, &e),
            })
            .and_then(|r| r)
    }

    pub(super) async fn run(
        &self,
        target: &Target<'_>,
        work: &Work<'_>,
        created: bool,
    ) -> Result<Value, Failure> {
        let query = work.query.to_owned();
        let statements = work.statements.clone();
        let batch = work.batch;
        let effect = work.effect.map(|e| Owned {
            table: e.table.to_owned(),
            key: e.key.to_owned(),
            run_id: e.run_id.to_owned(),
            step_id: e.step_id.to_owned(),
        });
        self.blocking(target, move |conn| {
            run(conn, &query, &statements, batch, effect.as_ref(), created)
        })
        .await
    }
}

/// An effect's record, owned by the blocking thread.
struct Owned {
    table: String,
    key: String,
    run_id: String,
    step_id: String,
}

fn open(path: &std::path::Path, timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(timeout)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    Ok(conn)
}

type Failed = (Option<usize>, rusqlite::Error);

fn run(
    conn: &mut Connection,
    query: &str,
    statements: &[Vec<Value>],
    batch: bool,
    effect: Option<&Owned>,
    created: bool,
) -> Result<Result<Value, Failure>, Failed> {
    let whole = |e| (None, e);
    if let (Some(effect), false) = (effect, created) {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} (key TEXT PRIMARY KEY, run_id TEXT NOT NULL, \
             step_id TEXT NOT NULL, output TEXT, \
             committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
            effect.table
        ))
        .map_err(whole)?;
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(whole)?;
    if let Some(effect) = effect {
        let found: Option<Option<String>> = tx
            .query_row(
                &format!("SELECT output FROM {} WHERE key = ?1", effect.table),
                [&effect.key],
                |row| row.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(whole)?;
        if let Some(text) = found {
            return Ok(Ok(super::already_committed(text)));
        }
    }
    let output = if batch {
        let mut stmt = tx.prepare_cached(query).map_err(whole)?;
        if let Some(wrong) = misnumbered(&stmt) {
            return Ok(Err(wrong.into()));
        }
        let mut affected = 0_u64;
        for (index, params) in statements.iter().enumerate() {
            let n = stmt
                .execute(rusqlite::params_from_iter(params.iter().map(bind)))
                .map_err(|e| (Some(index), e))?;
            affected += n as u64;
        }
        serde_json::json!({ "rows_affected": affected, "elements": statements.len() })
    } else {
        let params = statements.first().map(Vec::as_slice).unwrap_or_default();
        let mut stmt = tx.prepare(query).map_err(whole)?;
        if let Some(wrong) = misnumbered(&stmt) {
            return Ok(Err(wrong.into()));
        }
        let readonly = stmt.readonly();
        let columns: Vec<(String, Option<String>)> = stmt
            .columns()
            .map(|c| {
                (
                    c.name().to_owned(),
                    c.decl_type().map(str::to_ascii_uppercase),
                )
            })
            .collect();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params.iter().map(bind)))
            .map_err(whole)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(whole)? {
            if out.len() == MAX_ROWS {
                return Ok(Err(super::too_many_rows().into()));
            }
            let mut object = Map::new();
            for (i, (name, declared)) in columns.iter().enumerate() {
                let value = row.get_ref(i).map_err(whole)?;
                object.insert(name.clone(), read(value, declared.as_deref()));
            }
            out.push(Value::Object(object));
        }
        drop(rows);
        drop(stmt);
        let affected = if readonly { 0 } else { tx.changes() };
        serde_json::json!({ "rows": out, "rows_affected": affected })
    };
    if let Some(effect) = effect {
        // The IMMEDIATE transaction holds the only write lock: no other
        // attempt can have recorded the key since it was looked up.
        tx.execute(
            &format!(
                "INSERT INTO {} (key, run_id, step_id, output) VALUES (?1, ?2, ?3, ?4)",
                effect.table
            ),
            [
                &effect.key,
                &effect.run_id,
                &effect.step_id,
                &output.to_string(),
            ],
        )
        .map_err(whole)?;
    }
    tx.commit().map_err(whole)?;
    Ok(Ok(output))
}

/// SQLite numbers `?N` by N, but `$N` (and `:N`, `@N`) are *names*,
/// numbered in order of first appearance: `SET a = $2 WHERE id = $1` would
/// bind the values swapped. Such a statement is refused with the fix.
fn misnumbered(stmt: &rusqlite::Statement<'_>) -> Option<ActionError> {
    for i in 1..=stmt.parameter_count() {
        let Some(name) = stmt.parameter_name(i) else {
            continue;
        };
        let named_number = name
            .strip_prefix(['$', ':', '@'])
            .is_some_and(|n| n.parse::<usize>().is_ok());
        if named_number && name[1..] != i.to_string() {
            return Some(ActionError::Permanent {
                message: format!(
                    "placeholder `{name}` is bound as parameter {i} by SQLite (`$N` is a name, numbered in order of appearance): write `?N` (`?1, ?2`) on SQLite"
                ),
                status: None,
            });
        }
    }
    None
}

fn bind(value: &Value) -> Sql {
    match value {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            None => Sql::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Sql::Text(s.clone()),
        other => Sql::Text(other.to_string()),
    }
}

/// A stored value as JSON, using the column's declared type where SQLite's
/// own storage class says less (booleans, JSON).
fn read(value: ValueRef<'_>, declared: Option<&str>) -> Value {
    match (value, declared) {
        (ValueRef::Null, _) => Value::Null,
        (ValueRef::Integer(i), Some("BOOLEAN" | "BOOL")) => Value::Bool(i != 0),
        (ValueRef::Integer(i), _) => Value::from(i),
        (ValueRef::Real(f), _) => Value::from(f),
        (ValueRef::Text(t), Some("JSON" | "JSONB")) => serde_json::from_slice(t)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(t).into_owned())),
        (ValueRef::Text(t), _) => Value::String(String::from_utf8_lossy(t).into_owned()),
        (ValueRef::Blob(b), _) => Value::String(super::base64(b)),
    }
}

/// Busy and locked databases are retryable; everything else (constraints,
/// syntax, a file that cannot be opened) is permanent.
fn classify(connection: &str, e: &rusqlite::Error) -> ActionError {
    match e {
        rusqlite::Error::SqliteFailure(failure, message) => {
            let text = message.clone().unwrap_or_else(|| failure.to_string());
            let message = format!(
                "{text} (SQLite {:?}, extended code {})",
                failure.code, failure.extended_code
            );
            // Interrupted: a step given up on (its timeout) may interrupt
            // the statement that follows it on the connection.
            let busy = matches!(
                failure.code,
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::OperationInterrupted
            );
            super::database_error(message, busy)
        }
        other => ActionError::Permanent {
            message: format!("connection `{connection}`: {other}"),
            status: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_booleans_and_json_read_as_such() {
        assert_eq!(
            read(ValueRef::Integer(1), Some("BOOLEAN")),
            Value::Bool(true)
        );
        assert_eq!(read(ValueRef::Integer(1), Some("INTEGER")), Value::from(1));
        assert_eq!(
            read(ValueRef::Text(br#"{"a":1}"#), Some("JSON")),
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            read(ValueRef::Blob(b"hi"), None),
            Value::String("aGk=".into())
        );
    }
}
