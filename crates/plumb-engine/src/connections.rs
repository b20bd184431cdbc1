//! The live state of this process's broker connections: for each queue
//! consumer, whether it is connected, since when it has been reconnecting
//! and why, and whether the store has paused it. `plumb status`, the API
//! and `/metrics` show it per connection (the worst of its consumers), and
//! each process reports it with its heartbeat so a status read from the
//! store sees every process's connections.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use plumb_store::{Millis, now_ms};
use serde::{Deserialize, Serialize};

/// How long a connection must have stayed up for its next loss to start
/// the reconnect backoff from the beginning again.
const STABLE_MS: i64 = 30_000;

/// The longest last error kept.
const MAX_ERROR_BYTES: usize = 1024;

/// One consumer's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// The connection it uses.
    pub connection: String,
    /// The workflow it feeds.
    pub workflow: String,
    /// `connected`, `connecting`, `reconnecting` or `paused` (connected,
    /// but not taking messages because the store cannot commit).
    pub state: String,
    /// Since when it has been in that state.
    pub since: Millis,
    /// The last error (redacted), if any.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<Millis>,
}

/// Every consumer of this process.
#[derive(Debug, Default)]
pub struct Connections {
    consumers: Arc<Mutex<BTreeMap<(String, String), ConsumerState>>>,
}

impl Connections {
    /// The handle through which the consumer of `workflow` on `connection`
    /// reports; it starts as `connecting`.
    pub(crate) fn consumer(&self, connection: &str, workflow: &str) -> ConsumerHandle {
        let key = (connection.to_owned(), workflow.to_owned());
        if let Ok(mut map) = self.consumers.lock() {
            map.insert(
                key.clone(),
                ConsumerState {
                    connection: connection.to_owned(),
                    workflow: workflow.to_owned(),
                    state: "connecting".into(),
                    since: now_ms(),
                    last_error: None,
                    last_error_at: None,
                },
            );
        }
        ConsumerHandle {
            consumers: Arc::clone(&self.consumers),
            key,
        }
    }

    /// Forgets consumers of workflows no longer consumed (after a reload).
    pub(crate) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        if let Ok(mut map) = self.consumers.lock() {
            map.retain(|(c, w), _| keep(c, w));
        }
    }

    /// Every consumer's state, by connection then workflow.
    #[must_use]
    pub fn snapshot(&self) -> Vec<ConsumerState> {
        self.consumers
            .lock()
            .map(|map| map.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// A consumer's way to report its state.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerHandle {
    consumers: Arc<Mutex<BTreeMap<(String, String), ConsumerState>>>,
    key: (String, String),
}

impl ConsumerHandle {
    fn update(&self, f: impl FnOnce(&mut ConsumerState)) {
        if let Ok(mut map) = self.consumers.lock()
            && let Some(state) = map.get_mut(&self.key)
        {
            f(state);
        }
    }

    fn set(&self, state: &str, error: Option<&str>) {
        self.update(|s| {
            if s.state != state {
                s.state = state.to_owned();
                s.since = now_ms();
            }
            if let Some(error) = error {
                // A broker's error may quote a whole reply: keep its start.
                let mut error = error.to_owned();
                if error.len() > MAX_ERROR_BYTES {
                    let mut cut = MAX_ERROR_BYTES;
                    while !error.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    error.truncate(cut);
                    error.push('…');
                }
                s.last_error = Some(error);
                s.last_error_at = Some(now_ms());
            }
        });
    }

    /// Subscribed.
    pub(crate) fn connected(&self) {
        self.set("connected", None);
    }

    /// Lost the broker (or could not reach it).
    pub(crate) fn reconnecting(&self, error: &str) {
        self.set("reconnecting", Some(error));
    }

    /// The store could not commit a message; true if that newly paused it
    /// (so it is said once, not once per message).
    pub(crate) fn paused(&self, error: &str) -> bool {
        let mut newly = false;
        self.update(|s| newly = s.state != "paused");
        self.set("paused", Some(error));
        newly
    }

    /// A message was committed: if the store had paused it, no longer
    /// (true if it was paused).
    pub(crate) fn resumed(&self) -> bool {
        let mut was = false;
        self.update(|s| {
            if s.state == "paused" {
                was = true;
                s.state = "connected".into();
                s.since = now_ms();
            }
        });
        was
    }

    /// Whether it had been connected long enough that its loss starts a
    /// fresh backoff.
    pub(crate) fn was_connected_long(&self) -> bool {
        let mut stable = false;
        self.update(|s| stable = s.state == "connected" && now_ms() - s.since >= STABLE_MS);
        stable
    }
}
