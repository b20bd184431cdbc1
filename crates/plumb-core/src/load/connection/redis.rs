//! `connections.<name>.redis`: a Redis server that `publish` steps add
//! stream entries to. Like a database, its URL is written without a
//! password (`redis://app@cache:6379/0`, with `password: { secret: NAME }`)
//! or is itself a secret (`url: { secret: NAME }`).

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{Connection, RedisConnection, SqlUrl};
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
    let url_path = path.key("url");
    let url = match &spec.url {
        Value::String(text) => {
            let parsed = match Url::parse(text) {
                Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.has_host() => u,
                _ => {
                    cx.error_at_value(&url_path, "this is not a Redis URL")
                        .help = Some("write `redis://HOST:6379/0` (`rediss://` for TLS), or `url: { secret: NAME }` for a URL kept sealed".into());
                    return None;
                }
            };
            if parsed.password().is_some() {
                cx.error_at_value(&url_path, "the URL holds a password")
                    .help = Some("remove it from the URL and write `password: { secret: NAME }` (seal it with `plumb secrets set NAME`), or seal the whole URL and write `url: { secret: NAME }`".into());
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
                .help = Some("e.g. `url: redis://cache.internal:6379/0`".into());
            return None;
        }
    };
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
