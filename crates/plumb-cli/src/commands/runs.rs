//! `plumb runs list` and `plumb runs show`.

use std::collections::HashMap;
use std::time::Duration;

use plumb_core::SourceFile;
use plumb_core::model::{Action, Step, Workflow, short_version};
use plumb_store::{AttemptFailure, Run, RunFilter, StepRecord, StepStatus};
use serde_json::{Value, json};

use crate::cli::{Global, ListArgs};
use crate::output::{Style, duration, failure_place, timestamp};
use crate::{Exit, UsageError};

fn run_duration(run: &Run) -> Option<Duration> {
    let start = run.started_at?;
    let end = run.finished_at?;
    Some(Duration::from_millis(
        u64::try_from(end - start).unwrap_or(0),
    ))
}

/// Recent runs, newest first.
pub async fn list(global: &Global, args: ListArgs) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let config = super::load_config(&root)?;
    let store = super::open_store_for_command(&config, &root).await?;
    let runs = store
        .list_runs(&RunFilter {
            workflow: args.workflow.clone(),
            status: args.status.map(Into::into),
            limit: args.limit,
        })
        .await?;
    if global.json {
        println!("{}", serde_json::to_string(&runs)?);
        return Ok(Exit::Success);
    }
    if runs.is_empty() {
        println!("no runs yet; start one with `plumb run WORKFLOW`");
        return Ok(Exit::Success);
    }
    let style = Style::detect();
    let rows: Vec<[String; 6]> = runs
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.workflow.clone(),
                r.status.as_str().to_owned(),
                timestamp(r.created_at),
                run_duration(r)
                    .map(duration)
                    .unwrap_or_else(|| "-".to_owned()),
                r.failure
                    .as_ref()
                    .map(|f| {
                        let place = failure_place(f);
                        if place.is_empty() {
                            f.message.clone()
                        } else {
                            place
                        }
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let headers = [
        "RUN", "WORKFLOW", "STATUS", "CREATED", "DURATION", "FAILURE",
    ];
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers
        .iter()
        .zip(widths)
        .map(|(h, w)| format!("{h:<w$}"))
        .collect();
    println!("{}", style.dim(header.join("  ").trim_end()));
    for (row, run) in rows.iter().zip(&runs) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                let padded = format!("{cell:<w$}");
                if i == 2 {
                    padded.replace(cell.as_str(), &style.status(run.status))
                } else {
                    padded
                }
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(Exit::Success)
}

/// One run with its step timeline.
pub async fn show(global: &Global, run_id: &str) -> anyhow::Result<Exit> {
    let root = global.project_dir();
    let mut config = super::load_config(&root)?;
    // The pinned workflow is loaded below: the contracts it names are
    // today's files in `schemas/` (those that do not compile are left out,
    // and `plumb check` reports them).
    if let Ok(sources) = plumb_engine::project_dir::read_sources(&root) {
        config.schemas = plumb_core::load::load_schemas(&sources.schemas).0;
    }
    let store = super::open_store_for_command(&config, &root).await?;
    let run_id = &super::resolve_run_id(store.as_ref(), run_id).await?;
    let Some(run) = store.run(run_id).await? else {
        return Err(UsageError(format!(
            "no run with id `{run_id}`; `plumb runs list` shows the runs"
        ))
        .into());
    };
    let journal = store.journal(run_id).await?;
    let attempts = store.attempt_failures(run_id).await?;
    if global.json {
        println!(
            "{}",
            json!({ "run": run, "steps": journal, "failed_attempts": attempts })
        );
        return Ok(Exit::Success);
    }
    // The step order comes from the workflow version the run is pinned to.
    let workflow = match store.workflow_version(&run.version).await? {
        Some(v) => plumb_core::load_workflow(
            &SourceFile {
                path: v.file,
                text: v.source,
            },
            &config,
        )
        .ok(),
        None => None,
    };
    print_run(&run, workflow.as_ref(), &journal, &attempts);
    Ok(Exit::Success)
}

fn print_run(
    run: &Run,
    workflow: Option<&Workflow>,
    journal: &[StepRecord],
    attempts: &[AttemptFailure],
) {
    let s = Style::detect();
    println!(
        "run {} · workflow {} (version {})",
        s.bold(&run.id),
        run.workflow,
        short_version(&run.version)
    );
    let mut status = s.status(run.status);
    if let Some(f) = &run.failure {
        let place = failure_place(f);
        if !place.is_empty() {
            status.push_str(&format!(" ({place})"));
        }
    }
    println!("  status    {status}");
    if let Some(f) = &run.failure {
        println!("  error     {}", f.message.replace('\n', "\n            "));
    }
    println!("  created   {}", timestamp(run.created_at));
    if let Some(cursor) = &run.cursor {
        let from = plumb_engine::preview_json(&cursor["from"]["value"], 40);
        let line = match (cursor.get("moved"), cursor.get("note")) {
            (Some(Value::Bool(true)), _) => format!(
                "{from} → {} (version {})",
                plumb_engine::preview_json(&cursor["to"]["value"], 40),
                cursor["to"]["version"]
            ),
            (_, Some(Value::String(note))) => format!("started from {from}; {note}"),
            _ => format!("started from {from}"),
        };
        println!("  cursor    {line}");
    }
    if let Some(d) = run_duration(run) {
        println!("  duration  {}", duration(d));
    }
    if run.claims > 1 {
        println!(
            "  resumed   {} time{}",
            run.claims - 1,
            if run.claims == 2 { "" } else { "s" }
        );
    }
    if run.replays > 0 {
        println!(
            "  replayed  {} time{} from the dead-letter list (attempts below say which round)",
            run.replays,
            if run.replays == 1 { "" } else { "s" }
        );
    }
    if let Some(why) = &run.unreadable {
        println!("  {}  {why}", s.bad("unreadable"));
    }
    if !run.status.is_terminal() && (run.strikes > 1 || run.last_error.is_some()) {
        println!(
            "  stopped   {} time{} without ending{}",
            run.strikes.saturating_sub(1),
            if run.strikes == 2 { "" } else { "s" },
            run.last_error
                .as_deref()
                .map(|e| format!("; last: {e}"))
                .unwrap_or_default()
        );
    }
    if run.status == plumb_store::RunStatus::Running {
        match &run.lease_owner {
            Some(owner) => println!("  held by   {owner}"),
            None => println!(
                "  held by   nobody: interrupted; continue with `plumb run --resume {}`",
                run.id
            ),
        }
    }
    println!();
    let by_key: HashMap<(&str, Option<u32>), &StepRecord> = journal
        .iter()
        .map(|r| ((r.step_id.as_str(), r.item), r))
        .collect();
    let mut failures: HashMap<(&str, Option<u32>), Vec<&AttemptFailure>> = HashMap::new();
    for a in attempts {
        failures
            .entry((a.step_id.as_str(), a.item))
            .or_default()
            .push(a);
    }
    let view = Timeline {
        s,
        by_key: &by_key,
        failures: &failures,
        journal,
        run_status: run.status,
    };
    match workflow {
        Some(w) => view.steps(&w.steps, 1, false),
        None => {
            // Without the definition, show the journal as it is.
            for r in journal.iter().filter(|r| r.item.is_none()) {
                view.record_line(&r.step_id, "", Some(r), 1);
            }
        }
    }
}

struct Timeline<'a> {
    s: Style,
    by_key: &'a HashMap<(&'a str, Option<u32>), &'a StepRecord>,
    failures: &'a HashMap<(&'a str, Option<u32>), Vec<&'a AttemptFailure>>,
    journal: &'a [StepRecord],
    /// An ended run has nothing in flight: an attempt it left without an
    /// outcome was cut short.
    run_status: plumb_store::RunStatus,
}

impl Timeline<'_> {
    fn steps(&self, steps: &[Step], depth: usize, skipped: bool) {
        for step in steps {
            let record = self.by_key.get(&(step.id.as_str(), None)).copied();
            if skipped {
                let pad = "  ".repeat(depth);
                println!(
                    "{pad}{} {:<18} {:<7} {}",
                    self.s.dim("-"),
                    step.id,
                    step.action.kind(),
                    self.s.dim("skipped (branch not taken)")
                );
            } else {
                self.record_line(&step.id, step.action.kind(), record, depth);
            }
            if step.for_each.is_some() && !skipped {
                self.items(step, depth + 1);
            }
            if let Action::If(branch) = &step.action {
                let took = record
                    .filter(|r| r.status == StepStatus::Succeeded)
                    .and_then(|r| r.output.as_ref())
                    .and_then(|o| o.get("branch"))
                    .and_then(|b| b.as_str());
                let pad = "  ".repeat(depth + 1);
                println!("{pad}{}", self.s.dim("then:"));
                self.steps(&branch.then, depth + 2, skipped || took != Some("then"));
                if !branch.otherwise.is_empty() {
                    println!("{pad}{}", self.s.dim("else:"));
                    self.steps(
                        &branch.otherwise,
                        depth + 2,
                        skipped || took != Some("else"),
                    );
                }
            }
        }
    }

    fn items(&self, step: &Step, depth: usize) {
        let items: Vec<&StepRecord> = self
            .journal
            .iter()
            .filter(|r| r.step_id == step.id && r.item.is_some())
            .collect();
        if items.is_empty() {
            return;
        }
        let ok = items
            .iter()
            .filter(|r| r.status == StepStatus::Succeeded)
            .count();
        let failed = items
            .iter()
            .filter(|r| r.status == StepStatus::Failed)
            .count();
        let running = items.len() - ok - failed;
        let pad = "  ".repeat(depth);
        let unfinished = if self.run_status.is_terminal() {
            "cut short"
        } else {
            "in flight"
        };
        println!(
            "{pad}{}",
            self.s.dim(&format!(
                "items: {ok} succeeded, {failed} failed, {running} {unfinished}"
            ))
        );
        // Every item with something to say: not succeeded, retried, or
        // with failed attempts on record (a replay may have fixed it).
        let mut shown: Vec<&&StepRecord> = items
            .iter()
            .filter(|r| {
                r.status != StepStatus::Succeeded
                    || r.attempt > 1
                    || self.failures.contains_key(&(step.id.as_str(), r.item))
            })
            .collect();
        shown.sort_by_key(|r| r.item);
        for r in shown {
            let name = format!("[{}]", r.item.unwrap_or_default());
            self.record_line(&step.id, &name, Some(r), depth);
        }
    }

    fn record_line(&self, id: &str, kind: &str, record: Option<&StepRecord>, depth: usize) {
        let pad = "  ".repeat(depth);
        let s = self.s;
        let Some(r) = record else {
            println!(
                "{pad}{} {id:<18} {kind:<7} {}",
                s.dim("·"),
                s.dim("not run")
            );
            return;
        };
        let (mark, word) = match r.status {
            StepStatus::Succeeded => (s.ok("✓"), s.ok("succeeded")),
            StepStatus::Failed => (s.bad("✗"), s.bad("failed")),
            StepStatus::Running => match self.run_status {
                plumb_store::RunStatus::Cancelled => {
                    (s.dim("-"), s.dim("stopped (the run was cancelled)"))
                }
                status if status.is_terminal() => (s.dim("-"), s.dim("cut short")),
                _ => (s.warn("…"), s.warn("in flight")),
            },
        };
        let took = r
            .finished_at
            .map(|f| {
                duration(Duration::from_millis(
                    u64::try_from(f - r.started_at).unwrap_or(0),
                ))
            })
            .unwrap_or_default();
        let mut extra = Vec::new();
        if r.attempt > 1 {
            extra.push(format!("{} attempts", r.attempt));
        }
        if let Some(code) = r.status_code {
            extra.push(format!("HTTP {code}"));
        }
        let label = if kind.starts_with('[') {
            format!("{id}{kind}")
        } else {
            id.to_owned()
        };
        let kind = if kind.starts_with('[') { "" } else { kind };
        println!(
            "{pad}{mark} {label:<18} {kind:<7} {word} {} {}",
            s.dim(&took),
            extra.join(", ")
        );
        if let Some(e) = &r.error {
            println!(
                "{pad}    error: {}",
                e.replace('\n', &format!("\n{pad}           "))
            );
        }
        if let Some(list) = self.failures.get(&(id, r.item)) {
            for a in list {
                let round = if a.round > 0 {
                    format!(" (replay {})", a.round)
                } else {
                    String::new()
                };
                println!(
                    "{pad}    {} attempt {}{round}: {}",
                    s.dim("↻"),
                    a.attempt,
                    a.error.replace('\n', " ")
                );
            }
        }
    }
}
