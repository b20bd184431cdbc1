//! `plumb dlq`, `plumb cancel`, `plumb status`: through a running server's
//! API when `PLUMB_TOKEN` is set and the server answers, on the store
//! directly otherwise (whoever can open the store file needs no token).
//! Either way the command says which: a running server is never reported
//! as "not running" just because no token was given.

use std::sync::Arc;

use plumb_store::{CancelResult, ReplayResult, Store};
use serde_json::{Value, json};

use crate::cli::{DlqCommand, Global};
use crate::client::ApiClient;
use crate::output::{Style, timestamp};
use crate::{Exit, UsageError};

enum Backend {
    /// The server's API; the store is open too, to resolve abbreviated run
    /// ids.
    Api(ApiClient, Arc<dyn Store>),
    /// The store directly; `server` is this project's running server, if
    /// one answers (there was no `PLUMB_TOKEN` to use its API with).
    Store {
        store: Arc<dyn Store>,
        server: Option<String>,
    },
}

impl Backend {
    async fn open(global: &Global) -> anyhow::Result<Self> {
        let root = global.project_dir();
        let config = super::load_config(&root)?;
        let location = super::store_location(&config, &root)?;
        let store = super::open_store_for_command(&config, &root).await?;
        let instance = store.instance_secret().await?;
        let server =
            ApiClient::probe(&config.listen, &super::store_id_of(&location), &instance).await;
        if let (Some(base), Ok(token)) = (&server, std::env::var("PLUMB_TOKEN"))
            && let Some(client) = ApiClient::new(base.clone(), &token)
        {
            tracing::debug!(server = client.base(), "Using the running server's API.");
            return Ok(Self::Api(client, store));
        }
        Ok(Self::Store { store, server })
    }

    async fn close(self) {
        match self {
            Self::Api(_, store) | Self::Store { store, .. } => store.close().await,
        }
    }

    /// The full id of the run `given` names (see
    /// [`super::resolve_run_id`]).
    async fn resolve(&self, given: &str) -> anyhow::Result<String> {
        match self {
            Self::Api(_, store) | Self::Store { store, .. } => {
                super::resolve_run_id(store.as_ref(), given).await
            }
        }
    }

    /// What happens next to a run this command queued, in a sentence.
    fn who_runs_it(&self, id: Option<&str>) -> String {
        match self {
            Self::Api(api, _) => format!("the server at {} runs it", api.base()),
            Self::Store {
                server: Some(base), ..
            } => format!(
                "the server running at {base} picks it up within a second (this command wrote to the store directly; set PLUMB_TOKEN to an API token to go through the server's API)"
            ),
            Self::Store { server: None, .. } => match id {
                Some(id) => format!(
                    "no server is running: `plumb serve` will run it, or run it now with `plumb run --resume {id}`"
                ),
                None => "no server is running: `plumb serve` will run them".to_owned(),
            },
        }
    }
}

/// `plumb dlq list|replay`.
pub async fn dlq(global: &Global, command: DlqCommand) -> anyhow::Result<Exit> {
    let backend = Backend::open(global).await?;
    let exit = match command {
        DlqCommand::List { workflow, limit } => {
            let letters: Value = match &backend {
                Backend::Api(api, _) => {
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
                Backend::Store { store, .. } => serde_json::to_value(
                    plumb_engine::ops::dead_letters(store.as_ref(), workflow.as_deref(), limit)
                        .await?,
                )?,
            };
            print_dead_letters(global, &letters);
            Exit::Success
        }
        DlqCommand::Replay {
            run_id: Some(id), ..
        } => {
            let id = backend.resolve(&id).await?;
            replay_one(global, &backend, &id).await?
        }
        DlqCommand::Replay {
            workflow: Some(w),
            all: true,
            ..
        } => {
            let replayed: Vec<String> = match &backend {
                Backend::Api(api, _) => serde_json::from_value(
                    api.post("dlq/replay", &json!({ "workflow": w })).await?["replayed"].take(),
                )?,
                Backend::Store { store, .. } => {
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
                if !replayed.is_empty() {
                    println!("{}", backend.who_runs_it(None));
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
        Backend::Api(api, _) => match api
            .post(&format!("dlq/{}/replay", encode_segment(id)), &json!({}))
            .await
        {
            Ok(_) => ReplayResult::Replayed,
            Err(e) => return Err(UsageError(e.to_string()).into()),
        },
        Backend::Store { store, .. } => store.replay_run(id, &super::cli_actor()).await?,
    };
    match result {
        ReplayResult::Replayed => {
            if global.json {
                println!("{}", json!({ "run_id": id, "result": "replayed" }));
            } else {
                println!(
                    "run {id} queued again: it resumes at its failed step, with the same idempotency keys"
                );
                println!("{}", backend.who_runs_it(Some(id)));
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
    let run_id = &backend.resolve(run_id).await?;
    let reason = reason.unwrap_or_else(|| "cancelled from the command line".to_owned());
    let result = match &backend {
        Backend::Api(api, _) => {
            let answer = api
                .post(
                    &format!("runs/{}/cancel", encode_segment(run_id)),
                    &json!({ "reason": reason }),
                )
                .await
                .map_err(|e| UsageError(e.to_string()))?;
            serde_json::from_value::<CancelResult>(answer["result"].clone())?
        }
        Backend::Store { store, .. } => {
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

/// `plumb status`: every workflow's health, then a verdict line; exits 1
/// when something needs a person, so it can run from cron or a monitor.
pub async fn status(global: &Global) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let backend = Backend::open(global).await?;
    let mut status = match &backend {
        Backend::Api(api, _) => api.get("status").await?,
        Backend::Store { store, .. } => {
            // Status describes the project on disk: the workflows that load
            // are shown, and the files that do not are problems of their
            // own, not a reason to show nothing.
            let partial = plumb_engine::project_dir::load_project_partial(&root).ok();
            let config = match partial.as_ref().and_then(|p| p.config.clone()) {
                Some(c) => c,
                None => Arc::new(super::load_config(&root)?),
            };
            let project = plumb_core::Project {
                config,
                workflows: partial
                    .as_ref()
                    .map(|p| p.workflows.clone())
                    .unwrap_or_default(),
            };
            let mut status = plumb_engine::status::collect(store.as_ref(), &project).await?;
            for file in partial.map(|p| p.broken_files()).unwrap_or_default() {
                status.verdict.add(
                    "broken_file",
                    None,
                    format!("{file} has problems (`plumb check`)"),
                );
            }
            serde_json::to_value(status)?
        }
    };
    let server = match &backend {
        Backend::Api(api, _) => Some(api.base().to_owned()),
        Backend::Store { server, .. } => server.clone(),
    };
    let direct = matches!(backend, Backend::Store { .. });
    backend.close().await;
    let mut verdict: plumb_engine::status::Verdict =
        serde_json::from_value(status["verdict"].clone()).unwrap_or_default();
    let waiting: u64 = status["workflows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| w["queued"].as_u64().unwrap_or(0) + w["running"].as_u64().unwrap_or(0))
        .sum();
    if server.is_none() && waiting > 0 {
        verdict.add(
            "no_server",
            None,
            format!(
                "{waiting} run{} waiting and no server is running (`plumb serve`)",
                if waiting == 1 { " is" } else { "s are" }
            ),
        );
    }
    verdict.healthy = verdict.problems.is_empty();
    status["verdict"] = serde_json::to_value(&verdict)?;
    status["server"] =
        json!({ "running": server.is_some(), "url": server, "read_directly": direct });
    let exit = if verdict.healthy {
        Exit::Success
    } else {
        Exit::Failure
    };
    if global.json {
        println!("{status}");
        return Ok(exit);
    }
    let s = Style::detect();
    match (&server, direct) {
        (Some(base), false) => println!("server   {} at {base}", s.ok("running")),
        (Some(base), true) => println!(
            "server   {} at {base} (read from the store directly; set PLUMB_TOKEN to an API token to ask the server)",
            s.ok("running")
        ),
        (None, _) => println!("server   {} (read from the store)", s.warn("not running")),
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
        if let Some(poll) = w.get("poll") {
            let line = format!(
                "  poll   last {} · next {} · last new item {}",
                when(&poll["last_poll_at"]),
                when(&poll["next_poll_at"]),
                when(&poll["last_new_item_at"]),
            );
            println!("{}", s.dim(&line));
            if let Some(error) = poll["last_error"].as_str() {
                println!(
                    "{}",
                    s.bad(&format!(
                        "  poll   last error ({} in a row): {error}",
                        poll["failures"].as_u64().unwrap_or(0)
                    ))
                );
            }
        }
        if let Some(cursor) = w.get("cursor") {
            println!(
                "{}",
                s.dim(&format!(
                    "  cursor {} (version {}, {})",
                    plumb_engine::preview_json(&cursor["value"], 60),
                    cursor["version"].as_i64().unwrap_or(0),
                    match cursor["updated_by"].as_str() {
                        Some(by) => format!("{by}, {}", when(&cursor["updated_at"])),
                        None => "never moved".to_owned(),
                    }
                ))
            );
        }
    }
    let connections = status["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !connections.is_empty() {
        println!("\n{}", s.dim("CONNECTION           WORKFLOW             STATE          SINCE                 PROCESS"));
        for c in &connections {
            let state = c["state"].as_str().unwrap_or("");
            let state_text = format!("{state:<14}");
            println!(
                "{:<20} {:<20} {} {:<21} {}",
                c["connection"].as_str().unwrap_or(""),
                c["workflow"].as_str().unwrap_or(""),
                if state == "connected" {
                    s.ok(&state_text)
                } else {
                    s.bad(&state_text)
                },
                when(&c["since"]),
                c["process"].as_str().unwrap_or(""),
            );
            if let Some(error) = c["last_error"].as_str() {
                println!(
                    "{}",
                    s.dim(&format!(
                        "  last error {}: {error}",
                        when(&c["last_error_at"])
                    ))
                );
            }
        }
    }
    let store = &status["store"];
    println!(
        "\n{}",
        s.dim(&format!(
            "store    {:.1} MiB · oldest run {}",
            store["bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0),
            when(&store["oldest_run_at"]),
        ))
    );
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
    let workflows = status["workflows"].as_array().map_or(0, Vec::len);
    let line = if verdict.healthy {
        s.ok(&format!(
            "all healthy ({workflows} workflow{})",
            if workflows == 1 { "" } else { "s" }
        ))
    } else {
        s.bad(&verdict.line())
    };
    println!("\nverdict  {line}");
    Ok(exit)
}
