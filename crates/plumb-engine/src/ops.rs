//! Operations on the run history shared by the API and the command line
//! (which may work on the store directly when no server runs).

use plumb_store::{Millis, ReplayResult, RunFilter, RunStatus, Store, StoreError};
use serde::Serialize;
use serde_json::Value;

/// A failed run, as the dead-letter list shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// The run.
    pub run_id: String,
    /// Its workflow.
    pub workflow: String,
    /// When it failed.
    pub failed_at: Option<Millis>,
    /// The failing step.
    pub step: Option<String>,
    /// The failing item of a `for_each`.
    pub item: Option<u32>,
    /// Attempts made.
    pub attempt: Option<u32>,
    /// HTTP status of the last attempt.
    pub status_code: Option<u16>,
    /// The error.
    pub error: String,
    /// The run's input (its trigger document).
    pub input: Value,
}

/// Failed runs, newest first.
///
/// # Errors
///
/// Returns the store error.
pub async fn dead_letters(
    store: &dyn Store,
    workflow: Option<&str>,
    limit: u32,
) -> Result<Vec<DeadLetter>, StoreError> {
    let runs = store
        .list_runs(&RunFilter {
            workflow: workflow.map(str::to_owned),
            status: Some(RunStatus::Failed),
            limit: limit.clamp(1, 10_000),
        })
        .await?;
    Ok(runs
        .into_iter()
        .map(|r| {
            let f = r.failure.unwrap_or_default();
            DeadLetter {
                run_id: r.id,
                workflow: r.workflow,
                failed_at: r.finished_at,
                step: f.step,
                item: f.item,
                attempt: f.attempt,
                status_code: f.status_code,
                error: f.message,
                input: r.trigger,
            }
        })
        .collect())
}

/// Replays every failed run of a workflow; returns the ids replayed.
///
/// The list is read once, so a replayed run that fails again at once is not
/// replayed twice by the same call.
///
/// # Errors
///
/// Returns the store error.
pub async fn replay_all(
    store: &dyn Store,
    workflow: &str,
    actor: &str,
) -> Result<Vec<String>, StoreError> {
    let failed = dead_letters(store, Some(workflow), 10_000).await?;
    let mut replayed = Vec::new();
    for letter in failed {
        if store.replay_run(&letter.run_id, actor).await? == ReplayResult::Replayed {
            replayed.push(letter.run_id);
        }
    }
    Ok(replayed)
}

/// The whole audit log, in order.
///
/// # Errors
///
/// Returns the store error.
pub async fn all_audit_entries(
    store: &dyn Store,
) -> Result<Vec<plumb_store::AuditEntry>, StoreError> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    Ok(out)
}

/// A verified audit log: how many entries, and the head hash worth keeping
/// outside the store as an anchor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditVerified {
    /// Entries checked.
    pub entries: usize,
    /// Sequence number of the last entry.
    pub head_seq: i64,
    /// Hash of the last entry.
    pub head: String,
}

/// Verifies the whole audit log: the chain, the recorded head and the
/// given anchors (`(seq, hash)` pairs kept outside the store).
///
/// # Errors
///
/// The store error; the inner `Err` is the first problem in the log.
pub async fn verify_audit(
    store: &dyn Store,
    anchors: &[(i64, String)],
) -> Result<Result<AuditVerified, plumb_store::AuditProblem>, StoreError> {
    let entries = all_audit_entries(store).await?;
    let head = store.audit_head().await?;
    Ok(plumb_store::audit::verify_log(
        &entries,
        head.as_ref().map(|(s, h)| (*s, h.as_str())),
        anchors,
    )
    .map(|n| AuditVerified {
        entries: n,
        head_seq: entries.last().map_or(0, |e| e.seq),
        head: entries.last().map(|e| e.hash.clone()).unwrap_or_default(),
    }))
}

/// Parses an anchor written as `SEQ:HASH`.
///
/// # Errors
///
/// What is wrong with it.
pub fn parse_anchor(text: &str) -> Result<(i64, String), String> {
    let (seq, hash) = text
        .split_once(':')
        .ok_or_else(|| format!("anchor `{text}` is not SEQ:HASH"))?;
    let seq: i64 = seq
        .parse()
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("anchor `{text}`: `{seq}` is not an entry number"))?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("anchor `{text}`: the hash must be 64 hex digits"));
    }
    Ok((seq, hash.to_ascii_lowercase()))
}

/// Audits a run of a workflow version other than the deployed one
/// (`workflow.run_undeployed`); nothing when it is the deployed version.
///
/// # Errors
///
/// Returns the store error.
pub async fn audit_undeployed_run(
    store: &dyn Store,
    workflow: &plumb_core::model::Workflow,
    actor: &str,
) -> Result<(), StoreError> {
    let deployed = store.deployed_version("workflow", &workflow.name).await?;
    if deployed.as_deref() == Some(workflow.version.as_str()) {
        return Ok(());
    }
    store
        .append_audit(&plumb_store::NewAuditEntry::new(
            actor,
            "workflow.run_undeployed",
            &workflow.name,
            serde_json::json!({
                "version": workflow.version,
                "file": workflow.file,
                "deployed_version": deployed,
            }),
        ))
        .await
}

/// Records the project a process is about to run: `plumb.yaml`, each
/// connection, each workflow and each data contract (`schemas/`) whose
/// definition changed since the last deployment gets an audit entry.
/// Returns the changes as `kind:name`.
///
/// # Errors
///
/// Returns the store error.
pub async fn record_deployment(
    store: &dyn Store,
    project: &plumb_core::Project,
    actor: &str,
) -> Result<Vec<String>, StoreError> {
    let mut items = vec![plumb_store::Deployed {
        kind: "config".to_owned(),
        name: "plumb.yaml".to_owned(),
        version: project.config.version.clone(),
        file: "plumb.yaml".to_owned(),
    }];
    items.extend(
        project
            .config
            .connection_versions
            .iter()
            .map(|(name, version)| plumb_store::Deployed {
                kind: "connection".to_owned(),
                name: name.clone(),
                version: version.clone(),
                file: "plumb.yaml".to_owned(),
            }),
    );
    items.extend(project.workflows.iter().map(|w| plumb_store::Deployed {
        kind: "workflow".to_owned(),
        name: w.name.clone(),
        version: w.version.clone(),
        file: w.file.clone(),
    }));
    items.extend(
        project
            .config
            .schemas
            .values()
            .map(|c| plumb_store::Deployed {
                kind: "schema".to_owned(),
                name: c.path().to_owned(),
                version: c.version().to_owned(),
                file: c.path().to_owned(),
            }),
    );
    store.record_deployment(&items, actor).await
}
