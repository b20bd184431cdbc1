//! plumb's engine: runs workflows durably.
//!
//! The engine owns the life of a run: creating it, holding its lease (with a
//! heartbeat), walking its steps, retrying failed attempts with backoff,
//! committing every outcome to the journal before the next step starts, and
//! ending the run in exactly one terminal state. On resume it replays the
//! journal instead of the steps, so finished work is never redone (SPEC G2)
//! and effects carry the same idempotency keys (G3).
//!
//! It talks to the store only through [`plumb_store::Store`] and to the
//! outside only through [`plumb_connectors`]; it does not know SQL, YAML or
//! the command line.
//!
//! Where to look: the step life-cycle (what is journaled when) is
//! `journal`; executing a run is `exec`, one module per step kind under
//! `exec/step`; expressions run on the threads of [`eval`]; claiming,
//! watching leases and catching panics is [`worker`]; who holds a lease and
//! whether it is provably dead is [`owner`]; schedules are [`schedule`], and
//! poll triggers `poll` (started with them); a workflow's cursor (SPEC G7)
//! is pinned when a run first executes and moved with its successful end
//! (`exec::Execution::cursor_move`).

pub mod alerts;
pub mod connections;
pub mod eval;
pub mod events;
mod exec;
pub mod failpoint;
mod journal;
pub mod lineage;
pub mod ops;
pub mod owner;
mod poll;
pub mod project_dir;
mod queue;
pub mod retention;
pub mod retry;
pub mod schedule;
pub mod secrets;
pub mod status;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use plumb_connectors::http::{ClientError, HttpClient};
use plumb_core::model::{Project, Workflow};
use plumb_core::{SourceFile, load_workflow};
use plumb_store::{
    Claim, Dedupe, Failure, Lease, NewAlert, NewRun, Release, Run, RunOutcome, RunStatus,
    StepRecord, Store, StoreError, WorkflowVersion, now_ms,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// How long a webhook's dedupe key may take to evaluate: it runs before
/// the sender is answered.
const DEDUPE_EVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub use events::{Observer, Quiet, RunEvent};
pub use exec::idempotency_key;
pub use owner::Owner;

/// Errors the engine reports to its caller (the run itself may still have
/// ended; these are about this process's work on it).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The journal could not be written while the run was executing; the
    /// run is left as it was, resumable.
    #[error(
        "could not write the journal of run {run_id}: {source}; the run is left as it was: once the store is writable again, continue it with `plumb run --resume {run_id}`"
    )]
    Journal {
        /// Run id.
        run_id: String,
        /// What the store said.
        source: StoreError,
    },
    /// The HTTP client could not start.
    #[error(transparent)]
    Http(#[from] ClientError),
    /// No run with this id.
    #[error("no run with id `{0}`; `plumb runs list` shows the runs")]
    NotFound(String),
    /// The run has already ended.
    #[error("run {run_id} has already ended ({status}); nothing to resume")]
    Ended {
        /// Run id.
        run_id: String,
        /// How it ended.
        status: RunStatus,
    },
    /// Another live process holds the run.
    #[error(
        "run {run_id} is being worked on by another process ({owner}); try again in {seconds}s, when its lease expires if that process has stopped"
    )]
    Busy {
        /// Run id.
        run_id: String,
        /// The holder.
        owner: String,
        /// Seconds until the lease expires.
        seconds: i64,
    },
    /// The run's workflow is not part of the project any more and its stored
    /// version is missing.
    #[error("run {run_id} needs workflow version {version}, which is not in the store")]
    VersionMissing {
        /// Run id.
        run_id: String,
        /// Version hash.
        version: String,
    },
}

/// How this process's work on a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunEnd {
    /// The run reached a terminal state.
    Finished {
        /// The state.
        status: RunStatus,
        /// Why it failed, if it did.
        failure: Option<Failure>,
    },
    /// This process stopped without ending the run (interrupted, or its
    /// lease was taken); it can be resumed.
    Interrupted {
        /// Why.
        reason: String,
    },
}

/// Runs workflows of one project against one store.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) http: HttpClient,
    /// Database pools of `sql` steps, opened on first use.
    pub(crate) sql: plumb_connectors::sql::SqlPools,
    /// Broker clients of `publish` steps, opened on first use.
    pub(crate) brokers: plumb_connectors::broker::Brokers,
    /// The state of this process's queue consumers.
    pub(crate) connections: connections::Connections,
    project: RwLock<Arc<Project>>,
    pub(crate) owner: Owner,
    lease: Duration,
    /// Workflow versions this process has already stored: a webhook should
    /// cost one write, not two.
    stored_versions: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The master key, or why there is none.
    master_key: RwLock<Result<Arc<plumb_vault::MasterKey>, String>>,
    /// Opened secrets and their redactor.
    secrets: RwLock<Arc<secrets::Secrets>>,
    /// Claim tokens of the executions running in this process now: their
    /// heartbeats renew them, so this process's lease watcher leaves them
    /// alone (a stall of the whole process stalls both alike).
    executing: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Keeps a claim token in [`Engine::executing`] while an execution runs.
struct Executing<'a> {
    engine: &'a Engine,
    token: String,
}

impl Drop for Executing<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.engine.executing.lock() {
            set.remove(&self.token);
        }
    }
}

/// A short, single-line rendering of a JSON value (at most `max`
/// characters), for progress and status lines.
#[must_use]
pub fn preview_json(value: &Value, max: usize) -> String {
    exec::preview(value, max)
}

/// The trigger document of a run started by hand with `input` (SPEC §2:
/// `.trigger.body` holds the input, as it would for a webhook).
#[must_use]
pub fn manual_trigger(input: Value) -> Value {
    json!({ "type": "manual", "body": input, "headers": {}, "query": {} })
}

impl Engine {
    /// An engine whose leases are held in the name of this process.
    ///
    /// # Errors
    ///
    /// Returns [`EngineError::Http`] if the HTTP client cannot start.
    pub fn new(
        store: Arc<dyn Store>,
        project: Arc<Project>,
        role: &str,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            store,
            http: HttpClient::new()?,
            sql: plumb_connectors::sql::SqlPools::default(),
            brokers: plumb_connectors::broker::Brokers::default(),
            connections: connections::Connections::default(),
            lease: project.config.serve.lease,
            project: RwLock::new(project),
            owner: Owner::this_process(role),
            stored_versions: std::sync::Mutex::new(std::collections::HashSet::new()),
            master_key: RwLock::new(Err("no master key was loaded".to_owned())),
            secrets: RwLock::new(Arc::new(secrets::Secrets::default())),
            executing: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Whether `holder` (a claim token) belongs to an execution running in
    /// this process now.
    pub(crate) fn is_executing(&self, holder: &str) -> bool {
        self.executing
            .lock()
            .map(|set| set.contains(holder))
            .unwrap_or(false)
    }

    /// The state of this process's queue consumers now.
    #[must_use]
    pub fn connections(&self) -> Vec<connections::ConsumerState> {
        self.connections.snapshot()
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The project as loaded now.
    #[must_use]
    pub fn project(&self) -> Arc<Project> {
        match self.project.read() {
            Ok(p) => Arc::clone(&p),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the project (after `SIGHUP`). Runs already executing keep
    /// the project they started with; runs stay pinned to their workflow
    /// version whatever the files say now.
    pub fn set_project(&self, project: Arc<Project>) {
        match self.project.write() {
            Ok(mut p) => *p = project,
            Err(poisoned) => *poisoned.into_inner() = project,
        }
        // Database connections may have changed: pools reopen on next use.
        self.sql.reset();
        self.brokers.reset();
    }

    /// Closes the database pools of `sql` steps (at shutdown).
    pub async fn close_pools(&self) {
        self.sql.close().await;
        self.brokers.reset();
    }

    /// Sets the master key (or why there is none) used to open secrets.
    pub fn set_master_key(&self, key: Result<Arc<plumb_vault::MasterKey>, String>) {
        match self.master_key.write() {
            Ok(mut k) => *k = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The master key, or why there is none.
    ///
    /// # Errors
    ///
    /// The reason no key is available.
    pub fn master_key(&self) -> Result<Arc<plumb_vault::MasterKey>, String> {
        match self.master_key.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Opens the stored secrets for the current project and builds the
    /// redactor. Call at start, after a reload, and when secrets change.
    ///
    /// # Errors
    ///
    /// When a secret the project uses is missing or cannot be opened.
    pub async fn load_secrets(&self) -> Result<(), secrets::SecretsError> {
        let key = self.master_key();
        let project = self.project();
        let loaded = match &key {
            Ok(k) => secrets::load(self.store.as_ref(), Ok(k.as_ref()), &project).await?,
            Err(why) => secrets::load(self.store.as_ref(), Err(why.as_str()), &project).await?,
        };
        match self.secrets.write() {
            Ok(mut s) => *s = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(())
    }

    /// Opens the secrets `project` names with `key`, without using them yet
    /// (see [`Engine::switch_to`]).
    ///
    /// # Errors
    ///
    /// As [`Engine::load_secrets`].
    pub async fn prepare_secrets(
        &self,
        project: &Project,
        key: &Result<Arc<plumb_vault::MasterKey>, String>,
    ) -> Result<Arc<secrets::Secrets>, secrets::SecretsError> {
        match key {
            Ok(k) => secrets::load(self.store.as_ref(), Ok(k.as_ref()), project).await,
            Err(why) => secrets::load(self.store.as_ref(), Err(why.as_str()), project).await,
        }
    }

    /// Switches to a reloaded project with its key and the secrets opened
    /// for it by [`Engine::prepare_secrets`]. Secrets go first: they hold
    /// every stored secret, so the old project keeps working with them
    /// until the project itself is swapped.
    pub fn switch_to(
        &self,
        project: Arc<Project>,
        key: Result<Arc<plumb_vault::MasterKey>, String>,
        opened: Arc<secrets::Secrets>,
    ) {
        match self.secrets.write() {
            Ok(mut s) => *s = opened,
            Err(poisoned) => *poisoned.into_inner() = opened,
        }
        self.set_master_key(key);
        self.set_project(project);
    }

    /// Reloads secrets if another process set, rotated or deleted one.
    ///
    /// # Errors
    ///
    /// As [`Engine::load_secrets`]; the secrets held before stay in use.
    pub async fn refresh_secrets(&self) -> Result<bool, secrets::SecretsError> {
        let version = self.store.secrets_version().await?;
        if version == self.secrets().version {
            return Ok(false);
        }
        self.load_secrets().await?;
        Ok(true)
    }

    /// The opened secrets.
    #[must_use]
    pub fn secrets(&self) -> Arc<secrets::Secrets> {
        match self.secrets.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Redacts every secret value from a JSON value.
    pub fn redact_json(&self, value: &mut Value) {
        self.secrets().redactor().redact_json(value);
    }

    /// Redacts every secret value from a text.
    #[must_use]
    pub fn redact(&self, text: &str) -> String {
        self.secrets().redactor().redact(text).into_owned()
    }

    /// The HTTP client (shared with alert delivery).
    #[must_use]
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// How long leases last.
    #[must_use]
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// This process's lease owner id.
    #[must_use]
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub(crate) fn lease(&self) -> Lease {
        Lease {
            owner: self.owner.as_str().to_owned(),
            ttl_ms: i64::try_from(self.lease.as_millis()).unwrap_or(30_000),
        }
    }

    /// Stores the workflow's version and describes a new run of it.
    pub(crate) async fn new_run(
        &self,
        workflow: &Workflow,
        mut trigger: Value,
        lease: Option<Lease>,
    ) -> Result<NewRun, EngineError> {
        // An event may carry a secret value (a sender echoing a token): it is
        // redacted before it is stored or seen by any expression.
        self.redact_json(&mut trigger);
        for path in &workflow.redact {
            path.mask_trigger(&mut trigger);
        }
        let known = self
            .stored_versions
            .lock()
            .is_ok_and(|v| v.contains(&workflow.version));
        if !known {
            self.store
                .put_workflow_version(&WorkflowVersion {
                    hash: workflow.version.clone(),
                    workflow: workflow.name.clone(),
                    file: workflow.file.clone(),
                    source: workflow.source.to_string(),
                    created_at: now_ms(),
                })
                .await?;
            if let Ok(mut v) = self.stored_versions.lock() {
                v.insert(workflow.version.clone());
            }
        }
        Ok(NewRun {
            id: uuid::Uuid::now_v7().to_string(),
            workflow: workflow.name.clone(),
            version: workflow.version.clone(),
            trigger,
            lease,
            max_concurrency: workflow.concurrency,
            deadline: None,
            dedupe: None,
        })
    }

    /// Commits a new queued run of `workflow` for the workers, and returns
    /// its id. When this returns the run is durable (SPEC G1). With a
    /// `deadline`, the run is committed before it or not at all (the error
    /// then is transient): a caller that answers "not accepted" after the
    /// deadline can be sure the run does not exist.
    ///
    /// # Errors
    ///
    /// Returns [`EngineError::Store`] when the run cannot be committed.
    pub async fn enqueue_run(
        &self,
        workflow: &Workflow,
        trigger: Value,
        deadline: Option<std::time::Instant>,
    ) -> Result<String, EngineError> {
        let dedupe = self.dedupe_key(workflow, &trigger).await;
        self.enqueue(workflow, trigger, deadline, dedupe).await
    }

    /// Commits a new queued run of a queue-triggered `workflow`, deduped by
    /// the trigger's `dedupe` key or, without one (or when it is null), by
    /// `identity` (the message's).
    pub(crate) async fn enqueue_with(
        &self,
        workflow: &Workflow,
        trigger: Value,
        identity: Option<Dedupe>,
    ) -> Result<String, EngineError> {
        let dedupe = match self.dedupe_key(workflow, &trigger).await {
            Some(key) => Some(key),
            None => identity,
        };
        self.enqueue(workflow, trigger, None, dedupe).await
    }

    async fn enqueue(
        &self,
        workflow: &Workflow,
        trigger: Value,
        deadline: Option<std::time::Instant>,
        dedupe: Option<Dedupe>,
    ) -> Result<String, EngineError> {
        let mut run = self.new_run(workflow, trigger, None).await?;
        run.deadline = deadline;
        run.dedupe = dedupe;
        let created = self.store.create_run(&run).await;
        // Only a workflow with a `record_key` pays for the copy.
        if workflow.record_key.is_some() {
            match &created {
                Ok(()) => self.index_acceptance(workflow, run.trigger.clone(), &run.id, "accepted"),
                // Indexed under the run the first delivery started.
                Err(StoreError::Duplicate { run_id }) => {
                    self.index_acceptance(workflow, run.trigger.clone(), run_id, "dedupe_hit");
                }
                Err(_) => {}
            }
        }
        created?;
        Ok(run.id)
    }

    /// The dedupe key of a webhook delivery (see
    /// [`plumb_core::model::TriggerDedupe`]), evaluated over the trigger
    /// document before anything is masked. A key that is `null` or cannot
    /// be evaluated dedupes nothing: the event still starts its run (a
    /// possible duplicate is better than a lost event), and a warning says
    /// why.
    async fn dedupe_key(&self, workflow: &Workflow, trigger: &Value) -> Option<Dedupe> {
        let (dedupe, kind) = match &workflow.trigger {
            plumb_core::model::Trigger::Webhook {
                dedupe: Some(dedupe),
                ..
            } => (dedupe, "webhook"),
            plumb_core::model::Trigger::Queue(q) => (q.dedupe.as_ref()?, "queue"),
            _ => return None,
        };
        if trigger.get("type").and_then(Value::as_str) != Some(kind) {
            // A manual run is deliberate: it is never a duplicate.
            return None;
        }
        let context = plumb_core::expr::json_to_val(&serde_json::json!({ "trigger": trigger }));
        let template = dedupe.key.clone();
        // Bounded wait for a thread too: the sender is answered within
        // seconds however busy the runs' expressions keep the pool.
        let evaluated =
            eval::evaluate_within(DEDUPE_EVAL_TIMEOUT, DEDUPE_EVAL_TIMEOUT, move |budget| {
                template.render(&context, budget)
            })
            .await;
        let key = match evaluated {
            Ok(value) => plumb_core::model::TriggerDedupe::key_text(&value),
            Err(e) => {
                tracing::warn!(workflow = %workflow.name, error = %self.redact(&e.message), "The dedupe key could not be evaluated; the event starts a run without one.");
                return None;
            }
        };
        let Some(key) = key else {
            tracing::warn!(workflow = %workflow.name, key = %dedupe.source, "The dedupe key is null for this event; it starts a run without one.");
            return None;
        };
        let window = i64::try_from(dedupe.window.as_millis()).unwrap_or(i64::MAX);
        Some(Dedupe {
            key,
            expires_at: now_ms().saturating_add(window),
        })
    }
    /// Commits a new run of `workflow`, already leased to this process, and
    /// returns it. When this returns the run is durable: if the process dies
    /// now, `plumb run --resume` (or a worker) will run it.
    ///
    /// # Errors
    ///
    /// Returns [`EngineError::Store`] when the run cannot be committed.
    pub async fn create_run(
        &self,
        workflow: &Workflow,
        trigger: Value,
    ) -> Result<Run, EngineError> {
        let run = self.new_run(workflow, trigger, Some(self.lease())).await?;
        self.store.create_run(&run).await?;
        if let Some(key) = lineage::trigger_record_key(workflow, &run.trigger).await {
            self.note_lineage(vec![lineage::entry(
                &key,
                &workflow.name,
                &run.id,
                "accepted",
            )])
            .await;
        }
        self.store
            .run(&run.id)
            .await?
            .ok_or(EngineError::NotFound(run.id))
    }

    /// Takes over an interrupted run so it can be resumed here.
    ///
    /// A run whose holder is certainly dead (see [`owner`]) is taken at
    /// once. A lease that has run out by the wall clock is watched for its
    /// whole duration first (at most two minutes): a live holder renews
    /// every third of it, and stops working on the run within it when it
    /// cannot, so an unchanged heartbeat proves it stopped (whatever the
    /// clocks say).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`], [`EngineError::Ended`] or
    /// [`EngineError::Busy`] when the run cannot be taken.
    pub async fn claim(&self, run_id: &str) -> Result<Run, EngineError> {
        let lease = self.lease();
        let mut claim = self.store.claim_run(run_id, &lease, None).await?;
        if let Claim::Busy {
            owner,
            heartbeat,
            expires_at,
            ttl_ms,
        } = &claim
        {
            if owner::is_certainly_dead(owner) {
                tracing::info!(run_id, previous_owner = %owner, "Previous owner is gone; taking the run over.");
                claim = self
                    .store
                    .claim_run(run_id, &lease, Some((owner, *heartbeat)))
                    .await?;
            } else if *expires_at < now_ms() {
                // A whole lease duration: a live holder renews every third
                // of it and stops on its own within it when it cannot.
                let watch = Duration::from_millis(u64::try_from(*ttl_ms).unwrap_or(30_000))
                    .min(Duration::from_secs(120));
                tracing::info!(run_id, previous_owner = %owner, "The lease ran out by the clock; watching it before taking the run over.");
                tokio::time::sleep(watch).await;
                claim = self
                    .store
                    .claim_run(run_id, &lease, Some((owner, *heartbeat)))
                    .await?;
            }
        }
        match claim {
            Claim::Claimed(run) => Ok(*run),
            Claim::NotFound => Err(EngineError::NotFound(run_id.to_owned())),
            Claim::Ended(status) => Err(EngineError::Ended {
                run_id: run_id.to_owned(),
                status,
            }),
            Claim::Busy {
                owner,
                expires_at,
                ttl_ms,
                ..
            } => Err(EngineError::Busy {
                run_id: run_id.to_owned(),
                owner,
                seconds: ((expires_at - now_ms()) / 1000).clamp(0, ttl_ms / 1000) + 1,
            }),
        }
    }

    /// Why a claimed run cannot be executed at all, if it cannot: its
    /// record does not read back, or its executions kept stopping without
    /// ending it. Such a run is failed rather than tried again, so it can
    /// never hold up other runs.
    fn unrunnable(&self, run: &Run, project: &Project) -> Option<String> {
        if let Some(why) = &run.unreadable {
            return Some(format!("this run cannot be executed: {why}"));
        }
        let limit = project.config.serve.max_crashes;
        let crashes = run.strikes.saturating_sub(1);
        if crashes >= limit {
            let last = run
                .last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            return Some(format!(
                "crashed its worker {crashes} times: each execution stopped without ending the run (the process crashed or was killed, or the store refused its journal), so it is failed rather than tried again (serve.max_crashes is {limit}){last}"
            ));
        }
        None
    }

    /// Gives a run back after an execution that could not go on; it is
    /// claimed again after a backoff that grows with its strikes.
    ///
    /// The release is fenced by `owner` (the claim's token), so it is a
    /// no-op when another process already took the run over; a store that
    /// is briefly busy is retried, since a release that never lands leaves
    /// the run waiting for its lease to be watched out.
    pub(crate) async fn release_failed(
        &self,
        run_id: &str,
        owner: &str,
        strikes: u32,
        error: &str,
    ) {
        let wait = i64::try_from(retry::crash_backoff(strikes).as_millis()).unwrap_or(60_000);
        let how = Release::Failed {
            error: self.redact(error),
            not_before: now_ms() + wait,
        };
        let released =
            exec::with_store_retries(|| self.store.release_run(run_id, owner, &how)).await;
        if let Err(e) = released {
            tracing::warn!(run_id, error = %e, "Could not release the run; it is resumed once its lease is seen unrenewed.");
        }
    }

    /// The workflow a run is pinned to: the project's current one when the
    /// version matches, else the stored text of that version.
    async fn pinned_workflow(
        &self,
        project: &Project,
        run: &Run,
    ) -> Result<Result<Arc<Workflow>, String>, EngineError> {
        if let Some(w) = project.workflow(&run.workflow)
            && w.version == run.version
        {
            return Ok(Ok(Arc::clone(w)));
        }
        let Some(stored) = self.store.workflow_version(&run.version).await? else {
            return Err(EngineError::VersionMissing {
                run_id: run.id.clone(),
                version: run.version.clone(),
            });
        };
        let file = SourceFile {
            path: stored.file,
            text: stored.source,
        };
        Ok(load_workflow(&file, &project.config)
            .map(Arc::new)
            .map_err(|d| {
                format!(
                    "the workflow version this run started with ({}) no longer loads against plumb.yaml:\n{d}",
                    plumb_core::model::short_version(&run.version)
                )
            }))
    }

    /// Executes a run this process holds, from its first step without a
    /// committed outcome, until it ends or `cancel` fires.
    ///
    /// On cancel the in-flight attempt is abandoned, the lease is released
    /// and the run stays resumable ([`RunEnd::Interrupted`]).
    ///
    /// # Errors
    ///
    /// Returns [`EngineError::Store`] when the journal cannot be read or
    /// written; the run is then left to be resumed.
    pub async fn execute(
        &self,
        run: Run,
        observer: &dyn Observer,
        cancel: CancellationToken,
    ) -> Result<RunEnd, EngineError> {
        let began = Instant::now();
        // The claim's token: every fenced write of this execution uses it,
        // so a second execution of the same run can never interleave.
        let owner = run
            .lease_owner
            .clone()
            .unwrap_or_else(|| self.owner.as_str().to_owned());
        let run_id = run.id.clone();
        let workflow_name = run.workflow.clone();
        let strikes = run.strikes;
        if let Ok(mut set) = self.executing.lock() {
            set.insert(owner.clone());
        }
        let _executing = Executing {
            engine: self,
            token: owner.clone(),
        };
        // The heartbeat starts with the claim, before anything that can
        // take time (reading the journal, compiling a stored version), and
        // stops however this execution ends, unwinding from a panic
        // included: a dead execution must not keep its run.
        let stop = cancel.child_token();
        let lease_lost = Arc::new(AtomicBool::new(false));
        let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
            Arc::clone(&self.store),
            run_id.clone(),
            owner.clone(),
            self.lease,
            stop.clone(),
            Arc::clone(&lease_lost),
        )));
        let project = self.project();
        if let Some(message) = self.unrunnable(&run, &project) {
            return self
                .fail_unrunnable(&project, &run, &owner, message, observer, began)
                .await;
        }
        // A run claimed for the first time cannot have journal rows: writing
        // one needs a lease, and this is the first.
        let journal = if run.claims > 1 {
            match self.store.journal(&run.id).await {
                Ok(j) => j,
                Err(StoreError::Corrupt(why)) => {
                    let message =
                        format!("this run cannot be executed: its journal cannot be read ({why})");
                    return self
                        .fail_unrunnable(&project, &run, &owner, message, observer, began)
                        .await;
                }
                Err(e) => {
                    self.release_failed(&run_id, &owner, strikes, &e.to_string())
                        .await;
                    return Err(EngineError::Journal { run_id, source: e });
                }
            }
        } else {
            Vec::new()
        };
        observer.on_event(&RunEvent::Started {
            run_id: run.id.clone(),
            workflow: run.workflow.clone(),
            version: run.version.clone(),
            resumed: run.claims > 1 || !journal.is_empty(),
        });
        let pinned = match self.pinned_workflow(&project, &run).await {
            Ok(p) => p,
            Err(EngineError::Store(e)) => {
                self.release_failed(&run_id, &owner, strikes, &e.to_string())
                    .await;
                return Err(EngineError::Journal { run_id, source: e });
            }
            // A version that is not stored can never run: fail the run
            // (a dead letter, with alerts) rather than retry it forever.
            Err(other) => Err(other.to_string()),
        };
        let workflow = match pinned {
            Ok(w) => w,
            Err(message) => {
                return self
                    .fail_unrunnable(&project, &run, &owner, message, observer, began)
                    .await;
            }
        };

        // A workflow with a cursor: the run starts from the cursor it
        // pinned the first time it executed, on every resume.
        let mut run = run;
        if workflow.cursor.is_some() {
            match self.store.pin_cursor(&run.id, &owner).await {
                Ok(record) => run.cursor = Some(record),
                Err(e) => {
                    self.release_failed(&run_id, &owner, strikes, &e.to_string())
                        .await;
                    return Err(EngineError::Journal { run_id, source: e });
                }
            }
        }
        let run_for_alerts = run.clone();
        let mut execution = exec::Execution::new(
            self,
            Arc::clone(&project),
            run,
            Arc::clone(&workflow),
            journal,
            observer,
            stop.clone(),
        );
        // Evaluated over the stored trigger, as at acceptance: never waits
        // for the acceptance's own index write.
        execution.run_keys = lineage::trigger_record_key(&workflow, &execution.run.trigger)
            .await
            .into_iter()
            .collect();
        let mut result = execution.run_all().await.map(|()| None);
        if matches!(result, Ok(None)) && workflow.cursor.is_some() {
            result = execution.cursor_move().await.map(Some);
        }
        let last_outcome = execution.take_last_outcome();
        drop(heartbeat);
        drop(execution);

        match result {
            Ok(cursor) => {
                self.end(
                    &workflow_name,
                    &run_id,
                    &owner,
                    strikes,
                    cursor.map_or(RunOutcome::Succeeded, RunOutcome::SucceededMovingCursor),
                    last_outcome.as_ref(),
                    &[],
                    observer,
                    began,
                )
                .await
            }
            Err(exec::Halt::Failed(failure)) => {
                let alerts = self.failure_alerts(
                    &project,
                    (&run_for_alerts.workflow, &run_for_alerts.id),
                    Some(&workflow),
                    &failure,
                );
                self.end(
                    &workflow_name,
                    &run_id,
                    &owner,
                    strikes,
                    RunOutcome::Failed(failure),
                    None,
                    &alerts,
                    observer,
                    began,
                )
                .await
            }
            Err(exec::Halt::Stopped) => {
                let reason = if lease_lost.load(Ordering::SeqCst) || !cancel.is_cancelled() {
                    // The lease may only have gone unrenewed (the store
                    // did not answer) rather than been taken: give it
                    // back, fenced, so the run does not wait for a
                    // watcher. A no-op when another process holds it.
                    self.release_failed(
                        &run_id,
                        &owner,
                        strikes,
                        "the lease could not be renewed (the store did not answer)",
                    )
                    .await;
                    "another process took over this run (this process lost its lease)".to_owned()
                } else {
                    // Interrupted on purpose: the run is resumable at once
                    // and this execution is not held against it.
                    if let Err(e) = self
                        .store
                        .release_run(&run_id, &owner, &Release::Clean)
                        .await
                    {
                        tracing::warn!(run_id, error = %e, "Could not release the run's lease; it will expire.");
                    }
                    "interrupted".to_owned()
                };
                observer.on_event(&RunEvent::Interrupted {
                    run_id: run_id.clone(),
                    reason: reason.clone(),
                });
                Ok(RunEnd::Interrupted { reason })
            }
            Err(exec::Halt::Store(source)) => {
                // Leave the run resumable after a backoff; the lease runs
                // out on its own if the store cannot even take the release.
                self.release_failed(&run_id, &owner, strikes, &source.to_string())
                    .await;
                Err(EngineError::Journal { run_id, source })
            }
        }
    }

    /// Fails a run that cannot be executed (see [`Engine::unrunnable`]):
    /// terminal, a dead letter, alerted.
    async fn fail_unrunnable(
        &self,
        project: &Project,
        run: &Run,
        owner: &str,
        message: String,
        observer: &dyn Observer,
        began: Instant,
    ) -> Result<RunEnd, EngineError> {
        tracing::error!(run_id = %run.id, workflow = %run.workflow, error = %message, "The run cannot be executed; failing it.");
        let failure = Failure {
            message,
            ..Failure::default()
        };
        let alerts = self.failure_alerts(project, (&run.workflow, &run.id), None, &failure);
        self.end(
            &run.workflow,
            &run.id,
            owner,
            run.strikes,
            RunOutcome::Failed(failure),
            None,
            &alerts,
            observer,
            began,
        )
        .await
    }

    /// The alerts a terminal failure sends, one per channel of the
    /// workflow's `alerts.on_failure`.
    /// Where alert links point: `serve.public_url`, or the listen address.
    pub(crate) fn public_base(&self) -> String {
        let project = self.project();
        project
            .config
            .serve
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", project.config.listen))
    }

    fn failure_alerts(
        &self,
        project: &Project,
        (workflow_name, run_id): (&str, &str),
        workflow: Option<&Workflow>,
        failure: &Failure,
    ) -> Vec<NewAlert> {
        let channels: Vec<String> =
            match workflow.or_else(|| project.workflow(workflow_name).map(AsRef::as_ref)) {
                Some(w) => w.alerts_on_failure.clone(),
                None => Vec::new(),
            };
        let base = self.public_base();
        let owner = workflow
            .or_else(|| project.workflow(workflow_name).map(AsRef::as_ref))
            .map(|w| w.owner.clone());
        channels
            .into_iter()
            .map(|channel| NewAlert {
                id: uuid::Uuid::now_v7().to_string(),
                channel,
                payload: json!({
                    "event": "run_failed",
                    "workflow": workflow_name,
                    "run_id": run_id,
                    "owner": owner,
                    "step": failure.step,
                    "item": failure.item,
                    "attempt": failure.attempt,
                    "status_code": failure.status_code,
                    "error": failure.message,
                    "failed_at": now_ms(),
                    "link": format!("{base}/api/v1/runs/{run_id}"),
                }),
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn end(
        &self,
        workflow: &str,
        run_id: &str,
        owner: &str,
        strikes: u32,
        outcome: RunOutcome,
        last_step: Option<&StepRecord>,
        alerts: &[NewAlert],
        observer: &dyn Observer,
        began: Instant,
    ) -> Result<RunEnd, EngineError> {
        // The last line of defence before anything leaves the engine: no
        // failure message or alert carries a secret value.
        let outcome = match outcome {
            RunOutcome::Failed(mut f) => {
                f.message = self.redact(&f.message);
                RunOutcome::Failed(f)
            }
            other => other,
        };
        let alerts: Vec<NewAlert> = alerts
            .iter()
            .cloned()
            .map(|mut a| {
                self.redact_json(&mut a.payload);
                a
            })
            .collect();
        let alerts = alerts.as_slice();
        let mut outcome = outcome;
        let mut finished = exec::with_store_retries(|| {
            self.store
                .finish_run(run_id, owner, &outcome, last_step, alerts)
        })
        .await;
        if let Err(StoreError::Rejected(why)) = &finished {
            // What the end would record breaks a store limit (a last step's
            // output, a failure text, an alert): retrying it as is can never
            // succeed, and releasing the run would only repeat it. The run
            // fails instead, saying why — with its alerts if they fit.
            tracing::error!(run_id, error = %why, "The run's end could not be recorded as it was; failing the run.");
            let failure = Failure {
                message: self.redact(&format!("the run's end could not be recorded: {why}")),
                ..Failure::default()
            };
            // The alerts the failure deserves (a run that was to succeed
            // had none).
            let mut alerts_now =
                self.failure_alerts(&self.project(), (workflow, run_id), None, &failure);
            for a in &mut alerts_now {
                self.redact_json(&mut a.payload);
            }
            outcome = RunOutcome::Failed(failure);
            finished = self
                .store
                .finish_run(run_id, owner, &outcome, None, &alerts_now)
                .await;
            if matches!(finished, Err(StoreError::Rejected(_))) {
                finished = self
                    .store
                    .finish_run(run_id, owner, &outcome, None, &[])
                    .await;
            }
        }
        match finished {
            Ok(()) => self.note_run_end(workflow, run_id, &outcome).await,
            Err(StoreError::LeaseLost { .. }) => {
                let reason = "another process took over this run before it could end".to_owned();
                observer.on_event(&RunEvent::Interrupted {
                    run_id: run_id.to_owned(),
                    reason: reason.clone(),
                });
                return Ok(RunEnd::Interrupted { reason });
            }
            Err(source) => {
                // Leave the run for the next claim (its last step's effect
                // carries the same key if it is sent again).
                self.release_failed(run_id, owner, strikes, &source.to_string())
                    .await;
                return Err(EngineError::Journal {
                    run_id: run_id.to_owned(),
                    source,
                });
            }
        }
        let (status, failure) = match outcome {
            RunOutcome::Succeeded | RunOutcome::SucceededMovingCursor(_) => {
                (RunStatus::Succeeded, None)
            }
            RunOutcome::Failed(f) => (RunStatus::Failed, Some(f)),
            RunOutcome::Cancelled(message) => (
                RunStatus::Cancelled,
                Some(Failure {
                    message,
                    ..Failure::default()
                }),
            ),
        };
        metrics::counter!(
            "plumb_runs_total",
            "workflow" => workflow.to_owned(),
            "status" => status.as_str(),
        )
        .increment(1);
        observer.on_event(&RunEvent::Finished {
            run_id: run_id.to_owned(),
            workflow: workflow.to_owned(),
            status,
            failure: failure.clone(),
            elapsed: began.elapsed(),
        });
        Ok(RunEnd::Finished { status, failure })
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the lease every third of its duration; if the lease is gone, stops
/// the run so two processes never work on it at once. Time is this
/// process's monotonic clock: a watcher expires a lease it has seen
/// unrenewed for a whole lease duration, so when renewals keep failing this
/// execution stops before that (five sixths of the duration after its last
/// renewal), retrying sooner in between.
async fn heartbeat(
    store: Arc<dyn Store>,
    run_id: String,
    owner: String,
    duration: Duration,
    stop: CancellationToken,
    lost: Arc<AtomicBool>,
) {
    let every = duration / 3;
    let lease = Lease {
        owner,
        ttl_ms: i64::try_from(duration.as_millis()).unwrap_or(30_000),
    };
    let mut renewed = Instant::now();
    let mut pause = every;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        let give_up_at = renewed + duration * 5 / 6;
        // Even past `give_up_at` (this process was stalled: paused,
        // throttled) a renewal gets a moment: one that lands is safe, since
        // watchers expire a lease only at the heartbeat they saw.
        let now = Instant::now();
        let attempt_until = (now + every).min(give_up_at).max(now + every / 4);
        let answer =
            tokio::time::timeout_at(attempt_until.into(), store.renew_lease(&run_id, &lease)).await;
        match answer {
            Ok(Ok(true)) => {
                renewed = Instant::now();
                pause = every;
            }
            Ok(Ok(false)) => {
                tracing::warn!(run_id, "Lease lost; stopping work on this run.");
                lost.store(true, Ordering::SeqCst);
                stop.cancel();
                return;
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the store did not answer in time".to_owned(),
                };
                if Instant::now() >= give_up_at {
                    tracing::warn!(
                        run_id,
                        error,
                        "The lease could not be renewed in time; stopping work on this run before watchers take it over."
                    );
                    lost.store(true, Ordering::SeqCst);
                    stop.cancel();
                    return;
                }
                // Keep going: the store may recover before the lease
                // expires, and journal writes are fenced anyway.
                tracing::warn!(run_id, error, "Could not renew the lease.");
                pause = (every / 4).max(Duration::from_millis(50));
            }
        }
    }
}
