//! NATS JetStream.
//!
//! **Publishing** to a subject through JetStream, waiting for the stream's
//! ack: the message's `Nats-Msg-Id` is the step's idempotency key, so the
//! server's duplicate window (2 minutes unless the stream sets another)
//! turns a re-send into a no-op it reports as a duplicate; the key is also
//! in the `plumb-idempotency-key` header.
//!
//! **Consuming** through a durable pull consumer (named by the trigger's
//! `group`) with explicit acks, `max_ack_pending` = `prefetch` and an
//! `ack_wait` longer than a commit can take; the stream is found by the
//! subject unless named (and created for the subject with `declare`). A
//! message's identity is its stream, the stream's creation time and its
//! sequence, the same on a redelivery;
//! a poison message is terminated (`+TERM`: never redelivered).

use std::collections::HashMap;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures::StreamExt;
use serde_json::Value;

use super::{Acker, BrokerError, Consumer, ConsumerSpec, Delivery, Message};
use crate::ActionError;

/// JetStream contexts by connection and URL.
#[derive(Default)]
pub struct NatsClients {
    clients: std::sync::Mutex<HashMap<String, jetstream::Context>>,
}

impl std::fmt::Debug for NatsClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsClients")
    }
}

/// Connects; the error never quotes the URL.
async fn connect(
    connection: &str,
    url: &str,
    timeout: std::time::Duration,
) -> Result<async_nats::Client, String> {
    let options = async_nats::ConnectOptions::new().connection_timeout(timeout);
    async_nats::connect_with_options(url, options)
        .await
        .map_err(|e| format!("connection `{connection}`: {e}"))
}

impl NatsClients {
    async fn context(&self, message: &Message<'_>) -> Result<jetstream::Context, ActionError> {
        let id = message.client_id();
        if let Some(c) = self.clients.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(c);
        }
        let client = tokio::time::timeout(
            message.timeout,
            connect(message.connection, message.url, message.timeout),
        )
        .await
        .map_err(|_| message.timed_out("the NATS server"))?
        .map_err(|message| ActionError::Retryable {
            message,
            status: None,
            retry_after: None,
        })?;
        let context = jetstream::new(client);
        if let Ok(mut clients) = self.clients.lock() {
            let prefix = format!("{}:", message.connection);
            clients.retain(|k, _| !k.starts_with(&prefix));
            clients.insert(id, context.clone());
        }
        Ok(context)
    }

    pub(super) fn reset(&self) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.clear();
        }
    }

    /// Publishes `message` to subject `to` and waits for the stream's ack.
    pub(super) async fn publish(&self, message: &Message<'_>) -> Result<Value, ActionError> {
        let context = self.context(message).await?;
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(bytes::Bytes::copy_from_slice(message.body.as_bytes()))
            .message_id(message.key)
            .header(plumb_core::model::IDEMPOTENCY_FIELD, message.key);
        for (name, value) in message.headers {
            publish = publish.header(name.as_str(), value.as_str());
        }
        let sent = tokio::time::timeout(message.timeout, async {
            context
                .send_publish(message.to.to_owned(), publish)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| message.timed_out("JetStream"))?;
        let ack = sent.map_err(|e| ActionError::Retryable {
            message: format!(
                "connection `{}`: {e} (is there a stream for subject `{}`?)",
                message.connection, message.to
            ),
            status: None,
            retry_after: None,
        })?;
        Ok(serde_json::json!({
            "to": message.to,
            "stream": ack.stream,
            "sequence": ack.sequence,
            "already_published": ack.duplicate,
        }))
    }
}

/// A durable pull consumer's message stream.
struct StreamConsumer {
    messages: pull::Stream,
    /// When the stream was created: a stream deleted and created again
    /// numbers its messages from 1 again, so the sequence alone is not an
    /// identity.
    created: String,
    name: String,
    subject: String,
}

pub(super) async fn consume(spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BrokerError> {
    let fail =
        |e: &dyn std::fmt::Display| BrokerError(format!("connection `{}`: {e}", spec.connection));
    let client = connect(&spec.connection, &spec.url, spec.timeout)
        .await
        .map_err(BrokerError)?;
    let context = jetstream::new(client);
    let stream_name = match &spec.stream {
        Some(name) => name.clone(),
        None => match context.stream_by_subject(spec.source.clone()).await {
            Ok(name) => name,
            Err(_) if spec.declare => stream_name_for(&spec.source),
            Err(e) => {
                return Err(BrokerError(format!(
                    "connection `{}`: no JetStream stream holds subject `{}` ({e}); create one, or set `declare: true`",
                    spec.connection, spec.source
                )));
            }
        },
    };
    let stream = if spec.declare {
        context
            .get_or_create_stream(jetstream::stream::Config {
                name: stream_name.clone(),
                subjects: vec![spec.source.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?
    } else {
        context
            .get_stream(&stream_name)
            .await
            .map_err(|e| fail(&e))?
    };
    let consumer = stream
        .get_or_create_consumer(
            &spec.group,
            pull::Config {
                durable_name: Some(spec.group.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                max_ack_pending: i64::from(spec.prefetch),
                filter_subject: spec.source.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| fail(&e))?;
    let created = format!("{:?}", stream.cached_info().created);
    let messages = consumer.messages().await.map_err(|e| fail(&e))?;
    Ok(Box::new(StreamConsumer {
        messages,
        created,
        name: spec.connection.clone(),
        subject: spec.source.clone(),
    }))
}

/// A stream name made from a subject (`orders.*` → `orders__`): letters,
/// digits, `-` and `_` only.
fn stream_name_for(subject: &str) -> String {
    subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait::async_trait]
impl Consumer for StreamConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        let message = match self.messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(BrokerError(format!("connection `{}`: {e}", self.name))),
            None => {
                return Err(BrokerError(format!(
                    "connection `{}`: the consumer of `{}` ended",
                    self.name, self.subject
                )));
            }
        };
        let (id, redelivered) = match message.info() {
            Ok(info) => (
                Some(format!(
                    "{}:{}:{}",
                    info.stream, self.created, info.stream_sequence
                )),
                info.delivered > 1,
            ),
            Err(_) => (None, false),
        };
        let mut headers = Vec::new();
        if let Some(map) = &message.headers {
            for (name, values) in map.iter() {
                if let Some(value) = values.first() {
                    headers.push((name.to_string(), value.to_string()));
                }
            }
        }
        headers.sort();
        let source = message.subject.to_string();
        let body = message.payload.to_vec();
        Ok(Delivery {
            id,
            body,
            headers: super::bounded_headers(headers),
            source,
            redelivered,
            acker: Box::new(MessageAcker {
                message,
                name: self.name.clone(),
            }),
        })
    }
}

/// Acks (`+ACK`) or terminates (`+TERM`) one message.
struct MessageAcker {
    message: jetstream::Message,
    name: String,
}

#[async_trait::async_trait]
impl Acker for MessageAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.message
            .ack()
            .await
            .map_err(|e| BrokerError(format!("connection `{}`: {e}", self.name)))
    }

    async fn in_progress(&self) {
        let _ = self.message.ack_with(jetstream::AckKind::Progress).await;
    }

    async fn reject(&self) -> Result<(), BrokerError> {
        self.message
            .ack_with(jetstream::AckKind::Term)
            .await
            .map_err(|e| BrokerError(format!("connection `{}`: {e}", self.name)))
    }
}
