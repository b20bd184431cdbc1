//! `plumb run`: one run in the foreground, or the resume of an interrupted
//! one.

use std::path::Path;
use std::sync::Arc;

use plumb_engine::project_dir::{self, LoadError};
use plumb_engine::{Engine, EngineError, RunEnd, manual_trigger};
use plumb_store::{RunStatus, Store};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::{Global, RunArgs};
use crate::output::Progress;
use crate::{Exit, UsageError};

/// Starts (or resumes) a run and follows it to its end.
pub async fn run(global: &Global, args: RunArgs) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let partial = match project_dir::load_project_partial(&root) {
        Ok(p) => p,
        Err(LoadError::Invalid(d)) => {
            super::print_diagnostics(&d);
            anyhow::bail!("the project files could not be read");
        }
        Err(e) => return Err(e.into()),
    };
    let Some(config) = partial.config.clone() else {
        super::print_diagnostics(&partial.problems);
        anyhow::bail!("plumb.yaml has problems; fix them (see `plumb check`) and run again");
    };
    // Other workflows' problems do not stop this one: only the workflow
    // being run (or resumed) must load.
    let wanted = args.workflow.as_deref();
    let runnable = wanted.is_none_or(|name| partial.workflows.iter().any(|w| w.name == name));
    if !partial.problems.is_empty() {
        if runnable {
            eprintln!(
                "warning: other project files have problems ({}); `plumb check` lists them",
                partial.broken_files().join(", ")
            );
        } else {
            super::print_diagnostics(&partial.problems);
            anyhow::bail!(
                "no workflow named `{}` loads; the files above have problems (see `plumb check`)",
                wanted.unwrap_or_default()
            );
        }
    }
    let project = Arc::new(plumb_core::Project {
        config,
        workflows: partial.workflows,
    });
    let store = super::open_store(&project.config, &root).await?;
    let store_dyn: Arc<dyn Store> = store.clone();
    let engine = Engine::new(store_dyn, Arc::clone(&project), "cli")?;
    super::load_secrets(&engine, &root).await?;

    let run = match (&args.resume, &args.workflow) {
        (Some(given), _) => match engine
            .claim(&super::resolve_run_id(store.as_ref(), given).await?)
            .await
        {
            Ok(run) => run,
            Err(e @ (EngineError::NotFound(_) | EngineError::Ended { .. })) => {
                return Err(UsageError(e.to_string()).into());
            }
            Err(e) => return Err(e.into()),
        },
        (None, Some(name)) => {
            let Some(workflow) = project.workflow(name) else {
                let names: Vec<&str> = project.workflows.iter().map(|w| w.name.as_str()).collect();
                return Err(UsageError(format!(
                    "no workflow named `{name}`; the project has: {}",
                    if names.is_empty() {
                        "(none)".to_owned()
                    } else {
                        names.join(", ")
                    }
                ))
                .into());
            };
            let input = read_input(args.input.as_deref())?;
            if let Some(contract) = workflow.input_contract() {
                let violations = contract.violations(&input);
                if !violations.is_empty() {
                    let list: Vec<String> = violations
                        .iter()
                        .map(|v| format!("  {}", engine.redact(&v.to_string())))
                        .collect();
                    return Err(UsageError(format!(
                        "the input does not match {} (the workflow's trigger schema); nothing was run:\n{}",
                        contract.path(),
                        list.join("\n")
                    ))
                    .into());
                }
            }
            // A version that was never deployed (edited files, run by
            // hand) is audited with who ran it; deployments stay what
            // serve and the API deployed.
            plumb_engine::ops::audit_undeployed_run(
                store.as_ref(),
                workflow,
                &format!("{} (plumb run)", super::cli_actor()),
            )
            .await?;
            engine.create_run(workflow, manual_trigger(input)).await?
        }
        (None, None) => {
            return Err(
                UsageError("name a workflow to run, or pass --resume RUN_ID".into()).into(),
            );
        }
    };

    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    let progress = Progress::new(global.json);
    let run_id = run.id.clone();
    let end = engine.execute(run, &progress, cancel).await;
    if let Ok(RunEnd::Finished {
        status: RunStatus::Failed,
        ..
    }) = &end
    {
        deliver_alerts(&engine, &run_id, global.json).await;
    }
    store.close().await;
    match end? {
        RunEnd::Finished {
            status: RunStatus::Succeeded,
            ..
        } => Ok(Exit::Success),
        RunEnd::Finished { .. } => Ok(Exit::Failure),
        RunEnd::Interrupted { .. } => Ok(Exit::Interrupted),
    }
}

/// A failed run's alerts are already committed; try to deliver them now
/// rather than leaving them for the next `plumb serve`.
async fn deliver_alerts(engine: &Engine, run_id: &str, json: bool) {
    let pending = match engine.store().undelivered_alerts(100).await {
        Ok(a) => a.iter().filter(|a| a.run_id == run_id).count(),
        Err(_) => return,
    };
    if pending == 0 {
        return;
    }
    let delivered = plumb_engine::alerts::deliver_due(engine, Some(run_id), None)
        .await
        .unwrap_or(0);
    if !json {
        if delivered > 0 {
            println!("  alert sent ({delivered})");
        }
        if delivered < pending {
            println!(
                "  {} alert(s) not delivered yet: `plumb serve` keeps retrying them; see `plumb status`",
                pending - delivered
            );
        }
    }
}

/// The `--input` document (a file, or `-` for stdin), held to the same
/// limits as every document that enters plumb.
fn read_input(path: Option<&Path>) -> anyhow::Result<Value> {
    use std::io::Read;
    let Some(path) = path else {
        return Ok(Value::Object(serde_json::Map::new()));
    };
    let limit = plumb_core::limits::MAX_DOCUMENT_BYTES;
    let mut bytes = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin()
            .take(u64::try_from(limit).unwrap_or(u64::MAX) + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| {
            f.take(u64::try_from(limit).unwrap_or(u64::MAX) + 1)
                .read_to_end(&mut bytes)
        })
    };
    read.map_err(|e| UsageError(format!("cannot read the input {}: {e}", path.display())))?;
    if bytes.len() > limit {
        return Err(UsageError(format!(
            "the input {} is larger than {}; plumb keeps documents up to that size",
            path.display(),
            plumb_core::limits::human_bytes(limit)
        ))
        .into());
    }
    plumb_core::limits::parse_json(&bytes, &format!("the input {}", path.display())).map_err(|e| {
        match e {
            plumb_core::limits::ParseError::Limit(l) => UsageError(l.to_string()).into(),
            json => UsageError(format!("the input {} is {json}", path.display())).into(),
        }
    })
}

/// First Ctrl-C or SIGTERM: stop at once, leaving the run resumable.
async fn stop_on_signal(cancel: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    cancel.cancel();
}
