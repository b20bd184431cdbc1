//! Where expressions run: a small pool of dedicated threads, apart from
//! tokio's worker threads and from the blocking pool the store reads on.
//!
//! A jq program can take long (a big transform) or never end (a loop
//! without exit). It must not stall other runs, the API or the store, and
//! once its step gives up on it, it must stop using CPU. So:
//!
//! * evaluations run only here, on [`threads`] threads with a large stack
//!   (deep recursion in a program fails that program, see
//!   [`plumb_core::expr`]), never on a thread that does store I/O;
//! * every evaluation carries a [`Budget`]; when the caller stops waiting
//!   (the step's timeout, or the run was interrupted) the budget is
//!   cancelled and the evaluation ends at its next step, freeing its
//!   thread within microseconds;
//! * a panic inside an evaluation is caught, so a thread is never lost.
//!
//! A queue in front of the threads holds evaluations while all threads are
//! busy; time spent waiting there does not count against the caller's
//! timeout, which measures the expression's own running time.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use plumb_core::expr::{Budget, EvalError};
use tokio::sync::oneshot;

/// Stack of each evaluation thread: reserved address space, of which only
/// the pages an evaluation touches become resident. Large, because values
/// built inside an expression can nest deeply, and dropping one recurses
/// once per level (about 50 bytes each: millions of levels fit).
const STACK: usize = 256 * 1024 * 1024;

/// How much of it the evaluator itself may use before an evaluation is
/// stopped as runaway recursion; the rest is room for dropping what it
/// built while unwinding out of it.
const EVAL_STACK: usize = 64 * 1024 * 1024;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// How many evaluation threads run: one per core, at least two, so one
/// long transform never holds up every other run's expressions.
#[must_use]
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .max(2)
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads() {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("plumb-eval-{i}"))
                .stack_size(STACK)
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        let Ok(job) = job else { return };
                        // Evaluations catch their own panics; this keeps the
                        // thread alive should anything else in a job panic.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "Could not start an expression thread.");
            }
        }
        Pool {
            jobs: Mutex::new(tx),
        }
    })
}

/// Cancels the budget if the caller stops waiting for any reason (dropped
/// future: the run was interrupted or its step timed out).
struct CancelOnDrop {
    budget: Arc<Budget>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.budget
                .cancel("the evaluation was abandoned (the run stopped)");
        }
    }
}

/// Runs `job` on an evaluation thread and waits at most `timeout` for it
/// once it has started.
///
/// # Errors
///
/// The job's own error, or an [`EvalError`] saying the expression did not
/// finish within `timeout` (it is then stopped).
pub async fn evaluate<T: Send + 'static>(
    timeout: Duration,
    job: impl FnOnce(&Budget) -> Result<T, EvalError> + Send + 'static,
) -> Result<T, EvalError> {
    let budget = Arc::new(Budget::new(EVAL_STACK));
    let (tx, rx) = oneshot::channel();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let for_job = Arc::clone(&budget);
    let boxed: Job = Box::new(move || {
        // Cancelled while queued: do not start at all.
        if for_job.is_cancelled() {
            return;
        }
        let _ = started_tx.send(());
        let _ = tx.send(job(&for_job));
    });
    let sent = match pool().jobs.lock() {
        Ok(jobs) => jobs.send(boxed),
        Err(poisoned) => poisoned.into_inner().send(boxed),
    };
    if sent.is_err() {
        return Err(EvalError {
            message: "no expression thread is running".to_owned(),
        });
    }
    let mut guard = CancelOnDrop {
        budget: Arc::clone(&budget),
        armed: true,
    };
    // The timeout is the expression's own running time: waiting for a
    // thread behind other runs' evaluations is not held against it (each of
    // those ends within its own timeout).
    if started_rx.await.is_err() {
        guard.armed = false;
        return Err(EvalError {
            message: "the expression could not be evaluated".to_owned(),
        });
    }
    let answer = tokio::time::timeout(timeout, rx).await;
    guard.armed = false;
    match answer {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(EvalError {
            message: "the expression could not be evaluated".to_owned(),
        }),
        Err(_) => {
            let message = format!(
                "the expression did not finish within the step's timeout of {}",
                crate::exec::humanize(timeout)
            );
            budget.cancel(message.clone());
            Err(EvalError { message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plumb_core::expr::Program;

    #[tokio::test]
    async fn a_runaway_expression_stops_and_frees_its_thread() {
        let program = Program::compile("last(repeat(1))").expect("compiles");
        // More runaways than threads: if a timed-out evaluation kept its
        // thread, the last ones would never start and the quick one after
        // them would time out too.
        for _ in 0..threads() + 2 {
            let p = program.clone();
            let e = evaluate(Duration::from_millis(50), move |b| {
                p.eval(&jaq_json::Val::Null, b)
            })
            .await
            .expect_err("times out");
            assert!(
                e.message
                    .contains("did not finish within the step's timeout of 50ms"),
                "{e}"
            );
        }
        let quick = Program::compile("1 + 1").expect("compiles");
        let two = evaluate(Duration::from_secs(5), move |b| {
            quick.eval(&jaq_json::Val::Null, b)
        })
        .await
        .expect("a quick expression still runs");
        assert_eq!(two, serde_json::json!(2));
    }
}
