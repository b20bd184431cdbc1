//! `plumb check`: validate the whole project and list every problem.

use std::collections::BTreeSet;

use plumb_core::Diagnostics;
use plumb_engine::project_dir::{self, LoadError};
use serde_json::json;

use crate::Exit;
use crate::cli::Global;
use crate::output::Style;

/// Runs the check; exit 1 when anything is wrong.
pub async fn run(global: &Global) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let result = match stored_secret_names(&root).await {
        Some(names) => project_dir::load_project_checking_secrets(&root, &names),
        None => project_dir::load_project(&root),
    };
    let (diags, workflows) = match result {
        Ok(project) => (Diagnostics::default(), project.workflows.len()),
        Err(LoadError::Invalid(d)) => (d, 0),
        Err(e @ LoadError::NoProject { .. }) => return Err(e.into()),
    };
    if global.json {
        println!(
            "{}",
            json!({ "ok": diags.is_empty(), "problems": diags.0, "workflows": workflows })
        );
    } else if diags.is_empty() {
        let style = Style::detect();
        println!(
            "{} {workflows} workflow{} checked, no problems",
            style.ok("ok:"),
            if workflows == 1 { "" } else { "s" }
        );
    } else {
        super::print_diagnostics(&diags);
        eprintln!(
            "{} problem{} found",
            diags.0.len(),
            if diags.0.len() == 1 { "" } else { "s" }
        );
    }
    Ok(if diags.is_empty() {
        Exit::Success
    } else {
        Exit::Failure
    })
}

/// The names of the secrets in the project's store, when the store exists
/// (a check never creates one). `None` when they cannot be read: secret
/// references are then checked when the project starts.
async fn stored_secret_names(root: &std::path::Path) -> Option<BTreeSet<String>> {
    // Quietly: a broken plumb.yaml is reported once, by the check itself.
    let sources = project_dir::read_sources(root).ok()?;
    let config = plumb_core::load_config(&sources.project).ok()?;
    match project_dir::store_location(&config, root).ok()? {
        project_dir::StoreLocation::Sqlite { path, .. } if !path.is_file() => {
            return Some(BTreeSet::new());
        }
        project_dir::StoreLocation::Sqlite { .. } => {}
        // A check does not connect to a database server (nor migrate it):
        // secret references are checked when the project starts.
        project_dir::StoreLocation::Postgres { .. } => return None,
    }
    let store = super::open_store_for_command(&config, root).await.ok()?;
    let names = store
        .list_secrets()
        .await
        .ok()
        .map(|list| list.into_iter().map(|m| m.name).collect::<BTreeSet<_>>());
    store.close().await;
    names
}
