//! `/api/v1`: workflows, runs, the dead-letter list, cancel and status;
//! plus `/healthz`, `/readyz` and `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use plumb_core::model::Trigger;
use plumb_engine::manual_trigger;
use plumb_store::{RunFilter, RunStatus};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::{Admin, Auth, Operator, Viewer};
use crate::error::ApiError;

/// Routes under `/api/v1`.
pub fn routes() -> axum::Router<AppState> {
    Router::new()
        .route("/workflows", get(workflows))
        .route("/workflows/{name}/runs", post(start_run))
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(show_run))
        .route("/runs/{id}/cancel", post(cancel_run))
        .route("/trace/{key}", get(trace))
        .route("/dlq", get(dead_letters))
        .route("/dlq/replay", post(replay_all))
        .route("/dlq/{id}/replay", post(replay_one))
        .route("/status", get(status))
        .route("/workers", get(workers))
        .route("/secrets", get(list_secrets).post(set_secret))
        .route(
            "/secrets/{name}",
            axum::routing::put(rotate_secret).delete(delete_secret),
        )
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/deployments", post(deploy))
        .route("/audit", get(audit))
        .route("/audit/verify", get(audit_verify))
}

/// `GET /healthz`: the process is up. `store` identifies the store it
/// serves (a hash, not the path), so a CLI can tell its project's server
/// from another one on the same address.
///
/// With `?challenge=C` it also proves it serves that store: `proof` is an
/// HMAC of `C` under the store's instance secret, which only someone who
/// can read the store file knows. The CLI checks it before it sends a
/// token.
pub async fn healthz(
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Json<Value> {
    let mut doc = json!({
        "status": "ok",
        "service": "plumb",
        "version": env!("CARGO_PKG_VERSION"),
        "store": state.store_id,
    });
    if let Some(challenge) = q.get("challenge").filter(|c| c.len() <= 128) {
        doc["proof"] = json!(plumb_vault::healthz_proof(
            &state.instance_secret,
            challenge
        ));
    }
    Json(doc)
}

/// `GET /readyz`: the store can commit now.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.engine.store().ping()).await {
        Ok(Ok(())) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Not ready: the store cannot commit.");
            ApiError::unavailable("the store cannot commit right now").into_response()
        }
        Err(_) => ApiError::unavailable("the store did not commit in time").into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn workflows(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let project = state.engine.project();
    let cursors = if project
        .workflows
        .iter()
        .any(|w| w.cursor.is_some() || w.polls_with_cursor())
    {
        state.engine.store().cursors().await?
    } else {
        Vec::new()
    };
    let list: Vec<Value> = project
        .workflows
        .iter()
        .map(|w| {
            let trigger = match &w.trigger {
                Trigger::Manual => json!({ "type": "manual" }),
                Trigger::Webhook { path, auth, schema, dedupe } => json!({ "type": "webhook", "path": format!("/hooks/{path}"), "authenticated": auth.is_some(), "schema": schema.as_ref().map(plumb_core::contract::Contract::path), "dedupe": dedupe.as_ref().map(|d| json!({ "key": d.source, "window_seconds": d.window.as_secs() })) }),
                Trigger::Poll(p) => json!({ "type": "poll", "every_seconds": p.every.as_secs_f64(), "connection": p.http.connection, "method": p.http.method, "batch": p.batch, "remember_seconds": p.remember.as_secs() }),
                Trigger::Queue(q) => json!({ "type": "queue", "connection": q.connection, "broker": q.kind.name(), q.kind.source_field(): q.source, "group": q.group_for(&w.name), "prefetch": q.prefetch, "schema": q.schema.as_ref().map(plumb_core::contract::Contract::path), "dedupe": q.dedupe.as_ref().map(|d| json!({ "key": d.source, "window_seconds": d.window.as_secs() })), "window_seconds": q.window.as_secs() }),
                Trigger::Schedule { cron, timezone, catch_up } => {
                    json!({ "type": "schedule", "cron": cron, "timezone": timezone, "catch_up": catch_up })
                }
            };
            json!({
                "name": w.name,
                "owner": w.owner,
                "description": w.description,
                "version": w.version,
                "file": w.file,
                "trigger": trigger,
                "concurrency": w.concurrency,
                "steps": w.all_steps().iter().map(|s| json!({"id": s.id, "kind": s.action.kind()})).collect::<Vec<_>>(),
                "cursor": (w.cursor.is_some() || w.polls_with_cursor()).then(|| {
                    cursors
                        .iter()
                        .find(|c| c.workflow == w.name)
                        .map_or_else(plumb_engine::status::cursor_never_moved, plumb_engine::status::cursor_json)
                }),
            })
        })
        .collect();
    Ok(Json(json!({ "workflows": list })))
}

async fn start_run(
    _auth: Auth<Operator>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let project = state.engine.project();
    let Some(workflow) = project.workflow(&name) else {
        return Err(ApiError::not_found(format!("no workflow named `{name}`")));
    };
    let bytes = crate::webhook::read_body(body, project.config.serve.body_limit).await?;
    let input: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        plumb_core::limits::parse_json(&bytes, "the input").map_err(crate::webhook::parse_error)?
    };
    crate::webhook::keeps_contract(&state, workflow, &input)?;
    match crate::webhook::enqueue(&state, workflow, manual_trigger(input)).await? {
        crate::webhook::Accepted::Run(id) => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": id }))).into_response())
        }
        crate::webhook::Accepted::Duplicate(id) => {
            Ok((StatusCode::OK, Json(json!({ "duplicate_of": id }))).into_response())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    workflow: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

fn parse_status(s: Option<&str>) -> Result<Option<RunStatus>, ApiError> {
    s.map(|s| {
        RunStatus::parse(s).map_err(|_| {
            ApiError::bad_request(format!(
                "unknown status `{s}`; use queued, running, succeeded, failed or cancelled"
            ))
        })
    })
    .transpose()
}

async fn list_runs(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let runs = state
        .engine
        .store()
        .list_runs(&RunFilter {
            workflow: q.workflow,
            status: parse_status(q.status.as_deref())?,
            limit: q.limit.unwrap_or(50).min(1000),
        })
        .await?;
    Ok(Json(json!({ "runs": runs })))
}

async fn show_run(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.engine.store();
    let Some(run) = store.run(&id).await? else {
        return Err(ApiError::not_found(format!("no run with id `{id}`")));
    };
    let steps = store.journal(&id).await?;
    let attempts = store.attempt_failures(&id).await?;
    Ok(Json(
        json!({ "run": run, "steps": steps, "failed_attempts": attempts }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct TraceQuery {
    workflow: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/trace/<key>`: every run, step and item that touched a
/// business record, oldest first (`plumb trace`).
async fn trace(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(q): Query<TraceQuery>,
) -> Result<Json<Value>, ApiError> {
    if key.is_empty() || key.len() > plumb_store::lineage::MAX_RECORD_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "a record key is 1 to {} bytes",
            plumb_store::lineage::MAX_RECORD_KEY_BYTES
        )));
    }
    let limit = q.limit.unwrap_or(1000).min(plumb_store::lineage::MAX_TRACE);
    let events = state
        .engine
        .trace(&key, q.workflow.as_deref(), limit)
        .await?;
    Ok(Json(json!({ "record_key": key, "events": events })))
}

#[derive(Debug, Default, Deserialize)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_run(
    auth: Auth<Operator>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> Result<Json<Value>, ApiError> {
    let reason = body
        .and_then(|b| b.0.reason)
        .unwrap_or_else(|| "cancelled through the API".to_owned());
    let result = state
        .engine
        .store()
        .cancel_run(&id, &reason, &auth.actor())
        .await?;
    match result {
        plumb_store::CancelResult::NotFound => {
            Err(ApiError::not_found(format!("no run with id `{id}`")))
        }
        other => Ok(Json(json!({ "run_id": id, "result": other }))),
    }
}

async fn dead_letters(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100_u32);
    let letters = plumb_engine::ops::dead_letters(
        state.engine.store().as_ref(),
        q.get("workflow").map(String::as_str),
        limit,
    )
    .await?;
    Ok(Json(json!({ "dead_letters": letters })))
}

async fn replay_one(
    auth: Auth<Operator>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let result = state.engine.store().replay_run(&id, &auth.actor()).await?;
    match result {
        plumb_store::ReplayResult::NotFound => {
            Err(ApiError::not_found(format!("no run with id `{id}`")))
        }
        plumb_store::ReplayResult::NotFailed(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_failed",
            format!("run {id} is {status}; only failed runs can be replayed"),
        )),
        plumb_store::ReplayResult::Replayed => {
            state.wake_workers.notify_one();
            Ok(Json(json!({ "run_id": id, "result": "replayed" })))
        }
    }
}

#[derive(Debug, Deserialize)]
struct ReplayAll {
    workflow: String,
}

async fn replay_all(
    auth: Auth<Operator>,
    State(state): State<AppState>,
    Json(body): Json<ReplayAll>,
) -> Result<Json<Value>, ApiError> {
    let replayed =
        plumb_engine::ops::replay_all(state.engine.store().as_ref(), &body.workflow, &auth.actor())
            .await?;
    state.wake_workers.notify_waiters();
    Ok(Json(
        json!({ "workflow": body.workflow, "replayed": replayed }),
    ))
}

async fn status(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let project = state.engine.project();
    let mut status = plumb_engine::status::collect(state.engine.store().as_ref(), &project).await?;
    // This process's own consumers as they are now, not as of its last
    // heartbeat.
    let me = state.engine.owner().as_str().to_owned();
    status.connections.retain(|c| c.process != me);
    status
        .connections
        .extend(state.engine.connections().into_iter().map(|state| {
            plumb_engine::status::ConnectionStatus {
                process: me.clone(),
                state,
            }
        }));
    status
        .verdict
        .problems
        .retain(|p| !matches!(p.kind.as_str(), "broker_unreachable" | "queue_paused"));
    status.verdict.healthy = status.verdict.problems.is_empty();
    plumb_engine::status::connection_problems(&mut status.verdict, &status.connections);
    Ok(Json(
        serde_json::to_value(status).map_err(|e| ApiError::internal(&e))?,
    ))
}

async fn workers(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let (now, live) = plumb_engine::status::live_processes(state.engine.store().as_ref()).await?;
    Ok(Json(json!({ "now": now, "workers": live })))
}

async fn list_secrets(
    _auth: Auth<Viewer>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let uses = state.engine.project().secret_uses();
    let secrets: Vec<Value> = state
        .engine
        .store()
        .list_secrets()
        .await?
        .into_iter()
        .map(|m| {
            json!({
                "name": m.name,
                "created_at": m.created_at,
                "rotated_at": m.rotated_at,
                "key_id": m.key_id,
                "used_by": uses.get(&m.name).cloned().unwrap_or_default(),
            })
        })
        .collect();
    Ok(Json(json!({ "secrets": secrets })))
}

#[derive(Deserialize)]
struct SecretBody {
    name: Option<String>,
    value: String,
}

async fn write_secret(
    state: &AppState,
    actor: &str,
    name: &str,
    value: String,
    mode: plumb_store::SecretWrite,
) -> Result<Json<Value>, ApiError> {
    if !plumb_core::load::is_identifier(name) {
        return Err(ApiError::bad_request(
            "secret names are letters, digits and `_`, starting with a letter or `_`",
        ));
    }
    if value.chars().count() < plumb_engine::secrets::MIN_SECRET_LEN {
        return Err(ApiError::bad_request(format!(
            "the value is shorter than {} characters",
            plumb_engine::secrets::MIN_SECRET_LEN
        )));
    }
    let key = state.engine.master_key().map_err(|why| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_master_key",
            format!("this server has no master key: {why}"),
        )
    })?;
    let key_fingerprint = key.fingerprint();
    let sealed = key.seal(name, &plumb_vault::SecretValue::new(value));
    let result = state
        .engine
        .store()
        .put_secret(name, &plumb_engine::secrets::to_store(sealed), mode, actor)
        .await?;
    let answer = match result {
        plumb_store::SecretWriteResult::Created => "created",
        plumb_store::SecretWriteResult::Rotated => "rotated",
        plumb_store::SecretWriteResult::AlreadyExists => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "exists",
                format!("the secret `{name}` exists; rotate it with PUT /api/v1/secrets/{name}"),
            ));
        }
        plumb_store::SecretWriteResult::KeyMismatch { stored } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "key_retired",
                plumb_engine::secrets::SecretsError::KeyRetired {
                    current: key_fingerprint,
                    stored,
                }
                .to_string(),
            ));
        }
        plumb_store::SecretWriteResult::NotFound => {
            return Err(ApiError::not_found(format!("no secret named `{name}`")));
        }
    };
    if let Err(e) = state.engine.load_secrets().await {
        tracing::warn!(error = %e, "Secrets changed but could not be reloaded.");
    }
    Ok(Json(json!({ "name": name, "result": answer })))
}

async fn set_secret(
    auth: Auth<Admin>,
    State(state): State<AppState>,
    Json(body): Json<SecretBody>,
) -> Result<Json<Value>, ApiError> {
    let name = body
        .name
        .ok_or_else(|| ApiError::bad_request("give the secret's `name` and `value`"))?;
    write_secret(
        &state,
        &auth.actor(),
        &name,
        body.value,
        plumb_store::SecretWrite::Create,
    )
    .await
}

async fn rotate_secret(
    auth: Auth<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<SecretBody>,
) -> Result<Json<Value>, ApiError> {
    write_secret(
        &state,
        &auth.actor(),
        &name,
        body.value,
        plumb_store::SecretWrite::Rotate,
    )
    .await
}

async fn delete_secret(
    auth: Auth<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let users = state
        .engine
        .project()
        .secret_uses()
        .remove(&name)
        .unwrap_or_default();
    let force = q.get("force").is_some_and(|v| v == "true");
    if !users.is_empty() && !force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "the secret `{name}` is used by {}; remove those uses first, or pass ?force=true",
                users.join(", ")
            ),
        ));
    }
    if !state
        .engine
        .store()
        .delete_secret(&name, &auth.actor())
        .await?
    {
        return Err(ApiError::not_found(format!("no secret named `{name}`")));
    }
    let _ = state.engine.load_secrets().await;
    Ok(Json(json!({ "name": name, "result": "deleted" })))
}

async fn list_tokens(
    _auth: Auth<Admin>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.engine.store().list_tokens().await?;
    Ok(Json(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
struct TokenBody {
    name: String,
    role: plumb_store::Role,
}

async fn create_token(
    auth: Auth<Admin>,
    State(state): State<AppState>,
    Json(body): Json<TokenBody>,
) -> Result<Response, ApiError> {
    let token = plumb_vault::new_api_token();
    let record = plumb_store::ApiToken {
        id: uuid_like(),
        name: body.name.clone(),
        role: body.role,
        created_at: plumb_store::now_ms(),
        revoked_at: None,
    };
    let created = state
        .engine
        .store()
        .create_token(&record, &plumb_vault::token_hash(&token), &auth.actor())
        .await?;
    if !created {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!(
                "a token named `{}` exists; revoke it or choose another name",
                body.name
            ),
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": body.name, "role": body.role, "token": token.as_str() })),
    )
        .into_response())
}

fn uuid_like() -> String {
    // 128 random bits, hex: an id only, not a credential.
    let token = plumb_vault::new_api_token();
    plumb_vault::token_hash(&token)[..32].to_owned()
}

async fn revoke_token(
    auth: Auth<Admin>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state
        .engine
        .store()
        .revoke_token(&name, &auth.actor())
        .await?
    {
        return Err(ApiError::not_found(format!(
            "no active token named `{name}`"
        )));
    }
    Ok(Json(json!({ "name": name, "result": "revoked" })))
}

/// `POST /api/v1/deployments` (admin): deploy the project files as they
/// are on disk, exactly like SIGHUP; `422` with every problem when they do
/// not check, and the running project is unchanged.
async fn deploy(auth: Auth<Admin>, State(state): State<AppState>) -> Result<Response, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = crate::DeployRequest {
        actor: auth.actor(),
        reply,
    };
    let unavailable = || {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "deploy_unavailable",
            "this process cannot reload the project now; try again, or send SIGHUP",
        );
        e.retry_after = Some(5);
        e
    };
    if state
        .deploy
        .send_timeout(request, Duration::from_secs(5))
        .await
        .is_err()
    {
        return Err(unavailable());
    }
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(Ok(deployed))) => Ok(Json(json!({ "result": "deployed", "workflows": deployed.workflows, "changed": deployed.changed })).into_response()),
        Ok(Ok(Err(rejected))) => Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": { "code": "invalid_project", "message": rejected.message, "diagnostics": rejected.diagnostics } })),
        )
            .into_response()),
        Ok(Err(_)) | Err(_) => Err(unavailable()),
    }
}

async fn audit(
    _auth: Auth<Admin>,
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let after = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0_i64);
    let limit = q
        .get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_u32)
        .min(1000);
    let entries = state.engine.store().audit_entries(after, limit).await?;
    Ok(Json(json!({ "entries": entries })))
}

async fn audit_verify(
    _auth: Auth<Admin>,
    State(state): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let anchors = q
        .iter()
        .filter(|(k, _)| k == "anchor")
        .map(|(_, v)| plumb_engine::ops::parse_anchor(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad_request)?;
    Ok(Json(
        match plumb_engine::ops::verify_audit(state.engine.store().as_ref(), &anchors).await? {
            Ok(v) => json!({
                "ok": true, "entries": v.entries, "head": v.head,
                "anchor": format!("{}:{}", v.head_seq, v.head),
            }),
            Err(problem) => {
                json!({ "ok": false, "problem": problem, "message": problem.to_string() })
            }
        },
    ))
}
