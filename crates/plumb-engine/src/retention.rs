//! The purge job: what retention no longer keeps leaves the store, a small
//! batch at a time, so the store's size follows what is kept and intake
//! never waits behind it (see [`plumb_store::retention`]).

use std::sync::Arc;
use std::time::Duration;

use plumb_core::model::Retention;
use plumb_store::{PurgePosition, PurgeScope, Purged, StoreError, now_ms};
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// How long a batch may hold a store with one writer (SQLite): a webhook
/// that arrives meanwhile waits for it. Batches of a fixed 100 runs took
/// ~3 ms and moved W1's p99 from 7.6 to 10.5 ms during a purge
/// (bench/w10.sh); the batch size now follows what the last batch took.
const SLICE: Duration = Duration::from_micros(1500);

/// Bounds of a batch on a store with one writer (see [`Pace`]).
const MIN_BATCH: u32 = 10;
const MAX_BATCH: u32 = 200;

/// A batch on a store with row locks (PostgreSQL), which locks only the
/// old runs it takes.
const SHARED_BATCH: u32 = 500;

/// The shortest pause between two batches: commits of webhooks and
/// workers go between them.
const PAUSE: Duration = Duration::from_millis(10);

/// After a batch that took `t`, the purge waits at least `SHARE × t`: on
/// a store with one writer it takes at most a quarter of its time.
const SHARE: u32 = 3;

/// How often the job looks for work.
const EVERY: Duration = Duration::from_secs(60);

/// Purges every [`EVERY`] (the first time shortly after start) until
/// `shutdown`. Every process that fires schedules runs it; two at once
/// only share the work.
pub async fn run_purge(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut wait = Duration::from_secs(5);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = EVERY;
        match purge_once(&engine, Some(&shutdown)).await {
            Ok(p) if p.runs > 0 || p.payloads > 0 => {
                tracing::info!(
                    runs = p.runs,
                    payloads = p.payloads,
                    "Retention: deleted ended runs and blanked old payloads."
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Retention could not purge; it tries again in a minute.");
            }
        }
    }
}

/// One pass over every workflow (each under its own retention) and the
/// runs of workflows no longer in the project (under the defaults), batch
/// by batch until nothing is left to purge or `stop` fires.
///
/// # Errors
///
/// The store's error; what was purged before it stays purged.
pub async fn purge_once(
    engine: &Engine,
    stop: Option<&CancellationToken>,
) -> Result<Purged, StoreError> {
    let project = engine.project();
    let mut scopes: Vec<(PurgeScope, Retention)> = project
        .workflows
        .iter()
        .map(|w| (PurgeScope::Workflow(w.name.clone()), w.retention))
        .collect();
    scopes.push((
        PurgeScope::Others(project.workflows.iter().map(|w| w.name.clone()).collect()),
        project.config.defaults.retention,
    ));
    let now = now_ms();
    let before = |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut total = Purged::default();
    let mut pace = Pace::new(engine.store.one_writer());
    // One position for the whole pass: each batch starts where the last
    // one of its workflow ended.
    let mut position = PurgePosition::default();
    for (scope, retention) in scopes {
        loop {
            if stop.is_some_and(CancellationToken::is_cancelled) {
                return Ok(total);
            }
            let batch = pace.batch;
            let started = std::time::Instant::now();
            let p = engine
                .store
                .purge(
                    &scope,
                    before(retention.runs),
                    before(retention.payloads),
                    batch,
                    &mut position,
                )
                .await?;
            let took = started.elapsed();
            total.runs += p.runs;
            total.payloads += p.payloads;
            if p.runs < u64::from(batch) && p.payloads < u64::from(batch) {
                break;
            }
            tokio::time::sleep(pace.after(took)).await;
        }
    }
    Ok(total)
}

/// The size of the next batch and the pause after each.
#[derive(Debug)]
struct Pace {
    /// Whether the store has one writer (see
    /// [`plumb_store::RetentionStore::one_writer`]): the batch size then
    /// follows [`SLICE`].
    one_writer: bool,
    batch: u32,
}

impl Pace {
    fn new(one_writer: bool) -> Self {
        Self {
            one_writer,
            batch: if one_writer { MIN_BATCH } else { SHARED_BATCH },
        }
    }

    /// Adjusts the batch to what the last one took (which includes its
    /// wait for the writer: under load, batches shrink), and says how
    /// long to pause.
    fn after(&mut self, took: Duration) -> Duration {
        if self.one_writer {
            let slice = SLICE.as_secs_f64();
            let took_s = took.as_secs_f64().max(1e-6);
            let next = if took_s > slice {
                // Proportionally smaller: the next one fits the slice.
                f64::from(self.batch) * slice / took_s
            } else if took_s < slice / 2.0 {
                f64::from(self.batch) * 2.0
            } else {
                f64::from(self.batch)
            };
            // In range by the clamp; the cast only drops the fraction.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let next = next.clamp(f64::from(MIN_BATCH), f64::from(MAX_BATCH)) as u32;
            self.batch = next;
        }
        PAUSE.max(took * SHARE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_one_writer_batches_shrink_to_fit_the_slice_and_grow_back_when_quick() {
        let mut pace = Pace::new(true);
        assert_eq!(pace.batch, MIN_BATCH, "a pass starts small");
        pace.after(Duration::from_micros(100));
        assert_eq!(pace.batch, 2 * MIN_BATCH);
        for _ in 0..10 {
            pace.after(Duration::from_micros(100));
        }
        assert_eq!(pace.batch, MAX_BATCH, "quick batches grow up to the bound");
        // A batch of 200 that took 6 ms (four slices): the next is a quarter.
        pace.after(Duration::from_millis(6));
        assert_eq!(pace.batch, 50);
        pace.after(Duration::from_secs(1));
        assert_eq!(pace.batch, MIN_BATCH, "never below the bound");
    }

    #[test]
    fn the_pause_gives_the_store_at_least_three_quarters_of_its_time() {
        let mut pace = Pace::new(true);
        assert_eq!(pace.after(Duration::from_millis(1)), PAUSE);
        assert_eq!(pace.after(Duration::from_millis(20)), Duration::from_millis(60));
    }

    #[test]
    fn with_row_locks_batches_stay_large() {
        let mut pace = Pace::new(false);
        pace.after(Duration::from_millis(200));
        assert_eq!(pace.batch, SHARED_BATCH);
    }
}
