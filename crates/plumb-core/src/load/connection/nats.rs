//! `connections.<name>.nats`: a NATS server with JetStream.
//! `nats://[user@]host:4222`, `tls://` for TLS.

use serde_json::Value;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{BrokerKind, Connection};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "nats",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    super::broker::check(
        cx,
        raw,
        path,
        BrokerKind::Nats,
        "NATS",
        &["nats", "tls"],
        "nats://HOST:4222",
    )
}
