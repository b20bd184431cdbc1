//! MQTT 5.
//!
//! **Publishing** at QoS 1: the call returns once the broker's PUBACK
//! arrives; the idempotency key travels as the `plumb-idempotency-key` user
//! property.
//!
//! **Consuming** at QoS 1 with a persistent session — a fixed client id
//! (the trigger's `group` and a digest of its topic), clean start off and a
//! long session expiry — so
//! messages published while plumb is down wait at the broker, and with
//! manual acks: the PUBACK is sent only after the run is committed. The
//! broker never has more than `prefetch` unacknowledged messages out
//! (`receive_maximum`). MQTT has no message id that survives a
//! redelivery, so the engine recognises one by its content.
//!
//! rumqttc's event loop must be polled for anything (acks included) to
//! move, so each client's loop runs in a task of its own.

use std::collections::HashMap;

use rumqttc::{
    AckMode, AsyncClient, Event, EventLoop, MqttOptions, Packet, PublishOptions, PublishProperties,
    PublishResult, QoS,
};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Acker, BrokerError, Consumer, ConsumerSpec, Delivery, Message};
use crate::ActionError;

/// How long the broker keeps a consumer's session (and its messages)
/// while plumb is away: 30 days.
const SESSION_EXPIRY_S: u32 = 30 * 24 * 3600;
/// Keep-alive interval.
const KEEP_ALIVE_S: u16 = 30;
/// The largest incoming packet (the body limit plus room for properties).
const MAX_PACKET_BYTES: u32 = 2 * 1024 * 1024;

/// Host, port and credentials from an `mqtt://` URL.
fn options(client_id: &str, url: &str, connection: &str) -> Result<MqttOptions, String> {
    let parsed = url::Url::parse(url)
        .map_err(|_| format!("the URL of connection `{connection}` is not a valid MQTT URL"))?;
    if parsed.scheme() != "mqtt" {
        return Err(format!(
            "connection `{connection}`: `{}://` is not supported yet; use `mqtt://` (TLS through a local proxy)",
            parsed.scheme()
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("the URL of connection `{connection}` has no host"))?;
    let mut options = MqttOptions::new(client_id, (host.to_owned(), parsed.port().unwrap_or(1883)));
    options.set_keep_alive(KEEP_ALIVE_S);
    options.set_max_packet_size(Some(MAX_PACKET_BYTES));
    if !parsed.username().is_empty() {
        let user = percent(parsed.username());
        let password = parsed.password().map(percent).unwrap_or_default();
        options.set_credentials(user, password.into_bytes());
    }
    Ok(options)
}

/// Percent-decoding of a URL's user or password (`+` stays a plus).
fn percent(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Polls `events` until it fails, forwarding incoming publishes; returns
/// the failure.
async fn drive(
    mut events: EventLoop,
    incoming: Option<mpsc::UnboundedSender<rumqttc::Publish>>,
) -> String {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if let Some(tx) = &incoming
                    && tx.send(publish).is_err()
                {
                    return "the consumer stopped".into();
                }
            }
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
}

/// Publishing clients by connection and URL, each with its event loop
/// task.
#[derive(Default)]
pub struct MqttClients {
    clients: std::sync::Mutex<HashMap<String, (AsyncClient, tokio::task::JoinHandle<String>)>>,
}

impl std::fmt::Debug for MqttClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MqttClients")
    }
}

impl MqttClients {
    async fn client(&self, message: &Message<'_>) -> Result<AsyncClient, ActionError> {
        let id = message.client_id();
        let Ok(mut clients) = self.clients.lock() else {
            return Err(ActionError::Retryable {
                message: "the MQTT client cache is unusable".into(),
                status: None,
                retry_after: None,
            });
        };
        if let Some((client, task)) = clients.get(&id)
            && !task.is_finished()
        {
            return Ok(client.clone());
        }
        let prefix = format!("{}:", message.connection);
        clients.retain(|k, (_, task)| {
            let keep = !k.starts_with(&prefix);
            if !keep {
                task.abort();
            }
            keep
        });
        let client_id = format!("plumb-publish-{}", uuid::Uuid::now_v7().simple());
        let mut options =
            options(&client_id, message.url, message.connection).map_err(|message| {
                ActionError::Permanent {
                    message,
                    status: None,
                }
            })?;
        options.set_clean_start(true);
        let (client, events) = AsyncClient::builder(options).capacity(256).build();
        let task = tokio::spawn(drive(events, None));
        clients.insert(id, (client.clone(), task));
        Ok(client)
    }

    pub(super) fn reset(&self) {
        if let Ok(mut clients) = self.clients.lock() {
            for (_, (client, task)) in clients.drain() {
                let _ = client.try_disconnect();
                task.abort();
            }
        }
    }

    /// Publishes `message` to topic `to` at QoS 1 and waits for the PUBACK.
    pub(super) async fn publish(&self, message: &Message<'_>) -> Result<Value, ActionError> {
        let client = self.client(message).await?;
        let mut user_properties = vec![(
            plumb_core::model::IDEMPOTENCY_FIELD.to_owned(),
            message.key.to_owned(),
        )];
        user_properties.extend(message.headers.iter().cloned());
        let properties = PublishProperties {
            content_type: Some("application/json".into()),
            user_properties,
            ..PublishProperties::default()
        };
        let sent = tokio::time::timeout(message.timeout, async {
            let notice = client
                .publish_tracked(
                    message.to.to_owned(),
                    message.body.as_bytes().to_vec(),
                    PublishOptions::new(QoS::AtLeastOnce).properties(properties),
                )
                .await
                .map_err(|e| e.to_string())?;
            notice.wait_async().await.map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| message.timed_out("the MQTT broker"))?;
        match sent {
            Ok(PublishResult::Qos1(ack)) if (ack.reason as u8) < 0x80 => Ok(serde_json::json!({
                "to": message.to,
                "reason": format!("{:?}", ack.reason),
            })),
            Ok(other) => Err(ActionError::Retryable {
                message: format!(
                    "connection `{}`: the broker did not accept the message: {other:?}",
                    message.connection
                ),
                status: None,
                retry_after: None,
            }),
            Err(e) => {
                // The client may be broken: the next message opens another.
                if let Ok(mut clients) = self.clients.lock()
                    && let Some((_, task)) = clients.remove(&message.client_id())
                {
                    task.abort();
                }
                Err(ActionError::Retryable {
                    message: format!("connection `{}`: {e}", message.connection),
                    status: None,
                    retry_after: None,
                })
            }
        }
    }
}

/// A persistent-session subscriber.
struct TopicConsumer {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: tokio::task::JoinHandle<String>,
    name: String,
}

impl Drop for TopicConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The consumer's client id: the group and a digest of the topic filter,
/// so a changed topic starts a new session (subscribed to it) rather than
/// resuming one subscribed to the old topic.
pub fn client_id(group: &str, topic: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(topic.as_bytes()));
    format!("{group}-{}", &digest[..8])
}

pub(super) async fn consume(spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BrokerError> {
    let id = client_id(&spec.group, &spec.source);
    let mut options = options(&id, &spec.url, &spec.connection).map_err(BrokerError)?;
    options
        .set_clean_start(false)
        // The session lives at the broker; this process keeps none of its
        // own (it only acknowledges, and a message it took but did not ack
        // is resent by the broker).
        .set_broker_session_resume_policy(rumqttc::BrokerSessionResumePolicy::AllowBrokerOnly)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_S))
        .set_ack_mode(AckMode::Manual)
        .set_receive_maximum(Some(spec.prefetch));
    let (client, mut events) = AsyncClient::builder(options)
        .capacity(usize::from(spec.prefetch) + 16)
        .build();
    // Wait for the broker's CONNACK, so a refused connection is reported
    // here rather than as a silent stall.
    let session_present = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack.session_present,
            Ok(_) => {}
            Err(e) => {
                return Err(BrokerError(format!(
                    "connection `{}`: {e}",
                    spec.connection
                )));
            }
        }
    };
    // A resumed session keeps its subscription (and the client may not
    // send a new one in it): subscribe only in a new session. The client id
    // names the topic, so a resumed session is always this topic's.
    if !session_present {
        client
            .subscribe(spec.source.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| BrokerError(format!("connection `{}`: {e}", spec.connection)))?;
    }
    let (tx, incoming) = mpsc::unbounded_channel();
    let task = tokio::spawn(drive(events, Some(tx)));
    Ok(Box::new(TopicConsumer {
        client,
        incoming,
        task,
        name: spec.connection.clone(),
    }))
}

#[async_trait::async_trait]
impl Consumer for TopicConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        let Some(publish) = self.incoming.recv().await else {
            let why = if self.task.is_finished() {
                (&mut self.task).await.unwrap_or_else(|e| e.to_string())
            } else {
                "the connection closed".into()
            };
            return Err(BrokerError(format!("connection `{}`: {why}", self.name)));
        };
        let mut headers = Vec::new();
        if let Some(p) = &publish.properties {
            headers.extend(p.user_properties.iter().cloned());
            if let Some(ct) = &p.content_type {
                headers.push(("content_type".into(), ct.clone()));
            }
        }
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        Ok(Delivery {
            id: None,
            body: publish.payload.to_vec(),
            headers: super::bounded_headers(headers),
            source: topic,
            redelivered: publish.dup,
            acker: Box::new(PublishAcker {
                client: self.client.clone(),
                publish,
                name: self.name.clone(),
            }),
        })
    }
}

/// The PUBACK of one incoming publish.
struct PublishAcker {
    client: AsyncClient,
    publish: rumqttc::Publish,
    name: String,
}

#[async_trait::async_trait]
impl Acker for PublishAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.client
            .ack(&self.publish)
            .await
            .map_err(|e| BrokerError(format!("connection `{}`: {e}", self.name)))
    }

    async fn reject(&self) -> Result<(), BrokerError> {
        // MQTT has no dead-letter place: the failed run keeps the payload.
        self.ack().await
    }
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn url_credentials_are_percent_decoded_keeping_plus_and_ampersand() {
        assert_eq!(percent("p%2Bw+d%26x%40y"), "p+w+d&x@y");
        assert_eq!(percent("plain"), "plain");
    }
}
