//! `for_each`: the item list is committed first (indices, and so
//! idempotency keys, mean the same items on every resume); items run
//! `concurrency` at a time, each journaled on its own as `(step, index)`;
//! a bad item fails alone and the step then fails naming the failed items.
//! Item outputs live only in their rows: a later step that reads them gets
//! them assembled from the store, so memory stays flat however many items
//! there are.

use std::sync::Arc;

use futures::StreamExt;
use jaq_json::Val;
use plumb_core::expr::json_to_val;
use plumb_core::model::Step;
use plumb_store::{Failure, StepRecord, StepStatus, now_ms};
use serde_json::{Value, json};

use super::super::context::{ContextBase, preview, with_store_retries};
use super::super::{Execution, Halt};
use crate::events::RunEvent;
use crate::journal::Prior;

impl Execution<'_> {
    pub(in crate::exec) async fn run_for_each(
        &mut self,
        step: &Step,
        prior: Option<&StepRecord>,
    ) -> Result<(), Halt> {
        let Some(for_each) = &step.for_each else {
            return Ok(());
        };
        let started = prior.map_or_else(now_ms, |r| r.started_at);
        let journaled_items = crate::journal::for_each_items(prior).cloned();
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
            self.lazy.insert(step.id.clone(), super::super::Lazy::Items);
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
    pub(in crate::exec) async fn assemble_outputs(&mut self, step: &Step) -> Result<(), Halt> {
        self.assemble_for(Some(step), &step.reads).await
    }

    /// The same for an expression that is not a step's (the workflow's
    /// `cursor`).
    pub(in crate::exec) async fn assemble_reads(
        &mut self,
        reads: &plumb_core::expr::StepsRead,
    ) -> Result<(), Halt> {
        self.assemble_for(None, reads).await
    }

    async fn assemble_for(
        &mut self,
        step: Option<&Step>,
        reads: &plumb_core::expr::StepsRead,
    ) -> Result<(), Halt> {
        let wanted: Vec<(String, super::super::Lazy)> = self
            .lazy
            .iter()
            .filter(|(id, _)| reads.reads(id))
            .map(|(id, lazy)| (id.clone(), *lazy))
            .collect();
        for (id, lazy) in wanted {
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
                        return Err(match step {
                            Some(step) => {
                                self.fail_step(step, None, 1, now_ms(), &message, None)
                                    .await
                            }
                            None => Halt::Failed(Failure {
                                message,
                                ..Failure::default()
                            }),
                        });
                    }
                }
            }
            drop(texts);
            let list = Val::Arr(Arc::new(items));
            let output = match lazy {
                super::super::Lazy::Items => list,
                super::super::Lazy::Pages => {
                    let mut pages = jaq_json::Map::default();
                    pages.insert(Val::from("pages".to_owned()), list);
                    Val::obj(pages)
                }
            };
            self.outputs.insert(Val::from(id.clone()), output);
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
        match Prior::of(prior) {
            Prior::Succeeded(_) => return (index, Ok(())),
            Prior::Failed(record) => {
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
            Prior::Fresh | Prior::InFlight(_) => {}
        }
        let item = json_to_val(item);
        let result = self
            .attempts(step, Some((index, &item)), base, prior, None)
            .await
            .map(|_| ());
        (index, result)
    }
}
