//! The journal protocol: the life of a step (or a `for_each` item) in the
//! journal, as rules in one place. The executor (`exec`) follows them; the
//! tests below check them without a store or a network.
//!
//! 1. **Reaching a step**, the executor reads what the journal holds for it
//!    ([`Prior`]): nothing (run it), an attempt in flight (run it again:
//!    the attempt may have had its effect, so it is re-sent with the same
//!    idempotency key and the attempt count carries on), a committed
//!    success (restore its output, never run it again), or a committed
//!    failure (the run fails again with it).
//! 2. **Attempts** ([`AttemptPlan`]): numbering continues across crashes;
//!    an attempt cut short by a crash counts, but if it was the last the
//!    policy allows, one more is allowed so the step gets a real try.
//! 3. **Before an attempt**, a step with effects journals `running` with
//!    the attempt's number ([`marks_attempt_start`]); a pure step does not
//!    (running it again has no effect outside).
//! 4. **After a failed attempt** ([`after_failure`]): a retryable failure
//!    is retried while attempts remain, after `Retry-After` or the backoff;
//!    otherwise the step fails for good. A timed-out pure step fails for
//!    good at once ([`timed_out`]): it would only loop again.
//! 5. **Outcomes** are committed before the next step starts: the failure
//!    first and the attempt's record after it (a crash between them leaves
//!    a failed step, never one a resume would re-send). The last top-level
//!    step's success is committed together with the run's end, one commit
//!    instead of two ([`success_commit`]), except an `if`, whose decision
//!    must be durable before its branch runs.
//! 6. **Durable state first**: a `for_each` commits its item list and a
//!    `sleep` its wake-up time before the work they describe, so a resume
//!    sees the same items at the same indices and waits only the remainder
//!    ([`for_each_items`], [`sleep_wake_at`]). A `for_each` step's own row
//!    holds no copy of its items' outputs: each item's row does.
//! 7. **Pages** of a paginated http step are journaled like `for_each`
//!    items, `(step, page index)`, each as it arrives with the request that
//!    fetched it in its state; each page has its own attempts and
//!    idempotency key. A resume skips the committed pages, derives the next
//!    request from the last one ([`last_page`]), and re-sends only the page
//!    that was in flight. A page's attempt is not marked `running` first
//!    (it would be re-sent the same way either way), so a page costs one
//!    commit. The step's own row holds no copy of the pages.

use std::time::Duration;

use plumb_connectors::ActionError;
use plumb_core::model::{Action, Step, Workflow};
use plumb_store::{Millis, StepRecord, StepStatus};
use serde_json::Value;

use crate::retry::delay_after;

/// What the journal holds for a step (or item) when an execution reaches
/// it (rule 1).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Prior<'r> {
    /// Never started.
    Fresh,
    /// An attempt started and has no outcome: it may have had its effect.
    InFlight(&'r StepRecord),
    /// A committed success: restored, not run again.
    Succeeded(&'r StepRecord),
    /// A committed failure: the run fails again with it.
    Failed(&'r StepRecord),
}

impl<'r> Prior<'r> {
    /// Classifies a journal row (or its absence).
    pub(crate) fn of(record: Option<&'r StepRecord>) -> Self {
        match record {
            None => Self::Fresh,
            Some(r) => match r.status {
                StepStatus::Running => Self::InFlight(r),
                StepStatus::Succeeded => Self::Succeeded(r),
                StepStatus::Failed => Self::Failed(r),
            },
        }
    }

    /// The row, if there is one.
    pub(crate) fn record(self) -> Option<&'r StepRecord> {
        match self {
            Self::Fresh => None,
            Self::InFlight(r) | Self::Succeeded(r) | Self::Failed(r) => Some(r),
        }
    }
}

/// The attempts of a step (or item) run now (rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttemptPlan {
    /// Attempts already made (the next is this + 1).
    pub(crate) made: u32,
    /// The last attempt allowed.
    pub(crate) max: u32,
    /// When the first attempt started, if one did before.
    pub(crate) first_started: Option<Millis>,
}

/// Rule 2.
pub(crate) fn attempt_plan(prior: Prior<'_>, policy_attempts: u32) -> AttemptPlan {
    match prior {
        Prior::InFlight(r) => AttemptPlan {
            made: r.attempt,
            max: policy_attempts.max(r.attempt + 1),
            first_started: Some(r.started_at),
        },
        // A `for_each` step or `sleep` whose durable state is committed has
        // a `running` row too; so does nothing else that is restored.
        Prior::Fresh | Prior::Succeeded(_) | Prior::Failed(_) => AttemptPlan {
            made: prior.record().map_or(0, |r| r.attempt),
            max: policy_attempts,
            first_started: prior.record().map(|r| r.started_at),
        },
    }
}

/// Rule 3: whether an attempt is journaled as `running` before it starts.
/// A page (rule 7) is not: a resume re-sends the first page not committed,
/// with its key, whether or not it was marked, and one commit per page
/// instead of two halves the cost of a long pagination.
pub(crate) fn marks_attempt_start(step: &Step, item: Option<u32>) -> bool {
    step.has_effects() && !(item.is_some() && step.paginate().is_some())
}

/// What follows a failed attempt (rule 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Try again after this long.
    Retry(Duration),
    /// The step fails for good with this message.
    Fail(String),
}

/// Rule 4.
pub(crate) fn after_failure(
    step: &Step,
    error: &ActionError,
    attempt: u32,
    max: u32,
) -> AfterFailure {
    if error.is_retryable() && attempt < max {
        return AfterFailure::Retry(
            error
                .retry_after()
                .unwrap_or_else(|| delay_after(&step.retry, attempt)),
        );
    }
    let mut message = error.to_string();
    if error.is_retryable() {
        message = format!("{message} (gave up after {attempt} attempts)");
    }
    AfterFailure::Fail(message)
}

/// Rule 4: the error of an attempt that ran out of time.
pub(crate) fn timed_out(step: &Step) -> ActionError {
    let timeout = crate::exec::humanize(step.timeout);
    if step.has_effects() {
        ActionError::Retryable {
            message: format!("the step timed out after {timeout}"),
            status: None,
            retry_after: None,
        }
    } else {
        ActionError::Permanent {
            message: format!(
                "expression failed: the expression did not finish within the step's timeout of {timeout}"
            ),
            status: None,
        }
    }
}

/// When a success is committed (rule 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SuccessCommit {
    /// In its own commit, before the next step starts.
    Now,
    /// With the run's end.
    WithRunEnd,
}

/// Rule 5.
pub(crate) fn success_commit(workflow: &Workflow, step: &Step, item: Option<u32>) -> SuccessCommit {
    let last = workflow
        .steps
        .last()
        .is_some_and(|last| std::ptr::eq(last, step));
    // A workflow's cursor is evaluated after the last step, over its
    // output: that output must be in hand, so it is committed first.
    if item.is_none() && last && !matches!(step.action, Action::If(_)) && workflow.cursor.is_none()
    {
        SuccessCommit::WithRunEnd
    } else {
        SuccessCommit::Now
    }
}

/// Rule 6: a `for_each`'s committed item list, if it has one.
pub(crate) fn for_each_items(prior: Option<&StepRecord>) -> Option<&Vec<Value>> {
    prior?.state.as_ref()?.get("items")?.as_array()
}

/// Rule 6: a `sleep`'s committed wake-up time, if it has one.
pub(crate) fn sleep_wake_at(prior: Option<&StepRecord>) -> Option<Millis> {
    prior?.state.as_ref()?.get("wake_at")?.as_i64()
}

/// Rule 7: how many pages are committed in a row from the first, and the
/// last of them.
pub(crate) fn last_page<'r>(
    step_id: &str,
    journal: &'r std::collections::HashMap<(String, Option<u32>), StepRecord>,
) -> (u32, Option<&'r StepRecord>) {
    let mut count = 0u32;
    let mut last = None;
    while let Some(record) = journal.get(&(step_id.to_owned(), Some(count))) {
        if record.status != StepStatus::Succeeded {
            break;
        }
        last = Some(record);
        count += 1;
    }
    (count, last)
}

/// Rule 1 for a `for_each` (or paginated) step's own row: a success
/// restores the item (page) outputs from their rows (`None` output), or
/// from the row itself for a run journaled before item outputs were kept
/// only once.
pub(crate) fn restores_items_lazily(step: &Step, output: &Value) -> bool {
    (step.for_each.is_some() || step.paginate().is_some()) && output.is_null()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plumb_core::{SourceFile, load_config, load_workflow};
    use serde_json::json;

    fn workflow() -> Workflow {
        let config = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: "connections:\n  rx:\n    http: { base_url: 'https://rx.example' }\n".into(),
        })
        .expect("config");
        load_workflow(
            &SourceFile {
                path: "workflows/w.yaml".into(),
                text: "name: w\nowner: o\ndescription: d\nretry: { attempts: 3, initial: 1s, max: 1s, jitter: false }\nsteps:\n  - id: call\n    http: { connection: rx, path: /x }\n  - id: shape\n    jq: '1'\n  - id: pick\n    if: '${{ true }}'\n    then:\n      - id: inner\n        jq: '2'\n".into(),
            },
            &config,
        )
        .expect("workflow")
    }

    fn row(status: StepStatus, attempt: u32, state: Option<Value>) -> StepRecord {
        StepRecord {
            run_id: "r".into(),
            step_id: "call".into(),
            item: None,
            status,
            attempt,
            state,
            output: None,
            error: None,
            status_code: None,
            started_at: 1_000,
            finished_at: None,
        }
    }

    #[test]
    fn rule_1_the_journal_decides_what_happens_to_a_step() {
        assert!(matches!(Prior::of(None), Prior::Fresh));
        let running = row(StepStatus::Running, 2, None);
        assert!(matches!(Prior::of(Some(&running)), Prior::InFlight(_)));
        let done = row(StepStatus::Succeeded, 1, None);
        assert!(matches!(Prior::of(Some(&done)), Prior::Succeeded(_)));
        let failed = row(StepStatus::Failed, 3, None);
        assert!(matches!(Prior::of(Some(&failed)), Prior::Failed(_)));
    }

    #[test]
    fn rule_2_an_interrupted_last_attempt_still_gets_a_real_try() {
        let fresh = attempt_plan(Prior::Fresh, 3);
        assert_eq!((fresh.made, fresh.max, fresh.first_started), (0, 3, None));
        let second = row(StepStatus::Running, 2, None);
        let plan = attempt_plan(Prior::InFlight(&second), 3);
        assert_eq!(
            (plan.made, plan.max, plan.first_started),
            (2, 3, Some(1_000))
        );
        let last = row(StepStatus::Running, 3, None);
        assert_eq!(attempt_plan(Prior::InFlight(&last), 3).max, 4);
    }

    #[test]
    fn rule_3_only_effects_mark_an_attempt_before_it_starts() {
        let w = workflow();
        assert!(marks_attempt_start(&w.steps[0], None), "http");
        assert!(marks_attempt_start(&w.steps[0], Some(3)), "a for_each item");
        assert!(!marks_attempt_start(&w.steps[1], None), "jq");
    }

    #[test]
    fn rule_4_retryable_failures_retry_while_attempts_remain() {
        let w = workflow();
        let step = &w.steps[0];
        let busy = ActionError::Retryable {
            message: "HTTP 503".into(),
            status: Some(503),
            retry_after: None,
        };
        assert_eq!(
            after_failure(step, &busy, 1, 3),
            AfterFailure::Retry(Duration::from_secs(1))
        );
        let asked = ActionError::Retryable {
            message: "HTTP 429".into(),
            status: Some(429),
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            after_failure(step, &asked, 1, 3),
            AfterFailure::Retry(Duration::from_secs(7)),
            "Retry-After wins over the backoff"
        );
        assert_eq!(
            after_failure(step, &busy, 3, 3),
            AfterFailure::Fail("HTTP 503 (gave up after 3 attempts)".into())
        );
        let bad = ActionError::Permanent {
            message: "HTTP 400".into(),
            status: Some(400),
        };
        assert_eq!(
            after_failure(step, &bad, 1, 3),
            AfterFailure::Fail("HTTP 400".into())
        );
        assert!(
            timed_out(&w.steps[0]).is_retryable(),
            "an effect may be retried"
        );
        assert!(
            !timed_out(&w.steps[1]).is_retryable(),
            "a pure step would only loop"
        );
    }

    #[test]
    fn rule_5_the_last_step_commits_with_the_run_end_but_never_an_if() {
        let w = workflow();
        assert_eq!(success_commit(&w, &w.steps[0], None), SuccessCommit::Now);
        assert_eq!(success_commit(&w, &w.steps[1], None), SuccessCommit::Now);
        assert_eq!(
            success_commit(&w, &w.steps[2], None),
            SuccessCommit::Now,
            "the `if` is last, but its decision must be durable first"
        );
        let mut short = workflow();
        short.steps.truncate(2);
        assert_eq!(
            success_commit(&short, &short.steps[1], None),
            SuccessCommit::WithRunEnd
        );
        assert_eq!(
            success_commit(&short, &short.steps[1], Some(0)),
            SuccessCommit::Now,
            "items never wait for the run's end"
        );
    }

    #[test]
    fn rule_6_durable_state_is_read_back_from_the_running_row() {
        let fe = row(StepStatus::Running, 1, Some(json!({"items": [1, 2]})));
        assert_eq!(for_each_items(Some(&fe)), Some(&vec![json!(1), json!(2)]));
        let nap = row(StepStatus::Running, 1, Some(json!({"wake_at": 42})));
        assert_eq!(sleep_wake_at(Some(&nap)), Some(42));
        assert_eq!(sleep_wake_at(None), None);
        assert_eq!(for_each_items(Some(&nap)), None);
    }
}
