//! The Redis connector: `publish` steps add an entry to a stream with
//! `XADD`, made idempotent by the step's key. A Lua script (atomic on the
//! server) looks the key up, adds the entry and records the key with the
//! entry's id in one step, so a step retried or resumed after a crash finds
//! its entry instead of adding a second one. Keys are remembered for
//! [`REMEMBER`]. Every entry carries the key in its
//! `plumb-idempotency-key` field, for consumers that dedupe themselves.
//!
//! Connections are opened on first use (a `ConnectionManager`, which
//! reconnects on its own) and shared by every step of the connection.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sha2::Digest;

use crate::ActionError;

/// How long a published key is remembered: a re-send within it is
/// answered with the first entry's id.
pub const REMEMBER: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest message body, as JSON text.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

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

/// One message to publish.
pub struct Message<'a> {
    /// The connection's name, for messages.
    pub connection: &'a str,
    /// The full URL, password included: never shown.
    pub url: &'a str,
    /// Timeout of connecting and of the command.
    pub timeout: Duration,
    /// The stream.
    pub to: &'a str,
    /// The body, as JSON text.
    pub body: &'a str,
    /// Extra fields.
    pub headers: &'a [(String, String)],
    /// The step's idempotency key.
    pub key: &'a str,
}

impl RedisClients {
    async fn client(
        &self,
        message: &Message<'_>,
    ) -> Result<redis::aio::ConnectionManager, ActionError> {
        let id = format!(
            "{}:{}",
            message.connection,
            hex::encode(sha2::Sha256::digest(message.url.as_bytes()))
        );
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
    pub fn reset(&self) {
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
    /// [`MAX_BODY_BYTES`].
    pub async fn publish(&self, message: &Message<'_>) -> Result<Value, ActionError> {
        if message.body.len() > MAX_BODY_BYTES {
            return Err(ActionError::Permanent {
                message: format!(
                    "the message is {} bytes; a published body is at most {MAX_BODY_BYTES}",
                    message.body.len()
                ),
                status: None,
            });
        }
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
            .map_err(|_| ActionError::Retryable {
                message: format!(
                    "Redis did not answer within {} s (the entry may have been added: its key makes the retry safe)",
                    message.timeout.as_secs_f64()
                ),
                status: None,
                retry_after: None,
            })?
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
