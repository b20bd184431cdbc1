//! `trigger.queue`: messages from a broker connection, one run each.
//! Where they come from is named in the broker's words — `queue` (AMQP),
//! `topic` (MQTT, a filter), `subject` (NATS, with an optional `stream`),
//! `stream` (Redis) — and must match the connection's kind. `group` is
//! the consumer's durable identity, `prefetch` how many messages may be
//! in hand and unacknowledged, `declare` creates what is missing (an AMQP
//! queue, a JetStream stream), `schema` is the body's contract, `dedupe`
//! a key that recognises a message sent twice (besides the broker's id),
//! and `window` how long an id or key counts.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::TriggerKind;
use crate::load::Checker;
use crate::model::{BrokerKind, Connection, QueueTrigger, Trigger};
use crate::spec::Dur;
use crate::yaml::FieldPath;

pub(super) const KIND: TriggerKind = TriggerKind {
    name: "queue",
    check,
};

/// Messages in hand at once unless `prefetch` says otherwise.
pub const DEFAULT_PREFETCH: u16 = 64;
/// The most messages in hand at once.
pub const MAX_PREFETCH: u16 = 1000;
/// How long a message's id counts unless `window` (or `dedupe.window`)
/// says otherwise: longer than any outage after which a broker
/// redelivers what was taken but not acknowledged.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest name of a queue, topic, subject, stream or group.
const MAX_NAME_BYTES: usize = 255;

/// `trigger.queue`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// The broker connection.
    pub connection: String,
    /// AMQP: the queue.
    pub queue: Option<String>,
    /// MQTT: the topic filter.
    pub topic: Option<String>,
    /// NATS: the subject.
    pub subject: Option<String>,
    /// Redis: the stream; NATS: the JetStream stream.
    pub stream: Option<String>,
    /// The consumer's durable identity.
    pub group: Option<String>,
    /// Messages in hand at once.
    pub prefetch: Option<u16>,
    /// Create the queue (AMQP) or stream (NATS) if it is missing.
    #[serde(default)]
    pub declare: bool,
    /// The body's contract (`schemas/order.json`).
    pub schema: Option<String>,
    /// `dedupe: "${{ … }}"` or `{ key, window }`.
    pub dedupe: Option<Value>,
    /// How long a message's id counts.
    pub window: Option<Dur>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Trigger> {
    let spec: QueueSpec = cx.deserialize(raw, path)?;
    let connection = super::super::step::step_connection(
        cx,
        &spec.connection,
        path,
        "a queue trigger reads from a broker connection",
        "`amqp:`, `mqtt:`, `nats:` or `redis: { url: … }`",
        |c| matches!(c, Connection::Broker(_)),
    );
    let kind = match connection {
        Some(Connection::Broker(b)) => Some(b.kind),
        _ => None,
    };
    let named = [
        ("queue", &spec.queue),
        ("topic", &spec.topic),
        ("subject", &spec.subject),
        ("stream", &spec.stream),
    ];
    for (field, value) in named {
        if let Some(v) = value
            && (v.is_empty() || v.len() > MAX_NAME_BYTES || v.chars().any(char::is_control))
        {
            cx.error_at_value(
                &path.key(field),
                format!("`{field}` must be 1 to {MAX_NAME_BYTES} bytes of text"),
            );
        }
    }
    if let Some(g) = &spec.group
        && (g.is_empty() || g.len() > MAX_NAME_BYTES || !g.chars().all(valid_group_char))
    {
        cx.error_at_value(
            &path.key("group"),
            "`group` may hold letters, digits, `-` and `_` (1 to 255)",
        )
        .help = Some("it names the consumer on the broker: keep it stable".into());
    }
    let prefetch = spec.prefetch.unwrap_or(DEFAULT_PREFETCH);
    if !(1..=MAX_PREFETCH).contains(&prefetch) {
        cx.error_at_value(
            &path.key("prefetch"),
            format!("`prefetch` must be between 1 and {MAX_PREFETCH}"),
        )
        .help = Some(format!(
            "how many messages may be taken before the first is acknowledged (default {DEFAULT_PREFETCH})"
        ));
    }
    let window = spec.window.map_or(DEFAULT_WINDOW, |d| d.0);
    if window < Duration::from_secs(60) || window > Duration::from_secs(366 * 24 * 3600) {
        cx.error_at_value(&path.key("window"), "`window` must be between 1m and 366d")
            .help =
            Some("a redelivery after an outage must still be recognised: days are usual".into());
    }
    let schema = match &spec.schema {
        Some(reference) => Some(cx.contract(reference, &path.key("schema"))?),
        None => None,
    };
    let dedupe = match &spec.dedupe {
        None => None,
        Some(raw) => Some(Box::new(cx.trigger_dedupe(
            Some(raw),
            None,
            &path.key("dedupe"),
        )?)),
    };
    let kind = kind?;
    let source = source(cx, kind, &spec, path)?;
    if spec.declare && !matches!(kind, BrokerKind::Amqp | BrokerKind::Nats) {
        cx.error_at_value(
            &path.key("declare"),
            format!(
                "`declare` applies to amqp and nats; a {} connection has nothing to declare",
                kind.name()
            ),
        );
    }
    Some(Trigger::Queue(Box::new(QueueTrigger {
        connection: spec.connection,
        kind,
        source,
        stream: spec.stream.filter(|_| kind == BrokerKind::Nats),
        group: spec.group,
        prefetch,
        declare: spec.declare,
        schema,
        dedupe,
        window,
    })))
}

/// Consumer names travel into broker commands and client ids.
fn valid_group_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The field naming the source for the connection's kind, and no other.
fn source(
    cx: &mut Checker<'_>,
    kind: BrokerKind,
    spec: &QueueSpec,
    path: &FieldPath,
) -> Option<String> {
    let wanted = kind.source_field();
    let given = [
        ("queue", spec.queue.as_ref()),
        ("topic", spec.topic.as_ref()),
        ("subject", spec.subject.as_ref()),
        // On NATS `stream` names the JetStream stream beside the subject.
        (
            "stream",
            spec.stream.as_ref().filter(|_| kind != BrokerKind::Nats),
        ),
    ];
    let mut found = None;
    for (field, value) in given {
        let Some(value) = value else { continue };
        if field == wanted {
            found = Some(value.clone());
        } else {
            cx.error_at_value(
                &path.key(field),
                format!("`{field}` does not apply to {} connections", kind.name()),
            )
            .help = Some(format!("name what to read with `{wanted}:`"));
        }
    }
    if found.is_none() {
        cx.error_at_value(path, format!("`{wanted}` is missing"))
            .help = Some(format!(
            "a queue trigger on {} connections reads from a {wanted}, e.g. `{wanted}: orders`",
            kind.name()
        ));
    }
    found
}
