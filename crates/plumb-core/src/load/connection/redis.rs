//! `connections.<name>.redis`: a Redis server that `publish` steps add
//! stream entries to. Like a database, its URL is written without a
//! password (`redis://app@cache:6379/0`, with `password: { secret: NAME }`)
//! or is itself a secret (`url: { secret: NAME }`).

use serde::Deserialize;
use serde_json::Value;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{Connection, RedisConnection};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "redis",
    check,
};

/// `connections.<name>.redis`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSpec {
    /// `redis://[user@]host:6379[/db]` (no password), `rediss://` for TLS,
    /// or `{ secret: NAME }`.
    pub url: Value,
    /// The password (or ACL user's password), for a URL written without one.
    pub password: Option<SecretRef>,
    /// Timeout of one command.
    pub timeout: Option<Dur>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let spec: RedisSpec = cx.deserialize(raw, path)?;
    let url = super::sql::url_or_secret(
        cx,
        &spec.url,
        &path.key("url"),
        "Redis",
        &["redis", "rediss"],
        "redis://HOST:6379/0",
    )?;
    if let Some(p) = &spec.password {
        cx.secret_name(&p.secret, &path.key("password").key("secret"));
    }
    let timeout = spec.timeout.map(|d| d.0);
    if let Some(t) = timeout {
        cx.check_timeout(t, &path.key("timeout"));
    }
    Some(Connection::Redis(RedisConnection {
        url,
        password: spec.password.map(|p| p.secret),
        timeout,
    }))
}
