//! `publish: { connection, to, body, headers }`: one message to a broker.
//! On a `redis` connection, `to` names a stream and the message is an
//! entry added with `XADD`, made idempotent by the step's key.

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
    /// Where: a stream (Redis).
    pub to: Value,
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
    let timeout = match super::step_connection(
        cx,
        &spec.connection,
        &path,
        "a publish step sends to a broker connection",
        "`redis: { url: … }`",
        |c| matches!(c, Connection::Redis(_)),
    ) {
        Some(Connection::Redis(c)) => c.timeout,
        _ => None,
    };
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
            body,
            headers,
        }),
        timeout,
    })
}
