//! `plumb mock-api`: the documented mock CRM and warehouse the `sync`
//! example (`plumb init --example sync`) runs against, so an incremental
//! sync can be watched end to end without an account anywhere. Loopback
//! only; everything is in memory.
//!
//! * `GET /contacts?updated_since=T&limit=L`: contacts changed after `T`
//!   (RFC 3339), oldest first, `L` per page (default 50, at most 200):
//!   `{"items": [{id, email, name, updated_at}], "next_page": URL}`;
//!   `next_page` is a relative URL (keyset pagination: the same query from
//!   the page's last `updated_at`), null on the last page. `--records`
//!   contacts exist at the start; one more is added every `--every`, and
//!   every third time an old one is renamed (it moves to the end).
//! * `POST /warehouse/contacts` with a JSON list of contacts: upserted by
//!   `id`; a request whose `Idempotency-Key` was seen before changes nothing
//!   and answers `{"duplicate": true}`.
//! * `GET /warehouse/stats`: contacts held, deliveries, duplicates refused.

#![allow(clippy::print_stdout)] // a foreground tool: it reports what it serves

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Exit;
use crate::cli::{Global, MockArgs};

/// The most contacts the mock keeps (a bound on its memory).
const MAX_CONTACTS: usize = 1_000_000;

#[derive(Clone)]
struct Contact {
    id: String,
    email: String,
    name: String,
    updated_at: DateTime<Utc>,
}

impl Contact {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "updated_at": self.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        })
    }
}

#[derive(Default)]
struct Mock {
    /// Oldest change first.
    contacts: Vec<Contact>,
    warehouse: BTreeMap<String, Value>,
    keys: HashSet<String>,
    deliveries: u64,
    duplicates: u64,
}

type Shared = Arc<Mutex<Mock>>;

/// Now, to the millisecond: what `updated_at` shows is all there is, so a
/// cursor read back from it compares exactly.
fn now_ms() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn contact(i: usize, at: DateTime<Utc>) -> Contact {
    Contact {
        id: format!("c-{i:06}"),
        email: format!("Person.{i}@Example.COM"),
        name: format!("Person {i}"),
        updated_at: at,
    }
}

/// Serves the mock until interrupted.
pub async fn run(_global: &Global, args: MockArgs) -> anyhow::Result<Exit> {
    let now = now_ms();
    let records = args.records.min(MAX_CONTACTS);
    let mut mock = Mock::default();
    for i in 0..records {
        let back = i64::try_from(records - i).unwrap_or(i64::MAX);
        mock.contacts
            .push(contact(i, now - chrono::Duration::milliseconds(back)));
    }
    let state: Shared = Arc::new(Mutex::new(mock));
    let every = Duration::from_secs(args.every.max(1));
    let changes = Arc::clone(&state);
    tokio::spawn(async move {
        let mut n = records;
        loop {
            tokio::time::sleep(every).await;
            let Ok(mut mock) = changes.lock() else { return };
            // A new contact, and every third time an old one changes too.
            if mock.contacts.len() < MAX_CONTACTS {
                mock.contacts.push(contact(n, now_ms()));
                n += 1;
            }
            if n.is_multiple_of(3) && !mock.contacts.is_empty() {
                // Strictly later than the contact just added: changes are
                // totally ordered by `updated_at`, as keyset pages need.
                let old = mock.contacts.remove(0);
                mock.contacts.push(Contact {
                    name: format!("{} (renamed)", old.name),
                    updated_at: now_ms() + chrono::Duration::milliseconds(1),
                    ..old
                });
            }
        }
    });
    let app = Router::new()
        .route("/contacts", get(contacts))
        .route("/warehouse/contacts", post(upsert))
        .route("/warehouse/stats", get(stats))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!(
        "mock CRM and warehouse on http://{} ({records} contacts, one more every {}s)",
        listener.local_addr()?,
        every.as_secs_f64()
    );
    println!("  GET  /contacts?updated_since=…&limit=…   GET /warehouse/stats   (Ctrl-C stops it)");
    tokio::select! {
        r = axum::serve(listener, app) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(Exit::Success)
}

#[derive(Deserialize)]
struct ContactsQuery {
    updated_since: Option<String>,
    limit: Option<usize>,
}

async fn contacts(
    State(state): State<Shared>,
    Query(q): Query<ContactsQuery>,
) -> Result<Json<Value>, (axum::http::StatusCode, Json<Value>)> {
    let since = match q.updated_since.as_deref() {
        None | Some("") => DateTime::<Utc>::MIN_UTC,
        Some(text) => DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    Json(json!({"error": format!("updated_since is not RFC 3339: {e}")})),
                )
            })?,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let Ok(mock) = state.lock() else {
        return Err((
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "the mock is broken"})),
        ));
    };
    let mut changed = mock.contacts.iter().filter(|c| c.updated_at > since);
    let page: Vec<&Contact> = changed.by_ref().take(limit).collect();
    let more = changed.next().is_some();
    let next_page = match page.last() {
        Some(last) if more => {
            let from = last.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true);
            let from: String = url::form_urlencoded::byte_serialize(from.as_bytes()).collect();
            Some(format!("/contacts?updated_since={from}&limit={limit}"))
        }
        _ => None,
    };
    let items: Vec<Value> = page.iter().map(|c| c.json()).collect();
    Ok(Json(json!({ "items": items, "next_page": next_page })))
}

async fn upsert(
    State(state): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Json<Value> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(mut mock) = state.lock() else {
        return Json(json!({"error": "the mock is broken"}));
    };
    mock.deliveries += 1;
    if let Some(key) = key
        && !mock.keys.insert(key)
    {
        mock.duplicates += 1;
        return Json(json!({"duplicate": true}));
    }
    let list = match body {
        Value::Array(list) => list,
        Value::Object(mut o) => match o.remove("records") {
            Some(Value::Array(list)) => list,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let mut upserted = 0;
    for c in list {
        if let Some(id) = c.get("id").and_then(Value::as_str).map(str::to_owned)
            && mock.warehouse.len() < MAX_CONTACTS
        {
            mock.warehouse.insert(id, c);
            upserted += 1;
        }
    }
    Json(json!({ "upserted": upserted }))
}

async fn stats(State(state): State<Shared>) -> Json<Value> {
    let Ok(mock) = state.lock() else {
        return Json(json!({"error": "the mock is broken"}));
    };
    let in_sync = mock.contacts.iter().all(|c| {
        mock.warehouse
            .get(&c.id)
            .and_then(|w| w.get("updated_at"))
            .and_then(Value::as_str)
            == Some(
                c.updated_at
                    .to_rfc3339_opts(SecondsFormat::Millis, true)
                    .as_str(),
            )
    });
    Json(json!({
        "crm_contacts": mock.contacts.len(),
        "warehouse_contacts": mock.warehouse.len(),
        "deliveries": mock.deliveries,
        "duplicates_refused": mock.duplicates,
        "in_sync": in_sync,
    }))
}
