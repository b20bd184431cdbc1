//! `connections.<name>.redis`: a Redis server whose streams `queue`
//! triggers read (consumer groups) and `publish` steps add entries to.
//! `redis://[user@]host:6379[/db]`, `rediss://` for TLS.

use serde_json::Value;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{BrokerKind, Connection};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "redis",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    super::broker::check(
        cx,
        raw,
        path,
        BrokerKind::Redis,
        "Redis",
        &["redis", "rediss"],
        "redis://HOST:6379/0",
    )
}
