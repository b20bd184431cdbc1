//! The purge job: what retention no longer keeps leaves the store, a small
//! batch at a time, so the store's size follows what is kept and intake
//! never waits behind it (see [`plumb_store::retention`]).

use std::sync::Arc;
use std::time::Duration;

use plumb_core::model::Retention;
use plumb_store::{PurgePosition, PurgeScope, Purged, StoreError, now_ms};
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// Runs deleted (and runs blanked) per batch on a store with one writer
/// (SQLite), where a batch holds the writer while it runs and webhooks
/// arriving meanwhile wait for it: 500 runs a batch (~13 ms) tripled W1's
/// p99 during a purge of 1M runs, 100 (~3 ms) moved it 1.4× (7.6 → 10.5
/// ms, bench/w10.sh). Batches sized to a 1.5 ms slice of measured time
/// (10 to 200 runs) did worse: the time a batch takes there is mostly its
/// wait for the writer and the shared commit, so they shrank to 10 runs,
/// the purge slowed to ~500 runs/s and W1's p99 rose to 22 ms.
const ONE_WRITER_BATCH: u32 = 100;

/// Runs per batch on a store with row locks (PostgreSQL): a batch locks
/// only the old runs it takes.
const SHARED_BATCH: u32 = 500;

/// The pause between two batches: commits of webhooks and workers go
/// between them. With [`ONE_WRITER_BATCH`], a purge deleted ~6,900 runs/s
/// on SQLite (bench/w10.sh).
const PAUSE: Duration = Duration::from_millis(10);

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
            Ok(p) if p.runs > 0 || p.payloads > 0 || p.dedupe_keys > 0 => {
                tracing::info!(
                    runs = p.runs,
                    payloads = p.payloads,
                    dedupe_keys = p.dedupe_keys,
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

/// How much longer than the runs that wrote them effect records are kept:
/// a dead letter is kept `retention.runs` after it *ended*, and a replay
/// reads the records its steps wrote before that.
const EFFECTS_MARGIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deletes the records `exactly_once` connections keep in their target
/// databases once every run that may read them is gone: older than the
/// longest `retention.runs` of the workflows using the connection (at
/// least the project default) plus [`EFFECTS_MARGIN`]. A database that
/// cannot be reached is logged and tried at the next pass.
async fn purge_effects(
    engine: &Engine,
    project: &plumb_core::Project,
    now: i64,
    stop: Option<&CancellationToken>,
) {
    use plumb_core::model::{Action, Connection};
    for (name, connection) in &project.config.connections {
        if stop.is_some_and(CancellationToken::is_cancelled) {
            return;
        }
        let Connection::Sql(sql) = connection else {
            continue;
        };
        let Some(table) = &sql.effects_table else {
            continue;
        };
        let keep = project
            .workflows
            .iter()
            .filter(|w| {
                w.all_steps()
                    .iter()
                    .any(|s| matches!(&s.action, Action::Sql(a) if a.connection == *name))
            })
            .map(|w| w.retention.runs)
            .max()
            .unwrap_or(project.config.defaults.retention.runs)
            .max(project.config.defaults.retention.runs)
            .saturating_add(EFFECTS_MARGIN);
        let before = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        let Some(before) = chrono::DateTime::from_timestamp_millis(before) else {
            continue;
        };
        let url = match crate::exec::connection_url(engine, name, &sql.url, sql.password.as_deref())
        {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(connection = %name, error = %engine.redact(&e.to_string()), "Retention cannot reach an exactly_once connection's effects table.");
                continue;
            }
        };
        let target = plumb_connectors::sql::Target {
            connection: name,
            driver: sql.driver,
            url: &url,
            pool: sql.pool,
            timeout: sql.timeout.unwrap_or(Duration::from_secs(30)),
            effect: None,
        };
        match engine.sql.purge_effects(&target, table, before).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(connection = %name, table = %table, deleted = n, "Retention: deleted exactly_once records past retention.")
            }
            Err(e) => {
                tracing::warn!(connection = %name, error = %engine.redact(&e.to_string()), "Retention could not purge an exactly_once connection's effects table; it tries again in a minute.")
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
    let batch = if engine.store.one_writer() {
        ONE_WRITER_BATCH
    } else {
        SHARED_BATCH
    };
    // Dedupe keys past their window first, in batches of the same size: a
    // workflow whose runs cannot be purged must not let the keys pile up.
    loop {
        if stop.is_some_and(CancellationToken::is_cancelled) {
            return Ok(total);
        }
        let keys = engine.store.purge_dedupe_keys(now, batch).await?;
        total.dedupe_keys += keys;
        if keys < u64::from(batch) {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    // One position for the whole pass: each batch starts where the last
    // one of its workflow ended.
    let mut position = PurgePosition::default();
    for (scope, retention) in scopes {
        loop {
            if stop.is_some_and(CancellationToken::is_cancelled) {
                return Ok(total);
            }
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
            total.runs += p.runs;
            total.payloads += p.payloads;
            if p.runs < u64::from(batch) && p.payloads < u64::from(batch) {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }
    // Last: the target databases may be slow or down, and the store's own
    // purge does not wait for them.
    purge_effects(engine, &project, now, stop).await;
    Ok(total)
}
