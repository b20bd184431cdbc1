//! What the database connection kinds (`postgres`, `mysql`, `sqlite`)
//! share: the URL is either written without a password
//! (`postgres://app@db:5432/wh`, with `password: { secret: NAME }`) or is
//! itself a secret (`url: { secret: NAME }`); a password written in the URL
//! is an error with the fix. Steps reach only the host the URL names. A
//! SQLite connection names a file instead (`sqlite://warehouse.db`,
//! relative to the project).

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::load::Checker;
use crate::model::{Connection, SqlConnection, SqlDriver, SqlUrl};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

/// Connections in a pool unless `pool:` says otherwise.
const DEFAULT_POOL: u32 = 8;
/// The largest `pool:`.
const MAX_POOL: u32 = 100;

/// `connections.<name>.postgres` (and `mysql`, `sqlite`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSpec {
    /// `postgres://user@host:port/db` (no password), or `{ secret: NAME }`;
    /// `sqlite://FILE`.
    pub url: Value,
    /// The password, for a URL written without one.
    pub password: Option<SecretRef>,
    /// Connections in the pool (default 8).
    pub pool: Option<u32>,
    /// Timeout of one statement.
    pub timeout: Option<Dur>,
    /// Record each step's idempotency key in the target database, in the
    /// same transaction as its write: a write happens once however plumb
    /// is stopped.
    #[serde(default)]
    pub exactly_once: bool,
    /// The table those keys go in (default `plumb_effects`).
    pub effects_table: Option<String>,
}

/// Whether `name` is a plain (optionally schema-qualified) table name: it is
/// written into SQL, so nothing else is accepted.
fn is_table_name(name: &str) -> bool {
    let part = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && p.len() <= 63
    };
    match name.split_once('.') {
        Some((schema, table)) => part(schema) && part(table),
        None => part(name),
    }
}

/// `url:` of a connection that holds credentials: a URL in one of
/// `schemes` written without a password (a password in it is an error
/// with the fix, never echoed), or `{ secret: NAME }` holding the whole URL.
pub(super) fn url_or_secret(
    cx: &mut Checker<'_>,
    raw: &Value,
    url_path: &FieldPath,
    title: &str,
    schemes: &[&str],
    example: &str,
) -> Option<SqlUrl> {
    match raw {
        Value::String(text) => {
            let parsed = match Url::parse(text) {
                Ok(u) if schemes.contains(&u.scheme()) && u.has_host() => u,
                _ => {
                    cx.error_at_value(url_path, format!("this is not a {title} URL"))
                        .help = Some(format!(
                        "write `{example}`, or `url: {{ secret: NAME }}` for a URL kept sealed"
                    ));
                    return None;
                }
            };
            if parsed.password().is_some() {
                // Not echoed: the message names the field, not the value.
                cx.error_at_value(url_path, "the URL holds a password")
                    .help = Some(
                    "remove it from the URL and write `password: { secret: NAME }` (seal it with `plumb secrets set NAME`), or seal the whole URL and write `url: { secret: NAME }`".into(),
                );
                return None;
            }
            Some(SqlUrl::Literal(parsed))
        }
        Value::Object(_) => {
            let secret: SecretRef = cx.deserialize(raw, url_path)?;
            cx.secret_name(&secret.secret, &url_path.key("secret"));
            Some(SqlUrl::Secret(secret.secret))
        }
        _ => {
            cx.error_at_value(url_path, "`url` is a URL or `{ secret: NAME }`")
                .help = Some(format!("e.g. `url: {example}`"));
            None
        }
    }
}

/// How one database kind's URLs look.
pub(super) struct Dialect {
    /// The kind, as written.
    pub driver: SqlDriver,
    /// The database's name in messages.
    pub title: &'static str,
    /// The URL schemes it takes.
    pub schemes: &'static [&'static str],
    /// An example URL, for the fix.
    pub example: &'static str,
}

/// Checks `connections.<name>.<kind>` for a database kind.
pub(super) fn check(
    cx: &mut Checker<'_>,
    raw: &Value,
    path: &FieldPath,
    dialect: &Dialect,
) -> Option<Connection> {
    let spec: SqlSpec = cx.deserialize(raw, path)?;
    let url_path = path.key("url");
    let url = match &spec.url {
        Value::Object(_) if dialect.driver == SqlDriver::Sqlite => {
            cx.error_at_value(&url_path, "a SQLite database is a file, not a secret")
                .help = Some(format!(
                "write `url: {}` (relative to the project)",
                dialect.example
            ));
            return None;
        }
        Value::String(text) if dialect.driver == SqlDriver::Sqlite => {
            let file = text
                .strip_prefix("sqlite://")
                .or_else(|| text.strip_prefix("sqlite:"))
                .filter(|f| !f.is_empty() && !f.contains('?'));
            let Some(file) = file else {
                cx.error_at_value(&url_path, "this is not a SQLite URL")
                    .help = Some(format!(
                    "write `{}` (relative to the project) or `sqlite:///absolute/path.db`",
                    dialect.example
                ));
                return None;
            };
            if spec.password.is_some() {
                cx.error_at_value(&path.key("password"), "a SQLite database has no password")
                    .help = Some("remove `password`".into());
            }
            SqlUrl::File(file.into())
        }
        _ => url_or_secret(
            cx,
            &spec.url,
            &url_path,
            dialect.title,
            dialect.schemes,
            dialect.example,
        )?,
    };
    if let Some(p) = &spec.password {
        cx.secret_name(&p.secret, &path.key("password").key("secret"));
    }
    let pool = spec.pool.unwrap_or(DEFAULT_POOL);
    if !(1..=MAX_POOL).contains(&pool) {
        cx.error_at_value(&path.key("pool"), format!("`pool` is {pool}"))
            .help = Some(format!("use 1 to {MAX_POOL} connections"));
    }
    let effects_table = if spec.exactly_once {
        let name = spec
            .effects_table
            .clone()
            .unwrap_or_else(|| crate::model::DEFAULT_EFFECTS_TABLE.to_owned());
        if !is_table_name(&name) {
            cx.error_at_value(&path.key("effects_table"), format!("`{name}` is not a table name"))
                .help = Some("use letters, digits and `_` (optionally `schema.table`), starting with a letter or `_`".into());
        }
        Some(name)
    } else {
        if spec.effects_table.is_some() {
            cx.error_at_value(
                &path.key("effects_table"),
                "`effects_table` without `exactly_once: true`",
            )
            .help = Some("add `exactly_once: true`, or remove `effects_table`".into());
        }
        None
    };
    let timeout = spec.timeout.map(|d| d.0);
    if let Some(t) = timeout {
        cx.check_timeout(t, &path.key("timeout"));
    }
    Some(Connection::Sql(SqlConnection {
        driver: dialect.driver,
        url,
        password: spec.password.map(|p| p.secret),
        pool,
        timeout,
        effects_table,
    }))
}
