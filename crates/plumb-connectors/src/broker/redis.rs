//! Redis Streams.
//!
//! **Publishing**: a `publish` step adds an entry to a stream with
//! `XADD`, made idempotent by the step's key. A Lua script (atomic on the
//! server) looks the key up, adds the entry and records the key with the
//! entry's id in one step, so a step retried or resumed after a crash finds
//! its entry instead of adding a second one. Keys are remembered for
//! [`REMEMBER`]. Every entry carries the key in its
//! `plumb-idempotency-key` field, for consumers that dedupe themselves.
//!
//! Connections are opened on first use (a `ConnectionManager`, which
//! reconnects on its own) and shared by every step of the connection.
//!
//! **Consuming**: a consumer group (created at the start of the stream,
//! with the stream, if missing), read with `XREADGROUP` on a connection of
//! its own (a blocking read would hold up the acks), each entry
//! acknowledged with `XACK` once its run is committed. Entries a dead
//! consumer took and never acknowledged are taken over with `XAUTOCLAIM`
//! once idle for [`CLAIM_IDLE`]; an entry's id is its identity, so one
//! taken over after its run was committed is recognised and only acked.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{Acker, BrokerError, Consumer, ConsumerSpec, Delivery, Message};
use crate::ActionError;

/// How long a published key is remembered: a re-send within it is
/// answered with the first entry's id.
pub const REMEMBER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Looks up the key (KEYS[2]); otherwise adds the entry to the stream
/// (KEYS[1]) with the field/value pairs ARGV[2..] and records the key with
/// the entry's id for ARGV[1] seconds. Returns `{id, 1 if it was there}`.
const PUBLISH: &str = r"
local done = redis.call('GET', KEYS[2])
if done then return {done, 1} end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[1]))
return {id, 0}
";

/// Connections by connection name and URL.
#[derive(Default)]
pub struct RedisClients {
    clients: std::sync::Mutex<HashMap<String, redis::aio::ConnectionManager>>,
}

impl std::fmt::Debug for RedisClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisClients")
    }
}

impl RedisClients {
    async fn client(
        &self,
        message: &Message<'_>,
    ) -> Result<redis::aio::ConnectionManager, ActionError> {
        let id = message.client_id();
        if let Some(c) = self.clients.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(c);
        }
        // Never quote the URL: it may hold the password.
        let client = redis::Client::open(message.url).map_err(|_| ActionError::Permanent {
            message: format!(
                "the URL of connection `{}` is not a valid Redis URL",
                message.connection
            ),
            status: None,
        })?;
        let manager = tokio::time::timeout(message.timeout, client.get_connection_manager())
            .await
            .map_err(|_| ActionError::Retryable {
                message: format!(
                    "cannot reach the Redis server of connection `{}` within {} s",
                    message.connection,
                    message.timeout.as_secs_f64()
                ),
                status: None,
                retry_after: None,
            })?
            .map_err(|e| classify(message.connection, &e))?;
        // Two first steps at once may both connect: the last one is kept.
        if let Ok(mut clients) = self.clients.lock() {
            let prefix = format!("{}:", message.connection);
            clients.retain(|k, _| !k.starts_with(&prefix));
            clients.insert(id, manager.clone());
        }
        Ok(manager)
    }

    /// Forgets every connection (a reload or shutdown).
    pub(super) fn reset(&self) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.clear();
        }
    }

    /// Adds `message` to its stream once per idempotency key; the step's
    /// output is `{stream, id, already_published}`.
    ///
    /// # Errors
    ///
    /// Retryable when the server cannot be reached, is loading or busy;
    /// permanent for a refused password, a key of another type, a body over
    /// [`super::MAX_BODY_BYTES`].
    pub(super) async fn publish(&self, message: &Message<'_>) -> Result<Value, ActionError> {
        let mut manager = self.client(message).await?;
        let script = redis::Script::new(PUBLISH);
        let mut invocation = script.key(message.to);
        invocation
            .key(format!("plumb:published:{}", message.key))
            .arg(REMEMBER.as_secs())
            .arg("body")
            .arg(message.body)
            .arg(plumb_core::model::IDEMPOTENCY_FIELD)
            .arg(message.key);
        for (name, value) in message.headers {
            invocation.arg(name).arg(value);
        }
        let call = invocation.invoke_async::<(String, i64)>(&mut manager);
        let (id, again) = tokio::time::timeout(message.timeout, call)
            .await
            .map_err(|_| message.timed_out("Redis"))?
            .map_err(|e| classify(message.connection, &e))?;
        Ok(serde_json::json!({
            "stream": message.to,
            "id": id,
            "already_published": again == 1,
        }))
    }
}

/// What a Redis error means for the step.
fn classify(connection: &str, e: &redis::RedisError) -> ActionError {
    use redis::{ErrorKind, RetryMethod};
    let permanent = matches!(e.kind(), ErrorKind::AuthenticationFailed)
        || matches!(e.retry_method(), RetryMethod::NoRetry);
    if permanent {
        ActionError::Permanent {
            message: format!("connection `{connection}`: {e}"),
            status: None,
        }
    } else {
        ActionError::Retryable {
            message: format!("connection `{connection}`: {e}"),
            status: None,
            retry_after: None,
        }
    }
}

/// How long an entry taken by another consumer stays unacknowledged before
/// this one takes it over: far longer than a commit takes, so a live
/// consumer's entries are not taken from it (and if they were, the store's
/// dedupe makes the second taker only ack).
pub const CLAIM_IDLE: Duration = Duration::from_secs(15);
/// How often this consumer looks for entries to take over.
const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// How long one `XREADGROUP` blocks.
const BLOCK_MS: u64 = 1000;

/// One stream entry as it came, its field names and values as bytes: a
/// field name that is not UTF-8 must not make a whole batch unreadable
/// (it would be read again and again).
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The elements of an array reply (nothing for nil or anything else).
fn items(value: redis::Value) -> Vec<redis::Value> {
    match value {
        redis::Value::Array(items) | redis::Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// A string reply's bytes.
fn bytes(value: redis::Value) -> Option<Vec<u8>> {
    match value {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.into_bytes()),
        redis::Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// A string reply as text.
fn text(value: redis::Value) -> Option<String> {
    bytes(value).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `[[id, [field, value, …]], …]`; an entry deleted while pending comes
/// as `[id, nil]` and reads as one without fields (a failed run, acked).
fn entries(value: redis::Value) -> Vec<Entry> {
    items(value)
        .into_iter()
        .filter_map(|entry| {
            let mut parts = items(entry).into_iter();
            let id = parts.next().and_then(text)?;
            let mut flat = parts.next().map(items).unwrap_or_default().into_iter();
            let mut fields = Vec::new();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                if let (Some(name), Some(value)) = (bytes(name), bytes(value)) {
                    fields.push((name, value));
                }
            }
            Some(Entry { id, fields })
        })
        .collect()
}

/// A consumer group member on one stream.
struct StreamConsumer {
    spec: ConsumerSpec,
    reader: redis::aio::MultiplexedConnection,
    acks: redis::aio::MultiplexedConnection,
    /// Entries to hand out, each with whether it was delivered before.
    ready: std::collections::VecDeque<(Entry, bool)>,
    last_claim: std::time::Instant,
    claim_from: String,
    /// First this member's own pending entries (taken before a restart),
    /// from this id on; then (`None`) new ones (`>`).
    own_pending: Option<String>,
}

pub(super) async fn consume(spec: &ConsumerSpec) -> Result<Box<dyn Consumer>, BrokerError> {
    let client = redis::Client::open(spec.url.as_str()).map_err(|_| {
        BrokerError(format!(
            "the URL of connection `{}` is not a valid Redis URL",
            spec.connection
        ))
    })?;
    let fail = |e: redis::RedisError| BrokerError(format!("connection `{}`: {e}", spec.connection));
    // The reader blocks for BLOCK_MS at a time: its answers may take that
    // long.
    let reader_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(spec.timeout))
        .set_response_timeout(Some(spec.timeout + Duration::from_millis(BLOCK_MS)));
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(spec.timeout))
        .set_response_timeout(Some(spec.timeout));
    let mut reader = client
        .get_multiplexed_async_connection_with_config(&reader_config)
        .await
        .map_err(fail)?;
    let acks = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(fail)?;
    // From the start of the stream ("0"): messages added before plumb first
    // ran are consumed, not skipped.
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&spec.source)
        .arg(&spec.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut reader)
        .await;
    match created {
        Ok(()) => {}
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(fail(e)),
    }
    Ok(Box::new(StreamConsumer {
        spec: spec.clone(),
        reader,
        acks,
        ready: std::collections::VecDeque::new(),
        last_claim: std::time::Instant::now()
            .checked_sub(CLAIM_EVERY)
            .unwrap_or_else(std::time::Instant::now),
        claim_from: "0-0".into(),
        own_pending: Some("0".into()),
    }))
}

impl StreamConsumer {
    fn fail(&self, e: &redis::RedisError) -> BrokerError {
        BrokerError(format!("connection `{}`: {e}", self.spec.connection))
    }

    /// Takes over entries idle in dead consumers, a batch at a time.
    async fn claim(&mut self) -> Result<(), BrokerError> {
        self.last_claim = std::time::Instant::now();
        let reply: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.spec.source)
            .arg(&self.spec.group)
            .arg(&self.spec.member)
            .arg(u64::try_from(CLAIM_IDLE.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.claim_from)
            .arg("COUNT")
            .arg(self.spec.prefetch)
            .query_async(&mut self.reader)
            .await
            .map_err(|e| self.fail(&e))?;
        // [next start id, [entries], [deleted ids]]
        let parts = items(reply);
        let mut parts = parts.into_iter();
        if let Some(next) = parts.next().and_then(text) {
            self.claim_from = next;
        }
        let claimed = parts.next().map(entries).unwrap_or_default();
        self.ready
            .extend(claimed.into_iter().map(|entry| (entry, true)));
        Ok(())
    }

    async fn read(&mut self) -> Result<(), BrokerError> {
        let from = self.own_pending.clone().unwrap_or_else(|| ">".into());
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.spec.group)
            .arg(&self.spec.member)
            .arg("COUNT")
            .arg(self.spec.prefetch);
        if self.own_pending.is_none() {
            command.arg("BLOCK").arg(BLOCK_MS);
        }
        command.arg("STREAMS").arg(&self.spec.source).arg(from);
        let reply: redis::Value = command
            .query_async(&mut self.reader)
            .await
            .map_err(|e| self.fail(&e))?;
        // [[stream, [entries]]] (nil when BLOCK timed out)
        let entries: Vec<Entry> = items(reply)
            .into_iter()
            .flat_map(|stream| {
                items(stream)
                    .into_iter()
                    .nth(1)
                    .map(entries)
                    .unwrap_or_default()
            })
            .collect();
        let again = self.own_pending.is_some();
        if again {
            // Pending entries stay pending until acked: go on after the last.
            self.own_pending = entries.last().map(|e| e.id.clone());
        }
        self.ready
            .extend(entries.into_iter().map(|entry| (entry, again)));
        Ok(())
    }

    fn delivery(&self, entry: Entry, redelivered: bool) -> Delivery {
        let mut body = Vec::new();
        let mut headers = Vec::new();
        for (field, value) in entry.fields {
            if field == b"body" {
                body = value;
            } else {
                headers.push((
                    String::from_utf8_lossy(&field).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                ));
            }
        }
        headers.sort();
        Delivery {
            id: Some(entry.id.clone()),
            body,
            headers: super::bounded_headers(headers),
            source: self.spec.source.clone(),
            redelivered,
            acker: Box::new(EntryAcker {
                connection: self.acks.clone(),
                stream: self.spec.source.clone(),
                group: self.spec.group.clone(),
                id: entry.id,
                name: self.spec.connection.clone(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Consumer for StreamConsumer {
    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        loop {
            if let Some((entry, again)) = self.ready.pop_front() {
                return Ok(self.delivery(entry, again));
            }
            if self.last_claim.elapsed() >= CLAIM_EVERY {
                self.claim().await?;
                continue;
            }
            self.read().await?;
        }
    }
}

/// `XACK` of one entry.
struct EntryAcker {
    connection: redis::aio::MultiplexedConnection,
    stream: String,
    group: String,
    id: String,
    name: String,
}

#[async_trait::async_trait]
impl Acker for EntryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.id)
            .query_async(&mut connection)
            .await
            .map_err(|e| BrokerError(format!("connection `{}`: {e}", self.name)))?;
        Ok(())
    }

    async fn reject(&self) -> Result<(), BrokerError> {
        // A stream has no dead-letter place: the failed run keeps the entry.
        self.ack().await
    }
}
