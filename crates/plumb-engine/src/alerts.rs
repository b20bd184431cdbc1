//! Delivering failure alerts from the store's outbox.
//!
//! A failed run's alerts are committed with the failure itself; this module
//! sends them through the channel's http connection, retries with backoff,
//! and after [`MAX_ATTEMPTS`] marks them failed so `plumb status` shows them.
//! Nothing is dropped silently. Each alert carries its id as
//! `Idempotency-Key`, so a receiver can drop a re-delivery.

use std::sync::Arc;
use std::time::Duration;

use plumb_connectors::http::{HttpRequest, same_origin};
use plumb_core::model::{AlertChannel, Connection};
use plumb_store::{Alert, AlertAttempt, StoreError, now_ms};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// Delivery attempts before an alert is marked failed (spread over about an
/// hour and a half by the backoff).
pub const MAX_ATTEMPTS: u32 = 14;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// Per-attempt timeout.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a deliverer holds an alert while it sends it: longer than any
/// send may take ([`SEND_LIMIT`]), so no other process sends it meanwhile;
/// if the deliverer dies, the alert is due again after it.
const CLAIM_HOLD: Duration = Duration::from_secs(120);

/// The longest one send may take, whatever the connection's timeout.
const SEND_LIMIT: Duration = Duration::from_secs(90);

/// The wait after `attempts` failed attempts: 2 s, 4 s, 8 s … up to 15 min.
#[must_use]
pub fn backoff(attempts: u32) -> Duration {
    let secs = 1_u64.checked_shl(attempts.min(20)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Sends the alerts due now — all of them, or only those of `only_run` —
/// and returns how many were delivered. Stops early when `stop` fires.
///
/// # Errors
///
/// Returns the store error if the outbox cannot be read or updated.
pub async fn deliver_due(
    engine: &Engine,
    only_run: Option<&str>,
    stop: Option<&CancellationToken>,
) -> Result<usize, StoreError> {
    let due = engine.store.due_alerts(now_ms(), 100).await?;
    let mut delivered = 0;
    for alert in due {
        if stop.is_some_and(CancellationToken::is_cancelled) {
            break;
        }
        if only_run.is_some_and(|r| r != alert.run_id) {
            continue;
        }
        // This attempt is this process's alone: another process's
        // deliverer finds it not due until the hold ends.
        let now = now_ms();
        let hold = i64::try_from(CLAIM_HOLD.as_millis()).unwrap_or(i64::MAX / 4);
        if !engine
            .store
            .claim_alert(&alert.id, alert.attempts, now, now.saturating_add(hold))
            .await?
        {
            continue;
        }
        let sent = match stop {
            Some(stop) => tokio::select! {
                () = stop.cancelled() => break,
                r = send(engine, &alert) => r,
            },
            None => send(engine, &alert).await,
        };
        let result = match sent {
            Ok(()) => AlertAttempt::Delivered,
            Err(error) if alert.attempts + 1 >= MAX_ATTEMPTS => {
                tracing::error!(alert = %alert.id, run_id = %alert.run_id, channel = %alert.channel, error, "Giving up on an alert; it stays listed by `plumb status`.");
                AlertAttempt::GaveUp { error }
            }
            Err(error) => {
                let wait = backoff(alert.attempts + 1);
                tracing::warn!(alert = %alert.id, channel = %alert.channel, error, retry_in_s = wait.as_secs(), "Alert not delivered; retrying.");
                AlertAttempt::RetryAt {
                    error,
                    at: now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 4),
                }
            }
        };
        // `false`: another deliverer (a second process) recorded this attempt
        // first; its result stands. The receiver sees the same
        // Idempotency-Key for both sends.
        let recorded = engine
            .store
            .record_alert_attempt(&alert.id, alert.attempts, &result)
            .await?;
        if recorded && result == AlertAttempt::Delivered {
            delivered += 1;
        }
    }
    Ok(delivered)
}

async fn send(engine: &Engine, alert: &Alert) -> Result<(), String> {
    let project = engine.project();
    let Some(AlertChannel::Http {
        connection,
        method,
        path,
    }) = project.config.alerts.get(&alert.channel)
    else {
        return Err(format!(
            "the alert channel `{}` is no longer defined in plumb.yaml",
            alert.channel
        ));
    };
    let Some(Connection::Http(http)) = project.config.connections.get(connection) else {
        return Err(format!(
            "the connection `{connection}` is no longer defined in plumb.yaml"
        ));
    };
    let base = http.base_url.as_str().trim_end_matches('/');
    let url = url::Url::parse(&format!("{base}{path}")).map_err(|e| e.to_string())?;
    if !same_origin(&url, &http.base_url) {
        return Err(format!(
            "the alert path `{path}` leaves the connection's host"
        ));
    }
    let mut headers = http.headers.clone();
    // An alert channel's connection authenticates like any other.
    let secrets = engine.secrets();
    let mut credential_header = None;
    if let Some(auth) = &http.auth {
        let (name, value) = crate::exec::auth_header(&secrets, connection, auth)
            .map_err(|e| engine.redact(&e.to_string()))?;
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        credential_header = Some(name.clone());
        headers.push((name, value));
    }
    headers.push(("Idempotency-Key".to_owned(), format!("alert:{}", alert.id)));
    let request = engine.http.send(HttpRequest {
        method: method.clone(),
        url,
        headers,
        body: Some(alert.payload.clone()),
        timeout: http.timeout.unwrap_or(TIMEOUT),
        expect_status: None,
        credential_header,
        scrub: Some(crate::secrets::scrubber(Arc::clone(&secrets))),
    });
    // Whatever the connection's timeout, a send ends well within the hold
    // this process took on the alert.
    match tokio::time::timeout(SEND_LIMIT, request).await {
        Ok(sent) => sent
            .map(|_| ())
            .map_err(|e| secrets.redactor().redact(&e.to_string()).into_owned()),
        Err(_) => Err(format!(
            "the alert channel did not answer within {} s",
            SEND_LIMIT.as_secs()
        )),
    }
}

/// Delivers alerts until `shutdown`: whenever woken (a run failed here) and
/// at least every second (for retries and other processes' failures).
pub async fn run_delivery(engine: Arc<Engine>, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = deliver_due(&engine, None, Some(&shutdown)).await {
            tracing::warn!(error = %e, "Could not read or update the alert outbox.");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
        let total: Duration = (1..MAX_ATTEMPTS).map(backoff).sum();
        assert!(
            total > Duration::from_secs(3600),
            "retries span over an hour: {total:?}"
        );
    }
}
