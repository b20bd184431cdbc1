//! `plumb demo`: the whole service on loopback in a temporary directory —
//! an embedded store, a mock upstream that fails some requests, a few
//! events — so a retry, a dead letter and an alert can be seen within
//! seconds. Ctrl-C stops it and removes the directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use plumb_engine::{Engine, Observer, RunEvent};
use plumb_server::{Roles, Service};
use plumb_store::{RunStatus, Store};
use serde_json::{Value, json};

use crate::Exit;
use crate::cli::Global;
use crate::output::Style;

fn plumb_yaml(listen: &str, upstream: &str) -> String {
    format!(
        r#"# The demo project, written by `plumb demo`.
store: sqlite://plumb.db
listen: {listen}
connections:
  shop:
    http:
      base_url: {upstream}/shop
      timeout: 5s
  chat:
    http:
      base_url: {upstream}/chat
alerts:
  ops:
    http: {{ connection: chat, path: /alerts }}
defaults:
  retry: {{ attempts: 4, backoff: exponential, initial: 300ms, max: 2s }}
serve:
  workers: 8
"#
    )
}

const ORDERS_YAML: &str = r#"name: orders
owner: demo@example.com
description: |
  Takes an order from a webhook, shapes it and creates it in the shop.
  The demo shop fails one request in three (retried) and rejects negative
  totals (a dead letter, and an alert to the `ops` channel).
trigger:
  webhook: { path: orders }
alerts:
  on_failure: [ops]
steps:
  - id: check
    assert:
      condition: "${{ .trigger.body.total | type == \"number\" }}"
      message: "the order has no numeric total"
  - id: shape
    jq: '{id: .trigger.body.id, total: .trigger.body.total, currency: (.trigger.body.currency // "EUR")}'
  - id: create
    http:
      connection: shop
      method: POST
      path: /orders
      body: "${{ .steps.shape }}"
  - id: receipt
    jq: '"order \(.steps.shape.id) created as \(.steps.create.body.order_id)"'
"#;

const HEARTBEAT_YAML: &str = r#"name: heartbeat
owner: demo@example.com
description: Fires every 15 seconds to show schedules (and that a slot fires once).
trigger:
  schedule: { cron: "*/15 * * * * *", timezone: UTC }
steps:
  - id: beat
    jq: '"tick at \(.trigger.scheduled_at)"'
"#;

/// The demo's flaky shop and its alert inbox.
async fn start_upstream(style: Style) -> anyhow::Result<String> {
    let counter = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/shop/orders",
            post(move |Json(order): Json<Value>| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if n.is_multiple_of(3) {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(json!({"error": "the shop is busy"})),
                        )
                            .into_response();
                    }
                    if order["total"].as_f64().is_some_and(|t| t < 0.0) {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            Json(json!({"error": "total must not be negative"})),
                        )
                            .into_response();
                    }
                    (
                        StatusCode::CREATED,
                        Json(json!({"order_id": format!("SHOP-{n:04}")})),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/chat/alerts",
            post(move |Json(alert): Json<Value>| async move {
                println!(
                    "  {} alert to #ops: workflow {} run {} failed at step {}: {}",
                    style.bad("⚑"),
                    alert["workflow"].as_str().unwrap_or("?"),
                    alert["run_id"].as_str().unwrap_or("?"),
                    alert["step"].as_str().unwrap_or("?"),
                    alert["error"].as_str().unwrap_or("?"),
                );
                StatusCode::NO_CONTENT
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

/// Prints runs as they end, and retries as they happen.
struct DemoObserver {
    style: Style,
}

impl Observer for DemoObserver {
    fn on_event(&self, event: &RunEvent) {
        let s = self.style;
        match event {
            RunEvent::StepRetrying {
                step_id,
                attempt,
                error,
                delay,
                ..
            } => println!(
                "  {} step {step_id} attempt {attempt} failed ({error}); retrying in {} ms",
                s.warn("↻"),
                delay.as_millis()
            ),
            RunEvent::Finished {
                run_id,
                status: RunStatus::Succeeded,
                elapsed,
                ..
            } => {
                println!(
                    "  {} run {run_id} succeeded in {} ms",
                    s.ok("✓"),
                    elapsed.as_millis()
                );
            }
            RunEvent::Finished {
                run_id, failure, ..
            } => println!(
                "  {} run {run_id} failed at step {}: {} → in the dead-letter list",
                s.bad("✗"),
                failure
                    .as_ref()
                    .and_then(|f| f.step.clone())
                    .unwrap_or_default(),
                failure
                    .as_ref()
                    .map(|f| f.message.clone())
                    .unwrap_or_default(),
            ),
            _ => {}
        }
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(global: &Global) -> anyhow::Result<Exit> {
    let style = Style::detect();
    let dir = tempfile::Builder::new().prefix("plumb-demo-").tempdir()?;
    let root = dir.path().to_owned();
    let upstream = start_upstream(style).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port for the demo")?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(root.join("workflows"))?;
    std::fs::write(
        root.join("plumb.yaml"),
        plumb_yaml(&addr.to_string(), &upstream),
    )?;
    std::fs::write(root.join("workflows/orders.yaml"), ORDERS_YAML)?;
    std::fs::write(root.join("workflows/heartbeat.yaml"), HEARTBEAT_YAML)?;

    let project = Arc::new(
        plumb_engine::project_dir::load_project(&root)
            .map_err(|e| anyhow::anyhow!("the demo project is invalid: {e}"))?,
    );
    let location = super::store_location(&project.config, &root)?;
    let store = super::open_store(&project.config, &root).await?;
    let store_dyn: Arc<dyn Store> = store.clone();
    let engine = Arc::new(Engine::new(store_dyn, Arc::clone(&project), "serve")?);
    super::load_secrets(&engine, &root).await?;
    let mut signals = super::serve::Signals::new()?;
    let service = Service::start(
        Arc::clone(&engine),
        Some(listener),
        Roles {
            http: true,
            scheduler: true,
        },
        Arc::new(DemoObserver { style }),
        &location.display_name(),
    )
    .await?;
    let base = format!("http://{addr}");
    let p = root.display();
    println!("{}", style.bold("plumb demo"));
    println!("  server      {base} (store: {p}/plumb.db)");
    println!("  upstream    {upstream} (a mock shop that fails one request in three)");
    println!("\nsending 5 orders to POST {base}/hooks/orders; one has a negative total…\n");

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    for (id, total) in [
        ("o-1", 20.0),
        ("o-2", 35.5),
        ("o-3", -5.0),
        ("o-4", 12.0),
        ("o-5", 50.0),
    ] {
        let answer = client
            .post(format!("{base}/hooks/orders"))
            .json(&json!({ "id": id, "total": total }))
            .send()
            .await;
        match answer {
            Ok(r) => {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                println!("  → order {id} (total {total}): {status} {body}");
            }
            Err(e) => println!("  → order {id}: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Commands that work as printed for someone who started the demo with
    // `cargo run`: `plumb` is not on their PATH, and the API needs a token.
    let token =
        super::secrets::create_token(store.as_ref(), "demo", plumb_store::Role::Operator, "demo")
            .await?
            .context("creating the demo's API token")?;
    let bin = std::env::current_exe()
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|_| "plumb".to_owned());
    let project = shell_quote(&p.to_string());
    let plumb = format!("{bin} --project {project}");
    let auth = format!("-H 'Authorization: Bearer {}'", token.as_str());
    println!(
        "\nwhile it runs, try (in another terminal):\n  {plumb} status\n  {plumb} runs list\n  {plumb} dlq list\n  {plumb} dlq replay --all --workflow orders\n  curl -s {auth} {base}/api/v1/status\n  curl -s {base}/metrics | grep plumb_\n  curl -s -X POST {base}/hooks/orders -H 'content-type: application/json' -d '{{\"id\": \"o-9\", \"total\": 9}}'\n\nthe API token above (role operator) lasts as long as the demo; Ctrl-C (or SIGTERM) stops the demo and removes {p}.\n"
    );
    if global.json {
        println!(
            "{}",
            json!({ "event": "demo_ready", "server": base, "project": p.to_string(), "binary": bin, "token": token.as_str() })
        );
    }

    signals.stop().await;
    println!("\nstopping…");
    service.shutdown().await;
    store.close().await;
    drop(dir);
    println!("demo stopped; its directory is removed");
    Ok(Exit::Success)
}

/// `text` as one shell word: as is when it is plain, single-quoted
/// otherwise.
fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}
