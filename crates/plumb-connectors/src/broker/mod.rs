//! Message brokers: one module per kind (AMQP, MQTT, NATS JetStream, Redis
//! Streams), each doing two things the same way.
//!
//! * **Publishing** one message per idempotency key ([`Brokers::publish`]):
//!   every message carries the key as its `plumb-idempotency-key`
//!   header/property/field, and the call returns only once the broker has
//!   confirmed it (a publisher confirm, a PUBACK, a JetStream ack, the
//!   script's reply).
//! * **Consuming** ([`consume`]): a [`Consumer`] hands out [`Delivery`]s,
//!   each with its own [`Acker`]; nothing is acknowledged until the engine
//!   says so, after the run it starts is committed. A delivery's `id` is
//!   the broker's stable identity of the message (the same on a
//!   redelivery) when the broker has one.
//!
//! Connectors never see workflows or the store; the URL they get holds
//! the password, so no message here ever quotes it.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::ActionError;

pub mod amqp;
pub mod mqtt;
pub mod nats;
pub mod redis;

pub use plumb_core::model::BrokerKind;

/// The largest message body, in bytes, a publish step sends.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The longest time a consumer waits for the broker's answer when
/// connecting, declaring or subscribing, unless the connection sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker failure while consuming: the engine shows it (redacted) as the
/// connection's last error and reconnects with backoff.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// One message to publish.
pub struct Message<'a> {
    /// The connection's name, for messages.
    pub connection: &'a str,
    /// The full URL, password included: never shown.
    pub url: &'a str,
    /// Timeout of connecting and of the broker's confirmation.
    pub timeout: Duration,
    /// The stream, routing key, topic or subject.
    pub to: &'a str,
    /// AMQP only: the exchange (`None`: the default exchange, which routes
    /// to the queue named `to`).
    pub exchange: Option<&'a str>,
    /// The body, as JSON text.
    pub body: &'a str,
    /// Extra headers.
    pub headers: &'a [(String, String)],
    /// The step's idempotency key.
    pub key: &'a str,
}

impl Message<'_> {
    /// A body over [`MAX_BODY_BYTES`] is refused before anything is sent.
    fn check_size(&self) -> Result<(), ActionError> {
        if self.body.len() > MAX_BODY_BYTES {
            return Err(ActionError::Permanent {
                message: format!(
                    "the message is {} bytes; a published body is at most {MAX_BODY_BYTES}",
                    self.body.len()
                ),
                status: None,
            });
        }
        Ok(())
    }

    /// The client cache's key: the connection and a digest of its URL, so a
    /// changed URL (a rotated password) opens a new client.
    fn client_id(&self) -> String {
        use sha2::Digest;
        format!(
            "{}:{}",
            self.connection,
            hex::encode(sha2::Sha256::digest(self.url.as_bytes()))
        )
    }

    /// "Did not answer in time" for this message's broker.
    fn timed_out(&self, broker: &str) -> ActionError {
        ActionError::Retryable {
            message: format!(
                "{broker} did not confirm within {} s (the message may have been sent: its idempotency key makes the retry safe)",
                self.timeout.as_secs_f64()
            ),
            status: None,
            retry_after: None,
        }
    }
}

/// The publishing clients of every broker kind, opened on first use and
/// shared by every step of a connection.
#[derive(Debug, Default)]
pub struct Brokers {
    redis: redis::RedisClients,
    amqp: amqp::AmqpClients,
    mqtt: mqtt::MqttClients,
    nats: nats::NatsClients,
}

impl Brokers {
    /// Sends `message` to a broker of `kind`; the step's output says where
    /// it went (`{to, id?, already_published?}`).
    ///
    /// # Errors
    ///
    /// Retryable when the broker cannot be reached or does not confirm in
    /// time; permanent when it refuses the credentials or the message.
    pub async fn publish(
        &self,
        kind: BrokerKind,
        message: &Message<'_>,
    ) -> Result<Value, ActionError> {
        message.check_size()?;
        match kind {
            BrokerKind::Redis => self.redis.publish(message).await,
            BrokerKind::Amqp => self.amqp.publish(message).await,
            BrokerKind::Mqtt => self.mqtt.publish(message).await,
            BrokerKind::Nats => self.nats.publish(message).await,
        }
    }

    /// Forgets every client (a reload or shutdown).
    pub fn reset(&self) {
        self.redis.reset();
        self.amqp.reset();
        self.mqtt.reset();
        self.nats.reset();
    }
}

/// Where and how a queue trigger consumes.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// The connection's name, for messages.
    pub connection: String,
    /// The full URL, password included: never shown.
    pub url: String,
    /// Timeout of connecting and of each setup step.
    pub timeout: Duration,
    /// The queue, topic filter, subject or stream.
    pub source: String,
    /// NATS: the JetStream stream, when named.
    pub stream: Option<String>,
    /// The consumer's durable identity (group, durable, client id).
    pub group: String,
    /// This process's name within the group (Redis consumer name).
    pub member: String,
    /// Messages in hand and unacknowledged at most.
    pub prefetch: u16,
    /// Create a missing queue (AMQP) or stream (NATS).
    pub declare: bool,
    /// How long JetStream waits for an ack before redelivering: longer
    /// than the store's commit deadline.
    pub ack_wait: Duration,
}

/// One message taken from a broker.
pub struct Delivery {
    /// The broker's identity of this message, the same on every redelivery
    /// (a Redis entry id, a JetStream stream sequence, an AMQP
    /// `message_id`), when there is one.
    pub id: Option<String>,
    /// The payload as it arrived.
    pub body: Vec<u8>,
    /// Headers, properties or fields, as text (at most
    /// [`MAX_DELIVERY_HEADERS`]).
    pub headers: Map<String, Value>,
    /// The queue, topic, subject or stream it came from.
    pub source: String,
    /// Whether the broker says it delivered this message before.
    pub redelivered: bool,
    /// Acknowledges or rejects it, once.
    pub acker: Box<dyn Acker>,
}

/// The most headers of a delivery kept in its trigger document.
pub const MAX_DELIVERY_HEADERS: usize = 64;

/// Settles one delivery with the broker.
#[async_trait::async_trait]
pub trait Acker: Send + Sync {
    /// The message is safe (its run is committed): the broker forgets it.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// The message can never be processed (its failed run keeps the raw
    /// payload): AMQP rejects it without requeue, so a dead-letter exchange
    /// gets it; the other brokers acknowledge it.
    async fn reject(&self) -> Result<(), BrokerError>;
    /// The message is still being worked on (its commit is being retried):
    /// JetStream restarts its `ack_wait`; the other brokers need nothing.
    async fn in_progress(&self) {}
}

/// A live subscription.
#[async_trait::async_trait]
pub trait Consumer: Send {
    /// The next message; waits for one.
    ///
    /// # Errors
    ///
    /// The connection or subscription failed: the engine reconnects.
    async fn next(&mut self) -> Result<Delivery, BrokerError>;
}

/// Connects and subscribes as `spec` says.
///
/// # Errors
///
/// The broker cannot be reached, refuses the credentials, or the queue,
/// stream or group cannot be set up.
pub async fn consume(
    kind: BrokerKind,
    spec: &ConsumerSpec,
) -> Result<Box<dyn Consumer>, BrokerError> {
    let setup = async {
        match kind {
            BrokerKind::Redis => redis::consume(spec).await,
            BrokerKind::Amqp => amqp::consume(spec).await,
            BrokerKind::Mqtt => mqtt::consume(spec).await,
            BrokerKind::Nats => nats::consume(spec).await,
        }
    };
    tokio::time::timeout(spec.timeout, setup)
        .await
        .map_err(|_| {
            BrokerError(format!(
                "connection `{}`: the {} broker did not answer within {} s",
                spec.connection,
                kind.name(),
                spec.timeout.as_secs_f64()
            ))
        })?
}

/// Keeps at most [`MAX_DELIVERY_HEADERS`] headers (names of at most 256
/// bytes), each value at most 8 KiB of text: a message is one record, not a way to flood a run.
pub(crate) fn bounded_headers(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Map<String, Value> {
    const MAX_VALUE_BYTES: usize = 8 * 1024;
    let mut map = Map::new();
    const MAX_NAME_BYTES: usize = 256;
    for (name, mut value) in pairs
        .into_iter()
        .filter(|(name, _)| name.len() <= MAX_NAME_BYTES)
        .take(MAX_DELIVERY_HEADERS)
    {
        if value.len() > MAX_VALUE_BYTES {
            let mut cut = MAX_VALUE_BYTES;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
        }
        map.insert(name, Value::String(value));
    }
    map
}
