//! `plumb cursor show|set|reset WORKFLOW`: a workflow's incremental-sync
//! cursor (SPEC G7), on the store directly. Setting or resetting it is a new
//! version, audited in the same transaction: a run in progress then
//! succeeds without moving it, so the operator's value is the one kept.

use plumb_store::{Cursor, Store};
use serde_json::{Value, json};

use crate::cli::{CursorCommand, Global};
use crate::output::{Style, timestamp};
use crate::{Exit, UsageError};

/// The largest cursor value accepted from the command line.
const MAX_VALUE_BYTES: usize = plumb_store::cursors::MAX_CURSOR_BYTES;

/// `plumb cursor …`.
pub async fn run(global: &Global, command: CursorCommand) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let (workflow, value) = match &command {
        CursorCommand::Show { workflow } => (workflow.clone(), None),
        CursorCommand::Set { workflow, value } => (workflow.clone(), Some(parse_value(value)?)),
        CursorCommand::Reset { workflow } => (workflow.clone(), Some(Value::Null)),
    };
    check_workflow(&root, &workflow, value.is_some())?;
    let store = super::open_store_for_command(&config, &root).await?;
    let result = act(store.as_ref(), &workflow, value).await;
    store.close().await;
    let cursor = result?;
    print(global, &workflow, cursor.as_ref(), &command);
    Ok(Exit::Success)
}

async fn act(
    store: &dyn Store,
    workflow: &str,
    value: Option<Value>,
) -> anyhow::Result<Option<Cursor>> {
    Ok(match value {
        None => store.cursor(workflow).await?,
        Some(value) => Some(
            store
                .set_cursor(workflow, &value, &super::cli_actor())
                .await?,
        ),
    })
}

/// VALUE as JSON; text that is not JSON is taken as a string, so
/// `plumb cursor set W 2026-01-01T00:00:00Z` does what it says.
fn parse_value(text: &str) -> anyhow::Result<Value> {
    if text.len() > MAX_VALUE_BYTES {
        return Err(UsageError(format!(
            "the value is {} bytes; a cursor is at most {MAX_VALUE_BYTES} bytes",
            text.len()
        ))
        .into());
    }
    match plumb_core::limits::parse_json(text.as_bytes(), "the cursor") {
        Ok(value) => Ok(value),
        Err(plumb_core::limits::ParseError::Limit(e)) => Err(UsageError(e.to_string()).into()),
        Err(_) => Ok(Value::String(text.to_owned())),
    }
}

/// The workflow must be in the project, and have a `cursor:` to set one.
fn check_workflow(root: &std::path::Path, name: &str, changing: bool) -> anyhow::Result<()> {
    let project = plumb_engine::project_dir::load_project_partial(root)?;
    let Some(workflow) = project.workflows.iter().find(|w| w.name == name) else {
        let names: Vec<&str> = project.workflows.iter().map(|w| w.name.as_str()).collect();
        return Err(UsageError(format!(
            "no workflow named `{name}` in this project{}",
            if names.is_empty() {
                String::new()
            } else {
                format!(" (workflows: {})", names.join(", "))
            }
        ))
        .into());
    };
    if changing && workflow.cursor.is_none() && !workflow.polls_with_cursor() {
        return Err(UsageError(format!(
            "workflow `{name}` has no `cursor:`, so nothing reads one: add `cursor: \"${{{{ … }}}}\"` to {} first",
            workflow.file
        ))
        .into());
    }
    Ok(())
}

fn print(global: &Global, workflow: &str, cursor: Option<&Cursor>, command: &CursorCommand) {
    if global.json {
        let doc = match cursor {
            Some(c) => json!({
                "workflow": workflow,
                "value": c.value,
                "version": c.version,
                "updated_at": c.updated_at,
                "updated_by": c.updated_by,
            }),
            None => json!({ "workflow": workflow, "value": null, "version": 0 }),
        };
        println!("{doc}");
        return;
    }
    let s = Style::detect();
    let Some(c) = cursor else {
        println!("{workflow}: no cursor committed yet (runs start from null)");
        return;
    };
    let verb = match command {
        CursorCommand::Show { .. } => "cursor",
        CursorCommand::Set { .. } => "cursor set to",
        CursorCommand::Reset { .. } => "cursor reset to",
    };
    println!("{workflow}: {verb} {}", c.value);
    println!(
        "{}",
        s.dim(&format!(
            "version {} · {} by {}",
            c.version,
            timestamp(c.updated_at),
            c.updated_by
        ))
    );
}
