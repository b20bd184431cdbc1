//! The `sleep` step: the wake-up time is committed before the wait, so a
//! resumed run waits only what is left.

use std::time::Duration;

use plumb_core::expr::Template;
use plumb_core::model::Step;
use plumb_store::{StepRecord, now_ms};
use serde_json::json;

use super::super::context::humanize;
use super::super::{Execution, Halt};
use crate::events::RunEvent;

impl Execution<'_> {
    pub(in crate::exec) async fn run_sleep(
        &mut self,
        step: &Step,
        duration: &Template,
        prior: Option<&StepRecord>,
    ) -> Result<(), Halt> {
        let wake_at = crate::journal::sleep_wake_at(prior);
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
}
