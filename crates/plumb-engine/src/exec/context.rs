//! What expressions see, and the small helpers every step kind shares:
//! the context document, bounded evaluation, idempotency keys, store
//! retries and the wording of durations and previews.

use std::future::Future;
use std::time::Duration;

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_core::expr::{EvalError, Template};
use plumb_core::model::Step;
use plumb_store::StoreError;
use serde_json::Value;

use crate::Engine;

/// The context document minus what depends on the step.
#[derive(Clone)]
pub(crate) struct ContextBase {
    pub(crate) trigger: Val,
    pub(crate) steps: Val,
    pub(crate) run_id: String,
    pub(crate) workflow: String,
    pub(crate) version: String,
    /// `.cursor`: the cursor the run started from.
    pub(crate) cursor: Val,
}

impl ContextBase {
    pub(crate) fn for_step(&self, step: &Step, item: Option<(u32, &Val)>, attempt: u32) -> Val {
        Val::obj(self.document(step, item, attempt))
    }

    /// What `paginate.next` sees: the step's context plus `.response` (the
    /// page just received), `.request` (what fetched it), `.page` (its
    /// number, from 1) and `.link_next` (its `Link: <…>; rel="next"`
    /// target, or null).
    pub(crate) fn for_page(
        &self,
        step: &Step,
        response: &Value,
        request: &Value,
        page: u32,
        link_next: Option<String>,
    ) -> Val {
        let mut doc = self.document(step, None, 1);
        doc.insert(k("response"), plumb_core::expr::json_to_val(response));
        doc.insert(k("request"), plumb_core::expr::json_to_val(request));
        doc.insert(k("page"), Val::from(page as isize));
        doc.insert(k("link_next"), link_next.map_or(Val::Null, Val::from));
        Val::obj(doc)
    }

    fn document(&self, step: &Step, item: Option<(u32, &Val)>, attempt: u32) -> jaq_json::Map {
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
        doc.insert(k("cursor"), self.cursor.clone());
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
        doc
    }
}

pub(crate) fn k(s: &str) -> Val {
    Val::from(s.to_owned())
}

/// Evaluates a template on the expression threads (see [`crate::eval`]);
/// a literal costs nothing.
pub(crate) async fn eval_bounded(
    template: Template,
    context: Val,
    timeout: Duration,
) -> Result<Value, EvalError> {
    if let Template::Literal(v) = &template {
        return Ok(v.clone());
    }
    crate::eval::evaluate(timeout, move |budget| template.render(&context, budget)).await
}

pub(crate) fn permanent_eval(e: EvalError) -> ActionError {
    ActionError::Permanent {
        message: format!("expression failed: {e}"),
        status: None,
    }
}

pub(crate) fn redact_error(engine: &Engine, e: ActionError) -> ActionError {
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

/// Retries a store operation that failed transiently (busy, I/O), a few
/// times over about four seconds, before giving up.
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
