//! Executing one run: walk the steps, skip what the journal already holds,
//! perform the rest with retries, commit each outcome before moving on.
//!
//! What is journaled when — the step life-cycle — is written down once, in
//! [`crate::journal`]; this module follows it. Each step kind is executed
//! in a module of its own under [`step`]; the context document and the
//! helpers every kind shares are in [`context`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jaq_json::Val;
use plumb_core::expr::{EvalError, Template, json_to_val};
use plumb_core::model::{Action, ForEachShape, Project, Step, Workflow};
use plumb_store::{AttemptFailure, Failure, Run, StepRecord, StepStatus, StoreError, now_ms};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::Engine;
use crate::events::{Observer, RunEvent};
use crate::journal::{self, AfterFailure, Prior, SuccessCommit};

mod context;
mod step;
pub(crate) use step::sql::connection_url;

pub(crate) use step::{
    PlannedRequest, auth_header, http_connection, json_size, link_next, next_request, plan_request,
    send_request,
};

pub use context::idempotency_key;
use context::{ContextBase, eval_bounded, redact_error};
pub(crate) use context::{humanize, preview, with_store_retries};

/// Evaluates a template on the expression threads, bounded by `timeout`.
pub(crate) async fn eval_template(
    template: Template,
    context: Val,
    timeout: Duration,
) -> Result<Value, EvalError> {
    eval_bounded(template, context, timeout).await
}

/// Why a run stopped early.
pub(crate) enum Halt {
    /// A step failed for good: the run fails.
    Failed(Failure),
    /// Work stopped (interrupt or lost lease); the run is left to resume.
    Stopped,
    /// The journal could not be written.
    Store(StoreError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LeaseLost { .. } => Self::Stopped,
            // The write itself is at fault (it would not read back), not
            // the store: the step fails, and trying again cannot help.
            StoreError::Rejected(message) => Self::Failed(Failure {
                message,
                ..Failure::default()
            }),
            other => Self::Store(other),
        }
    }
}

/// Whether a step's committed output is a list of item results.
fn output_shape(step: &Step, item: Option<u32>) -> ForEachShape {
    match item {
        None if step.for_each.is_some() => ForEachShape::AllItems,
        Some(page) if step.paginate().is_some() => ForEachShape::Page(page),
        _ => ForEachShape::One,
    }
}

/// What a step whose output lives in its item rows assembles into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lazy {
    /// A `for_each` step: the list of item results.
    Items,
    /// A paginated http step: `{pages: [...]}`.
    Pages,
}

impl Lazy {
    fn of(step: &Step) -> Self {
        if step.paginate().is_some() {
            Self::Pages
        } else {
            Self::Items
        }
    }
}

impl Halt {
    fn describe(&self) -> String {
        match self {
            Self::Failed(f) => f.message.clone(),
            Self::Stopped => "stopped".to_owned(),
            Self::Store(e) => e.to_string(),
        }
    }
}

type Key = (String, Option<u32>);

pub(crate) struct Execution<'e> {
    pub(crate) engine: &'e Engine,
    /// The project as it was when this execution started (a reload during
    /// the run does not change its connections under it).
    pub(crate) project: Arc<Project>,
    pub(crate) run: Run,
    pub(crate) workflow: Arc<Workflow>,
    pub(crate) journal: HashMap<Key, StepRecord>,
    pub(crate) observer: &'e dyn Observer,
    pub(crate) stop: CancellationToken,
    /// Outputs of steps so far, as jq values: `.steps` in expressions.
    outputs: jaq_json::Map,
    /// `for_each` steps that succeeded whose item outputs are not in
    /// `outputs` yet: loaded only for a step that reads them.
    lazy: std::collections::BTreeMap<String, Lazy>,
    trigger: Val,
    /// The outcome of the workflow's last step, committed with the run's end.
    last_outcome: std::sync::Mutex<Option<StepRecord>>,
    /// This execution's claim token (fences every journal write).
    token: String,
    /// `.cursor`: the cursor the run started from (`null` without one).
    cursor: Val,
    /// Each step's position in the workflow, nested steps included.
    position: HashMap<String, usize>,
    /// The position of the last step (or the cursor) that may read each
    /// step's output: past it, the output is dropped from memory (it stays
    /// in the journal). A step nobody reads has no entry.
    last_reader: HashMap<String, usize>,
    /// The records the run's trigger named (`record_key`): its steps'
    /// events are indexed under them unless a step names its own.
    pub(crate) run_keys: Vec<String>,
}

/// Where each step is in execution order, and the last position that may
/// read each step's output (`usize::MAX`: the workflow's cursor does).
fn liveness(workflow: &Workflow) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let all = workflow.all_steps();
    let position: HashMap<String, usize> = all
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let mut last_reader: HashMap<String, usize> = HashMap::new();
    let mut note = |reads: &plumb_core::expr::StepsRead, at: usize, before: usize| {
        if reads.whole {
            for earlier in all.iter().take(before) {
                last_reader.insert(earlier.id.clone(), at);
            }
        } else {
            for id in &reads.ids {
                last_reader.insert(id.clone(), at);
            }
        }
    };
    for (i, step) in all.iter().enumerate() {
        note(&step.reads, i, i);
    }
    if let Some(cursor) = &workflow.cursor {
        note(&cursor.reads, usize::MAX, all.len());
    }
    (position, last_reader)
}

/// How an action attempt ended well.
struct Outcome {
    output: Value,
    status_code: Option<u16>,
}

impl<'e> Execution<'e> {
    pub(crate) fn new(
        engine: &'e Engine,
        project: Arc<Project>,
        run: Run,
        workflow: Arc<Workflow>,
        journal: Vec<StepRecord>,
        observer: &'e dyn Observer,
        stop: CancellationToken,
    ) -> Self {
        let trigger = json_to_val(&run.trigger);
        let cursor = run
            .cursor
            .as_ref()
            .and_then(|c| c.pointer("/from/value"))
            .map_or(Val::Null, json_to_val);
        let token = run
            .lease_owner
            .clone()
            .unwrap_or_else(|| engine.owner.as_str().to_owned());
        let journal = journal
            .into_iter()
            .map(|r| ((r.step_id.clone(), r.item), r))
            .collect();
        let (position, last_reader) = liveness(&workflow);
        Self {
            engine,
            project,
            run,
            workflow,
            journal,
            observer,
            stop,
            outputs: jaq_json::Map::default(),
            lazy: std::collections::BTreeMap::new(),
            trigger,
            last_outcome: std::sync::Mutex::new(None),
            token,
            cursor,
            position,
            last_reader,
            run_keys: Vec::new(),
        }
    }

    /// The last step's outcome, to be committed with the run's end.
    pub(crate) fn take_last_outcome(&self) -> Option<StepRecord> {
        self.last_outcome.lock().ok().and_then(|mut l| l.take())
    }

    pub(crate) async fn run_all(&mut self) -> Result<(), Halt> {
        // A message that could not be taken as a record (not JSON, over a
        // limit, breaking its contract) was accepted as this run so that it
        // is a visible dead letter with its raw payload; it has nothing to
        // run.
        if let Some(reason) = crate::queue::rejection(&self.run.trigger) {
            return Err(Halt::Failed(Failure {
                message: reason,
                step: None,
                item: None,
                attempt: None,
                status_code: None,
            }));
        }
        let workflow = Arc::clone(&self.workflow);
        self.run_steps(&workflow.steps).await
    }

    fn run_steps<'a>(
        &'a mut self,
        steps: &'a [Step],
    ) -> Pin<Box<dyn Future<Output = Result<(), Halt>> + Send + 'a>> {
        Box::pin(async move {
            for step in steps {
                if self.stop.is_cancelled() {
                    return Err(Halt::Stopped);
                }
                self.run_step(step).await?;
                self.forget_dead_outputs(step);
            }
            Ok(())
        })
    }

    async fn run_step(&mut self, step: &Step) -> Result<(), Halt> {
        let prior = self.journal.get(&(step.id.clone(), None)).cloned();
        match Prior::of(prior.as_ref()) {
            Prior::Succeeded(record) => {
                let output = record.output.clone().unwrap_or(Value::Null);
                if journal::restores_items_lazily(step, &output) {
                    self.lazy.insert(step.id.clone(), Lazy::of(step));
                } else {
                    self.set_output(&step.id, &output);
                }
                self.observer.on_event(&RunEvent::StepRestored {
                    step_id: step.id.clone(),
                });
                if let Action::If(branch) = &step.action {
                    return self.resume_if(branch, &output).await;
                }
                return Ok(());
            }
            Prior::Failed(record) => {
                return Err(Halt::Failed(Failure {
                    message: record.error.clone().unwrap_or_else(|| "failed".to_owned()),
                    step: Some(step.id.clone()),
                    item: None,
                    attempt: Some(record.attempt),
                    status_code: record.status_code,
                }));
            }
            Prior::Fresh | Prior::InFlight(_) => {}
        }
        self.assemble_outputs(step).await?;
        match &step.action {
            Action::If(branch) => self.run_if(step, branch).await,
            Action::Sleep(duration) => self.run_sleep(step, duration, prior.as_ref()).await,
            Action::Http(http) if http.paginate.is_some() => {
                self.run_paginated(step, http, prior.as_ref()).await
            }
            _ => match &step.for_each {
                Some(_) => self.run_for_each(step, prior.as_ref()).await,
                None => {
                    let context_base = self.context_base();
                    let outcome = self
                        .attempts(step, None, context_base, prior.as_ref(), None)
                        .await;
                    match outcome {
                        Ok(o) => {
                            // What only this step read is dropped before its
                            // own output joins it in memory.
                            self.forget_dead_outputs(step);
                            self.set_output(&step.id, &o.output);
                            Ok(())
                        }
                        Err(halt) => Err(halt),
                    }
                }
            },
        }
    }

    /// Drops from memory the outputs no step after `step` reads: a large
    /// page list or transform result is not held through the rest of the
    /// run (the journal keeps it).
    fn forget_dead_outputs(&mut self, step: &Step) {
        let Some(&here) = self.position.get(&step.id) else {
            return;
        };
        let last_reader = &self.last_reader;
        let position = &self.position;
        let dead = |id: &str| {
            position.get(id).is_some_and(|p| *p <= here)
                && last_reader.get(id).is_none_or(|r| *r <= here)
        };
        let gone: Vec<String> = position.keys().filter(|id| dead(id)).cloned().collect();
        for id in gone {
            // Order does not matter: outputs are looked up by name.
            self.outputs.swap_remove(&Val::from(id.clone()));
            self.lazy.remove(&id);
        }
    }

    /// Makes an output visible to later steps; it is already sanitized (it
    /// comes from the journal, an attempt or `commit_success`).
    fn set_output(&mut self, step_id: &str, output: &Value) {
        self.outputs
            .insert(Val::from(step_id.to_owned()), json_to_val(output));
    }

    /// A step output as it may be kept and seen: secret values redacted and
    /// the workflow's `redact:` paths masked. Later steps see exactly what
    /// the journal holds, so a resumed run behaves like the first one, and
    /// an upstream echoing a secret cannot hand it to another step.
    ///
    /// Applied once, where an output is produced: in `attempts` (actions,
    /// and each `for_each` item) and in `commit_success` (`if`, `sleep` and
    /// a `for_each` step's list). Nothing downstream sanitizes again.
    fn sanitized<'v>(
        &self,
        step_id: &str,
        output: &'v Value,
        shape: ForEachShape,
    ) -> std::borrow::Cow<'v, Value> {
        let secrets = self.engine.secrets();
        let masks = self.workflow.redact.iter().any(|p| p.names_step(step_id));
        // The common case costs nothing: no secrets, no masks for this step.
        if !masks && secrets.redactor().is_empty() {
            return std::borrow::Cow::Borrowed(output);
        }
        let mut kept = output.clone();
        for path in &self.workflow.redact {
            path.mask_step_output(step_id, &mut kept, shape);
        }
        secrets.redactor().redact_json(&mut kept);
        std::borrow::Cow::Owned(kept)
    }

    /// The parts of the context document that do not depend on the step.
    fn context_base(&self) -> ContextBase {
        ContextBase {
            trigger: self.trigger.clone(),
            steps: Val::obj(self.outputs.clone()),
            run_id: self.run.id.clone(),
            workflow: self.run.workflow.clone(),
            version: self.run.version.clone(),
            cursor: self.cursor.clone(),
        }
    }

    /// Evaluates the workflow's `cursor` once every step succeeded: where
    /// the cursor moves with the run's end. A failure fails the run (its
    /// window is read again next time).
    pub(crate) async fn cursor_move(&mut self) -> Result<plumb_store::CursorMove, Halt> {
        let workflow = Arc::clone(&self.workflow);
        let Some(cursor) = &workflow.cursor else {
            return Ok(plumb_store::CursorMove { value: Value::Null });
        };
        self.assemble_reads(&cursor.reads).await?;
        let context = Val::obj({
            let mut doc = jaq_json::Map::default();
            doc.insert(Val::from("trigger".to_owned()), self.trigger.clone());
            doc.insert(
                Val::from("steps".to_owned()),
                Val::obj(self.outputs.clone()),
            );
            doc.insert(Val::from("cursor".to_owned()), self.cursor.clone());
            doc
        });
        let evaluated = tokio::select! {
            () = self.stop.cancelled() => return Err(Halt::Stopped),
            r = eval_bounded(cursor.template.clone(), context, workflow.cursor_timeout()) => r,
        };
        match evaluated {
            Ok(value) if json_size(&value) > plumb_store::cursors::MAX_CURSOR_BYTES => {
                Err(Halt::Failed(Failure {
                    message: format!(
                        "the workflow's `cursor` yielded {} bytes of JSON, more than a cursor may hold ({} KiB): make it a watermark (a time, an id, a token), not a list; the cursor stays where it was",
                        json_size(&value),
                        plumb_store::cursors::MAX_CURSOR_BYTES / 1024
                    ),
                    ..Failure::default()
                }))
            }
            Ok(value) => Ok(plumb_store::CursorMove { value }),
            Err(e) => Err(Halt::Failed(Failure {
                message: self.engine.redact(&format!(
                    "the workflow's `cursor` could not be evaluated: {e}; the cursor stays where it was"
                )),
                ..Failure::default()
            })),
        }
    }

    fn context(&self, step: &Step, item: Option<(u32, &Val)>, attempt: u32) -> Val {
        self.context_base().for_step(step, item, attempt)
    }

    async fn eval(
        &self,
        step: &Step,
        template: &Template,
        context: Val,
    ) -> Result<Value, EvalError> {
        eval_bounded(template.clone(), context, step.timeout).await
    }

    /// Evaluates one of the step's own expressions (a condition, a sleep
    /// duration, a `for_each` list) and checks its shape with `accept`; a
    /// failure of either fails the step (committed) and ends the run.
    async fn eval_own<T>(
        &self,
        step: &Step,
        template: &Template,
        started: i64,
        accept: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<T, Halt> {
        let context = self.context(step, None, 1);
        // Interrupts (shutdown, a lost lease) do not wait for a busy
        // expression pool.
        let evaluated = tokio::select! {
            () = self.stop.cancelled() => return Err(Halt::Stopped),
            r = self.eval(step, template, context) => r,
        };
        let checked = match evaluated {
            Ok(value) => accept(value),
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok(v) => Ok(v),
            Err(message) => Err(self.fail_step(step, None, 1, started, &message, None).await),
        }
    }

    /// Runs attempts of one step, item or page until one succeeds, a
    /// failure is permanent, or the retry policy is spent. Commits the
    /// outcome. A page (`item` is its index) sends `page` instead of the
    /// step's own request, and its row keeps that request.
    async fn attempts(
        &self,
        step: &Step,
        item: Option<(u32, &Val)>,
        base: ContextBase,
        prior: Option<&StepRecord>,
        page: Option<&step::PlannedRequest>,
    ) -> Result<Outcome, Halt> {
        let index = item.map(|(i, _)| i);
        let plan = journal::attempt_plan(Prior::of(prior), step.retry.attempts);
        let first_started = plan.first_started.unwrap_or_else(now_ms);
        let mut attempt = plan.made;
        let began = Instant::now();
        let record_keys = if page.is_none() {
            self.record_keys(step, item, &base).await
        } else {
            Vec::new()
        };
        loop {
            attempt += 1;
            let attempt_started = now_ms();
            if journal::marks_attempt_start(step, index) {
                self.write_step(&self.running(step, index, attempt, None, first_started))
                    .await?;
            }
            self.observer.on_event(&RunEvent::StepStarted {
                step_id: step.id.clone(),
                item: index,
                attempt,
                kind: step.action.kind(),
            });
            crate::failpoint::hit("step.attempt");
            let key = idempotency_key(&self.run.id, &step.id, index);
            let context = base.for_step(step, item, attempt);
            // Expression-only steps are timed by the evaluator, from when
            // their expression starts (not while it queues for a thread).
            let timed_here = !matches!(
                step.action,
                Action::Jq(_) | Action::Assert { .. } | Action::If(_)
            );
            let limit = if timed_here {
                step.timeout
            } else {
                Duration::MAX
            };
            let result = tokio::select! {
                () = self.stop.cancelled() => return Err(Halt::Stopped),
                r = tokio::time::timeout(limit, self.perform_for(step, page, context, key)) => match r {
                    Ok(r) => r,
                    Err(_) => Err(journal::timed_out(step)),
                },
            };
            // Nothing an upstream sends back — output or error — may carry a
            // secret value into the journal, the events or later expressions.
            let result = match result {
                Ok(mut outcome) => {
                    // Before anything sees it (the summary, later steps).
                    outcome.output = self
                        .sanitized(&step.id, &outcome.output, output_shape(step, index))
                        .into_owned();
                    Ok(outcome)
                }
                Err(e) => Err(redact_error(self.engine, e)),
            };
            match result {
                Ok(outcome) => {
                    // The effect happened and its outcome is not journaled:
                    // a crash here makes the resumed run send it again.
                    crate::failpoint::hit("step.effect");
                    let summary = summarize(step, &outcome);
                    let effect = effect_of(step, &outcome);
                    let output = self
                        .commit_success_timed(
                            step,
                            index,
                            attempt,
                            first_started,
                            page.map(step::PlannedRequest::to_state),
                            outcome.output,
                            outcome.status_code,
                            began.elapsed(),
                            summary,
                        )
                        .await?;
                    self.note(
                        &record_keys,
                        step,
                        index,
                        attempt,
                        "succeeded",
                        effect,
                        None,
                    )
                    .await;
                    return Ok(Outcome {
                        output,
                        status_code: outcome.status_code,
                    });
                }
                Err(error) => {
                    let failure = AttemptFailure {
                        run_id: self.run.id.clone(),
                        step_id: step.id.clone(),
                        item: index,
                        round: self.run.replays,
                        attempt,
                        started_at: attempt_started,
                        finished_at: now_ms(),
                        status_code: error.status(),
                        error: error.to_string(),
                        retryable: error.is_retryable(),
                    };
                    let message = match journal::after_failure(step, &error, attempt, plan.max) {
                        AfterFailure::Fail(message) => message,
                        AfterFailure::Retry(delay) => {
                            self.write_attempt(&failure).await?;
                            let effect = failure.status_code.map(|s| format!("HTTP {s}"));
                            self.note(
                                &record_keys,
                                step,
                                index,
                                attempt,
                                "retry",
                                effect,
                                Some(&failure.error),
                            )
                            .await;
                            metrics::counter!(
                                "plumb_step_retries_total",
                                "workflow" => self.run.workflow.clone(),
                            )
                            .increment(1);
                            self.observer.on_event(&RunEvent::StepRetrying {
                                step_id: step.id.clone(),
                                item: index,
                                attempt,
                                error: error.to_string(),
                                delay,
                            });
                            tokio::select! {
                                () = self.stop.cancelled() => return Err(Halt::Stopped),
                                () = tokio::time::sleep(delay) => {}
                            }
                            continue;
                        }
                    };
                    // The outcome first: a crash between the two writes must
                    // leave a failed step, not a `running` one that a resume
                    // would send again.
                    let halt = self
                        .fail_step(
                            step,
                            index,
                            attempt,
                            first_started,
                            &message,
                            error.status(),
                        )
                        .await;
                    if matches!(halt, Halt::Failed(_)) {
                        if let Err(e) = self.write_attempt(&failure).await {
                            tracing::warn!(run_id = %self.run.id, step = %step.id, error = %e.describe(), "Could not keep the last failed attempt for the timeline.");
                        }
                        let effect = failure.status_code.map(|s| format!("HTTP {s}"));
                        self.note(
                            &record_keys,
                            step,
                            index,
                            attempt,
                            "failed",
                            effect,
                            Some(&message),
                        )
                        .await;
                    }
                    return Err(halt);
                }
            }
        }
    }

    /// A `running` journal row: an attempt in flight, or durable state
    /// (item list, wake-up time) committed before the work it describes.
    fn running(
        &self,
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        state: Option<Value>,
        started_at: i64,
    ) -> StepRecord {
        StepRecord {
            run_id: self.run.id.clone(),
            step_id: step.id.clone(),
            item,
            status: StepStatus::Running,
            attempt,
            state,
            output: None,
            error: None,
            status_code: None,
            started_at,
            finished_at: None,
        }
    }

    /// Writes one journal row. Transient store errors (locked, disk
    /// trouble) are retried briefly; if the write still fails, or the lease
    /// is gone, every other part of this run stops too.
    async fn write_step(&self, record: &StepRecord) -> Result<(), Halt> {
        let owner = self.token.as_str();
        // Outputs arrive sanitized (see `sanitized`); the step's own state
        // and error text are redacted here, the last stop before the store.
        // Without secrets there is nothing to redact and nothing to copy (a
        // `for_each` item list may be large).
        let secrets = self.engine.secrets();
        let redactor = secrets.redactor();
        let redacted;
        let record = if redactor.is_empty() {
            record
        } else {
            let mut copy = record.clone();
            if let Some(state) = &mut copy.state {
                redactor.redact_json(state);
            }
            if let Some(e) = &mut copy.error {
                *e = redactor.redact(e).into_owned();
            }
            redacted = copy;
            &redacted
        };
        with_store_retries(|| self.engine.store.record_step(owner, record))
            .await
            .map_err(|e| self.halt(e))
    }

    /// Keeps a failed attempt for the timeline, like [`Self::write_step`].
    async fn write_attempt(&self, failure: &AttemptFailure) -> Result<(), Halt> {
        let owner = self.token.as_str();
        let mut failure = failure.clone();
        failure.error = self.engine.redact(&failure.error);
        let failure = &failure;
        with_store_retries(|| self.engine.store.record_attempt_failure(owner, failure))
            .await
            .map_err(|e| self.halt(e))
    }

    fn halt(&self, e: StoreError) -> Halt {
        // A refused record fails its own step or item; everything else
        // about the store stops every part of the run.
        if !matches!(e, StoreError::Rejected(_)) {
            self.stop.cancel();
        }
        Halt::from(e)
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_success(
        &self,
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        started: i64,
        output: &Value,
        status_code: Option<u16>,
        summary: Option<String>,
    ) -> Result<(), Halt> {
        let elapsed = Duration::from_millis(u64::try_from(now_ms() - started).unwrap_or(0));
        let output = self.sanitized(&step.id, output, output_shape(step, item));
        let summary = summary.unwrap_or_else(|| preview(output.as_ref(), 60));
        self.commit_success_timed(
            step,
            item,
            attempt,
            started,
            None,
            output.into_owned(),
            status_code,
            elapsed,
            summary,
        )
        .await
        .map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_success_timed(
        &self,
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        started: i64,
        state: Option<Value>,
        output: Value,
        status_code: Option<u16>,
        elapsed: Duration,
        summary: String,
    ) -> Result<Value, Halt> {
        // Callers pass outputs already sanitized (attempts, commit_success),
        // and write_step checks again before the store. The output moves
        // into the row and back out after the write: a large one is never
        // copied.
        let mut record = StepRecord {
            run_id: self.run.id.clone(),
            step_id: step.id.clone(),
            item,
            status: StepStatus::Succeeded,
            attempt,
            state,
            output: Some(output),
            error: None,
            status_code,
            started_at: started,
            finished_at: Some(now_ms()),
        };
        let output = match journal::success_commit(&self.workflow, step, item) {
            // Nothing runs after the last step: its output is needed only
            // in the row committed with the run's end.
            SuccessCommit::WithRunEnd => {
                if let Ok(mut last) = self.last_outcome.lock() {
                    *last = Some(record);
                }
                Value::Null
            }
            SuccessCommit::Now => {
                self.write_step(&record).await?;
                record.output.take().unwrap_or(Value::Null)
            }
        };
        metrics::histogram!(
            "plumb_step_duration_seconds",
            "workflow" => self.run.workflow.clone(),
            "kind" => step.action.kind(),
        )
        .record(elapsed.as_secs_f64());
        self.observer.on_event(&RunEvent::StepSucceeded {
            step_id: step.id.clone(),
            item,
            attempts: attempt,
            elapsed,
            summary,
        });
        Ok(output)
    }

    /// Commits a failed outcome and returns the failure that ends the run
    /// (or why it could not be committed).
    async fn fail_step(
        &self,
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        started: i64,
        message: &str,
        status_code: Option<u16>,
    ) -> Halt {
        let written = self
            .write_step(&StepRecord {
                run_id: self.run.id.clone(),
                step_id: step.id.clone(),
                item,
                status: StepStatus::Failed,
                attempt,
                state: None,
                output: None,
                error: Some(message.to_owned()),
                status_code,
                started_at: started,
                finished_at: Some(now_ms()),
            })
            .await;
        if let Err(halt) = written {
            return halt;
        }
        self.observer.on_event(&RunEvent::StepFailed {
            step_id: step.id.clone(),
            item,
            attempts: attempt,
            error: message.to_owned(),
        });
        Halt::Failed(Failure {
            message: message.to_owned(),
            step: Some(step.id.clone()),
            item,
            attempt: Some(attempt),
            status_code,
        })
    }
}

/// What an effect did, for lineage: `HTTP 201`, `3 rows` (`already
/// committed` when an `exactly_once` write had been made before).
fn effect_of(step: &Step, outcome: &Outcome) -> Option<String> {
    match &step.action {
        Action::Http(_) => outcome.status_code.map(|s| format!("HTTP {s}")),
        Action::Sql(_) => {
            let rows = outcome
                .output
                .get("rows_affected")
                .and_then(Value::as_u64)?;
            let again = outcome.output.get("already_committed") == Some(&Value::Bool(true));
            Some(format!(
                "{rows} rows{}",
                if again { " (already committed)" } else { "" }
            ))
        }
        Action::Publish(_) => {
            let id = outcome.output.get("id").and_then(Value::as_str)?;
            let again = outcome.output.get("already_published") == Some(&Value::Bool(true));
            Some(format!(
                "entry {id}{}",
                if again { " (already published)" } else { "" }
            ))
        }
        _ => None,
    }
}

impl Execution<'_> {
    /// The records an attempt of `step` (or its item) is about: the
    /// step's own `record_key` evaluated over its item, else the run's.
    async fn record_keys(
        &self,
        step: &Step,
        item: Option<(u32, &Val)>,
        base: &ContextBase,
    ) -> Vec<String> {
        let Some(template) = &step.record_key else {
            return self.run_keys.clone();
        };
        let context = base.for_step(step, item, 1);
        match self.eval(step, template, context).await {
            Ok(value) => crate::lineage::key_text(&value)
                .map(|k| vec![self.engine.redact(&k)])
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(run_id = %self.run.id, step = %step.id, error = %self.engine.redact(&e.to_string()), "The step's record key could not be evaluated; it is not indexed for lineage.");
                Vec::new()
            }
        }
    }

    /// Indexes one event of a step or item under each of `keys`.
    #[allow(clippy::too_many_arguments)]
    async fn note(
        &self,
        keys: &[String],
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        event: &str,
        effect: Option<String>,
        detail: Option<&str>,
    ) {
        if keys.is_empty() {
            return;
        }
        let entries = keys
            .iter()
            .map(|key| {
                let mut e = crate::lineage::entry(key, &self.run.workflow, &self.run.id, event);
                e.step_id = Some(step.id.clone());
                e.item = item;
                e.attempt = Some(attempt);
                e.idempotency_key = step
                    .has_effects()
                    .then(|| idempotency_key(&self.run.id, &step.id, item));
                e.effect.clone_from(&effect);
                e.detail = detail.map(|d| self.engine.redact(d));
                e
            })
            .collect();
        self.engine.note_lineage(entries).await;
    }
}

fn summarize(step: &Step, outcome: &Outcome) -> String {
    match (&step.action, outcome.status_code) {
        (Action::Http(_), Some(status)) => format!("HTTP {status}"),
        (Action::Assert { .. }, _) => "ok".to_owned(),
        _ => preview(&outcome.output, 60),
    }
}
