//! Queue triggers: each message from a broker becomes a run, and the broker
//! is told only once that run is committed (SPEC G1).
//!
//! One consumer per workflow with a `queue` trigger, in every serving
//! process (the broker shares the messages out among them). For each
//! delivery, in a task of its own (at most `prefetch` at once):
//!
//! 1. the trigger document is built: `{type: "queue", message: {id, body,
//!    headers, source, redelivered}}`. A body that is not JSON, is over the
//!    size or depth limit, or breaks the trigger's `schema` still becomes a
//!    run, marked `rejected` with the raw payload kept (up to
//!    [`MAX_RAW_BYTES`]): the run fails at once, so the message is a
//!    visible dead letter with an alert, never dropped, and it is rejected
//!    to the broker (AMQP: to the dead-letter exchange, if any);
//! 2. the run is committed with its dedupe key — the `dedupe` expression's,
//!    else the broker's message id, else a digest of the message — in the
//!    same transaction, so a redelivery of a message already accepted
//!    (plumb died between the commit and the ack) is recognised, and only
//!    acked;
//! 3. while the store cannot commit, the delivery is retried with backoff
//!    and never acked; every `prefetch` slot soon waits so, and consumption
//!    stops (G5) until the store commits again;
//! 4. the ack (or reject) is sent. If that fails, the broker redelivers,
//!    and step 2 recognises the message.
//!
//! A broker that drops the connection is reconnected with backoff; the
//! connection's state (connected, reconnecting since, last error, paused
//! by the store) is kept in [`crate::connections`] for status and
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use plumb_connectors::broker::{ConsumerSpec, Delivery};
use plumb_core::model::{Connection, QueueTrigger, Trigger, Workflow};
use plumb_store::{Dedupe, StoreError, now_ms};
use serde_json::{Map, Value, json};
use sha2::Digest;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// The most of a rejected message's raw payload kept in its run when the
/// payload is over the size limit (within it, all of it is kept).
pub const MAX_RAW_BYTES: usize = 64 * 1024;
/// The first wait before reconnecting; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between reconnects or commit attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A broker's connection timeout when its connection sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// JetStream's `ack_wait`: longer than one commit attempt may take under
/// load (the store answers within seconds); while commits are retried, each
/// retry tells JetStream the message is in progress, which restarts it. A
/// message a killed plumb had taken is redelivered after it.
const ACK_WAIT: Duration = Duration::from_secs(15);
/// The longest wait between two commit attempts of one message: well
/// inside [`ACK_WAIT`], so the in-progress signal keeps it.
const MAX_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Why a run's trigger is a rejected message, if it is one.
pub(crate) fn rejection(trigger: &Value) -> Option<String> {
    if trigger.get("type").and_then(Value::as_str) != Some("queue") {
        return None;
    }
    trigger
        .get("rejected")
        .and_then(Value::as_str)
        .map(|why| format!("the message cannot be processed: {why}; its raw payload is kept in the run's trigger (`.trigger.message.raw`)"))
}

/// Consumes `workflow`'s queue until `shutdown`.
pub(crate) async fn run_one(
    engine: Arc<Engine>,
    workflow: Arc<Workflow>,
    wake_workers: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let Trigger::Queue(queue) = &workflow.trigger else {
        return;
    };
    let state = engine
        .connections
        .consumer(&queue.connection, &workflow.name);
    let mut backoff = FIRST_BACKOFF;
    // Deliveries in hand: a consumer that is replaced (reconnect, reload)
    // waits for them, so their acks are attempted before it goes.
    let slots = Arc::new(Semaphore::new(usize::from(queue.prefetch)));
    loop {
        let result = consume(
            &engine,
            &workflow,
            queue,
            &slots,
            &wake_workers,
            &state,
            &shutdown,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        let message = match result {
            Ok(()) => "the subscription ended".to_owned(),
            Err(message) => message,
        };
        let message = engine.redact(&message);
        let stable = state.was_connected_long();
        tracing::warn!(workflow = %workflow.name, connection = %queue.connection, error = %message, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "The queue consumer cannot reach its broker (or lost it); reconnecting.");
        state.reconnecting(&message);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = if stable {
            FIRST_BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
    }
}

/// One connection's life: connect, then hand each delivery to a task.
async fn consume(
    engine: &Arc<Engine>,
    workflow: &Arc<Workflow>,
    queue: &QueueTrigger,
    slots: &Arc<Semaphore>,
    wake_workers: &Arc<Notify>,
    state: &crate::connections::ConsumerHandle,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let project = engine.project();
    let Some(Connection::Broker(connection)) = project.config.connections.get(&queue.connection)
    else {
        return Err(format!(
            "the connection `{}` is no longer a broker connection in plumb.yaml",
            queue.connection
        ));
    };
    let url = crate::exec::connection_url(
        engine,
        &queue.connection,
        &connection.url,
        connection.password.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let spec = ConsumerSpec {
        connection: queue.connection.clone(),
        url,
        timeout: connection.timeout.unwrap_or(DEFAULT_TIMEOUT),
        source: queue.source.clone(),
        stream: queue.stream.clone(),
        group: queue.group_for(&workflow.name),
        member: engine.owner.as_str().to_owned(),
        prefetch: queue.prefetch,
        declare: queue.declare,
        ack_wait: ACK_WAIT,
    };
    let mut consumer = plumb_connectors::broker::consume(queue.kind, &spec)
        .await
        .map_err(|e| e.to_string())?;
    state.connected();
    tracing::info!(workflow = %workflow.name, connection = %queue.connection, source = %queue.source, "Consuming.");
    loop {
        // A free slot first: with every slot waiting for the store, nothing
        // more is taken from the broker.
        let permit = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            permit = Arc::clone(slots).acquire_owned() => permit.map_err(|e| e.to_string())?,
        };
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            delivery = consumer.next() => delivery.map_err(|e| e.to_string())?,
        };
        let engine = Arc::clone(engine);
        let workflow = Arc::clone(workflow);
        let wake = Arc::clone(wake_workers);
        let state = state.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            accept(&engine, &workflow, delivery, &wake, &state, &stop).await;
            drop(permit);
        });
    }
}

/// Commits one delivery's run (or recognises it), then settles it.
async fn accept(
    engine: &Engine,
    workflow: &Workflow,
    delivery: Delivery,
    wake_workers: &Notify,
    state: &crate::connections::ConsumerHandle,
    shutdown: &CancellationToken,
) {
    let Trigger::Queue(queue) = &workflow.trigger else {
        return;
    };
    let limit = usize::try_from(engine.project().config.serve.body_limit).unwrap_or(usize::MAX);
    let (mut trigger, mut rejected) = document(queue, &delivery, limit);
    let fallback = Dedupe {
        key: identity(&delivery),
        expires_at: now_ms()
            .saturating_add(i64::try_from(queue.window.as_millis()).unwrap_or(i64::MAX)),
    };
    let mut wait = FIRST_BACKOFF;
    let outcome = loop {
        match engine
            .enqueue_with(workflow, trigger.clone(), Some(fallback.clone()))
            .await
        {
            Ok(_) => break "accepted",
            Err(crate::EngineError::Store(StoreError::Duplicate { .. })) => break "duplicate",
            Err(crate::EngineError::Store(e)) if e.is_transient() => {
                let message = engine.redact(&e.to_string());
                if state.paused(&message) {
                    tracing::warn!(workflow = %workflow.name, error = %message, "The store cannot commit queued messages; they are not acknowledged, consumption pauses, and each is tried again until it commits.");
                }
                tokio::select! {
                    // Unacked, the broker keeps it for the next consumer.
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                delivery.acker.in_progress().await;
                wait = (wait * 2).min(MAX_COMMIT_WAIT);
            }
            Err(e) if !rejected => {
                // The store refuses this record for good (it cannot be
                // stored as it is): it becomes a failed run of its own,
                // without its body, so it is a visible dead letter and its
                // slot is freed, instead of a message redelivered forever.
                let message = engine.redact(&e.to_string());
                tracing::error!(workflow = %workflow.name, error = %message, "A queued message could not be stored as it is; it is recorded as a failed run without its body.");
                trigger = refused_document(queue, &delivery, &message);
                rejected = true;
            }
            Err(e) => {
                // Even the failed run could not be stored: keep the message
                // (unacked, its slot held) and try again later, as for a
                // store that cannot commit.
                let message = engine.redact(&e.to_string());
                if state.paused(&message) {
                    tracing::error!(workflow = %workflow.name, error = %message, "A queued message cannot be recorded even as a failed run; it is not acknowledged and is tried again.");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                delivery.acker.in_progress().await;
                wait = (wait * 2).min(MAX_COMMIT_WAIT);
            }
        }
    };
    if state.resumed() {
        tracing::info!(workflow = %workflow.name, "The store commits again; consuming.");
    }
    if outcome == "accepted" {
        wake_workers.notify_one();
    }
    let settled = if rejected {
        delivery.acker.reject().await
    } else {
        delivery.acker.ack().await
    };
    let outcome = if rejected && outcome == "accepted" {
        "rejected"
    } else {
        outcome
    };
    metrics::counter!("plumb_queue_messages_total", "workflow" => workflow.name.clone(), "outcome" => outcome).increment(1);
    if let Err(e) = settled {
        // Committed, so the redelivery that follows is recognised.
        tracing::warn!(workflow = %workflow.name, error = %engine.redact(&e.to_string()), "A committed message could not be acknowledged; the broker will redeliver it and it will be recognised.");
    }
}

/// The trigger document of a delivery, and whether it is rejected.
fn document(queue: &QueueTrigger, delivery: &Delivery, limit: usize) -> (Value, bool) {
    let mut message = Map::new();
    message.insert(
        "id".into(),
        delivery.id.clone().map_or(Value::Null, Value::String),
    );
    message.insert("source".into(), Value::String(delivery.source.clone()));
    message.insert("headers".into(), Value::Object(delivery.headers.clone()));
    message.insert("redelivered".into(), Value::Bool(delivery.redelivered));
    let problem = if delivery.body.len() > limit {
        Some(format!(
            "the body is {} bytes; a message body is at most {} (`serve.body_limit`)",
            delivery.body.len(),
            plumb_core::limits::human_bytes(limit)
        ))
    } else {
        match plumb_core::limits::parse_json(&delivery.body, "the message body") {
            Err(e) => Some(format!("the body is {e}")),
            Ok(body) => {
                let broken = queue.schema.as_ref().and_then(|contract| {
                    let violations = contract.violations_without_values(&body);
                    (!violations.is_empty()).then(|| {
                        format!(
                            "the body breaks the contract {}",
                            plumb_core::contract::summary(contract, &violations)
                        )
                    })
                });
                if broken.is_none() {
                    message.insert("body".into(), body);
                }
                broken
            }
        }
    };
    let mut doc = Map::new();
    doc.insert("type".into(), json!("queue"));
    doc.insert("connection".into(), Value::String(queue.connection.clone()));
    if let Some(why) = &problem {
        message.insert("body".into(), Value::Null);
        // A body within the size limit (not JSON, or breaking the
        // contract) is kept whole; a larger one, its first MAX_RAW_BYTES.
        let keep = if delivery.body.len() <= limit {
            delivery.body.len()
        } else {
            delivery.body.len().min(MAX_RAW_BYTES)
        };
        let raw = &delivery.body[..keep];
        let (raw, encoding) = match std::str::from_utf8(raw) {
            Ok(text) => (text.to_owned(), "text"),
            Err(_) => {
                use base64::Engine as _;
                (
                    base64::engine::general_purpose::STANDARD.encode(raw),
                    "base64",
                )
            }
        };
        message.insert("raw".into(), Value::String(raw));
        message.insert("raw_encoding".into(), json!(encoding));
        message.insert("raw_bytes".into(), json!(delivery.body.len()));
        doc.insert("rejected".into(), Value::String(why.clone()));
    }
    doc.insert("message".into(), Value::Object(message));
    (Value::Object(doc), problem.is_some())
}

/// The trigger document of a message the store refused to keep as it
/// was: its id, source and the reason, nothing of its body.
fn refused_document(queue: &QueueTrigger, delivery: &Delivery, why: &str) -> Value {
    json!({
        "type": "queue",
        "connection": queue.connection,
        "rejected": format!("the store refused it ({why})"),
        "message": {
            "id": delivery.id,
            "source": delivery.source,
            "headers": {},
            "redelivered": delivery.redelivered,
            "body": null,
            "raw_bytes": delivery.body.len(),
        },
    })
}

/// The delivery's identity as a dedupe key: the broker's message id, or a
/// digest of what it carried (where the broker has no id that survives a
/// redelivery: MQTT, AMQP without `message_id`). Two messages identical in
/// source, headers and body within the window are then one; a publisher
/// that sends such twice on purpose sets an id, or the trigger a `dedupe`
/// key.
fn identity(delivery: &Delivery) -> String {
    let mut digest = sha2::Sha256::new();
    match &delivery.id {
        Some(id) => {
            digest.update(b"id\0");
            digest.update(id.as_bytes());
        }
        None => {
            digest.update(b"content\0");
            digest.update(delivery.source.as_bytes());
            digest.update(b"\0");
            // Broker-added headers that change on a redelivery are left out.
            for (name, value) in &delivery.headers {
                if matches!(
                    name.to_ascii_lowercase().as_str(),
                    "x-delivery-count" | "x-death" | "redelivered" | "delivery_count"
                ) {
                    continue;
                }
                digest.update(name.as_bytes());
                digest.update(b"\0");
                digest.update(value.to_string().as_bytes());
                digest.update(b"\0");
            }
            digest.update(&delivery.body);
        }
    }
    hex::encode(digest.finalize())
}
