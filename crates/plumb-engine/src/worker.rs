//! The worker pool: claims runs from the store and executes them, up to a
//! fixed number at once.
//!
//! Several claim loops run side by side so that, under load, their claims
//! share commits (the store batches concurrent writes). Each execution holds
//! one permit of a semaphore sized by `serve.workers`.
//!
//! Runs whose lease holder died are taken over: at once when the holder is
//! certainly dead (same host, process gone — a whole-process crash, then a
//! restart), otherwise when the lease expires (the claim query does that).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::Observer;
use crate::{Engine, RunEnd, owner};

/// How often idle claim loops look for work another process queued, or a
/// lease that expired.
const POLL: Duration = Duration::from_millis(500);

/// How often leases held by dead processes are looked for.
const SWEEP: Duration = Duration::from_secs(5);

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
    loops.spawn(sweep_dead_owners(Arc::clone(&engine), shutdown.clone()));
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
                set.spawn(async move {
                    let _permit = permit;
                    match engine.execute(run, observer.as_ref(), stop).await {
                        Ok(RunEnd::Finished { .. }) => {}
                        Ok(RunEnd::Interrupted { reason }) => {
                            tracing::info!(run_id, reason, "Run interrupted; it will be resumed.");
                        }
                        Err(e) => {
                            tracing::error!(run_id, error = %e, "Run stopped by a store error; it will be resumed.");
                        }
                    }
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = wake.notified() => {}
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

/// Releases runs whose holder is certainly dead, so they are claimed at
/// once instead of after their lease expires.
async fn sweep_dead_owners(engine: Arc<Engine>, shutdown: CancellationToken) {
    loop {
        match engine.store.leased_runs().await {
            Ok(leased) => {
                for (run_id, holder) in leased {
                    // Holders are claim tokens, `<owner>#<claim>`.
                    let process = holder.split('#').next().unwrap_or_default();
                    if process != engine.owner.as_str() && owner::is_certainly_dead(&holder) {
                        tracing::info!(run_id, previous_owner = %holder, "Its process is gone; releasing the run for resumption.");
                        if let Err(e) = engine.store.release_run(&run_id, &holder).await {
                            tracing::warn!(run_id, error = %e, "Could not release the run.");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "Could not list leased runs."),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SWEEP) => {}
        }
    }
}
