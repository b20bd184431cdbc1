//! `plumb serve` and `plumb worker`: the long-running service.
//!
//! Signals: SIGTERM or SIGINT stop it gracefully (stop accepting, interrupt
//! in-flight steps and release their runs, exit); SIGHUP reloads the
//! workflow files — an invalid project is rejected with the `check` errors
//! and the old one keeps running.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use plumb_engine::project_dir::{self, LoadError};
use plumb_engine::{Engine, Observer, RunEvent};
use plumb_server::{DeployRejected, DeployRequest, Deployed, Roles, Service};
use plumb_store::{RunStatus, Store};

use crate::Exit;
use crate::cli::{Global, ServeArgs, WorkerArgs};

/// Logs what matters from runs: failures loudly, the rest at debug level.
pub struct LogObserver;

impl Observer for LogObserver {
    fn on_event(&self, event: &RunEvent) {
        match event {
            RunEvent::Finished {
                run_id,
                workflow,
                status: RunStatus::Failed,
                failure,
                ..
            } => {
                let (step, error) = failure
                    .as_ref()
                    .map(|f| (f.step.clone().unwrap_or_default(), f.message.clone()))
                    .unwrap_or_default();
                tracing::warn!(
                    workflow,
                    run_id,
                    step,
                    error,
                    "Run failed; it is in the dead-letter list."
                );
            }
            RunEvent::Finished {
                run_id,
                status,
                elapsed,
                ..
            } => {
                tracing::debug!(run_id, status = %status, elapsed_ms = elapsed.as_millis(), "Run finished.");
            }
            RunEvent::StepRetrying {
                step_id,
                attempt,
                error,
                delay,
                ..
            } => {
                tracing::debug!(
                    step = step_id,
                    attempt,
                    error,
                    delay_ms = delay.as_millis(),
                    "Step failed; retrying."
                );
            }
            _ => {}
        }
    }
}

/// `plumb serve` (HTTP + scheduler + workers) or `plumb worker` (workers).
/// `plumb worker`: workers only; with `--listen`, health endpoints too.
pub async fn run_worker(global: &Global, args: WorkerArgs) -> anyhow::Result<Exit> {
    run_service(global, None, args.listen).await
}

/// `plumb serve`.
pub async fn run(global: &Global, args: ServeArgs) -> anyhow::Result<Exit> {
    run_service(global, Some(args), None).await
}

async fn run_service(
    global: &Global,
    args: Option<ServeArgs>,
    health_listen: Option<String>,
) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let project = match project_dir::load_project(&root) {
        Ok(p) => Arc::new(p),
        Err(LoadError::Invalid(d)) => {
            super::print_diagnostics(&d);
            anyhow::bail!("the project has problems; fix them (see `plumb check`) and start again");
        }
        Err(e) => return Err(e.into()),
    };
    let location = super::store_location(&project.config, &root)?;
    let store = super::open_store(&project.config, &root).await?;
    let store_dyn: Arc<dyn Store> = store.clone();
    let http = args.is_some();
    let engine = Arc::new(Engine::new(
        store_dyn,
        Arc::clone(&project),
        if http { "serve" } else { "worker" },
    )?);
    super::load_secrets(&engine, &root).await?;
    if http {
        // One process records deployments: workers run what serve deployed.
        plumb_engine::ops::record_deployment(store.as_ref(), &project, "serve").await?;
    }
    let listener = match &args {
        Some(a) => {
            let addr = a
                .listen
                .clone()
                .unwrap_or_else(|| project.config.listen.clone());
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (is another server running? set `listen:` in plumb.yaml or pass --listen)"))?;
            Some(listener)
        }
        None => match &health_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--listen)"))?,
            ),
            None => None,
        },
    };
    // Signals are caught from here on: a SIGTERM during start-up must stop
    // the service cleanly, not kill it.
    let signals = Signals::new()?;
    let service = Service::start(
        Arc::clone(&engine),
        listener,
        Roles {
            http,
            scheduler: http,
        },
        Arc::new(LogObserver),
        &location.display_name(),
    )
    .await?;
    announce(global, &service, &project, &location.display_name());

    wait_for_signals(signals, &root, &engine, &service).await;
    service.shutdown().await;
    store.close().await;
    if !global.json {
        println!("stopped");
    }
    Ok(Exit::Success)
}

fn announce(global: &Global, service: &Service, project: &plumb_core::Project, store: &str) {
    let workflows = project.workflows.len();
    if global.json {
        println!(
            "{}",
            serde_json::json!({
                "event": "ready",
                "listen": service.addr.map(|a| format!("http://{a}")),
                "store": store,
                "workflows": workflows,
            })
        );
        return;
    }
    match service.addr {
        Some(addr) => {
            println!("plumb listening on http://{addr} · {workflows} workflows · store {store}");
            for w in &project.workflows {
                if let plumb_core::model::Trigger::Webhook { path, .. } = &w.trigger {
                    println!("  webhook  POST http://{addr}/hooks/{path} → {}", w.name);
                }
            }
        }
        None => match service.health_addr {
            Some(addr) => println!(
                "plumb worker started · {workflows} workflows · store {store} · health on http://{addr}"
            ),
            None => println!("plumb worker started · {workflows} workflows · store {store}"),
        },
    }
}

/// The signals the service reacts to, registered before it starts.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching SIGTERM, SIGINT and SIGHUP.
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Waits for SIGTERM or SIGINT (SIGHUP is handled by the caller).
    pub async fn stop(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The next deployment asked for through the API; never, without an API.
async fn next_deploy(
    requests: &mut Option<tokio::sync::mpsc::Receiver<DeployRequest>>,
) -> Option<DeployRequest> {
    match requests {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_for_signals(
    mut signals: Signals,
    root: &Path,
    engine: &Arc<Engine>,
    service: &Service,
) {
    let mut deploys = service.take_deploy_requests();
    #[cfg(unix)]
    loop {
        tokio::select! {
            _ = signals.term.recv() => return,
            _ = signals.int.recv() => return,
            _ = signals.hup.recv() => reload_on_signal(root, engine, service).await,
            Some(request) = next_deploy(&mut deploys) => {
                let outcome = reload(root, engine, service, &request.actor).await;
                let _ = request.reply.send(outcome);
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (root, engine, service);
        signals.stop().await;
    }
}

/// Reloads on SIGHUP and prints the outcome.
async fn reload_on_signal(root: &Path, engine: &Arc<Engine>, service: &Service) {
    match reload(root, engine, service, "serve (SIGHUP)").await {
        Ok(done) => println!("reloaded: {} workflows", done.workflows),
        Err(rejected) => {
            if rejected.diagnostics.is_empty() {
                eprintln!("reload rejected: {}", rejected.message);
            } else {
                super::print_diagnostics(&plumb_core::Diagnostics(rejected.diagnostics));
            }
        }
    }
}

/// Loads the project files, the master key and the secrets they name, and
/// switches to them; on any problem the running project is unchanged.
async fn reload(
    root: &Path,
    engine: &Arc<Engine>,
    service: &Service,
    actor: &str,
) -> Result<Deployed, DeployRejected> {
    let reject = |message: String, diagnostics: Vec<plumb_core::Diagnostic>| {
        tracing::error!(error = %message, "Reload rejected; the previous project keeps running.");
        DeployRejected {
            message,
            diagnostics,
        }
    };
    let project = match project_dir::load_project(root) {
        Ok(project) => project,
        Err(LoadError::Invalid(d)) => {
            return Err(reject(
                format!("{} problem(s) in the project files", d.0.len()),
                d.0,
            ));
        }
        Err(e) => return Err(reject(e.to_string(), Vec::new())),
    };
    // A rekey may have replaced the key file since the start.
    let key = match super::load_master_key(root) {
        Ok(key) => key,
        Err(e) => return Err(reject(format!("{e:#}"), Vec::new())),
    };
    let count = project.workflows.len();
    let project = Arc::new(project);
    // Nothing changes for the running service until every step passed:
    // the secrets open, and the deployment is in the audit log (G8).
    let opened = match engine.prepare_secrets(&project, &key).await {
        Ok(opened) => opened,
        Err(e) => return Err(reject(e.to_string(), Vec::new())),
    };
    let changed = match plumb_engine::ops::record_deployment(
        engine.store().as_ref(),
        &project,
        actor,
    )
    .await
    {
        Ok(changed) => changed,
        Err(e) => {
            return Err(reject(
                format!("the deployment could not be recorded in the audit log: {e}"),
                Vec::new(),
            ));
        }
    };
    engine.switch_to(project, key, opened);
    service.restart_scheduler().await;
    tracing::info!(workflows = count, actor, "Reloaded the project.");
    Ok(Deployed {
        workflows: count,
        changed,
    })
}
