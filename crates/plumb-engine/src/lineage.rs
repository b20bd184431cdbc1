//! Record lineage, the engine's side: a workflow's `record_key` (on its
//! webhook or poll trigger, evaluated over `.trigger` when a run is
//! accepted; on a step, evaluated per `for_each` item) names the business
//! record a run or item is about, and each acceptance, dedupe hit, retry,
//! outcome and dead letter is indexed under it ([`plumb_store::lineage`];
//! replays are indexed by the store in the replay's own transaction).
//!
//! Lineage is an index, not the record of truth: a key that cannot be
//! evaluated, or an index write that fails, is logged and never fails a
//! run or an event.

use plumb_core::model::Workflow;
use plumb_store::LineageEntry;
use plumb_store::lineage::MAX_RECORD_KEY_BYTES;
use serde_json::Value;

use crate::Engine;

/// How long a record key may take to evaluate on an intake path.
const EVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The text a key's value is indexed by: a string as it is, a number or
/// anything else as compact JSON; `None` for `null`, an empty string, or a
/// key longer than [`MAX_RECORD_KEY_BYTES`] (a key names a record, it is
/// not a document).
#[must_use]
pub fn key_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    (!text.is_empty() && text.len() <= MAX_RECORD_KEY_BYTES).then_some(text)
}

/// One event of `run_id` about `record_key`, at this moment.
pub(crate) fn entry(record_key: &str, workflow: &str, run_id: &str, event: &str) -> LineageEntry {
    LineageEntry {
        id: uuid::Uuid::now_v7().to_string(),
        record_key: record_key.to_owned(),
        workflow: workflow.to_owned(),
        run_id: run_id.to_owned(),
        step_id: None,
        item: None,
        event: event.to_owned(),
        attempt: None,
        idempotency_key: None,
        effect: None,
        detail: None,
        at: plumb_store::now_ms(),
    }
}

/// The record a stored (already redacted) trigger document names under
/// `workflow`'s `record_key`. The acceptance, the executor and the run's
/// end all evaluate it over the same stored document, so they agree, and
/// none of them waits for another's index write.
pub(crate) async fn trigger_record_key(workflow: &Workflow, trigger: &Value) -> Option<String> {
    let template = workflow.record_key.clone()?;
    let context = plumb_core::expr::json_to_val(&serde_json::json!({ "trigger": trigger }));
    let evaluated = crate::eval::evaluate_within(EVAL_TIMEOUT, EVAL_TIMEOUT, move |budget| {
        template.render(&context, budget)
    })
    .await;
    match evaluated {
        Ok(value) => key_text(&value),
        Err(e) => {
            tracing::warn!(workflow = %workflow.name, error = %e.message, "The record key could not be evaluated; the run is not indexed for lineage.");
            None
        }
    }
}

impl Engine {
    /// Indexes a run just committed (`accepted`), or a delivery that
    /// matched the run `run_id` by its dedupe key (`dedupe_hit`), in the
    /// background: an intake path never waits for the index (a webhook is
    /// answered as soon as its run is durable).
    pub(crate) fn index_acceptance(
        &self,
        workflow: &Workflow,
        trigger: Value,
        run_id: &str,
        event: &'static str,
    ) {
        if workflow.record_key.is_none() {
            return;
        }
        let Some(workflow) = self.project().workflow(&workflow.name).cloned() else {
            return;
        };
        let (store, run_id) = (std::sync::Arc::clone(&self.store), run_id.to_owned());
        // The moment of the event, not of its index write.
        let at = plumb_store::now_ms();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Some(key) = trigger_record_key(&workflow, &trigger).await {
                let mut accepted = entry(&key, &workflow.name, &run_id, event);
                accepted.at = at;
                let entries = [accepted];
                if let Err(e) = store.record_lineage(&entries).await {
                    tracing::warn!(error = %e, "Could not index lineage events.");
                }
            }
        });
    }

    /// Appends lineage events; a failure is logged (the index is not the
    /// record of truth, and the run's own writes report a failing store).
    pub(crate) async fn note_lineage(&self, entries: Vec<LineageEntry>) {
        if entries.is_empty() {
            return;
        }
        if let Err(e) = self.store.record_lineage(&entries).await {
            tracing::warn!(error = %e, "Could not index lineage events.");
        }
    }

    /// Indexes how a run ended under the records its trigger named: a
    /// failed run is a dead letter until it is replayed.
    pub(crate) async fn note_run_end(
        &self,
        workflow: &str,
        run_id: &str,
        outcome: &plumb_store::RunOutcome,
    ) {
        use plumb_store::RunOutcome;
        let named = self
            .project()
            .workflow(workflow)
            .is_some_and(|w| w.record_key.is_some());
        if !named {
            return;
        }
        let Some(definition) = self.project().workflow(workflow).cloned() else {
            return;
        };
        let trigger = match self.store.run(run_id).await {
            Ok(Some(run)) => run.trigger,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(run_id, error = %e, "Could not read the run; its end is not indexed for lineage.");
                return;
            }
        };
        let keys: Vec<String> = trigger_record_key(&definition, &trigger)
            .await
            .into_iter()
            .collect();
        let (event, detail) = match outcome {
            RunOutcome::Succeeded | RunOutcome::SucceededMovingCursor(_) => ("succeeded", None),
            RunOutcome::Failed(f) => (
                "dead_letter",
                Some(match &f.step {
                    Some(step) => format!("step {step}: {}", f.message),
                    None => f.message.clone(),
                }),
            ),
            RunOutcome::Cancelled(why) => ("cancelled", Some(why.clone())),
        };
        let entries = keys
            .iter()
            .map(|key| {
                let mut e = entry(key, workflow, run_id, event);
                e.detail.clone_from(&detail);
                e
            })
            .collect();
        self.note_lineage(entries).await;
    }

    /// A record's events, oldest first (see [`plumb_store::LineageStore::trace`]).
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn trace(
        &self,
        record_key: &str,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageEntry>, plumb_store::StoreError> {
        self.store.trace(record_key, workflow, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_text_and_null_or_oversized_keys_are_not_indexed() {
        assert_eq!(key_text(&Value::from("ord-7")).as_deref(), Some("ord-7"));
        assert_eq!(key_text(&Value::from(42)).as_deref(), Some("42"));
        assert_eq!(key_text(&Value::Null), None);
        assert_eq!(key_text(&Value::from("")), None);
        assert_eq!(
            key_text(&Value::from("x".repeat(MAX_RECORD_KEY_BYTES + 1))),
            None
        );
    }
}
