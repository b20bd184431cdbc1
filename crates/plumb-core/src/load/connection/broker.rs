//! What the broker connection kinds (`amqp`, `mqtt`, `nats`, `redis`)
//! share: a URL written without a password (with `password: { secret: NAME
//! }`) or kept whole as a secret (`url: { secret: NAME }`), and a
//! `timeout` for connecting and for one broker operation.

use serde::Deserialize;
use serde_json::Value;

use crate::load::Checker;
use crate::model::{BrokerConnection, BrokerKind, Connection};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

/// `connections.<name>.<broker kind>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSpec {
    /// The broker's URL without a password, or `{ secret: NAME }`.
    pub url: Value,
    /// The password, for a URL written without one.
    pub password: Option<SecretRef>,
    /// Timeout of connecting and of one operation (a publish confirmation).
    pub timeout: Option<Dur>,
}

/// Checks a broker connection of `kind`, whose URL has one of `schemes`.
pub(super) fn check(
    cx: &mut Checker<'_>,
    raw: &Value,
    path: &FieldPath,
    kind: BrokerKind,
    title: &str,
    schemes: &[&str],
    example: &str,
) -> Option<Connection> {
    let spec: BrokerSpec = cx.deserialize(raw, path)?;
    let url = super::sql::url_or_secret(cx, &spec.url, &path.key("url"), title, schemes, example)?;
    if let Some(p) = &spec.password {
        cx.secret_name(&p.secret, &path.key("password").key("secret"));
    }
    let timeout = spec.timeout.map(|d| d.0);
    if let Some(t) = timeout {
        cx.check_timeout(t, &path.key("timeout"));
    }
    Some(Connection::Broker(BrokerConnection {
        kind,
        url,
        password: spec.password.map(|p| p.secret),
        timeout,
    }))
}
