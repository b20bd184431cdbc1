//! `POST /hooks/<path>`: accept an event durably, or say why not.
//!
//! Order of checks: unknown path (404), size (413; a body that does not
//! arrive within [`BODY_TIMEOUT`] is 408), the sender's signature or bearer
//! secret (401, checked over the raw bytes before anything is parsed),
//! content type (415), the body itself (400: not JSON or form data, or
//! nested deeper than [`plumb_core::limits::MAX_DEPTH`]), then the commit.
//!
//! Only a committed run gets `202`. The whole answer is bounded: if the
//! store cannot commit within [`crate::COMMIT_DEADLINE`] the answer is
//! `503` with `Retry-After`. A write that has not started by then is
//! skipped; one whose commit was still in progress (a stalled disk) and
//! lands afterwards is withdrawn by the store — its run is cancelled as
//! "withdrawn" — so the sender's retry is the only run of that event
//! (unless the process dies in between: then it runs twice, never zero
//! times).
//!
//! Bodies are JSON (`application/json`, `application/*+json`) or form data
//! (`application/x-www-form-urlencoded`, as GitHub's default webhooks and
//! Slack's commands send): form fields become an object, repeated fields a
//! list, and a `payload` field holding JSON is decoded.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use plumb_core::limits::{self, LimitError, ParseError};
use plumb_core::model::{Trigger, WebhookAuth, Workflow};
use plumb_store::NewAuditEntry;
use serde_json::{Map, Value, json};

use crate::auth::audit_failure;
use crate::{AppState, COMMIT_DEADLINE, error::ApiError, signature};

/// How long a sender may take to send its body.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
        Ok(Accepted::Run(run_id)) => {
            (StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response()
        }
        // Another delivery of an event already accepted: nothing runs, and
        // the sender learns which run the first one started.
        Ok(Accepted::Duplicate(run_id)) => {
            (StatusCode::OK, Json(json!({ "duplicate_of": run_id }))).into_response()
        }
        Err(e) => e.into_response(),
    };
    metrics::counter!(
        "plumb_webhook_responses_total",
        "code" => response.status().as_str().to_owned(),
    )
    .increment(1);
    response
}

/// What became of an event.
pub(crate) enum Accepted {
    /// It started this run, committed.
    Run(String),
    /// An event with the same dedupe key already started this run.
    Duplicate(String),
}

async fn accept(
    state: &AppState,
    path: &str,
    query: BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
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
    let bytes = read_body(body, project.config.serve.body_limit).await?;
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
    let parsed = match media_type(content_type) {
        Media::Json => limits::parse_json(&bytes, "the body").map_err(parse_error)?,
        Media::Form => form_body(&bytes)?,
        Media::Other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "webhooks take JSON or form data: send `Content-Type: application/json` or `application/x-www-form-urlencoded` (got `{}`)",
                    if content_type.is_empty() {
                        "none"
                    } else {
                        content_type
                    }
                ),
            ));
        }
    };
    if let Err(e) = keeps_contract(state, workflow, &parsed) {
        metrics::counter!(
            "plumb_webhook_contract_violations_total",
            "workflow" => workflow.name.clone(),
        )
        .increment(1);
        return Err(e);
    }
    let trigger = trigger_document(path, parsed, &query, headers);
    enqueue(state, workflow, trigger).await
}

/// Holds a run's input (a webhook body, a manual run's input) to the
/// workflow's contract: a document that breaks it is a `400` listing the
/// violations (each message passed through the redactor) and starts
/// nothing.
pub(crate) fn keeps_contract(
    state: &AppState,
    workflow: &Workflow,
    input: &Value,
) -> Result<(), ApiError> {
    let Some(contract) = workflow.input_contract() else {
        return Ok(());
    };
    let mut violations = contract.violations(input);
    if violations.is_empty() {
        return Ok(());
    }
    for v in &mut violations {
        v.message = state.engine.redact(&v.message);
    }
    tracing::info!(workflow = %workflow.name, schema = contract.path(), violations = violations.len(), "Refused a document that breaks the workflow's contract.");
    Err(ApiError::contract_violation(
        format!(
            "the body does not match {} ({} violation{}{})",
            contract.path(),
            violations.len(),
            if violations.len() == 1 { "" } else { "s" },
            if violations.len() == plumb_core::contract::MAX_VIOLATIONS {
                ", the first ones"
            } else {
                ""
            }
        ),
        violations,
    ))
}

/// Reads a body of at most `limit` bytes within [`BODY_TIMEOUT`].
pub(crate) async fn read_body(body: Body, limit: u64) -> Result<axum::body::Bytes, ApiError> {
    let max = usize::try_from(limit).unwrap_or(usize::MAX);
    match tokio::time::timeout(BODY_TIMEOUT, to_bytes(body, max)).await {
        Ok(read) => read.map_err(|e| body_error(&e, limit)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A body that is not a document plumb can keep: `400`, naming the limit
/// or the position of the syntax error.
pub(crate) fn parse_error(e: ParseError) -> ApiError {
    match e {
        ParseError::Limit(limit) => limit_error(&limit),
        ParseError::Json { .. } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is {e}"),
        ),
    }
}

/// A document over a documented limit: `400` (too deep) or `413`.
pub(crate) fn limit_error(e: &LimitError) -> ApiError {
    match e {
        LimitError::TooDeep { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "too_deep", e.to_string())
        }
        LimitError::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            e.to_string(),
        ),
    }
}

/// Form fields as an object: a repeated field becomes a list, and a
/// `payload` field that holds JSON (GitHub, Slack) is decoded.
fn form_body(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut fields = Map::new();
    for (name, value) in url::form_urlencoded::parse(bytes) {
        let value = Value::String(value.into_owned());
        match fields.get_mut(name.as_ref()) {
            Some(Value::Array(list)) => list.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
            None => {
                fields.insert(name.into_owned(), value);
            }
        }
    }
    if let Some(Value::String(payload)) = fields.get("payload") {
        let trimmed = payload.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            let decoded = limits::parse_json(payload.as_bytes(), "the `payload` field").map_err(
                |e| match e {
                    ParseError::Limit(l) => limit_error(&l),
                    ParseError::Json { .. } => ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_json",
                        format!("the `payload` field is {e}"),
                    ),
                },
            )?;
            fields.insert("payload".to_owned(), decoded);
        }
    }
    Ok(Value::Object(fields))
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

/// Commits a run of `workflow`, answering within [`COMMIT_DEADLINE`] and
/// a little: the deadline travels with the write (the store applies it
/// before then or not at all), and a commit still in progress when the
/// answer is due is withdrawn by the store if it lands (see the module
/// docs). A `503` therefore never leaves a run behind that will execute.
pub(crate) async fn enqueue(
    state: &AppState,
    workflow: &Workflow,
    trigger: Value,
) -> Result<Accepted, ApiError> {
    let deadline = std::time::Instant::now() + COMMIT_DEADLINE;
    // Longer than the store's own grace after the deadline, so that the
    // store decides "committed" or "not" and this timeout only guards
    // against a store that does not answer at all.
    let answer = tokio::time::timeout(
        COMMIT_DEADLINE + std::time::Duration::from_secs(1),
        state.engine.enqueue_run(workflow, trigger, Some(deadline)),
    )
    .await;
    match answer {
        Ok(Ok(run_id)) => {
            state.wake_workers.notify_one();
            Ok(Accepted::Run(run_id))
        }
        Ok(Err(plumb_engine::EngineError::Store(plumb_store::StoreError::Duplicate {
            run_id,
        }))) => {
            metrics::counter!(
                "plumb_webhook_duplicates_total",
                "workflow" => workflow.name.clone(),
            )
            .increment(1);
            Ok(Accepted::Duplicate(run_id))
        }
        Ok(Err(e)) => {
            tracing::warn!(workflow = %workflow.name, error = %e, "The event was not committed; answering 503.");
            Err(e.into())
        }
        Err(_) => {
            tracing::warn!(workflow = %workflow.name, "The store did not commit in time; answering 503.");
            Err(ApiError::unavailable(
                "the store did not commit in time; retry later",
            ))
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

/// What a webhook body is, by its content type.
#[derive(Debug, PartialEq, Eq)]
enum Media {
    Json,
    Form,
    Other,
}

fn media_type(content_type: &str) -> Media {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"))
    {
        Media::Json
    } else if media == "application/x-www-form-urlencoded" {
        Media::Form
    } else {
        Media::Other
    }
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
    fn content_types_are_recognised() {
        assert_eq!(media_type("application/json"), Media::Json);
        assert_eq!(media_type("application/json; charset=utf-8"), Media::Json);
        assert_eq!(media_type("application/vnd.github+json"), Media::Json);
        assert_eq!(media_type("text/plain"), Media::Other);
        assert_eq!(media_type(""), Media::Other);
        assert_eq!(
            media_type("application/x-www-form-urlencoded; charset=utf-8"),
            Media::Form
        );
    }

    #[test]
    fn form_fields_become_an_object_with_payload_decoded() {
        let body =
            form_body(b"payload=%7B%22action%22%3A%22opened%22%2C%22n%22%3A1%7D&x=1&x=2&empty=")
                .expect("form");
        assert_eq!(
            body,
            json!({"payload": {"action": "opened", "n": 1}, "x": ["1", "2"], "empty": ""})
        );
        // Slack's slash commands: plain fields, no payload.
        let body = form_body(b"command=%2Fdeploy&text=api+v2").expect("form");
        assert_eq!(body, json!({"command": "/deploy", "text": "api v2"}));
        let deep = format!("payload={}", "%5B".repeat(100));
        let err = form_body(deep.as_bytes()).expect_err("too deep");
        assert_eq!(err.code, "too_deep");
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
