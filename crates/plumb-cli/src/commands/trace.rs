//! `plumb trace KEY [--workflow W]`: what happened to one business record —
//! every run, step and item that touched it (a workflow's `record_key`),
//! oldest first: acceptance, dedupe hits, retries, outcomes with their
//! effect and idempotency key, dead letters and replays.

use plumb_store::LineageEntry;
use serde_json::json;

use crate::cli::Global;
use crate::output::{Style, timestamp};
use crate::{Exit, UsageError};

/// The most events shown.
const LIMIT: u32 = 1000;

/// `plumb trace KEY`.
pub async fn run(global: &Global, key: &str, workflow: Option<&str>) -> anyhow::Result<Exit> {
    if key.is_empty() || key.len() > plumb_store::lineage::MAX_RECORD_KEY_BYTES {
        return Err(UsageError(format!(
            "a record key is 1 to {} bytes",
            plumb_store::lineage::MAX_RECORD_KEY_BYTES
        ))
        .into());
    }
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let store = super::open_store_for_command(&config, &root).await?;
    let result = store.trace(key, workflow, LIMIT).await;
    store.close().await;
    let entries = result?;
    if global.json {
        println!("{}", json!({ "record_key": key, "events": entries }));
        return Ok(Exit::Success);
    }
    if entries.is_empty() {
        println!(
            "no run has touched record `{key}`{} (is `record_key` set on the workflow's trigger or step?)",
            workflow
                .map(|w| format!(" in workflow {w}"))
                .unwrap_or_default()
        );
        return Ok(Exit::Success);
    }
    let s = Style::detect();
    println!("record {key}: {} events", entries.len());
    for e in &entries {
        println!("{}", line(&s, e));
    }
    Ok(Exit::Success)
}

fn line(s: &Style, e: &LineageEntry) -> String {
    let mut where_ = format!("{} run {}", e.workflow, e.run_id);
    if let Some(step) = &e.step_id {
        where_.push_str(&format!(" · step {step}"));
        if let Some(item) = e.item {
            where_.push_str(&format!("[{item}]"));
        }
        if let Some(attempt) = e.attempt {
            where_.push_str(&format!(" · attempt {attempt}"));
        }
    }
    let mut text = format!("{}  {:<12} {where_}", timestamp(e.at), e.event);
    if let Some(effect) = &e.effect {
        text.push_str(&format!(" · {effect}"));
    }
    if let Some(detail) = &e.detail {
        text.push_str(&format!(" · {detail}"));
    }
    if let Some(key) = &e.idempotency_key {
        text.push_str(&s.dim(&format!(" · key {key}")));
    }
    text
}
