//! `plumb check`: validate the whole project and list every problem.

use plumb_core::Diagnostics;
use plumb_engine::project_dir::{self, LoadError};
use serde_json::json;

use crate::Exit;
use crate::cli::Global;
use crate::output::Style;

/// Runs the check; exit 1 when anything is wrong.
pub fn run(global: &Global) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let result = project_dir::load_project(&root);
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
