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
}

/// Computes the status from the store and the project.
///
/// # Errors
///
/// Returns the store error when the runs cannot be read.
pub async fn collect(store: &dyn Store, project: &Project) -> Result<Status, StoreError> {
    let stats = store.workflow_stats().await?;
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
                    Trigger::Schedule { cron, timezone, .. } => {
                        format!("schedule {cron} ({timezone})")
                    }
                },
                last_success_at: s.and_then(|s| s.last_success_at),
                last_failure_at: s.and_then(|s| s.last_failure_at),
                queued: s.map_or(0, |s| s.queued),
                running: s.map_or(0, |s| s.running),
                dead_letters: s.map_or(0, |s| s.dead_letters),
                next_fire_at: schedule::next_fire(w),
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
            });
        }
    }
    Ok(Status {
        generated_at: now_ms(),
        workflows,
        undelivered_alerts: store.undelivered_alerts(50).await?,
    })
}
