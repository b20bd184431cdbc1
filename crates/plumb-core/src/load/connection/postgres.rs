//! `connections.<name>.postgres`: a PostgreSQL database for `sql` steps.
//! The URL is either written without a password (`postgres://app@db:5432/wh`,
//! with `password: { secret: NAME }`) or is itself a secret
//! (`url: { secret: NAME }`); a password written in the URL is an error
//! with the fix. Steps reach only the host the URL names.

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{Connection, SqlConnection, SqlDriver, SqlUrl};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "postgres",
    check,
};

/// Connections in a pool unless `pool:` says otherwise.
const DEFAULT_POOL: u32 = 8;
/// The largest `pool:`.
const MAX_POOL: u32 = 100;

/// `connections.<name>.postgres`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// `postgres://user@host:port/db` (no password), or `{ secret: NAME }`.
    pub url: Value,
    /// The password, for a URL written without one.
    pub password: Option<SecretRef>,
    /// Connections in the pool (default 8).
    pub pool: Option<u32>,
    /// Timeout of one statement.
    pub timeout: Option<Dur>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let spec: PostgresSpec = cx.deserialize(raw, path)?;
    let url_path = path.key("url");
    let url = match &spec.url {
        Value::String(text) => {
            let parsed = match Url::parse(text) {
                Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") && u.has_host() => u,
                _ => {
                    cx.error_at_value(&url_path, "this is not a PostgreSQL URL")
                        .help = Some(
                        "write `postgres://USER@HOST:5432/DATABASE`, or `url: { secret: NAME }` for a URL kept sealed".into(),
                    );
                    return None;
                }
            };
            if parsed.password().is_some() {
                // Not echoed: the message names the field, not the value.
                cx.error_at_value(&url_path, "the URL holds a password")
                    .help = Some(
                    "remove it from the URL and write `password: { secret: NAME }` (seal it with `plumb secrets set NAME`), or seal the whole URL and write `url: { secret: NAME }`".into(),
                );
                return None;
            }
            SqlUrl::Literal(parsed)
        }
        Value::Object(_) => {
            let secret: SecretRef = cx.deserialize(&spec.url, &url_path)?;
            cx.secret_name(&secret.secret, &url_path.key("secret"));
            SqlUrl::Secret(secret.secret)
        }
        _ => {
            cx.error_at_value(&url_path, "`url` is a URL or `{ secret: NAME }`")
                .help = Some("e.g. `url: postgres://app@db.internal:5432/warehouse`".into());
            return None;
        }
    };
    if let Some(p) = &spec.password {
        cx.secret_name(&p.secret, &path.key("password").key("secret"));
    }
    let pool = spec.pool.unwrap_or(DEFAULT_POOL);
    if !(1..=MAX_POOL).contains(&pool) {
        cx.error_at_value(&path.key("pool"), format!("`pool` is {pool}"))
            .help = Some(format!("use 1 to {MAX_POOL} connections"));
    }
    let timeout = spec.timeout.map(|d| d.0);
    if let Some(t) = timeout {
        cx.check_timeout(t, &path.key("timeout"));
    }
    Some(Connection::Sql(SqlConnection {
        driver: SqlDriver::Postgres,
        url,
        password: spec.password.map(|p| p.secret),
        pool,
        timeout,
    }))
}
