//! AMQP 0-9-1 (RabbitMQ).
//!
//! **Publishing** on a channel in confirm mode: the call returns once the
//! broker confirms the message, which is persistent (`delivery_mode` 2),
//! `mandatory` (an unroutable message is an error, not silently dropped),
//! and carries the idempotency key as its `message_id` and its
//! `plumb-idempotency-key` header. `to` is the routing key; the exchange
//! is the default one (straight to the queue named `to`) unless the step
//! names one.
//!
//! **Consuming** with manual acks and `basic.qos(prefetch)`: a message is
//! acked after its run is committed, and a poison message is rejected
//! without requeue (to the queue's dead-letter exchange, if it has one).
//! A message's identity is its `message_id` property when the publisher set
//! one, so a redelivery is recognised by it.

use std::collections::HashMap;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use super::{Acker, BrokerError, Consumer, ConsumerSpec, Delivery, Message};
use crate::ActionError;

/// Publishing channels (confirm mode) by connection and URL.
#[derive(Default)]
pub struct AmqpClients {
    clients: std::sync::Mutex<HashMap<String, (Connection, Channel)>>,
}

impl std::fmt::Debug for AmqpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AmqpClients")
    }
}

/// Opens a connection; the error never quotes the URL.
async fn connect(connection: &str, url: &str) -> Result<Connection, String> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connection `{connection}`: {}", describe(&e)))
}

/// lapin's error text, which names the failure, not the URI.
fn describe(e: &lapin::Error) -> String {
    e.to_string()
}

impl AmqpClients {
    async fn channel(&self, message: &Message<'_>) -> Result<Channel, ActionError> {
        let id = message.client_id();
        if let Ok(clients) = self.clients.lock()
            && let Some((connection, channel)) = clients.get(&id)
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let retryable = |message: String| ActionError::Retryable {
            message,
            status: None,
            retry_after: None,
        };
        let opened = tokio::time::timeout(message.timeout, async {
            let connection = connect(message.connection, message.url).await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| describe(&e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| describe(&e))?;
            Ok::<_, String>((connection, channel))
        })
        .await
        .map_err(|_| {
            retryable(format!(
                "cannot reach the AMQP server of connection `{}` within {} s",
                message.connection,
                message.timeout.as_secs_f64()
            ))
        })?
        .map_err(retryable)?;
        let channel = opened.1.clone();
        // Two first messages at once may both connect: the last one is kept.
        if let Ok(mut clients) = self.clients.lock() {
            let prefix = format!("{}:", message.connection);
            clients.retain(|k, _| !k.starts_with(&prefix));
            clients.insert(id, opened);
        }
        Ok(channel)
    }

    pub(super) fn reset(&self) {
        if let Ok(mut clients) = self.clients.lock() {
            // Dropping the last handle closes the connection.
            clients.clear();
        }
    }

    /// Publishes `message` (routing key `to` on its exchange, by default
    /// the default exchange) and waits for the broker's confirm.
    pub(super) async fn publish(&self, message: &Message<'_>) -> Result<Value, ActionError> {
        let exchange = message.exchange.unwrap_or("");
        let routing_key = short(message.to, "`to`")?;
        let exchange_name = short(exchange, "the exchange")?;
        let mut headers = FieldTable::default();
        headers.insert(
            plumb_core::model::IDEMPOTENCY_FIELD.into(),
            AMQPValue::LongString(LongString::from(message.key)),
        );
        for (name, value) in message.headers {
            headers.insert(
                short(name, "a header name")?,
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(short(message.key, "the idempotency key")?)
            .with_headers(headers);
        let channel = self.channel(message).await?;
        let sent = tokio::time::timeout(message.timeout, async {
            channel
                .basic_publish(
                    exchange_name,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    message.body.as_bytes(),
                    properties,
                )
                .await?
                .await
        })
        .await
        .map_err(|_| message.timed_out("the AMQP server"))?;
        let confirmation = match sent {
            Ok(c) => c,
            Err(e) => {
                // The channel may be broken: the next message opens another.
                if let Ok(mut clients) = self.clients.lock() {
                    clients.remove(&message.client_id());
                }
                return Err(ActionError::Retryable {
                    message: format!("connection `{}`: {}", message.connection, describe(&e)),
                    status: None,
                    retry_after: None,
                });
            }
        };
        if confirmation.is_nack() {
            return Err(ActionError::Retryable {
                message: format!(
                    "connection `{}`: the broker refused the message (nack)",
                    message.connection
                ),
                status: None,
                retry_after: None,
            });
        }
        if confirmation.take_message().is_some() {
            return Err(ActionError::Retryable {
                message: format!(
                    "connection `{}`: no queue is bound to `{}` on {}: the message was returned, not delivered",
                    message.connection,
                    message.to,
                    if exchange.is_empty() {
                        "the default exchange".to_owned()
                    } else {
                        format!("exchange `{exchange}`")
                    }
                ),
                status: None,
                retry_after: None,
            });
        }
        Ok(serde_json::json!({ "to": message.to, "exchange": exchange, "message_id": message.key }))
    }
}

/// An AMQP short string (at most 255 bytes).
fn short(text: &str, what: &str) -> Result<ShortString, ActionError> {
    if text.len() > 255 {
        return Err(ActionError::Permanent {
            message: format!("{what} is {} bytes; AMQP allows at most 255", text.len()),
            status: None,
        });
    }
    Ok(text.into())
}

/// A queue consumer with manual acks.
struct QueueConsumer {
    /// Kept open while consuming.
    _connection: Connection,
    consumer: lapin::Consumer,
    name: String,
    queue: String,
}

pub(super) async fn consume(spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BrokerError> {
    let fail = |e: lapin::Error| {
        BrokerError(format!(
            "connection `{}`: {}",
            spec.connection,
            describe(&e)
        ))
    };
    let connection = connect(&spec.connection, &spec.url)
        .await
        .map_err(BrokerError)?;
    let channel = connection.create_channel().await.map_err(fail)?;
    channel
        .basic_qos(spec.prefetch, BasicQosOptions::default())
        .await
        .map_err(fail)?;
    let queue: ShortString = spec.source.as_str().into();
    if spec.declare {
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(fail)?;
    }
    let consumer = channel
        .basic_consume(
            queue,
            format!("plumb-{}", spec.member).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail)?;
    Ok(Box::new(QueueConsumer {
        _connection: connection,
        consumer,
        name: spec.connection.clone(),
        queue: spec.source.clone(),
    }))
}

#[async_trait::async_trait]
impl Consumer for QueueConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        let delivery = match self.consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                return Err(BrokerError(format!(
                    "connection `{}`: {}",
                    self.name,
                    describe(&e)
                )));
            }
            None => {
                return Err(BrokerError(format!(
                    "connection `{}`: the broker ended the subscription to queue `{}`",
                    self.name, self.queue
                )));
            }
        };
        let properties = &delivery.properties;
        let mut headers = Vec::new();
        if let Some(table) = properties.headers() {
            for (name, value) in table {
                headers.push((name.to_string(), value_text(value)));
            }
        }
        for (name, value) in [
            (
                "content_type",
                properties.content_type().as_ref().map(ToString::to_string),
            ),
            (
                "correlation_id",
                properties
                    .correlation_id()
                    .as_ref()
                    .map(ToString::to_string),
            ),
            (
                "message_id",
                properties.message_id().as_ref().map(ToString::to_string),
            ),
            ("timestamp", properties.timestamp().map(|t| t.to_string())),
            ("routing_key", Some(delivery.routing_key.to_string())),
            ("exchange", Some(delivery.exchange.to_string())),
        ] {
            if let Some(value) = value {
                headers.push((name.to_owned(), value));
            }
        }
        Ok(Delivery {
            id: properties
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .filter(|id| !id.is_empty()),
            body: delivery.data,
            headers: super::bounded_headers(headers),
            source: self.queue.clone(),
            redelivered: delivery.redelivered,
            acker: Box::new(MessageAcker {
                acker: delivery.acker,
                name: self.name.clone(),
            }),
        })
    }
}

/// A header value as text.
fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Acks or rejects one delivery on its channel.
struct MessageAcker {
    acker: lapin::Acker,
    name: String,
}

#[async_trait::async_trait]
impl Acker for MessageAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| BrokerError(format!("connection `{}`: {}", self.name, describe(&e))))
    }

    async fn reject(&self) -> Result<(), BrokerError> {
        self.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
            .map_err(|e| BrokerError(format!("connection `{}`: {}", self.name, describe(&e))))
    }
}
