//! `connections.<name>.mqtt`: an MQTT 5 broker. `mqtt://[user@]host:1883`,
//! `mqtts://` for TLS.

use serde_json::Value;

use super::ConnectionKind;
use crate::load::Checker;
use crate::model::{BrokerKind, Connection};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "mqtt",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    super::broker::check(
        cx,
        raw,
        path,
        BrokerKind::Mqtt,
        "MQTT",
        &["mqtt", "mqtts"],
        "mqtt://HOST:1883",
    )
}
