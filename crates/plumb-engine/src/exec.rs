//! Executing one run: walk the steps, skip what the journal already holds,
//! perform the rest with retries, commit each outcome before moving on.
//!
//! # The journal protocol
//!
//! * A step with effects (`http`) writes a `running` row with its attempt
//!   number *before* each attempt. After a crash that row tells us the
//!   attempt may have happened; the step is re-sent with the same
//!   idempotency key, and the attempt count carries on.
//! * Every step writes its outcome (`succeeded` with the output, or `failed`
//!   with the error) in one commit before the next step starts. Pure steps
//!   (`jq`, `assert`, `if`) write only that row.
//! * `for_each` first commits its item list (so a resume sees the same items
//!   at the same indices, whatever the expression would say now), then each
//!   item journals on its own as `(step, index)`, then the step's row
//!   holds the array of item outputs.
//! * `sleep` commits its wake-up time first; a resumed run waits only the
//!   remainder.
//! * `if` commits the branch it took; a resume follows the same branch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_connectors::http::{HttpRequest, same_origin};
use plumb_core::expr::{Budget, EvalError, Template, json_to_val};
use plumb_core::model::{Action, Connection, ForEachShape, HttpAction, Project, Step, Workflow};
use plumb_store::{AttemptFailure, Failure, Run, StepRecord, StepStatus, StoreError, now_ms};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Engine;
use crate::events::{Observer, RunEvent};
use crate::retry::delay_after;

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
    if step.for_each.is_some() && item.is_none() {
        ForEachShape::AllItems
    } else {
        ForEachShape::One
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
    lazy: std::collections::BTreeSet<String>,
    trigger: Val,
    /// The outcome of the workflow's last step, committed with the run's end.
    last_outcome: std::sync::Mutex<Option<StepRecord>>,
    /// This execution's claim token (fences every journal write).
    token: String,
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
        let token = run
            .lease_owner
            .clone()
            .unwrap_or_else(|| engine.owner.as_str().to_owned());
        let journal = journal
            .into_iter()
            .map(|r| ((r.step_id.clone(), r.item), r))
            .collect();
        Self {
            engine,
            project,
            run,
            workflow,
            journal,
            observer,
            stop,
            outputs: jaq_json::Map::default(),
            lazy: std::collections::BTreeSet::new(),
            trigger,
            last_outcome: std::sync::Mutex::new(None),
            token,
        }
    }

    /// Whether `step` is the last top-level step: after it, only the run's
    /// end is left to commit.
    fn is_last_step(&self, step: &Step) -> bool {
        // An `if` is never deferred: its branch decision must be committed
        // before the branch runs.
        !matches!(step.action, Action::If(_))
            && self
                .workflow
                .steps
                .last()
                .is_some_and(|last| std::ptr::eq(last, step))
    }

    /// The last step's outcome, to be committed with the run's end.
    pub(crate) fn take_last_outcome(&self) -> Option<StepRecord> {
        self.last_outcome.lock().ok().and_then(|mut l| l.take())
    }

    pub(crate) async fn run_all(&mut self) -> Result<(), Halt> {
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
            }
            Ok(())
        })
    }

    async fn run_step(&mut self, step: &Step) -> Result<(), Halt> {
        let prior = self.journal.get(&(step.id.clone(), None)).cloned();
        if let Some(record) = &prior {
            match record.status {
                StepStatus::Succeeded => {
                    let output = record.output.clone().unwrap_or(Value::Null);
                    // A for_each step's row holds no copy of its items'
                    // outputs (a run journaled before this version does).
                    if step.for_each.is_some() && output.is_null() {
                        self.lazy.insert(step.id.clone());
                    } else {
                        self.set_output(&step.id, &output);
                    }
                    self.observer.on_event(&RunEvent::StepRestored {
                        step_id: step.id.clone(),
                    });
                    if let Action::If(branch) = &step.action {
                        let took_then =
                            output.get("branch").and_then(Value::as_str) == Some("then");
                        let steps = if took_then {
                            &branch.then
                        } else {
                            &branch.otherwise
                        };
                        return self.run_steps(steps).await;
                    }
                    return Ok(());
                }
                StepStatus::Failed => {
                    return Err(Halt::Failed(Failure {
                        message: record.error.clone().unwrap_or_else(|| "failed".to_owned()),
                        step: Some(step.id.clone()),
                        item: None,
                        attempt: Some(record.attempt),
                        status_code: record.status_code,
                    }));
                }
                StepStatus::Running => {}
            }
        }
        self.assemble_outputs(step).await?;
        match &step.action {
            Action::If(branch) => {
                let started = now_ms();
                let condition = self
                    .eval_own(step, &branch.condition, started, |v| match v {
                        Value::Bool(b) => Ok(b),
                        other => Err(format!("the condition yielded {other}, not true or false")),
                    })
                    .await?;
                let output = json!({
                    "branch": if condition { "then" } else { "else" },
                    "condition": condition,
                });
                let summary = format!("took `{}`", if condition { "then" } else { "else" });
                self.commit_success(step, None, 1, started, &output, None, Some(summary))
                    .await?;
                self.set_output(&step.id, &output);
                let steps = if condition {
                    &branch.then
                } else {
                    &branch.otherwise
                };
                self.run_steps(steps).await
            }
            Action::Sleep(duration) => self.run_sleep(step, duration, prior.as_ref()).await,
            _ => match &step.for_each {
                Some(_) => self.run_for_each(step, prior.as_ref()).await,
                None => {
                    let context_base = self.context_base();
                    let outcome = self
                        .attempts(step, None, context_base, prior.as_ref())
                        .await;
                    match outcome {
                        Ok(o) => {
                            self.set_output(&step.id, &o.output);
                            Ok(())
                        }
                        Err(halt) => Err(halt),
                    }
                }
            },
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
        let checked = match self.eval(step, template, context).await {
            Ok(value) => accept(value),
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok(v) => Ok(v),
            Err(message) => Err(self.fail_step(step, None, 1, started, &message, None).await),
        }
    }

    async fn run_sleep(
        &mut self,
        step: &Step,
        duration: &Template,
        prior: Option<&StepRecord>,
    ) -> Result<(), Halt> {
        let wake_at = prior
            .and_then(|r| r.state.as_ref())
            .and_then(|s| s.get("wake_at"))
            .and_then(Value::as_i64);
        let started = prior.map_or_else(now_ms, |r| r.started_at);
        let wake_at = match wake_at {
            Some(w) => w,
            None => {
                let d = self
                    .eval_own(step, duration, started, |v| {
                        plumb_core::load::sleep_duration(&v)
                    })
                    .await?;
                let wake_at = now_ms() + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2);
                self.write_step(&self.running(
                    step,
                    None,
                    1,
                    Some(json!({ "wake_at": wake_at })),
                    started,
                ))
                .await?;
                wake_at
            }
        };
        self.observer.on_event(&RunEvent::StepStarted {
            step_id: step.id.clone(),
            item: None,
            attempt: 1,
            kind: "sleep",
        });
        let remaining = u64::try_from(wake_at - now_ms()).unwrap_or(0);
        tokio::select! {
            () = self.stop.cancelled() => return Err(Halt::Stopped),
            () = tokio::time::sleep(Duration::from_millis(remaining)) => {}
        }
        let output = json!({ "woke_at": wake_at });
        let slept = Duration::from_millis(u64::try_from(wake_at - started).unwrap_or(0));
        let summary = format!("slept {}", humanize(slept));
        self.commit_success(step, None, 1, started, &output, None, Some(summary))
            .await?;
        self.set_output(&step.id, &output);
        Ok(())
    }

    async fn run_for_each(&mut self, step: &Step, prior: Option<&StepRecord>) -> Result<(), Halt> {
        let Some(for_each) = &step.for_each else {
            return Ok(());
        };
        let started = prior.map_or_else(now_ms, |r| r.started_at);
        let journaled_items = prior
            .and_then(|r| r.state.as_ref())
            .and_then(|s| s.get("items"))
            .and_then(Value::as_array)
            .cloned();
        let items = match journaled_items {
            Some(items) => items,
            None => {
                let items = self
                    .eval_own(step, &for_each.items, started, |v| match v {
                        Value::Array(items) => Ok(items),
                        other => Err(format!(
                            "`for_each` must yield a list, but it yielded {}",
                            preview(&other, 80)
                        )),
                    })
                    .await?;
                // Commit the list first: indices (and so idempotency keys)
                // must mean the same items on every resume.
                let mut record = self.running(step, None, 1, None, started);
                record.state = Some(json!({ "items": items }));
                self.write_step(&record).await?;
                let Some(Value::Object(mut state)) = record.state else {
                    return Ok(());
                };
                match state.remove("items") {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                }
            }
        };
        let base = self.context_base();
        let concurrency = usize::try_from(for_each.concurrency.max(1)).unwrap_or(1);
        // Items start as slots free up: only `concurrency` of them exist as
        // futures at once, and each item's output goes to its own journal
        // row, not into memory here. Memory stays flat however many items
        // there are.
        let this = &*self;
        let list = &items;
        // Indices, not `items.iter()`: the closure then borrows the list
        // rather than taking a borrowed argument, which keeps the stream's
        // futures `Send` (a higher-ranked closure would not be).
        let mut results = futures::stream::iter(0..list.len())
            .map(|i| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                this.run_item(step, index, &list[i], base.clone())
            })
            .buffer_unordered(concurrency);
        let mut failed: Vec<u32> = Vec::new();
        let mut first_failure: Option<(u32, Failure)> = None;
        let mut stopped = false;
        let mut store_error = None;
        while let Some((index, result)) = results.next().await {
            match result {
                Ok(()) => {}
                Err(Halt::Failed(f)) => {
                    failed.push(index);
                    if first_failure.as_ref().is_none_or(|(i, _)| index < *i) {
                        first_failure = Some((index, f));
                    }
                }
                // A store error explains the stop better than the items it
                // stopped, so it wins.
                Err(Halt::Store(e)) => store_error = Some(e),
                Err(Halt::Stopped) => stopped = true,
            }
        }
        drop(results);
        if let Some(e) = store_error {
            return Err(Halt::Store(e));
        }
        if stopped || self.stop.is_cancelled() {
            return Err(Halt::Stopped);
        }
        let total = items.len();
        drop(items);
        let Some((first_index, first)) = first_failure else {
            // The step's own row holds no copy of the item outputs; a later
            // step that reads them gets them assembled from the item rows.
            let summary = format!("{total} items");
            self.commit_success(step, None, 1, started, &Value::Null, None, Some(summary))
                .await?;
            self.lazy.insert(step.id.clone());
            return Ok(());
        };
        failed.sort_unstable();
        let mut names: Vec<String> = failed.iter().take(20).map(u32::to_string).collect();
        if failed.len() > 20 {
            names.push(format!("and {} more", failed.len() - 20));
        }
        let message = format!(
            "{} of {total} items failed (items {}); item {first_index}: {}",
            failed.len(),
            names.join(", "),
            first.message
        );
        let now = now_ms();
        self.write_step(&StepRecord {
            run_id: self.run.id.clone(),
            step_id: step.id.clone(),
            item: None,
            status: StepStatus::Failed,
            attempt: 1,
            state: None,
            output: None,
            error: Some(message.clone()),
            status_code: first.status_code,
            started_at: started,
            finished_at: Some(now),
        })
        .await?;
        self.observer.on_event(&RunEvent::StepFailed {
            step_id: step.id.clone(),
            item: None,
            attempts: 1,
            error: message.clone(),
        });
        Err(Halt::Failed(Failure {
            message,
            step: Some(step.id.clone()),
            item: Some(first_index),
            attempt: first.attempt,
            status_code: first.status_code,
        }))
    }

    /// Makes the item outputs of earlier `for_each` steps visible to `step`,
    /// if its expressions may read them: assembled from the item rows, once.
    async fn assemble_outputs(&mut self, step: &Step) -> Result<(), Halt> {
        let wanted: Vec<String> = self
            .lazy
            .iter()
            .filter(|id| step.reads.reads(id))
            .cloned()
            .collect();
        for id in wanted {
            let texts = with_store_retries(|| self.engine.store.item_outputs(&self.run.id, &id))
                .await
                .map_err(|e| self.halt(e))?;
            let mut items = Vec::with_capacity(texts.len());
            for (index, text) in texts.iter().enumerate() {
                match jaq_json::read::parse_single(text.as_bytes()) {
                    Ok(v) => items.push(v),
                    Err(e) => {
                        let message = format!(
                            "the journaled output of item {index} of step `{id}` cannot be read: {e}"
                        );
                        return Err(self
                            .fail_step(step, None, 1, now_ms(), &message, None)
                            .await);
                    }
                }
            }
            drop(texts);
            self.outputs
                .insert(Val::from(id.clone()), Val::Arr(Arc::new(items)));
            self.lazy.remove(&id);
        }
        Ok(())
    }

    /// One `for_each` item: done already (its outcome is in the journal),
    /// or run now. Its output is journaled in its own row.
    async fn run_item(
        &self,
        step: &Step,
        index: u32,
        item: &Value,
        base: ContextBase,
    ) -> (u32, Result<(), Halt>) {
        let prior = self.journal.get(&(step.id.clone(), Some(index)));
        if let Some(record) = prior {
            match record.status {
                StepStatus::Succeeded => return (index, Ok(())),
                StepStatus::Failed => {
                    return (
                        index,
                        Err(Halt::Failed(Failure {
                            message: record.error.clone().unwrap_or_default(),
                            step: Some(step.id.clone()),
                            item: Some(index),
                            attempt: Some(record.attempt),
                            status_code: record.status_code,
                        })),
                    );
                }
                StepStatus::Running => {}
            }
        }
        let item = json_to_val(item);
        let result = self
            .attempts(step, Some((index, &item)), base, prior)
            .await
            .map(|_| ());
        (index, result)
    }

    /// Runs attempts of one step or item until one succeeds, a failure is
    /// permanent, or the retry policy is spent. Commits the outcome.
    async fn attempts(
        &self,
        step: &Step,
        item: Option<(u32, &Val)>,
        base: ContextBase,
        prior: Option<&StepRecord>,
    ) -> Result<Outcome, Halt> {
        let index = item.map(|(i, _)| i);
        let first_started = prior.map_or_else(now_ms, |r| r.started_at);
        let mut attempt = prior.map_or(0, |r| r.attempt);
        // An attempt cut short by a crash still counts (it may have had its
        // effect), but it must not leave the step without a real try: allow
        // one more than the policy if that attempt was the last.
        let max_attempts = match prior {
            Some(r) if r.status == StepStatus::Running => step.retry.attempts.max(r.attempt + 1),
            _ => step.retry.attempts,
        };
        let began = Instant::now();
        loop {
            attempt += 1;
            let attempt_started = now_ms();
            if step.has_effects() {
                self.write_step(&self.running(step, index, attempt, None, first_started))
                    .await?;
            }
            self.observer.on_event(&RunEvent::StepStarted {
                step_id: step.id.clone(),
                item: index,
                attempt,
                kind: step.action.kind(),
            });
            let key = idempotency_key(&self.run.id, &step.id, index);
            let context = base.for_step(step, item, attempt);
            let result = tokio::select! {
                () = self.stop.cancelled() => return Err(Halt::Stopped),
                r = tokio::time::timeout(step.timeout, self.perform(step, context, key)) => match r {
                    Ok(r) => r,
                    // A pure step that ran out of time would only loop
                    // again: retrying it wastes the retry budget and a thread.
                    Err(_) if !step.has_effects() => Err(ActionError::Permanent {
                        message: format!(
                            "expression failed: the expression did not finish within the step's timeout of {}",
                            humanize(step.timeout)
                        ),
                        status: None,
                    }),
                    Err(_) => Err(ActionError::Retryable {
                        message: format!("the step timed out after {}", humanize(step.timeout)),
                        status: None,
                        retry_after: None,
                    }),
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
                    let summary = summarize(step, &outcome);
                    self.commit_success_timed(
                        step,
                        index,
                        attempt,
                        first_started,
                        &outcome.output,
                        outcome.status_code,
                        began.elapsed(),
                        summary,
                    )
                    .await?;
                    return Ok(outcome);
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
                    if error.is_retryable() && attempt < max_attempts {
                        self.write_attempt(&failure).await?;
                        let delay = error
                            .retry_after()
                            .unwrap_or_else(|| delay_after(&step.retry, attempt));
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
                    let mut message = error.to_string();
                    if error.is_retryable() {
                        message = format!("{message} (gave up after {attempt} attempts)");
                    }
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
                    if matches!(halt, Halt::Failed(_))
                        && let Err(e) = self.write_attempt(&failure).await
                    {
                        tracing::warn!(run_id = %self.run.id, step = %step.id, error = %e.describe(), "Could not keep the last failed attempt for the timeline.");
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

    /// Performs one attempt of an action step.
    async fn perform(
        &self,
        step: &Step,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        match &step.action {
            Action::Http(http) => self.perform_http(step, http, context, key).await,
            Action::Jq(program) => {
                let program = program.clone();
                let output = crate::eval::evaluate(step.timeout, move |budget| {
                    program.eval(&context, budget)
                })
                .await
                .map_err(permanent_eval)?;
                Ok(Outcome {
                    output,
                    status_code: None,
                })
            }
            Action::Assert { condition, message } => {
                let value = eval_bounded(condition.clone(), context.clone(), step.timeout)
                    .await
                    .map_err(permanent_eval)?;
                match value {
                    Value::Bool(true) => Ok(Outcome {
                        output: Value::Bool(true),
                        status_code: None,
                    }),
                    Value::Bool(false) => {
                        let text = match message {
                            Some(m) => match eval_bounded(m.clone(), context, step.timeout).await {
                                Ok(Value::String(s)) => s,
                                Ok(other) => other.to_string(),
                                Err(e) => format!("assertion failed (and its message failed: {e})"),
                            },
                            None => format!("assertion failed: {}", condition_source(condition)),
                        };
                        Err(ActionError::Permanent {
                            message: text,
                            status: None,
                        })
                    }
                    other => Err(ActionError::Permanent {
                        message: format!(
                            "the assert condition yielded {}, not true or false",
                            preview(&other, 80)
                        ),
                        status: None,
                    }),
                }
            }
            Action::If(_) | Action::Sleep(_) => Err(ActionError::Permanent {
                message: format!(
                    "a `{}` step cannot be repeated by for_each",
                    step.action.kind()
                ),
                status: None,
            }),
        }
    }

    async fn perform_http(
        &self,
        step: &Step,
        http: &HttpAction,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        let config = &self.project.config;
        let Some(Connection::Http(connection)) = config.connections.get(&http.connection) else {
            return Err(ActionError::Permanent {
                message: format!(
                    "the connection `{}` is no longer defined in plumb.yaml",
                    http.connection
                ),
                status: None,
            });
        };
        let http_clone = http.clone();
        let rendered = crate::eval::evaluate(step.timeout, move |budget| {
            render_http(&http_clone, &context, budget)
        })
        .await
        .map_err(permanent_eval)?;
        let base = connection.base_url.as_str().trim_end_matches('/');
        let mut url = url::Url::parse(&format!("{base}{}", rendered.path)).map_err(|e| {
            ActionError::Permanent {
                message: format!(
                    "the path `{}` does not make a valid URL: {e}",
                    rendered.path
                ),
                status: None,
            }
        })?;
        if !same_origin(&url, &connection.base_url) {
            return Err(ActionError::Permanent {
                message: format!(
                    "the path `{}` leads to `{}`, outside the connection `{}` ({}); a step may only call its connection's host",
                    rendered.path,
                    url.host_str().unwrap_or("?"),
                    http.connection,
                    connection.base_url.host_str().unwrap_or("?"),
                ),
                status: None,
            });
        }
        if !rendered.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in &rendered.query {
                pairs.append_pair(k, v);
            }
        }
        // A step's header replaces the connection's header of the same name;
        // the idempotency key is always plumb's own.
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, value) in connection.headers.iter().cloned().chain(rendered.headers) {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            headers.push((name, value));
        }
        // The connection's credential goes last, so no step header can
        // replace it; it is only ever sent to this connection's origin. The
        // same snapshot of the secrets redacts the answer, so a rotation in
        // between cannot let the old value through.
        let secrets = self.engine.secrets();
        let mut credential_header = None;
        if let Some(auth) = &connection.auth {
            let (name, value) = auth_header(&secrets, &http.connection, auth)?;
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            credential_header = Some(name.clone());
            headers.push((name, value));
        }
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("idempotency-key"));
        headers.push(("Idempotency-Key".to_owned(), key));
        let response = self
            .engine
            .http
            .send(HttpRequest {
                method: http.method.clone(),
                url,
                headers,
                body: rendered.body,
                timeout: step.timeout,
                expect_status: http.expect_status.clone(),
                credential_header,
                scrub: Some(crate::secrets::scrubber(Arc::clone(&secrets))),
            })
            .await?;
        let status = response.status;
        // The snapshot that supplied the credential also redacts the answer:
        // an upstream echoing a value rotated meanwhile is still caught.
        let mut output = response.into_output();
        secrets.redactor().redact_json(&mut output);
        Ok(Outcome {
            output,
            status_code: Some(status),
        })
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
        let output = output.as_ref();
        let summary = summary.unwrap_or_else(|| preview(output, 60));
        self.commit_success_timed(
            step,
            item,
            attempt,
            started,
            output,
            status_code,
            elapsed,
            summary,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_success_timed(
        &self,
        step: &Step,
        item: Option<u32>,
        attempt: u32,
        started: i64,
        output: &Value,
        status_code: Option<u16>,
        elapsed: Duration,
        summary: String,
    ) -> Result<(), Halt> {
        // Callers pass outputs already sanitized (attempts, commit_success),
        // and write_step checks again before the store.
        let record = StepRecord {
            run_id: self.run.id.clone(),
            step_id: step.id.clone(),
            item,
            status: StepStatus::Succeeded,
            attempt,
            state: None,
            output: Some(output.clone()),
            error: None,
            status_code,
            started_at: started,
            finished_at: Some(now_ms()),
        };
        if item.is_none() && self.is_last_step(step) {
            // Nothing runs after it: its outcome is committed together with
            // the run's end, one commit instead of two.
            if let Ok(mut last) = self.last_outcome.lock() {
                *last = Some(record);
            }
        } else {
            self.write_step(&record).await?;
        }
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
        Ok(())
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

/// The context document minus what depends on the step.
#[derive(Clone)]
pub(crate) struct ContextBase {
    trigger: Val,
    steps: Val,
    run_id: String,
    workflow: String,
    version: String,
}

impl ContextBase {
    fn for_step(&self, step: &Step, item: Option<(u32, &Val)>, attempt: u32) -> Val {
        let key = idempotency_key(&self.run_id, &step.id, item.map(|(i, _)| i));
        let mut run = jaq_json::Map::default();
        run.insert(k("id"), Val::from(self.run_id.clone()));
        run.insert(k("workflow"), Val::from(self.workflow.clone()));
        run.insert(k("version"), Val::from(self.version.clone()));
        run.insert(k("attempt"), Val::from(attempt as isize));
        run.insert(k("idempotency_key"), Val::from(key));
        let mut doc = jaq_json::Map::default();
        doc.insert(k("trigger"), self.trigger.clone());
        doc.insert(k("steps"), self.steps.clone());
        doc.insert(k("run"), Val::obj(run));
        doc.insert(k("cursor"), Val::Null);
        match item {
            Some((index, value)) => {
                doc.insert(k("item"), value.clone());
                doc.insert(k("index"), Val::from(index as isize));
            }
            None => {
                doc.insert(k("item"), Val::Null);
                doc.insert(k("index"), Val::Null);
            }
        }
        Val::obj(doc)
    }
}

fn k(s: &str) -> Val {
    Val::from(s.to_owned())
}

/// Retries a store operation that failed transiently (busy, I/O), a few
/// times over about four seconds, before giving up.
/// The header that carries a connection's credential.
pub(crate) fn auth_header(
    secrets: &crate::secrets::Secrets,
    connection: &str,
    auth: &plumb_core::model::HttpAuth,
) -> Result<(String, String), ActionError> {
    use base64::Engine as _;
    use plumb_core::model::HttpAuth;
    let Some(value) = secrets.get(auth.secret()) else {
        return Err(ActionError::Permanent {
            message: format!(
                "the connection `{connection}` needs the secret `{}`, which is not available; set it with `plumb secrets set {}`",
                auth.secret(),
                auth.secret()
            ),
            status: None,
        });
    };
    Ok(match auth {
        HttpAuth::Bearer { .. } => (
            "Authorization".to_owned(),
            format!("Bearer {}", value.expose()),
        ),
        HttpAuth::Basic { username, .. } => {
            let raw = format!("{username}:{}", value.expose());
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
            ("Authorization".to_owned(), format!("Basic {encoded}"))
        }
        HttpAuth::Header { name, .. } => (name.clone(), value.expose().to_owned()),
    })
}

fn redact_error(engine: &Engine, e: ActionError) -> ActionError {
    match e {
        ActionError::Retryable {
            message,
            status,
            retry_after,
        } => ActionError::Retryable {
            message: engine.redact(&message),
            status,
            retry_after,
        },
        ActionError::Permanent { message, status } => ActionError::Permanent {
            message: engine.redact(&message),
            status,
        },
    }
}

pub(crate) async fn with_store_retries<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    const DELAYS_MS: [u64; 4] = [100, 400, 1000, 2500];
    let mut tries = DELAYS_MS.iter();
    loop {
        match op().await {
            Err(e) if e.is_transient() => match tries.next() {
                Some(ms) => {
                    tracing::warn!(error = %e, retry_in_ms = ms, "The store could not commit a journal row; retrying.");
                    tokio::time::sleep(Duration::from_millis(*ms)).await;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// `<run_id>:<step_id>[:<item_index>]` (SPEC G3): the same on every attempt
/// and every resume, so a receiver can drop duplicates.
#[must_use]
pub fn idempotency_key(run_id: &str, step_id: &str, item: Option<u32>) -> String {
    match item {
        Some(index) => format!("{run_id}:{step_id}:{index}"),
        None => format!("{run_id}:{step_id}"),
    }
}

struct RenderedHttp {
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

fn render_http(
    http: &HttpAction,
    context: &Val,
    budget: &Budget,
) -> Result<RenderedHttp, EvalError> {
    let path = match http.path.render(context, budget)? {
        Value::String(s) => s,
        other => {
            return Err(EvalError {
                message: format!("the path must be text, but it is {}", preview(&other, 60)),
            });
        }
    };
    let mut query = Vec::with_capacity(http.query.len());
    for (name, t) in &http.query {
        match t.render(context, budget)? {
            Value::Null => {}
            Value::String(s) => query.push((name.clone(), s)),
            other => query.push((name.clone(), other.to_string())),
        }
    }
    let mut headers = Vec::with_capacity(http.headers.len());
    for (name, t) in &http.headers {
        match t.render(context, budget)? {
            Value::Null => {}
            Value::String(s) => headers.push((name.clone(), s)),
            other => headers.push((name.clone(), other.to_string())),
        }
    }
    let body = match &http.body {
        Some(t) => Some(t.render(context, budget)?),
        None => None,
    };
    Ok(RenderedHttp {
        path,
        query,
        headers,
        body,
    })
}

/// Evaluates a template on the expression threads (see [`crate::eval`]);
/// a literal costs nothing.
async fn eval_bounded(
    template: Template,
    context: Val,
    timeout: Duration,
) -> Result<Value, EvalError> {
    if let Template::Literal(v) = &template {
        return Ok(v.clone());
    }
    crate::eval::evaluate(timeout, move |budget| template.render(&context, budget)).await
}

fn permanent_eval(e: EvalError) -> ActionError {
    ActionError::Permanent {
        message: format!("expression failed: {e}"),
        status: None,
    }
}

fn condition_source(t: &Template) -> String {
    match t {
        Template::Expr(p) => format!("`${{{{ {} }}}}` is false", p.source().trim()),
        _ => "the condition is false".to_owned(),
    }
}

fn summarize(step: &Step, outcome: &Outcome) -> String {
    match (&step.action, outcome.status_code) {
        (Action::Http(_), Some(status)) => format!("HTTP {status}"),
        (Action::Assert { .. }, _) => "ok".to_owned(),
        _ => preview(&outcome.output, 60),
    }
}

/// A short, single-line rendering of a value for progress output.
pub(crate) fn preview(value: &Value, max: usize) -> String {
    let text = value.to_string();
    if text.chars().count() <= max {
        text
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub(crate) fn humanize(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
