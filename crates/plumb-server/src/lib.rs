//! plumb's HTTP surface: webhooks, the `/api/v1` API, `/healthz`,
//! `/readyz` and `/metrics`, and the wiring that runs them together with the
//! workers, the scheduler and alert delivery as one service.
//!
//! The server owns request handling and nothing else: runs are created and
//! executed by [`plumb_engine::Engine`], durability is the store's. A
//! webhook is answered `202` only after its run is committed (SPEC G1), and
//! `503` with `Retry-After` whenever the store cannot commit in time (G5).
//! Internal errors become JSON bodies with a stable code; their details go
//! to the log, not to the caller.

mod api;
pub mod auth;
mod error;
mod metrics_setup;
pub mod signature;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use plumb_engine::{Engine, Observer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use metrics_setup::Metrics;

/// How long a webhook waits for its run to be committed before answering
/// `503`: past this the caller is better off retrying than waiting.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(3);

/// How long shutdown waits for in-flight requests and executions.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    /// The engine (store, project, HTTP client).
    pub engine: Arc<Engine>,
    /// Where `POST /api/v1/deployments` asks for a reload.
    pub deploy: tokio::sync::mpsc::Sender<DeployRequest>,
    /// Wakes the workers when a run is queued here.
    pub wake_workers: Arc<Notify>,
    /// Prometheus rendering.
    pub metrics: Metrics,
    /// Identifies the store served (see [`store_id`]).
    pub store_id: String,
    /// The store's instance secret, for `/healthz?challenge=` proofs.
    pub instance_secret: Arc<str>,
}

/// A stable, non-revealing id for a store location: the CLI compares it
/// with its own project's to know it talks to the right server.
pub fn store_id(location: &str) -> String {
    use std::hash::{Hash, Hasher};
    // Not a secret: only distinguishes projects on one machine.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    location.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/hooks/{*path}", post(webhook::receive))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .nest("/api/v1", api::routes())
        .fallback(not_found)
        .with_state(state)
}

/// A worker's HTTP: `/healthz`, `/readyz` (a committed write to the store)
/// and `/metrics`, for a load balancer or an orchestrator's probes.
pub fn health_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Unknown routes answer JSON like every other error.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route `{}`; webhooks are served under /hooks/, the API under /api/v1/",
        uri.path()
    ))
}

/// What runs inside one `plumb serve` (or `plumb worker`) process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Serve HTTP.
    pub http: bool,
    /// Fire schedules.
    pub scheduler: bool,
}

/// A request to deploy the project files as they are on disk now, made
/// through the API. Whoever runs the service (the CLI) loads the files,
/// the same way as on SIGHUP, and answers.
pub struct DeployRequest {
    /// Who asked, for the audit log (`api:<token name>`).
    pub actor: String,
    /// The outcome.
    pub reply: tokio::sync::oneshot::Sender<Result<Deployed, DeployRejected>>,
}

/// A deployment that took effect.
#[derive(Debug, serde::Serialize)]
pub struct Deployed {
    /// Workflows now loaded.
    pub workflows: usize,
    /// What changed, as `kind:name` (changed first, then removed).
    pub changed: Vec<String>,
}

/// Why a deployment was refused; the running project is unchanged.
#[derive(Debug, serde::Serialize)]
pub struct DeployRejected {
    /// What is wrong.
    pub message: String,
    /// Each problem in the files, when they do not check.
    pub diagnostics: Vec<plumb_core::Diagnostic>,
}

/// A running service; dropped or stopped through [`Service::shutdown`].
pub struct Service {
    /// The address the HTTP server listens on, if it serves HTTP.
    pub addr: Option<SocketAddr>,
    /// The address a worker serves its health endpoints on, if asked to.
    pub health_addr: Option<SocketAddr>,
    deploy_requests: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<DeployRequest>>>,
    shutdown: CancellationToken,
    scheduler: tokio::sync::Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    tasks: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    engine: Arc<Engine>,
    wake_workers: Arc<Notify>,
}

/// How often a running service looks for secrets set or rotated by another
/// process (`plumb secrets rotate` on the command line).
const SECRETS_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads the secrets whenever the store's secrets version changes, so a
/// rotation takes effect without a restart.
async fn follow_secrets(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SECRETS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The same failure (a rekey awaiting a reload) is logged once, not
    // every poll.
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match engine.refresh_secrets().await {
            Ok(true) => {
                last_error = None;
                tracing::info!("Secrets changed; the new values are in use.");
            }
            Ok(false) => {}
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "Secrets changed but cannot be loaded; the previous values stay in use.");
                    last_error = Some(text);
                }
            }
        }
    }
}

impl Service {
    /// Starts the HTTP server (on `listener`), the workers, the scheduler
    /// and alert delivery.
    pub async fn start(
        engine: Arc<Engine>,
        listener: Option<TcpListener>,
        roles: Roles,
        observer: Arc<dyn Observer>,
        store_location: &str,
    ) -> std::io::Result<Self> {
        let metrics = Metrics::install();
        let shutdown = CancellationToken::new();
        let wake_workers = Arc::new(Notify::new());
        let wake_alerts = Arc::new(Notify::new());
        let mut tasks = tokio::task::JoinSet::new();
        let mut addr = None;
        let mut health_addr = None;
        let (deploy, deploy_requests) = tokio::sync::mpsc::channel(4);
        if let Some(listener) = listener {
            let local = listener.local_addr()?;
            let instance_secret: Arc<str> = engine
                .store()
                .instance_secret()
                .await
                .map_err(std::io::Error::other)?
                .into();
            let state = AppState {
                engine: Arc::clone(&engine),
                deploy,
                wake_workers: Arc::clone(&wake_workers),
                metrics: metrics.clone(),
                store_id: store_id(store_location),
                instance_secret,
            };
            // A worker serves only its health: no webhooks, no API.
            let app = if roles.http {
                addr = Some(local);
                router(state)
            } else {
                health_addr = Some(local);
                health_router(state)
            };
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "The HTTP server stopped.");
                }
            });
        }
        let workers = usize::try_from(engine.project().config.serve.workers).unwrap_or(64);
        let alert_observer: Arc<dyn Observer> = Arc::new(WakeOnFailure {
            inner: observer,
            wake: Arc::clone(&wake_alerts),
        });
        tasks.spawn(plumb_engine::worker::run_workers(
            Arc::clone(&engine),
            workers,
            Arc::clone(&wake_workers),
            alert_observer,
            shutdown.clone(),
        ));
        tasks.spawn(plumb_engine::alerts::run_delivery(
            Arc::clone(&engine),
            wake_alerts,
            shutdown.clone(),
        ));
        tasks.spawn(metrics_setup::sample_gauges(
            Arc::clone(&engine),
            metrics.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(follow_secrets(Arc::clone(&engine), shutdown.clone()));
        let service = Self {
            addr,
            health_addr,
            deploy_requests: std::sync::Mutex::new(Some(deploy_requests)),
            shutdown,
            scheduler: tokio::sync::Mutex::new(None),
            tasks: tokio::sync::Mutex::new(tasks),
            engine,
            wake_workers,
        };
        if roles.scheduler {
            service.restart_scheduler().await;
            service
                .tasks
                .lock()
                .await
                .spawn(plumb_engine::retention::run_purge(
                    Arc::clone(&service.engine),
                    service.shutdown.clone(),
                ));
        }
        Ok(service)
    }

    /// The deployments asked for through the API; taken once by whoever
    /// can reload the project. Until then such requests time out with 503.
    pub fn take_deploy_requests(&self) -> Option<tokio::sync::mpsc::Receiver<DeployRequest>> {
        match self.deploy_requests.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// (Re)starts the scheduler with the engine's current project.
    pub async fn restart_scheduler(&self) {
        let mut slot = self.scheduler.lock().await;
        if let Some((token, handle)) = slot.take() {
            token.cancel();
            let _ = handle.await;
        }
        let token = self.shutdown.child_token();
        let handle = tokio::spawn(plumb_engine::schedule::run_schedules(
            Arc::clone(&self.engine),
            Arc::clone(&self.wake_workers),
            token.clone(),
        ));
        *slot = Some((token, handle));
    }

    /// Stops accepting work, interrupts running executions (their leases are
    /// released so they resume at once on the next start) and waits.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        if let Some((_, handle)) = self.scheduler.lock().await.take() {
            let _ = handle.await;
        }
        let mut tasks = self.tasks.lock().await;
        // A slow client must not hold the process: give the HTTP server and
        // in-flight work a bounded time, then stop waiting.
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "Shutdown grace period over; stopping anyway."
            );
            tasks.abort_all();
        }
        drop(tasks);
        // Database sessions end cleanly, but never hold the process.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.engine.close_pools()).await;
    }
}

/// Passes events on, and wakes alert delivery when a run fails here.
struct WakeOnFailure {
    inner: Arc<dyn Observer>,
    wake: Arc<Notify>,
}

impl Observer for WakeOnFailure {
    fn on_event(&self, event: &plumb_engine::RunEvent) {
        if let plumb_engine::RunEvent::Finished {
            status: plumb_store::RunStatus::Failed,
            ..
        } = event
        {
            self.wake.notify_one();
        }
        self.inner.on_event(event);
    }
}
