//! MySQL and MariaDB: values bind as their natural types (objects and
//! arrays as JSON text, which a `JSON` column takes), rows come back typed,
//! errors are classified by SQLSTATE and MySQL error number. Placeholders
//! are `?`. MariaDB stores `JSON` as text and says so to clients, so its
//! JSON columns read as strings (parse them with `fromjson`).
//! Dates and times are read as in PostgreSQL: `TIMESTAMP` as RFC 3339 UTC,
//! `DATETIME` as written, `DATE` as `YYYY-MM-DD`.

use serde_json::{Map, Value};
use sqlx::{Arguments, Column, Row, TypeInfo};
use sqlx_mysql::{
    MySql, MySqlArguments, MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions,
    MySqlQueryResult, MySqlRow,
};

use super::{Dialect, Target};
use crate::ActionError;

/// A lazily connecting pool for `target` (the URL is never quoted: it may
/// hold the password). Sessions run in UTC, so `TIMESTAMP` columns read and
/// write as UTC.
pub(super) fn open(target: &Target<'_>) -> Result<MySqlPool, ActionError> {
    let options: MySqlConnectOptions = target.url.parse().map_err(|_| ActionError::Permanent {
        message: format!(
            "the URL of connection `{}` is not a valid MySQL URL",
            target.connection
        ),
        status: None,
    })?;
    Ok(MySqlPoolOptions::new()
        .max_connections(target.pool.max(1))
        .acquire_timeout(target.timeout)
        .connect_lazy_with(options.timezone(Some("+00:00".to_owned()))))
}

/// MySQL error numbers worth another try: deadlock, lock wait timeout, too
/// many connections (server-wide and per user), the server shutting down
/// and the connection killed.
const RETRYABLE_ERRORS: &[u16] = &[1213, 1205, 1040, 1203, 1053, 1927];

/// Duplicate key, and a table that exists already.
const EXISTS_ERRORS: &[u16] = &[1062, 1050];

impl Dialect for MySql {
    const NO_TABLE: &'static str = "error 1146";

    fn bind(args: &mut MySqlArguments, value: &Value) -> Result<(), sqlx::error::BoxDynError> {
        match value {
            Value::Null => args.add(None::<String>),
            Value::Bool(b) => args.add(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => args.add(i),
                (None, Some(u)) => args.add(u),
                _ => args.add(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => args.add(s.as_str()),
            other => args.add(other.to_string()),
        }
    }

    fn row_json(row: &MySqlRow) -> Result<Value, ActionError> {
        let mut out = Map::new();
        for column in row.columns() {
            let name = column.name();
            let info = column.type_info();
            // A text column with a `_bin` collation (MariaDB's JSON among
            // them) carries the binary flag, so its name says BLOB; only
            // the binary collation means bytes.
            let ty = match info.name() {
                "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB"
                    if <String as sqlx::Type<MySql>>::compatible(info) =>
                {
                    "TEXT"
                }
                name => name,
            };
            let value = read(row, column.ordinal(), ty)
                .ok_or_else(|| super::unread_column(name, ty, &format!("CAST({name} AS CHAR)")))?
                .map_err(|e| super::undecodable_column(name, &e))?;
            out.insert(name.to_owned(), value);
        }
        Ok(Value::Object(out))
    }

    fn affected(done: &MySqlQueryResult) -> u64 {
        done.rows_affected()
    }

    fn judge(db: &dyn sqlx::error::DatabaseError) -> (String, bool) {
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        let number = db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number);
        let retryable = code == "40001"
            || code.starts_with("08")
            || number.is_some_and(|n| RETRYABLE_ERRORS.contains(&n));
        let shown = match number {
            Some(n) => format!("SQLSTATE {code}, error {n}"),
            None => format!("SQLSTATE {code}"),
        };
        (shown, retryable)
    }

    /// Keys are ASCII (run ids, step ids, item numbers) and compared byte
    /// for byte: step ids are case-sensitive. InnoDB, so the record rolls
    /// back with the write; `datetime` in the UTC session (no 2038 limit).
    fn effects_ddl(table: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
             `key` varchar(512) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY, \
             run_id varchar(64) NOT NULL, step_id varchar(255) NOT NULL, output longtext, \
             committed_at datetime(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
        )
    }

    fn select_effect(table: &str) -> String {
        format!("SELECT output FROM {table} WHERE `key` = ?")
    }

    fn insert_effect(table: &str) -> String {
        format!("INSERT INTO {table} (`key`, run_id, step_id, output) VALUES (?, ?, ?, ?)")
    }

    fn purge_effects(table: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE committed_at < ? LIMIT {}",
            super::PURGE_BATCH
        )
    }

    fn already_exists(e: &sqlx::Error) -> bool {
        matches!(e, sqlx::Error::Database(db)
            if db.try_downcast_ref::<MySqlDatabaseError>()
                .is_some_and(|m| EXISTS_ERRORS.contains(&m.number())))
    }
}

/// One column's value by its type's name; `None` for a type not read here.
fn read(row: &MySqlRow, i: usize, ty: &str) -> Option<Result<Value, sqlx::Error>> {
    fn get<T, F>(row: &MySqlRow, i: usize, f: F) -> Result<Value, sqlx::Error>
    where
        T: for<'r> sqlx::Decode<'r, MySql> + sqlx::Type<MySql>,
        F: FnOnce(T) -> Value,
    {
        row.try_get::<Option<T>, _>(i)
            .map(|v| v.map_or(Value::Null, f))
    }
    Some(match ty {
        "NULL" => Ok(Value::Null),
        "BOOLEAN" => get::<bool, _>(row, i, Value::Bool),
        "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
            get::<i64, _>(row, i, Value::from)
        }
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED" | "MEDIUMINT UNSIGNED"
        | "BIGINT UNSIGNED" => get::<u64, _>(row, i, Value::from),
        "FLOAT" => get::<f32, _>(row, i, |f| Value::from(f64::from(f))),
        "DOUBLE" => get::<f64, _>(row, i, Value::from),
        // Exact decimals keep every digit: as text.
        "DECIMAL" => get::<rust_decimal::Decimal, _>(row, i, |d| Value::String(d.to_string())),
        "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" | "SET" => {
            get::<String, _>(row, i, Value::String)
        }
        // sqlx-mysql decodes no Rust type from a JSON column but its own
        // `Json<T>` (behind a feature that pulls in sqlx-sqlite): the bytes
        // are the JSON text, read without the type check.
        "JSON" => row
            .try_get_unchecked::<Option<Vec<u8>>, _>(i)
            .and_then(|v| match v {
                None => Ok(Value::Null),
                Some(b) => serde_json::from_slice(&b).map_err(|e| sqlx::Error::Decode(Box::new(e))),
            }),
        // TIMESTAMP is stored in UTC and the session is UTC.
        "TIMESTAMP" => get::<chrono::DateTime<chrono::Utc>, _>(row, i, |t| {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }),
        // Without a zone, as written (RFC 3339 without an offset).
        "DATETIME" => get::<chrono::NaiveDateTime, _>(row, i, |t| {
            Value::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string())
        }),
        "DATE" => get::<chrono::NaiveDate, _>(row, i, |d| Value::String(d.to_string())),
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
            get::<Vec<u8>, _>(row, i, |b| Value::String(super::base64(&b)))
        }
        _ => return None,
    })
}
