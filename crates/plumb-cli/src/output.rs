//! Terminal output: colours when stdout is a terminal, plain lines when it
//! is not (logs, CI, pipes), JSON lines with `--json`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use plumb_engine::{Observer, RunEvent};
use plumb_store::{Failure, Millis, RunStatus};
use serde_json::json;

/// Text styling, off unless stdout is a terminal and `NO_COLOR` is unset.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Detects whether to colour stdout.
    pub fn detect() -> Self {
        Self {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Green.
    pub fn ok(self, t: &str) -> String {
        self.paint("32", t)
    }
    /// Red.
    pub fn bad(self, t: &str) -> String {
        self.paint("31", t)
    }
    /// Yellow.
    pub fn warn(self, t: &str) -> String {
        self.paint("33", t)
    }
    /// Dim.
    pub fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    /// Bold.
    pub fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }

    /// A status word in its colour.
    pub fn status(self, s: RunStatus) -> String {
        match s {
            RunStatus::Succeeded => self.ok(s.as_str()),
            RunStatus::Failed => self.bad(s.as_str()),
            RunStatus::Cancelled | RunStatus::Running => self.warn(s.as_str()),
            RunStatus::Queued => self.dim(s.as_str()),
        }
    }
}

/// Short human duration: `12 ms`, `1.50 s`, `3m 20s`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// `2026-11-24 04:27:42Z` from Unix milliseconds.
pub fn timestamp(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
    )
}

/// `step push, item 3` style location of a failure.
pub fn failure_place(f: &Failure) -> String {
    let mut parts = Vec::new();
    if let Some(step) = &f.step {
        parts.push(format!("step {step}"));
    }
    if let Some(item) = f.item {
        parts.push(format!("item {item}"));
    }
    if let Some(attempt) = f.attempt {
        parts.push(format!(
            "{attempt} attempt{}",
            if attempt == 1 { "" } else { "s" }
        ));
    }
    if let Some(code) = f.status_code {
        parts.push(format!("HTTP {code}"));
    }
    parts.join(", ")
}

/// Prints run progress as it happens. On a terminal the step in flight is
/// shown on a line that its outcome then replaces; elsewhere only outcomes
/// are printed, one plain line each.
pub struct Progress {
    style: Style,
    json: bool,
    live: bool,
    out: Mutex<Out>,
}

struct Out {
    stdout: std::io::Stdout,
    /// A transient "running" line is on screen and must be erased first.
    transient: bool,
}

impl Progress {
    /// A printer for human (`json = false`) or JSON-lines output.
    pub fn new(json: bool) -> Self {
        Self {
            style: Style::detect(),
            json,
            live: !json && std::io::stdout().is_terminal(),
            out: Mutex::new(Out {
                stdout: std::io::stdout(),
                transient: false,
            }),
        }
    }

    fn write(&self, text: &str, transient: bool) {
        if let Ok(mut out) = self.out.lock() {
            // A closed pipe must not kill the run: progress is best effort,
            // the journal is the record.
            if out.transient {
                let _ = write!(out.stdout, "\r\x1b[2K");
            }
            if transient {
                let _ = write!(out.stdout, "{text}");
            } else {
                let _ = writeln!(out.stdout, "{text}");
            }
            out.transient = transient;
            let _ = out.stdout.flush();
        }
    }

    fn line(&self, text: &str) {
        self.write(text, false);
    }

    fn step_name(step_id: &str, item: Option<u32>) -> String {
        match item {
            Some(i) => format!("{step_id}[{i}]"),
            None => step_id.to_owned(),
        }
    }

    fn json_event(event: &RunEvent) -> serde_json::Value {
        match event {
            RunEvent::Started {
                run_id,
                workflow,
                version,
                resumed,
            } => {
                json!({"event": "run_started", "run_id": run_id, "workflow": workflow, "version": version, "resumed": resumed})
            }
            RunEvent::StepRestored { step_id } => {
                json!({"event": "step_restored", "step": step_id})
            }
            RunEvent::StepStarted {
                step_id,
                item,
                attempt,
                kind,
            } => {
                json!({"event": "step_started", "step": step_id, "item": item, "attempt": attempt, "kind": kind})
            }
            RunEvent::StepRetrying {
                step_id,
                item,
                attempt,
                error,
                delay,
            } => {
                json!({"event": "step_retrying", "step": step_id, "item": item, "attempt": attempt, "error": error, "delay_ms": delay.as_millis()})
            }
            RunEvent::StepSucceeded {
                step_id,
                item,
                attempts,
                elapsed,
                summary,
            } => {
                json!({"event": "step_succeeded", "step": step_id, "item": item, "attempts": attempts, "elapsed_ms": elapsed.as_millis(), "summary": summary})
            }
            RunEvent::StepFailed {
                step_id,
                item,
                attempts,
                error,
            } => {
                json!({"event": "step_failed", "step": step_id, "item": item, "attempts": attempts, "error": error})
            }
            RunEvent::Finished {
                run_id,
                status,
                failure,
                elapsed,
                ..
            } => {
                json!({"event": "run_finished", "run_id": run_id, "status": status, "failure": failure, "elapsed_ms": elapsed.as_millis()})
            }
            RunEvent::Interrupted { run_id, reason } => {
                json!({"event": "run_interrupted", "run_id": run_id, "reason": reason})
            }
        }
    }

    fn human(&self, event: &RunEvent) -> Option<String> {
        let s = self.style;
        Some(match event {
            RunEvent::Started {
                run_id,
                workflow,
                version,
                resumed,
            } => format!(
                "{} {run_id} · workflow {} (version {})",
                if *resumed { "resuming run" } else { "run" },
                s.bold(workflow),
                plumb_core::model::short_version(version),
            ),
            RunEvent::StepRestored { step_id } => {
                format!(
                    "  {} {step_id:<18} {}",
                    s.dim("="),
                    s.dim("done before (from the journal)")
                )
            }
            RunEvent::StepStarted { .. } => return None,
            RunEvent::StepRetrying {
                step_id,
                item,
                attempt,
                error,
                delay,
            } => format!(
                "  {} {:<18} attempt {attempt} failed: {error}; retrying in {}",
                s.warn("↻"),
                Self::step_name(step_id, *item),
                duration(*delay)
            ),
            RunEvent::StepSucceeded {
                step_id,
                item,
                attempts,
                elapsed,
                summary,
            } => {
                let tries = if *attempts > 1 {
                    format!(" ({attempts} attempts)")
                } else {
                    String::new()
                };
                let indent = if item.is_some() { "    " } else { "  " };
                format!(
                    "{indent}{} {:<18} {} · {}{tries}",
                    s.ok("✓"),
                    Self::step_name(step_id, *item),
                    summary,
                    s.dim(&duration(*elapsed))
                )
            }
            RunEvent::StepFailed {
                step_id,
                item,
                attempts,
                error,
            } => {
                let indent = if item.is_some() { "    " } else { "  " };
                let tries = if *attempts > 1 {
                    format!(" (after {attempts} attempts)")
                } else {
                    String::new()
                };
                format!(
                    "{indent}{} {:<18} {}{tries}",
                    s.bad("✗"),
                    Self::step_name(step_id, *item),
                    error
                )
            }
            RunEvent::Finished {
                run_id,
                status,
                failure,
                elapsed,
                ..
            } => match failure {
                None => format!(
                    "run {run_id} {} in {}",
                    s.status(*status),
                    duration(*elapsed)
                ),
                Some(f) => {
                    let place = failure_place(f);
                    format!(
                        "run {run_id} {}{} after {}\n  error: {}\n  see: plumb runs show {run_id}",
                        s.status(*status),
                        if place.is_empty() {
                            String::new()
                        } else {
                            format!(" ({place})")
                        },
                        duration(*elapsed),
                        f.message
                    )
                }
            },
            RunEvent::Interrupted { run_id, reason } => format!(
                "run {run_id} {} ({reason}); continue it with: plumb run --resume {run_id}",
                s.warn("stopped")
            ),
        })
    }
}

impl Observer for Progress {
    fn on_event(&self, event: &RunEvent) {
        if self.json {
            self.line(&Self::json_event(event).to_string());
            return;
        }
        if let RunEvent::StepStarted {
            step_id,
            item: None,
            attempt,
            kind,
        } = event
        {
            if self.live {
                let what = match (*kind, *attempt) {
                    ("sleep", _) => "sleeping".to_owned(),
                    (_, 1) => "running".to_owned(),
                    (_, n) => format!("running (attempt {n})"),
                };
                self.write(
                    &format!(
                        "  {} {step_id:<18} {}",
                        self.style.dim("…"),
                        self.style.dim(&what)
                    ),
                    true,
                );
            }
            return;
        }
        if let Some(text) = self.human(event) {
            self.line(&text);
        }
    }
}
