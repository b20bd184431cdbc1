//! `publish: { connection, to, body, headers }`: one message to a broker,
//! carrying the step's idempotency key. `to` is a Redis stream, an AMQP
//! routing key (on `exchange`, by default the default exchange: the queue
//! named `to`), an MQTT topic or a NATS subject (JetStream).

use serde::Deserialize;
use serde_json::Value;

use super::{Checked, KindInput, StepKind};
use crate::load::Checker;
use crate::model::{Action, Connection, PublishAction};

pub(super) const KIND: StepKind = StepKind {
    name: "publish",
    siblings: &[],
    not_repeatable: None,
    check,
};

/// `publish:` in a step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// The broker connection.
    pub connection: String,
    /// Where: a stream, routing key, topic or subject.
    pub to: Value,
    /// AMQP: the exchange.
    pub exchange: Option<String>,
    /// The message: any JSON, sent as JSON text.
    pub body: Value,
    /// Extra headers (stream entry fields on Redis).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, Value>,
}

/// The most headers one message may carry.
const MAX_HEADERS: usize = 64;

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("publish");
    let spec: PublishSpec = cx.deserialize(input.raw, &path)?;
    let connection = super::step_connection(
        cx,
        &spec.connection,
        &path,
        "a publish step sends to a broker connection",
        "`amqp:`, `mqtt:`, `nats:` or `redis: { url: … }`",
        |c| matches!(c, Connection::Broker(_)),
    );
    let timeout = match &connection {
        Some(Connection::Broker(c)) => c.timeout,
        _ => None,
    };
    if let (Some(Connection::Broker(c)), Some(_)) = (&connection, &spec.exchange)
        && c.kind != crate::model::BrokerKind::Amqp
    {
        cx.error_at_value(
            &path.key("exchange"),
            format!(
                "`exchange` applies to amqp; `{}` is a {} connection, not amqp",
                spec.connection,
                c.kind.name()
            ),
        );
    }
    if spec.headers.len() > MAX_HEADERS {
        cx.error_at_value(
            &path.key("headers"),
            format!(
                "{} headers; a message carries at most {MAX_HEADERS}",
                spec.headers.len()
            ),
        );
    }
    for name in spec.headers.keys() {
        if name.eq_ignore_ascii_case(crate::model::IDEMPOTENCY_FIELD) || name == "body" {
            cx.error_at_value(&path.key("headers").key(name), format!("`{name}` is set by plumb"))
                .help = Some("every message carries the step's idempotency key and its body under these names: pick another".into());
        }
    }
    let to = cx.template(&spec.to, &path.key("to"))?;
    let body = cx.template(&spec.body, &path.key("body"))?;
    let mut headers = Vec::with_capacity(spec.headers.len());
    for (name, raw) in &spec.headers {
        headers.push((
            name.clone(),
            cx.template(raw, &path.key("headers").key(name))?,
        ));
    }
    Some(Checked {
        action: Action::Publish(PublishAction {
            connection: spec.connection,
            to,
            exchange: spec.exchange,
            body,
            headers,
        }),
        timeout,
    })
}
