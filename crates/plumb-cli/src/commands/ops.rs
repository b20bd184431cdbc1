//! `plumb dlq`, `plumb cancel`, `plumb status`: through a running server's
//! API when `PLUMB_TOKEN` is set and the server answers, on the store
//! directly otherwise (whoever can open the store file needs no token).

use std::sync::Arc;

use plumb_store::{CancelResult, ReplayResult, SqliteStore, Store};
use serde_json::{Value, json};

use crate::cli::{DlqCommand, Global};
use crate::client::ApiClient;
use crate::output::{Style, timestamp};
use crate::{Exit, UsageError};

enum Backend {
    Api(ApiClient),
    Store(Arc<SqliteStore>),
}

impl Backend {
    async fn open(global: &Global) -> anyhow::Result<Self> {
        let root = global.project_dir();
        let config = super::load_config(&root)?;
        let (path, _) = plumb_engine::project_dir::sqlite_location(&config, &root)
            .map_err(anyhow::Error::msg)?;
        let store = super::open_store(&config, &root).await?;
        if let Ok(token) = std::env::var("PLUMB_TOKEN") {
            let instance = store.instance_secret().await?;
            if let Some(client) = ApiClient::detect(
                &config.listen,
                &super::store_id_of(&path),
                &instance,
                &token,
            )
            .await
            {
                tracing::debug!(server = client.base(), "Using the running server's API.");
                store.close().await;
                return Ok(Self::Api(client));
            }
        }
        Ok(Self::Store(store))
    }

    async fn close(self) {
        if let Self::Store(store) = self {
            store.close().await;
        }
    }
}

/// `plumb dlq list|replay`.
pub async fn dlq(global: &Global, command: DlqCommand) -> anyhow::Result<Exit> {
    let backend = Backend::open(global).await?;
    let exit = match command {
        DlqCommand::List { workflow, limit } => {
            let letters: Value = match &backend {
                Backend::Api(api) => {
                    let mut path = format!("dlq?limit={limit}");
                    if let Some(w) = &workflow {
                        let query: String = url::form_urlencoded::Serializer::new(String::new())
                            .append_pair("workflow", w)
                            .finish();
                        path.push('&');
                        path.push_str(&query);
                    }
                    api.get(&path).await?["dead_letters"].take()
                }
                Backend::Store(store) => serde_json::to_value(
                    plumb_engine::ops::dead_letters(store.as_ref(), workflow.as_deref(), limit)
                        .await?,
                )?,
            };
            print_dead_letters(global, &letters);
            Exit::Success
        }
        DlqCommand::Replay {
            run_id: Some(id), ..
        } => replay_one(global, &backend, &id).await?,
        DlqCommand::Replay {
            workflow: Some(w),
            all: true,
            ..
        } => {
            let replayed: Vec<String> = match &backend {
                Backend::Api(api) => serde_json::from_value(
                    api.post("dlq/replay", &json!({ "workflow": w })).await?["replayed"].take(),
                )?,
                Backend::Store(store) => {
                    plumb_engine::ops::replay_all(store.as_ref(), &w, &super::cli_actor()).await?
                }
            };
            if global.json {
                println!("{}", json!({ "workflow": w, "replayed": replayed }));
            } else {
                println!(
                    "{} failed run{} of {w} queued again",
                    replayed.len(),
                    if replayed.len() == 1 { "" } else { "s" }
                );
                for id in &replayed {
                    println!("  {id}");
                }
                if matches!(backend, Backend::Store(_)) && !replayed.is_empty() {
                    println!("no server is running: `plumb serve` will run them");
                }
            }
            Exit::Success
        }
        DlqCommand::Replay { .. } => {
            return Err(UsageError("give a RUN_ID, or --all --workflow W".into()).into());
        }
    };
    backend.close().await;
    Ok(exit)
}

async fn replay_one(global: &Global, backend: &Backend, id: &str) -> anyhow::Result<Exit> {
    let result = match backend {
        Backend::Api(api) => match api
            .post(&format!("dlq/{}/replay", encode_segment(id)), &json!({}))
            .await
        {
            Ok(_) => ReplayResult::Replayed,
            Err(e) => return Err(UsageError(e.to_string()).into()),
        },
        Backend::Store(store) => store.replay_run(id, &super::cli_actor()).await?,
    };
    match result {
        ReplayResult::Replayed => {
            if global.json {
                println!("{}", json!({ "run_id": id, "result": "replayed" }));
            } else {
                println!(
                    "run {id} queued again: it resumes at its failed step, with the same idempotency keys"
                );
                if matches!(backend, Backend::Store(_)) {
                    println!(
                        "no server is running: `plumb serve` will run it, or run it now with `plumb run --resume {id}`"
                    );
                }
            }
            Ok(Exit::Success)
        }
        ReplayResult::NotFailed(status) => Err(UsageError(format!(
            "run {id} is {status}; only failed runs can be replayed"
        ))
        .into()),
        ReplayResult::NotFound => Err(UsageError(format!("no run with id `{id}`")).into()),
    }
}

/// A run id as one path segment (ids are UUIDs, but the argument is user
/// input).
fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn print_dead_letters(global: &Global, letters: &Value) {
    if global.json {
        println!("{letters}");
        return;
    }
    let Some(list) = letters.as_array().filter(|l| !l.is_empty()) else {
        println!("the dead-letter list is empty");
        return;
    };
    let s = Style::detect();
    println!("{}", s.dim("RUN                                   WORKFLOW          FAILED                STEP              ERROR"));
    for l in list {
        let error = l["error"].as_str().unwrap_or("").replace('\n', " ");
        let error: String = error.chars().take(100).collect();
        println!(
            "{:<37} {:<17} {:<21} {:<17} {}",
            l["run_id"].as_str().unwrap_or(""),
            l["workflow"].as_str().unwrap_or(""),
            l["failed_at"].as_i64().map(timestamp).unwrap_or_default(),
            l["step"].as_str().unwrap_or("-"),
            error
        );
    }
    println!(
        "\nreplay one with `plumb dlq replay RUN_ID`, or all of a workflow with `plumb dlq replay --all --workflow W`"
    );
}

/// `plumb cancel`.
pub async fn cancel(global: &Global, run_id: &str, reason: Option<String>) -> anyhow::Result<Exit> {
    let backend = Backend::open(global).await?;
    let reason = reason.unwrap_or_else(|| "cancelled from the command line".to_owned());
    let result = match &backend {
        Backend::Api(api) => {
            let answer = api
                .post(
                    &format!("runs/{}/cancel", encode_segment(run_id)),
                    &json!({ "reason": reason }),
                )
                .await
                .map_err(|e| UsageError(e.to_string()))?;
            serde_json::from_value::<CancelResult>(answer["result"].clone())?
        }
        Backend::Store(store) => {
            store
                .cancel_run(run_id, &reason, &super::cli_actor())
                .await?
        }
    };
    backend.close().await;
    match result {
        CancelResult::Cancelled => {
            if global.json {
                println!("{}", json!({ "run_id": run_id, "result": "cancelled" }));
            } else {
                println!("run {run_id} cancelled");
            }
            Ok(Exit::Success)
        }
        CancelResult::AlreadyEnded(status) => {
            Err(UsageError(format!("run {run_id} has already ended ({status})")).into())
        }
        CancelResult::NotFound => Err(UsageError(format!("no run with id `{run_id}`")).into()),
    }
}

/// `plumb status`.
pub async fn status(global: &Global) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let backend = Backend::open(global).await?;
    let (status, server) = match &backend {
        Backend::Api(api) => (api.get("status").await?, Some(api.base().to_owned())),
        Backend::Store(store) => {
            // Status describes the project on disk; a broken workflow file
            // should not hide the health of the others.
            let project = match plumb_engine::project_dir::load_project(&root) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("warning: {e}");
                    plumb_core::Project {
                        config: Arc::new(super::load_config(&root)?),
                        workflows: Vec::new(),
                    }
                }
            };
            (
                serde_json::to_value(
                    plumb_engine::status::collect(store.as_ref(), &project).await?,
                )?,
                None,
            )
        }
    };
    backend.close().await;
    if global.json {
        println!("{status}");
        return Ok(Exit::Success);
    }
    let s = Style::detect();
    match &server {
        Some(base) => println!("server   {} at {base}", s.ok("running")),
        None => println!("server   {} (read from the store)", s.warn("not running")),
    }
    println!();
    println!(
        "{}",
        s.dim("WORKFLOW             LAST SUCCESS          LAST FAILURE          QUEUED  RUNNING  DEAD  NEXT FIRE")
    );
    let when = |v: &Value| v.as_i64().map(timestamp).unwrap_or_else(|| "-".to_owned());
    for w in status["workflows"].as_array().into_iter().flatten() {
        let dead = w["dead_letters"].as_u64().unwrap_or(0);
        let dead_text = format!("{dead:<4}");
        println!(
            "{:<20} {:<21} {:<21} {:<7} {:<8} {} {}",
            w["name"].as_str().unwrap_or(""),
            when(&w["last_success_at"]),
            when(&w["last_failure_at"]),
            w["queued"].as_u64().unwrap_or(0),
            w["running"].as_u64().unwrap_or(0),
            if dead > 0 {
                s.bad(&dead_text)
            } else {
                dead_text
            },
            when(&w["next_fire_at"]),
        );
    }
    let alerts = status["undelivered_alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !alerts.is_empty() {
        println!(
            "\n{}",
            s.bad(&format!("{} alert(s) not delivered:", alerts.len()))
        );
        for a in &alerts {
            println!(
                "  {} run {} → channel {} · {} · {} attempt(s) · last error: {}",
                a["status"].as_str().unwrap_or(""),
                a["run_id"].as_str().unwrap_or(""),
                a["channel"].as_str().unwrap_or(""),
                a["workflow"].as_str().unwrap_or(""),
                a["attempts"].as_u64().unwrap_or(0),
                a["last_error"].as_str().unwrap_or("-"),
            );
        }
    }
    Ok(Exit::Success)
}
