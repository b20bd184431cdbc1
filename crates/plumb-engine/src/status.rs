//! One picture of the project's health: what `plumb status` prints and
//! `/api/v1/status` returns.

use plumb_core::model::{Project, Trigger};
use plumb_store::{Alert, Millis, Store, StoreError, now_ms};
use serde::Serialize;

use crate::schedule;

/// Health of one workflow.
#[derive(Clone, Debug, Serialize)]
pub struct WorkflowStatus {
    /// Name.
    pub name: String,
    /// Owner (who is paged).
    pub owner: String,
    /// `manual`, `webhook /hooks/<path>` or `schedule <cron> (<tz>)`.
    pub trigger: String,
    /// Last success.
    pub last_success_at: Option<Millis>,
    /// Last failure.
    pub last_failure_at: Option<Millis>,
    /// Runs waiting for a worker.
    pub queued: u64,
    /// Runs in progress or interrupted.
    pub running: u64,
    /// Failed runs waiting in the dead-letter list.
    pub dead_letters: u64,
    /// Next scheduled fire.
    pub next_fire_at: Option<Millis>,
    /// The committed cursor of a workflow with `cursor:` (`null` before the
    /// first success that moved it); absent for one without.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<serde_json::Value>,
    /// A polling workflow's last poll, last error, last new item and next
    /// poll; absent for other triggers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll: Option<plumb_store::PollState>,
}

/// The whole picture.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// When this was computed.
    pub generated_at: Millis,
    /// Every workflow of the project, plus any that only has history.
    pub workflows: Vec<WorkflowStatus>,
    /// Alerts not delivered yet or given up on.
    pub undelivered_alerts: Vec<Alert>,
    /// The broker connections of every live process (its queue
    /// consumers), as each reported with its last heartbeat.
    pub connections: Vec<ConnectionStatus>,
    /// The store's size and its oldest kept run.
    pub store: plumb_store::StoreSize,
    /// Whether anything needs a person, and what.
    pub verdict: Verdict,
}

/// One queue consumer's connection, in one process.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ConnectionStatus {
    /// The process (its lease owner id).
    pub process: String,
    /// Its state.
    #[serde(flatten)]
    pub state: crate::connections::ConsumerState,
}

/// How long a consumer may be reconnecting before status calls it a
/// problem (a broker restart takes seconds).
const RECONNECTING_PROBLEM_MS: Millis = 60_000;

/// The one-line answer to "is everything fine?".
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Nothing needs a person.
    pub healthy: bool,
    /// What needs a person, each in a sentence with what to do.
    pub problems: Vec<Problem>,
}

/// One thing that needs a person.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Problem {
    /// `dead_letters`, `failing`, `alerts_undelivered`, `broken_file`,
    /// `no_server`.
    pub kind: String,
    /// The workflow, when it is about one.
    pub workflow: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl Verdict {
    /// Adds a problem.
    pub fn add(&mut self, kind: &str, workflow: Option<&str>, message: String) {
        self.problems.push(Problem {
            kind: kind.to_owned(),
            workflow: workflow.map(str::to_owned),
            message,
        });
        self.healthy = false;
    }

    /// `all healthy`, or `N problems: …`.
    #[must_use]
    pub fn line(&self) -> String {
        if self.problems.is_empty() {
            return "all healthy".to_owned();
        }
        let list: Vec<&str> = self.problems.iter().map(|p| p.message.as_str()).collect();
        format!(
            "{} problem{}: {}",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" },
            list.join("; ")
        )
    }
}

/// What in a status needs a person: dead letters, workflows whose last run
/// failed, alerts that could not be delivered.
fn verdict(workflows: &[WorkflowStatus], alerts: &[Alert]) -> Verdict {
    let mut v = Verdict {
        healthy: true,
        problems: Vec::new(),
    };
    for w in workflows {
        if let Some(poll) = &w.poll
            && poll.failures > 0
        {
            v.add(
                "poll_failing",
                Some(&w.name),
                format!(
                    "{}: its last {} poll{} failed ({})",
                    w.name,
                    poll.failures,
                    if poll.failures == 1 { "" } else { "s" },
                    poll.last_error.as_deref().unwrap_or("no error recorded")
                ),
            );
        }
        let failing = w
            .last_failure_at
            .is_some_and(|f| w.last_success_at.is_none_or(|s| f > s));
        if w.dead_letters > 0 {
            v.add(
                "dead_letters",
                Some(&w.name),
                format!(
                    "{} has {} dead letter{}{} (`plumb dlq list --workflow {}`)",
                    w.name,
                    w.dead_letters,
                    if w.dead_letters == 1 { "" } else { "s" },
                    if failing {
                        " and its last run failed"
                    } else {
                        ""
                    },
                    w.name
                ),
            );
        } else if failing {
            v.add(
                "failing",
                Some(&w.name),
                format!("{}: its last run failed", w.name),
            );
        }
    }
    // An alert counts once it has failed at least once: a fresh one is on
    // its way.
    let stuck = alerts
        .iter()
        .filter(|a| a.status == plumb_store::AlertStatus::Failed || a.attempts > 0)
        .count();
    if stuck > 0 {
        v.add(
            "alerts_undelivered",
            None,
            format!(
                "{stuck} alert{} could not be delivered (listed above)",
                if stuck == 1 { "" } else { "s" }
            ),
        );
    }
    v
}

/// Consumers that cannot take messages: reconnecting for a while, or
/// paused because the store cannot commit.
pub fn connection_problems(v: &mut Verdict, connections: &[ConnectionStatus]) {
    let now = now_ms();
    for c in connections {
        let s = &c.state;
        let why = s.last_error.as_deref().unwrap_or("no error recorded");
        match s.state.as_str() {
            "reconnecting" if now - s.since >= RECONNECTING_PROBLEM_MS => v.add(
                "broker_unreachable",
                Some(&s.workflow),
                format!(
                    "{}: its queue consumer cannot reach connection `{}` ({why}); messages wait at the broker",
                    s.workflow, s.connection
                ),
            ),
            "paused" => v.add(
                "queue_paused",
                Some(&s.workflow),
                format!(
                    "{}: taking no messages from `{}` because the store cannot commit ({why}); they wait at the broker",
                    s.workflow, s.connection
                ),
            ),
            _ => {}
        }
    }
}

/// A committed cursor as status and the API show it.
#[must_use]
pub fn cursor_json(c: &plumb_store::Cursor) -> serde_json::Value {
    serde_json::json!({
        "value": c.value,
        "version": c.version,
        "updated_at": c.updated_at,
        "updated_by": c.updated_by,
    })
}

/// The cursor of a workflow whose cursor never moved.
#[must_use]
pub fn cursor_never_moved() -> serde_json::Value {
    serde_json::json!({ "value": null, "version": 0, "updated_at": null, "updated_by": null })
}

/// Computes the status from the store and the project.
///
/// # Errors
///
/// Returns the store error when the runs cannot be read.
pub async fn collect(store: &dyn Store, project: &Project) -> Result<Status, StoreError> {
    let stats = store.workflow_stats().await?;
    let cursors = if project
        .workflows
        .iter()
        .any(|w| w.cursor.is_some() || w.polls_with_cursor())
    {
        store.cursors().await?
    } else {
        Vec::new()
    };
    let polls = if project
        .workflows
        .iter()
        .any(|w| matches!(w.trigger, Trigger::Poll(_)))
    {
        store.poll_states().await?
    } else {
        Vec::new()
    };
    let mut workflows: Vec<WorkflowStatus> = project
        .workflows
        .iter()
        .map(|w| {
            let s = stats.iter().find(|s| s.workflow == w.name);
            WorkflowStatus {
                name: w.name.clone(),
                owner: w.owner.clone(),
                trigger: match &w.trigger {
                    Trigger::Manual => "manual".to_owned(),
                    Trigger::Webhook { path, .. } => format!("webhook /hooks/{path}"),
                    Trigger::Poll(p) => format!(
                        "poll every {} ({} {})",
                        crate::exec::humanize(p.every),
                        p.http.method,
                        p.http.connection
                    ),
                    Trigger::Schedule { cron, timezone, .. } => {
                        format!("schedule {cron} ({timezone})")
                    }
                    Trigger::Queue(q) => format!(
                        "queue {} `{}` on {}",
                        q.kind.source_field(),
                        q.source,
                        q.connection
                    ),
                },
                last_success_at: s.and_then(|s| s.last_success_at),
                last_failure_at: s.and_then(|s| s.last_failure_at),
                queued: s.map_or(0, |s| s.queued),
                running: s.map_or(0, |s| s.running),
                dead_letters: s.map_or(0, |s| s.dead_letters),
                next_fire_at: schedule::next_fire(w),
                poll: match &w.trigger {
                    Trigger::Poll(_) => Some(
                        polls
                            .iter()
                            .find(|p| p.workflow == w.name)
                            .cloned()
                            .unwrap_or_else(|| plumb_store::PollState {
                                workflow: w.name.clone(),
                                next_poll_at: now_ms(),
                                last_poll_at: None,
                                last_success_at: None,
                                last_new_item_at: None,
                                last_error: None,
                                failures: 0,
                                owner: None,
                            }),
                    ),
                    _ => None,
                },
                cursor: (w.cursor.is_some() || w.polls_with_cursor()).then(|| {
                    cursors
                        .iter()
                        .find(|c| c.workflow == w.name)
                        .map_or_else(cursor_never_moved, cursor_json)
                }),
            }
        })
        .collect();
    for s in &stats {
        if project.workflow(&s.workflow).is_none() {
            workflows.push(WorkflowStatus {
                name: s.workflow.clone(),
                owner: String::new(),
                trigger: "(no longer in the project)".to_owned(),
                last_success_at: s.last_success_at,
                last_failure_at: s.last_failure_at,
                queued: s.queued,
                running: s.running,
                dead_letters: s.dead_letters,
                next_fire_at: None,
                cursor: None,
                poll: None,
            });
        }
    }
    let undelivered_alerts = store.undelivered_alerts(50).await?;
    let connections = if project
        .workflows
        .iter()
        .any(|w| matches!(w.trigger, Trigger::Queue(_)))
    {
        let (_, live) = live_processes(store).await?;
        live.into_iter()
            .flat_map(|p| {
                let states: Vec<crate::connections::ConsumerState> =
                    serde_json::from_value(p.connections).unwrap_or_default();
                states.into_iter().map(move |state| ConnectionStatus {
                    process: p.owner.clone(),
                    state,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut verdict = verdict(&workflows, &undelivered_alerts);
    connection_problems(&mut verdict, &connections);
    Ok(Status {
        generated_at: now_ms(),
        workflows,
        connections,
        undelivered_alerts,
        store: store.store_size().await?,
        verdict,
    })
}

/// How recently a process must have recorded a heartbeat to be listed as
/// live (six beats).
pub const LIVE_WITHIN_MS: Millis = 30_000;

/// The processes sharing the store that recorded a heartbeat within
/// [`LIVE_WITHIN_MS`], and the store's clock now (their `beat_at` is on it).
///
/// # Errors
///
/// The store's error when it cannot be read.
pub async fn live_processes(
    store: &dyn Store,
) -> Result<(Millis, Vec<plumb_store::ProcessInfo>), StoreError> {
    let now = store.store_now().await?;
    let live = store.processes(now.saturating_sub(LIVE_WITHIN_MS)).await?;
    Ok((now, live))
}
