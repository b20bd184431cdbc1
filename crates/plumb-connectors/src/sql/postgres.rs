//! PostgreSQL: values bind as their natural types (`null` untyped, so the
//! server infers it from context; objects and arrays as `jsonb`), rows
//! come back typed, errors are classified by SQLSTATE.

use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgTypeInfo};
use sqlx::{Arguments, Column, Row, TypeInfo};

use super::{Dialect, Target};
use crate::ActionError;

/// A lazily connecting pool for `target` (the URL is never quoted: it may
/// hold the password).
pub(super) fn open(target: &Target<'_>) -> Result<PgPool, ActionError> {
    let options: PgConnectOptions = target.url.parse().map_err(|_| ActionError::Permanent {
        message: format!(
            "the URL of connection `{}` is not a valid PostgreSQL URL",
            target.connection
        ),
        status: None,
    })?;
    Ok(PgPoolOptions::new()
        .max_connections(target.pool.max(1))
        .acquire_timeout(target.timeout)
        .connect_lazy_with(options))
}

impl Dialect for sqlx::Postgres {
    const NO_TABLE: &'static str = "SQLSTATE 42P01";

    fn bind(args: &mut PgArguments, value: &Value) -> Result<(), sqlx::error::BoxDynError> {
        bind(args, value)
    }

    fn row_json(row: &PgRow) -> Result<Value, ActionError> {
        row_json(row)
    }

    fn affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn judge(db: &dyn sqlx::error::DatabaseError) -> (String, bool) {
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        let retryable = retryable_sqlstate(&code);
        (format!("SQLSTATE {code}"), retryable)
    }

    fn effects_ddl(table: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, run_id text NOT NULL, \
             step_id text NOT NULL, output jsonb, committed_at timestamptz NOT NULL DEFAULT now())"
        )
    }

    fn select_effect(table: &str) -> String {
        format!("SELECT output::text FROM {table} WHERE key = $1")
    }

    fn insert_effect(table: &str) -> String {
        format!(
            "INSERT INTO {table} (key, run_id, step_id, output) VALUES ($1, $2, $3, $4::jsonb) \
             ON CONFLICT (key) DO NOTHING"
        )
    }

    fn purge_effects(table: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE key IN (SELECT key FROM {table} \
             WHERE committed_at < $1::timestamptz LIMIT {})",
            super::PURGE_BATCH
        )
    }

    fn already_exists(e: &sqlx::Error) -> bool {
        matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("23505" | "42P07")))
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
            "BYTEA" => row
                .try_get::<Option<Vec<u8>>, _>(i)
                .map(|v| v.map_or(Value::Null, |b| Value::String(super::base64(&b)))),
            other => return Err(super::unread_column(name, other, &format!("{name}::text"))),
        };
        let value = value.map_err(|e| super::undecodable_column(name, &e))?;
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
