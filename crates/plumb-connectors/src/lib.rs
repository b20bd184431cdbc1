//! plumb's connectors: the code that talks to the outside world, one module
//! per connection kind.
//!
//! A connector performs one effect once and says what happened, classifying
//! its own failures as [`ActionError::Retryable`] or
//! [`ActionError::Permanent`]. It does not retry, journal, template or
//! schedule: the engine owns all of that. Connectors see only plain request
//! values, never workflow files, expressions or the store.

pub mod broker;
pub mod http;
pub mod sql;

use std::time::Duration;

/// Why an effect did not succeed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActionError {
    /// A transient failure: 5xx, 429, 408, a timeout, a refused or reset
    /// connection. The engine retries with backoff (or after `retry_after`).
    #[error("{message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// HTTP status, when there was a response.
        status: Option<u16>,
        /// How long the other side asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// A failure that will repeat: 4xx, a bad URL, a redirect off the
    /// connection's host, a response too large to keep.
    #[error("{message}")]
    Permanent {
        /// What went wrong.
        message: String,
        /// HTTP status, when there was a response.
        status: Option<u16>,
    },
}

impl ActionError {
    /// The same error with its message rewritten (context added).
    #[must_use]
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            Self::Retryable {
                message,
                status,
                retry_after,
            } => Self::Retryable {
                message: f(message),
                status,
                retry_after,
            },
            Self::Permanent { message, status } => Self::Permanent {
                message: f(message),
                status,
            },
        }
    }

    /// Whether the engine should try again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The HTTP status, if the failure had one.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Retryable { status, .. } | Self::Permanent { status, .. } => *status,
        }
    }

    /// The wait the other side asked for, if any.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Retryable { retry_after, .. } => *retry_after,
            Self::Permanent { .. } => None,
        }
    }
}
