//! The `plumb` command.
//!
//! This binary wires the crates together: it parses flags, finds the
//! project, opens the store the project names, builds the engine and maps
//! outcomes to exit codes (0 success, 1 failure or problems found, 2 usage,
//! 130 interrupted). It is the only place that uses `anyhow` and prints to
//! the terminal.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cli;
mod client;
mod commands;
mod output;

use std::process::ExitCode;

// The engine allocates many small, short-lived values per step (JSON, jq
// values, journal rows) across threads; mimalloc handles that pattern with
// less contention than the system allocator (measured in BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use crate::cli::{Cli, Command, RunsCommand};

/// What a command wants the process to exit with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0.
    Success,
    /// 1: the run failed, or problems were found.
    Failure,
    /// 2: the command was used wrongly (unknown workflow, bad input file).
    Usage,
    /// 130: stopped by Ctrl-C or SIGTERM; the run can be resumed.
    Interrupted,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(match e {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Interrupted => 130,
        })
    }
}

/// A mistake in how the command was called: exits 2 rather than 1.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `plumb runs list | head` must end quietly when `head` has read enough,
    // as other command-line tools do, not panic on the closed pipe. The
    // long-running commands keep Rust's default: a closed stdout must not
    // kill a server.
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Worker(_) | Command::Demo
    ) {
        sigpipe::reset();
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Whatever is still running when the command is done (a store read, a
    // connection closing) must not hold the process open.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                Exit::Usage.into()
            } else {
                Exit::Failure.into()
            }
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<Exit> {
    let global = cli.global;
    match cli.command {
        Command::Init { dir, example } => commands::init::run(&global, dir.as_deref(), example),
        Command::MockApi(args) => commands::mock::run(&global, args).await,
        Command::Check => commands::check::run(&global).await,
        Command::Run(args) => commands::run::run(&global, args).await,
        Command::Runs { command } => match command {
            RunsCommand::List(args) => commands::runs::list(&global, args).await,
            RunsCommand::Show { run_id } => commands::runs::show(&global, &run_id).await,
        },
        Command::Serve(args) => commands::serve::run(&global, args).await,
        Command::Worker(args) => commands::serve::run_worker(&global, args).await,
        Command::Demo => commands::demo::run(&global).await,
        Command::Dlq { command } => commands::ops::dlq(&global, command).await,
        Command::Cancel { run_id, reason } => commands::ops::cancel(&global, &run_id, reason).await,
        Command::Status => commands::ops::status(&global).await,
        Command::Workers => commands::store::workers(&global).await,
        Command::Secrets { command } => commands::secrets::secrets(&global, command).await,
        Command::Tokens { command } => commands::secrets::tokens(&global, command).await,
        Command::Audit { command } => commands::secrets::audit(&global, command).await,
        Command::Store { command } => commands::store::run(&global, command).await,
        Command::Cursor { command } => commands::cursor::run(&global, command).await,
        Command::Trace { key, workflow } => {
            commands::trace::run(&global, &key, workflow.as_deref()).await
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PLUMB_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    // Colour only for a person at a terminal: a log file or a journal gets
    // plain text, no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
