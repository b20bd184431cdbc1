//! A fast loopback HTTP sink for the webhook benchmarks, speaking the subset
//! of `../shared/bench/peers/sink.py`'s API the harness uses, so plumb, n8n
//! and Node-RED all deliver to the same receiver in one run:
//!
//! * `POST <any path>` with a JSON body holding `"id"` → `200 {"ok":true}`,
//!   counted by id (duplicates counted separately) and by idempotency key;
//!   a body `{"records": [{"id": …}, …]}` (a batch) counts each record's id;
//! * `GET /records?limit=L&total=T[&cursor=C]` → a page of a cursor-paginated
//!   API over T records (W7): `{"data": [...L records], "next_cursor": C'}`,
//!   `next_cursor` null on the last page; pages served are counted;
//! * `?delay_ms=N` on any of them: the answer comes N ms later;
//! * `GET /stats` → counters and first/last delivery times;
//! * `POST /reset`, `GET /health`.
//!
//! Usage: `bench-sink [PORT]` (default 9999). Listens on 127.0.0.1 only.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::any;
use serde_json::{Value, json};

#[derive(Default)]
struct Counters {
    ids: HashMap<String, u32>,
    keys: HashMap<String, u32>,
    accepted: u64,
    bad: u64,
    first_ts: Option<f64>,
    last_ts: Option<f64>,
    /// Records received in batches.
    records: u64,
    /// Pages of `/records` served.
    pages: u64,
}

type Shared = Arc<Mutex<Counters>>;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Json<Value> {
    // `?delay_ms=N`: answer N ms later, like a slow upstream (the W3
    // benchmark); the request is counted when it arrives.
    let delay = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    let answer = record(&state, &method, &uri, &headers, &body);
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    answer
}

fn record(
    state: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Json<Value> {
    let path = uri.path();
    let Ok(mut c) = state.lock() else {
        return Json(json!({"error": "poisoned"}));
    };
    match (method.as_str(), path) {
        ("GET", "/records") => {
            c.pages += 1;
            drop(c);
            Json(records_page(uri.query().unwrap_or("")))
        }
        ("GET", "/health") => Json(json!({"ok": true})),
        ("POST", "/reset") => {
            *c = Counters::default();
            Json(json!({"ok": true}))
        }
        ("GET", "/stats") => {
            let dup_ids = c.ids.values().filter(|n| **n > 1).count();
            let duplicate_deliveries: u64 = c.ids.values().map(|n| u64::from(n - 1)).sum();
            let resent_keys: u64 = c.keys.values().map(|n| u64::from(n - 1)).sum();
            Json(json!({
                "accepted": c.accepted,
                "bad": c.bad,
                "deliveries": c.accepted,
                "unique": c.ids.len(),
                "duplicate_deliveries": duplicate_deliveries,
                "dup_ids": dup_ids,
                "keys": c.keys.len(),
                "resent_keys": resent_keys,
                "first_ts": c.first_ts,
                "last_ts": c.last_ts,
                "records": c.records,
                "pages": c.pages,
            }))
        }
        _ => {
            let ts = now();
            c.accepted += 1;
            c.first_ts.get_or_insert(ts);
            c.last_ts = Some(ts);
            let doc = serde_json::from_slice::<Value>(body).ok();
            if let Some(batch) = doc
                .as_ref()
                .and_then(|v| v.get("records"))
                .and_then(Value::as_array)
            {
                for record in batch {
                    let id = match record.get("id") {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) => n.to_string(),
                        _ => {
                            c.bad += 1;
                            continue;
                        }
                    };
                    c.records += 1;
                    *c.ids.entry(id).or_default() += 1;
                }
            } else {
                match doc
                    .as_ref()
                    .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
                {
                    Some(id) => *c.ids.entry(id).or_default() += 1,
                    None => c.bad += 1,
                }
            }
            if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                *c.keys.entry(key.to_owned()).or_default() += 1;
            }
            Json(json!({"ok": true}))
        }
    }
}

/// One page of the W7 API: records `cursor..cursor+limit` of `total`. The
/// cursor is opaque to clients (`c` + the offset in hex).
fn records_page(query: &str) -> Value {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let limit = param("limit")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let total = param("total")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100_000);
    let offset = param("cursor")
        .and_then(|c| c.strip_prefix('c'))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0);
    let end = (offset + limit).min(total);
    let data: Vec<Value> = (offset.min(end)..end)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("Record {i}"),
                "email": format!("User.{i}@Example.COM"),
                "amount": (i % 1000) as f64 * 1.25,
                "updated_at": format!("2026-11-30T{:02}:{:02}:{:02}Z", (i / 3600) % 24, (i / 60) % 60, i % 60),
            })
        })
        .collect();
    let next = (end < total).then(|| format!("c{end:x}"));
    json!({ "data": data, "next_cursor": next })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .map(|p| p.parse())
        .transpose()?
        .unwrap_or(9999);
    let state: Shared = Arc::default();
    let app = Router::new().fallback(any(handle)).with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("bench-sink listening on 127.0.0.1:{port}");
    axum::serve(listener, app).await?;
    Ok(())
}
