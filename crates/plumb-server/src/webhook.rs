//! `POST /hooks/<path>`: accept an event durably, or say why not.
//!
//! Order of checks: unknown path (404), size (413), the sender's signature
//! or bearer secret (401, checked over the raw bytes before anything is
//! parsed), content type (415), JSON (400), then the commit. Only a committed run gets `202`; if the
//! store cannot commit within [`crate::COMMIT_DEADLINE`] the answer is `503`
//! with `Retry-After`, and the write is withdrawn if it has not started (the
//! store skips writes whose caller gave up).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use plumb_core::model::{Trigger, WebhookAuth, Workflow};
use plumb_store::NewAuditEntry;
use serde_json::{Map, Value, json};

use crate::auth::audit_failure;
use crate::{AppState, COMMIT_DEADLINE, error::ApiError, signature};

/// Request headers never copied into the trigger document (and so never
/// journaled): credentials a sender might use.
const DROPPED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// Handles one webhook.
pub async fn receive(
    State(state): State<AppState>,
    Path(path): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match accept(&state, &path, query, &headers, body).await {
        Ok(run_id) => (StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response(),
        Err(e) => e.into_response(),
    };
    metrics::counter!(
        "plumb_webhook_responses_total",
        "code" => response.status().as_str().to_owned(),
    )
    .increment(1);
    response
}

async fn accept(
    state: &AppState,
    path: &str,
    query: BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<String, ApiError> {
    let project = state.engine.project();
    let path = path.trim_matches('/');
    let Some(workflow) = project
        .workflows
        .iter()
        .find(|w| matches!(&w.trigger, Trigger::Webhook { path: p, .. } if p == path))
    else {
        return Err(ApiError::not_found(format!(
            "no workflow is triggered by POST /hooks/{path}"
        )));
    };
    let limit = project.config.serve.body_limit;
    let bytes = to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|e| body_error(&e, limit))?;
    if let Trigger::Webhook {
        auth: Some(auth), ..
    } = &workflow.trigger
    {
        authenticate(state, workflow, auth, headers, &bytes).await?;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "webhooks take JSON: send `Content-Type: application/json` (got `{}`)",
                if content_type.is_empty() {
                    "none"
                } else {
                    content_type
                }
            ),
        ));
    }
    let parsed: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let trigger = trigger_document(path, parsed, &query, headers);
    enqueue(state, workflow, trigger).await
}

/// Checks the sender. A refusal is a `401` that creates no run, and is
/// audited (rate-limited).
async fn authenticate(
    state: &AppState,
    workflow: &Workflow,
    auth: &WebhookAuth,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let secrets = state.engine.secrets();
    let Some(secret) = secrets.get(auth.secret()) else {
        // A configuration fault, not the sender's: 503 so a retrying sender
        // delivers the event once an operator sets the secret.
        tracing::error!(workflow = %workflow.name, secret = auth.secret(), "A webhook names a secret that is not set; answering 503. Fix: plumb secrets set NAME");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "misconfigured",
            "this webhook cannot verify senders right now",
        );
        e.retry_after = Some(60);
        return Err(e);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    match signature::verify(auth, secret.expose(), headers, body, now) {
        Ok(()) => Ok(()),
        Err(why) => {
            tracing::warn!(workflow = %workflow.name, reason = %why, "Webhook refused: the sender is not authenticated.");
            audit_failure(
                state,
                format!("webhook.auth_failed|{}|{}", workflow.name, why.kind()),
                NewAuditEntry::new(
                    "webhook:anonymous",
                    "webhook.auth_failed",
                    &workflow.name,
                    json!({ "reason": why.to_string() }),
                ),
            );
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("the sender is not authenticated: {why}"),
            );
            e.www_authenticate = matches!(auth, WebhookAuth::Bearer { .. });
            Err(e)
        }
    }
}

async fn enqueue(
    state: &AppState,
    workflow: &Workflow,
    trigger: Value,
) -> Result<String, ApiError> {
    // The deadline travels with the write: the store commits it before then
    // or not at all, and this handler always waits for the store's answer,
    // so a 503 always means "not committed" and a 202 always "committed".
    let deadline = std::time::Instant::now() + COMMIT_DEADLINE;
    match state
        .engine
        .enqueue_run(workflow, trigger, Some(deadline))
        .await
    {
        Ok(run_id) => {
            state.wake_workers.notify_one();
            Ok(run_id)
        }
        Err(e) => {
            tracing::warn!(workflow = %workflow.name, error = %e, "The event was not committed; answering 503.");
            Err(e.into())
        }
    }
}

/// A body that could not be read: too large (413), or cut off (400).
pub(crate) fn body_error(e: &axum::Error, limit: u64) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than the limit of {limit} bytes (serve.body_limit)"),
            );
        }
        source = err.source();
    }
    ApiError::bad_request(format!("the body could not be read: {e}"))
}

fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

fn trigger_document(
    path: &str,
    body: Value,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Value {
    let mut kept = Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if DROPPED_HEADERS.contains(&name) {
            continue;
        }
        kept.insert(
            name.to_owned(),
            Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
        );
    }
    json!({
        "type": "webhook",
        "path": path,
        "body": body,
        "headers": kept,
        "query": query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/vnd.github+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }

    #[test]
    fn credentials_are_not_copied_into_the_trigger() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer secret".parse().expect("header"));
        headers.insert("x-github-event", "push".parse().expect("header"));
        let doc = trigger_document("orders", json!({"a": 1}), &BTreeMap::new(), &headers);
        assert!(doc["headers"].get("authorization").is_none());
        assert_eq!(doc["headers"]["x-github-event"], "push");
        assert_eq!(doc["body"]["a"], 1);
    }
}
