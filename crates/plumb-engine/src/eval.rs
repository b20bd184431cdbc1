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
//! * a panic inside an evaluation is caught, so a thread is never lost;
//! * an evaluation that overruns its timeout inside a jaq native that never
//!   looks at the budget (a quadratic `index` over megabytes of text) keeps
//!   its thread until the native returns; a thread is started to stand in
//!   for it, up to a few, so such programs cannot hold every other run.
//!
//! A queue in front of the threads holds evaluations while all threads are
//! busy; time spent waiting there does not count against the caller's
//! timeout, which measures the expression's own running time. The wait has
//! a limit of its own (the timeout, at least 30 s), after which the step
//! fails saying no thread was free.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    /// Threads started beyond [`threads`] to stand in for stuck ones.
    extra: AtomicUsize,
}

/// At most this many threads are started to stand in for evaluations that
/// overran their timeout inside a jaq native that never looks at the
/// budget (a quadratic `index` over megabytes of text): enough that a few
/// such programs cannot hold every other run's expressions, few enough
/// that a flood of them cannot start threads without end.
const MAX_EXTRA_THREADS: usize = 8;

/// How long an evaluation may wait for a free thread before its step fails
/// (at least this long, or the step's own timeout if longer).
const MIN_QUEUE_WAIT: Duration = Duration::from_secs(30);

/// How long after its timeout an evaluation still holding its thread is
/// taken to be stuck, and a thread is started to stand in for it.
const STUCK_AFTER: Duration = Duration::from_secs(1);

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
            start_thread(Arc::clone(&rx), format!("plumb-eval-{i}"));
        }
        Pool {
            jobs: Mutex::new(tx),
            rx,
            extra: AtomicUsize::new(0),
        }
    })
}

fn start_thread(rx: Arc<Mutex<mpsc::Receiver<Job>>>, name: String) {
    let spawned = std::thread::Builder::new()
        .name(name)
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

impl Pool {
    /// Starts a thread to stand in for one stuck in an evaluation, unless
    /// [`MAX_EXTRA_THREADS`] were started already.
    fn stand_in(&self) {
        let started = self
            .extra
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_EXTRA_THREADS).then_some(n + 1)
            });
        if let Ok(n) = started {
            tracing::warn!(
                "An expression overran its timeout inside a filter that cannot be interrupted; starting another expression thread so other runs are not held up."
            );
            start_thread(Arc::clone(&self.rx), format!("plumb-eval-x{n}"));
        }
    }
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
    evaluate_within(timeout.max(MIN_QUEUE_WAIT), timeout, job).await
}

/// Like [`evaluate`], waiting at most `queue_wait` for a free evaluation
/// thread: for an evaluation whose caller must answer soon (a webhook's
/// dedupe key), whatever the runs' expressions are doing.
///
/// # Errors
///
/// As [`evaluate`], and an [`EvalError`] when no thread was free within
/// `queue_wait`.
pub async fn evaluate_within<T: Send + 'static>(
    queue_wait: Duration,
    timeout: Duration,
    job: impl FnOnce(&Budget) -> Result<T, EvalError> + Send + 'static,
) -> Result<T, EvalError> {
    let budget = Arc::new(Budget::new(EVAL_STACK));
    let (tx, rx) = oneshot::channel();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let for_job = Arc::clone(&budget);
    let done = Arc::clone(&finished);
    let boxed: Job = Box::new(move || {
        // Cancelled while queued: do not start at all.
        if for_job.is_cancelled() {
            return;
        }
        let _ = started_tx.send(());
        let result = job(&for_job);
        done.store(true, Ordering::SeqCst);
        let _ = tx.send(result);
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
    // thread behind other runs' evaluations is not held against it, up to
    // a limit of its own (evaluations ahead end within their timeouts, and
    // threads stuck past theirs are stood in for; see `Pool::stand_in`).
    match tokio::time::timeout(queue_wait, started_rx).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            guard.armed = false;
            return Err(EvalError {
                message: "the expression could not be evaluated".to_owned(),
            });
        }
        Err(_) => {
            guard.armed = false;
            let message = format!(
                "no expression thread was free for {}: other runs' expressions are holding them",
                crate::exec::humanize(queue_wait)
            );
            budget.cancel(message.clone());
            return Err(EvalError { message });
        }
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
            // A jaq native that never looks at the budget keeps its thread
            // past the cancel; if so, another thread takes its place.
            tokio::spawn(async move {
                tokio::time::sleep(STUCK_AFTER).await;
                if !finished.load(Ordering::SeqCst) {
                    pool().stand_in();
                }
            });
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

    #[tokio::test]
    async fn threads_stuck_past_their_timeout_are_stood_in_for() {
        // Jobs that ignore their budget, like a jaq native that never looks
        // at it: each holds its thread until the test lets it go.
        let mut release = Vec::new();
        let mut stuck = Vec::new();
        for _ in 0..threads() + 1 {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            release.push(tx);
            stuck.push(tokio::spawn(evaluate(
                Duration::from_millis(50),
                move |_| {
                    let _ = rx.recv();
                    Ok(serde_json::Value::Null)
                },
            )));
        }
        // Every original thread is held now, and one more job waits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let quick = Program::compile("1 + 1").expect("compiles");
        let two = tokio::time::timeout(
            Duration::from_secs(10),
            evaluate(Duration::from_secs(5), move |b| {
                quick.eval(&jaq_json::Val::Null, b)
            }),
        )
        .await
        .expect("a stand-in thread ran it, well before the queue limit")
        .expect("a quick expression still runs");
        assert_eq!(two, serde_json::json!(2));
        // Each stuck job times out while its thread is still held: the last
        // one may have started late, on a stand-in, so the threads are let
        // go only once every job has answered (releasing them first let
        // that one finish inside its 50 ms, a race under load).
        for job in stuck {
            let e = job.await.expect("joined").expect_err("each timed out");
            assert!(e.message.contains("did not finish"), "{e}");
        }
        drop(release);
    }
}
