//! Schedule triggers: cron in an IANA timezone, each slot fired at most once.
//!
//! A slot is fired by committing, in one transaction, the slot's row in
//! `schedule_fires` and the run it starts. The slot's primary key makes the
//! commit fail for a second process or a restarted one, so a slot never
//! fires twice. After downtime, the slots missed since the last recorded
//! one follow the workflow's `catch_up` policy:
//!
//! * `latest` (default): fire once, for the most recent missed slot;
//! * `all`: fire every missed slot, oldest first (at most 1000);
//! * `none`: fire nothing; the most recent missed slot is recorded as
//!   skipped so it is not considered again.
//!
//! A workflow that has never fired does not fire for the past: it waits for
//! its next slot.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use plumb_core::model::{CatchUp, Trigger, Workflow};
use plumb_store::Millis;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineError};

/// Most missed slots fired by `catch_up: all`.
pub const MAX_CATCH_UP: usize = 1000;

/// How long after its time a slot still counts as due rather than missed
/// (`catch_up: none` fires it).
const GRACE_MS: Millis = 60_000;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
    catch_up: CatchUp,
}

impl Schedule {
    /// The schedule of a workflow, if it has a schedule trigger.
    #[must_use]
    pub fn of(workflow: &Workflow) -> Option<Self> {
        let Trigger::Schedule {
            cron,
            timezone,
            catch_up,
        } = &workflow.trigger
        else {
            return None;
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(cron)
            .ok()?;
        let tz = Tz::from_str(timezone).ok()?;
        Some(Self {
            cron,
            tz,
            catch_up: *catch_up,
        })
    }

    /// The first slot strictly after `after` (Unix ms).
    #[must_use]
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        let at = self.tz.timestamp_millis_opt(after).single()?;
        self.cron
            .find_next_occurrence(&at, false)
            .ok()
            .map(|t: DateTime<Tz>| t.timestamp_millis())
    }

    /// The latest slot at or before `at`.
    #[must_use]
    pub fn latest_at_or_before(&self, at: Millis) -> Option<Millis> {
        let at = self.tz.timestamp_millis_opt(at).single()?;
        self.cron
            .find_previous_occurrence(&at, true)
            .ok()
            .map(|t: DateTime<Tz>| t.timestamp_millis())
    }

    /// Slots in `(after, until]`, oldest first, keeping only the newest
    /// `limit`. Walks back from `until`, so it costs at most `limit` steps
    /// however long plumb was down.
    #[must_use]
    pub fn slots_between(&self, after: Millis, until: Millis, limit: usize) -> Vec<Millis> {
        let mut out = Vec::new();
        let mut cursor = until;
        while out.len() < limit {
            match self.latest_at_or_before(cursor) {
                Some(slot) if slot > after => {
                    out.push(slot);
                    cursor = slot - 1;
                }
                _ => break,
            }
        }
        out.reverse();
        out
    }

    fn slot_document(&self, slot: Millis) -> serde_json::Value {
        let at = self
            .tz
            .timestamp_millis_opt(slot)
            .single()
            .map(|t| t.to_rfc3339());
        json!({ "type": "schedule", "scheduled_at": at, "slot": slot, "body": {} })
    }
}

/// Fires the schedules of every workflow, and runs its polls and queue
/// consumers (see the `poll` and `queue` modules), until `shutdown`.
/// Restart it after a reload so changed schedules, polls and queues take
/// effect.
pub async fn run_schedules(
    engine: Arc<Engine>,
    wake_workers: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let project = engine.project();
    let mut tasks = JoinSet::new();
    engine.connections.retain(|_, w| {
        project
            .workflows
            .iter()
            .any(|wf| wf.name == w && matches!(wf.trigger, plumb_core::model::Trigger::Queue(_)))
    });
    for workflow in &project.workflows {
        if matches!(workflow.trigger, plumb_core::model::Trigger::Queue(_)) {
            tasks.spawn(crate::queue::run_one(
                Arc::clone(&engine),
                Arc::clone(workflow),
                Arc::clone(&wake_workers),
                shutdown.clone(),
            ));
        }
        if matches!(workflow.trigger, plumb_core::model::Trigger::Poll(_)) {
            tasks.spawn(crate::poll::run_one(
                Arc::clone(&engine),
                Arc::clone(workflow),
                Arc::clone(&wake_workers),
                shutdown.clone(),
            ));
        }
        if let Some(schedule) = Schedule::of(workflow) {
            tasks.spawn(run_one(
                Arc::clone(&engine),
                Arc::clone(workflow),
                schedule,
                Arc::clone(&wake_workers),
                shutdown.clone(),
            ));
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn run_one(
    engine: Arc<Engine>,
    workflow: Arc<Workflow>,
    schedule: Schedule,
    wake_workers: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures = 0_u32;
    loop {
        match tick(&engine, &workflow, &schedule, &wake_workers, &shutdown).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                let wait = Duration::from_secs(u64::from(failures.min(30)));
                tracing::warn!(workflow = %workflow.name, error = %e, retry_in_s = wait.as_secs(), "The scheduler could not fire; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Catches up, then sleeps until the next slot and fires it.
async fn tick(
    engine: &Engine,
    workflow: &Workflow,
    schedule: &Schedule,
    wake_workers: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), EngineError> {
    let now = Utc::now().timestamp_millis();
    let last = engine.store.last_fire(&workflow.name).await?;
    if let Some(last) = last {
        let missed = schedule.slots_between(last, now, MAX_CATCH_UP);
        let to_fire: Vec<Millis> = match schedule.catch_up {
            CatchUp::All => missed,
            CatchUp::Latest => missed.last().copied().into_iter().collect(),
            CatchUp::None => {
                // A slot only just passed (a reload or a retry around its
                // time) was not missed to downtime: it still fires.
                let (recent, old): (Vec<Millis>, Vec<Millis>) =
                    missed.into_iter().partition(|s| now - *s <= GRACE_MS);
                if let Some(latest) = old.last()
                    && recent.is_empty()
                {
                    engine
                        .store
                        .record_fire(&workflow.name, *latest, None)
                        .await?;
                    tracing::info!(workflow = %workflow.name, skipped = old.len(), "Missed schedule slots skipped (catch_up: none).");
                }
                recent
            }
        };
        for slot in to_fire {
            fire(engine, workflow, schedule, slot, wake_workers).await?;
        }
    }
    let from = engine
        .store
        .last_fire(&workflow.name)
        .await?
        .unwrap_or(now)
        .max(now);
    let Some(next) = schedule.next_after(from) else {
        // No future slot (e.g. a date in the past): nothing left to do.
        shutdown.cancelled().await;
        return Ok(());
    };
    let wait =
        Duration::from_millis(u64::try_from(next - Utc::now().timestamp_millis()).unwrap_or(0));
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        () = tokio::time::sleep(wait) => {}
    }
    // This slot is due: retry it where it failed, so a passing store error
    // delays it instead of handing it to the catch-up policy.
    let mut failures = 0_u32;
    loop {
        match fire(engine, workflow, schedule, next, wake_workers).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                failures += 1;
                let retry = Duration::from_millis(200 * u64::from(failures.min(25)));
                tracing::warn!(workflow = %workflow.name, slot = next, error = %e, "Could not fire a due slot; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}

async fn fire(
    engine: &Engine,
    workflow: &Workflow,
    schedule: &Schedule,
    slot: Millis,
    wake_workers: &Notify,
) -> Result<(), EngineError> {
    let run = engine
        .new_run(workflow, schedule.slot_document(slot), None)
        .await?;
    if engine
        .store
        .record_fire(&workflow.name, slot, Some(&run))
        .await?
    {
        tracing::info!(workflow = %workflow.name, slot, run_id = %run.id, "Schedule fired.");
        wake_workers.notify_waiters();
    } else {
        tracing::debug!(workflow = %workflow.name, slot, "Slot already fired elsewhere.");
    }
    Ok(())
}

/// The next slot of a workflow after now, for `plumb status`.
#[must_use]
pub fn next_fire(workflow: &Workflow) -> Option<Millis> {
    Schedule::of(workflow)?.next_after(Utc::now().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, tz: &str) -> Schedule {
        Schedule {
            cron: CronParser::builder()
                .seconds(Seconds::Optional)
                .build()
                .parse(cron)
                .expect("cron"),
            tz: Tz::from_str(tz).expect("tz"),
            catch_up: CatchUp::Latest,
        }
    }

    fn ms(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .timestamp_millis()
    }

    #[test]
    fn next_slot_respects_the_timezone() {
        // 09:00 in Berlin is 08:00 UTC in winter.
        let s = schedule("0 9 * * *", "Europe/Berlin");
        assert_eq!(
            s.next_after(ms("2026-11-24T07:00:00Z")),
            Some(ms("2026-11-24T08:00:00Z"))
        );
        assert_eq!(
            s.next_after(ms("2026-11-24T08:00:00Z")),
            Some(ms("2026-11-25T08:00:00Z"))
        );
    }

    #[test]
    fn slots_between_lists_missed_slots_and_keeps_the_newest() {
        let s = schedule("*/5 * * * *", "UTC");
        let missed = s.slots_between(ms("2026-11-24T10:00:00Z"), ms("2026-11-24T10:17:00Z"), 10);
        assert_eq!(
            missed,
            vec![
                ms("2026-11-24T10:05:00Z"),
                ms("2026-11-24T10:10:00Z"),
                ms("2026-11-24T10:15:00Z")
            ]
        );
        let capped = s.slots_between(ms("2026-11-24T10:00:00Z"), ms("2026-11-24T10:17:00Z"), 2);
        assert_eq!(
            capped,
            vec![ms("2026-11-24T10:10:00Z"), ms("2026-11-24T10:15:00Z")]
        );
    }
}
