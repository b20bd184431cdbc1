//! `connections.<name>.amqp`: a RabbitMQ (AMQP 0-9-1) server.
//! `amqp://[user@]host:5672/VHOST` (`%2f` is the default vhost),
//! `amqps://` for TLS.

use serde_json::Value;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{BrokerKind, Connection};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "amqp",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    super::broker::check(
        cx,
        raw,
        path,
        BrokerKind::Amqp,
        "AMQP",
        &["amqp", "amqps"],
        "amqp://USER@HOST:5672/%2f",
    )
}
