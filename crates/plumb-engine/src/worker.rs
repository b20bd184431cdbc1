//! The worker pool: claims runs from the store and executes them, up to a
//! fixed number at once.
//!
//! Several claim loops run side by side so that, under load, their claims
//! share commits (the store batches concurrent writes). Each execution holds
//! one permit of a semaphore sized by `serve.workers`.
//!
//! Runs whose lease holder died are taken over: at once when the holder is
//! certainly dead (see [`crate::owner`]: a whole-process crash, then a
//! restart), otherwise once this process has watched the lease go
//! unrenewed for a whole lease duration on its own monotonic clock. Wall
//! clocks of different processes are never compared, so a clock step
//! frees no live lease.
//!
//! An execution that panics is caught here: its run is released with the
//! panic as its last error, counted as a strike and retried after a
//! backoff, so a run that keeps crashing fails on its own (see
//! `serve.max_crashes`) instead of holding a worker or its lease.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use plumb_store::now_ms;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::Observer;
use crate::retry::crash_backoff;
use crate::{Engine, RunEnd, owner};

/// How often idle claim loops look for work another process queued, or a
/// lease that expired.
const POLL: Duration = Duration::from_millis(500);

/// How often leases are watched: often enough that an unrenewed lease is
/// expired soon after it runs out, at most every five seconds.
fn watch_interval(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// Runs workers until `shutdown` fires, then stops claiming, interrupts
/// running executions (they release their leases, so the runs resume at
/// once elsewhere or on the next start) and waits for them to wind down.
pub async fn run_workers(
    engine: Arc<Engine>,
    workers: usize,
    wake: Arc<Notify>,
    observer: Arc<dyn Observer>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(workers.max(1)));
    let claimers = workers.clamp(1, 8);
    let mut loops = JoinSet::new();
    let executions = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    loops.spawn(watch_leases(Arc::clone(&engine), shutdown.clone()));
    loops.spawn(beat(
        Arc::clone(&engine),
        Arc::clone(&permits),
        workers.max(1),
        shutdown.clone(),
    ));
    for _ in 0..claimers {
        loops.spawn(claim_loop(
            Arc::clone(&engine),
            Arc::clone(&permits),
            Arc::clone(&wake),
            Arc::clone(&observer),
            Arc::clone(&executions),
            shutdown.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
    // Executions see the same token and stop; wait for their releases.
    let mut running = executions.lock().await;
    while running.join_next().await.is_some() {}
}

async fn claim_loop(
    engine: Arc<Engine>,
    permits: Arc<Semaphore>,
    wake: Arc<Notify>,
    observer: Arc<dyn Observer>,
    executions: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    shutdown: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => return,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let claimed = engine.store.claim_next(&engine.lease()).await;
        match claimed {
            Ok(Some(run)) => {
                let engine = Arc::clone(&engine);
                let observer = Arc::clone(&observer);
                let stop = shutdown.child_token();
                let run_id = run.id.clone();
                let mut set = executions.lock().await;
                // Reap finished executions so the set does not grow.
                while set.try_join_next().is_some() {}
                let token = run.lease_owner.clone();
                let strikes = run.strikes;
                set.spawn(async move {
                    let _permit = permit;
                    let executed = AssertUnwindSafe(engine.execute(run, observer.as_ref(), stop))
                        .catch_unwind()
                        .await;
                    match executed {
                        Ok(Ok(RunEnd::Finished { .. })) => {}
                        Ok(Ok(RunEnd::Interrupted { reason })) => {
                            tracing::info!(run_id, reason, "Run interrupted; it will be resumed.");
                        }
                        Ok(Err(e)) => {
                            tracing::error!(run_id, error = %e, "Run stopped by a store error; it will be resumed after a backoff.");
                        }
                        Err(panic) => {
                            let message = panic_message(panic.as_ref());
                            tracing::error!(run_id, error = %message, "The run's execution panicked; it will be retried after a backoff.");
                            if let Some(token) = token {
                                engine
                                    .release_failed(
                                        &run_id,
                                        &token,
                                        strikes,
                                        &format!("the execution panicked: {message}"),
                                    )
                                    .await;
                            }
                        }
                    }
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = wake.notified() => {}
                    () = store_signal(engine.store.work_signal()) => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %e, "Could not claim a run; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    }
}

/// Waits for the store's cross-process signal that a run may be
/// claimable; forever when the store has none (the poll covers it).
async fn store_signal(signal: Option<Arc<Notify>>) {
    match signal {
        Some(signal) => signal.notified().await,
        None => std::future::pending().await,
    }
}

/// How often a process records that it is alive, for `plumb workers`.
const BEAT: Duration = Duration::from_secs(5);

/// Records this process in the store's process list every [`BEAT`], with
/// the runs it is executing, until `shutdown`; then takes it off the list
/// (and anything not heard of for a day). Display only: failures are
/// logged, never fatal.
async fn beat(
    engine: Arc<Engine>,
    permits: Arc<Semaphore>,
    capacity: usize,
    shutdown: CancellationToken,
) {
    let id = engine.owner().id().clone();
    let started_at = plumb_store::now_ms();
    loop {
        let running = capacity.saturating_sub(permits.available_permits());
        let beat = plumb_store::ProcessBeat {
            owner: engine.owner().as_str().to_owned(),
            role: id.role.clone(),
            host: id.host.clone(),
            pid: id.pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at,
            runs: u32::try_from(running).unwrap_or(u32::MAX),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            connections: serde_json::to_value(engine.connections.snapshot())
                .unwrap_or_else(|_| serde_json::Value::Array(Vec::new())),
        };
        if let Err(e) = engine.store.beat(&beat).await {
            tracing::debug!(error = %e, "Could not record this process's heartbeat for `plumb workers`.");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(BEAT) => {}
        }
    }
    let day_ago = plumb_store::now_ms().saturating_sub(24 * 3600 * 1000);
    if let Err(e) = engine
        .store
        .forget_processes(engine.owner().as_str(), day_ago)
        .await
    {
        tracing::debug!(error = %e, "Could not take this process off the store's process list.");
    }
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A lease as last seen, and when (this process's monotonic clock) it was
/// first seen so.
struct Sighting {
    holder: String,
    heartbeat: i64,
    since: Instant,
}

/// Watches every lease but those of this process's running executions,
/// and expires the ones whose holder is certainly dead, or that went
/// unrenewed for a whole lease duration. An expired run is claimed again
/// after a backoff that grows with its strikes.
async fn watch_leases(engine: Arc<Engine>, shutdown: CancellationToken) {
    let every = watch_interval(engine.lease_duration());
    let mut sightings: HashMap<String, Sighting> = HashMap::new();
    loop {
        match engine.store.leased_runs().await {
            Ok(leased) => {
                let now = Instant::now();
                let mut current = HashSet::new();
                // This process's own leases are watched too, except those
                // of executions running here now (their heartbeats renew
                // them): a lease whose release never landed must not keep
                // its run for as long as the process lives.
                for lease in leased {
                    if engine.is_executing(&lease.holder) {
                        continue;
                    }
                    current.insert(lease.id.clone());
                    let reason = if owner::is_certainly_dead(&lease.holder) {
                        Some("the process running it is gone (it crashed or was killed)".to_owned())
                    } else {
                        let seen = sightings.entry(lease.id.clone()).or_insert(Sighting {
                            holder: lease.holder.clone(),
                            heartbeat: lease.heartbeat,
                            since: now,
                        });
                        let ttl = Duration::from_millis(u64::try_from(lease.ttl_ms).unwrap_or(0));
                        if seen.holder != lease.holder || seen.heartbeat != lease.heartbeat {
                            *seen = Sighting {
                                holder: lease.holder.clone(),
                                heartbeat: lease.heartbeat,
                                since: now,
                            };
                            None
                        } else if now.duration_since(seen.since) >= ttl {
                            Some(format!(
                                "the process running it stopped renewing its lease for {} (it stalled, lost the store, or stopped on another host)",
                                crate::exec::humanize(ttl)
                            ))
                        } else {
                            None
                        }
                    };
                    let Some(reason) = reason else { continue };
                    sightings.remove(&lease.id);
                    let wait =
                        i64::try_from(crash_backoff(lease.strikes).as_millis()).unwrap_or(60_000);
                    match engine
                        .store
                        .expire_lease(&lease, &reason, now_ms() + wait)
                        .await
                    {
                        Ok(true) => {
                            tracing::info!(run_id = %lease.id, previous_owner = %lease.holder, reason, "Lease expired; the run will be resumed.");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(run_id = %lease.id, error = %e, "Could not expire the lease.");
                        }
                    }
                }
                sightings.retain(|id, _| current.contains(id));
            }
            Err(e) => tracing::warn!(error = %e, "Could not list leased runs."),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
