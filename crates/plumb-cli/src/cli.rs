//! Flags and subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// plumb: durable, observable integrations you can trust with real data.
#[derive(Debug, Parser)]
#[command(
    name = "plumb",
    version,
    about = "plumb runs integrations you can trust with real data: workflows are YAML files in git; every step's outcome is committed before the next starts, a crashed run resumes where it stopped, every effect carries an idempotency key, and every failure ends in a dead letter and an alert.",
    long_about = None,
    after_help = "Start with `plumb init DIR`, then `plumb check` and `plumb run WORKFLOW`; `plumb serve` runs it all as a service. Every command takes --project DIR and --json."
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The project directory (holding plumb.yaml); default: the current directory.
    #[arg(long, global = true, value_name = "DIR", env = "PLUMB_PROJECT")]
    pub project: Option<PathBuf>,
    /// Machine-readable output: JSON (JSON lines for `run`).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    /// The project directory.
    pub fn project_dir(&self) -> PathBuf {
        self.project.clone().unwrap_or_else(|| PathBuf::from("."))
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scaffold a project with an example workflow.
    Init {
        /// Where to create it (default: the current directory).
        dir: Option<PathBuf>,
        /// Which example to scaffold: `hello` (a first workflow), or `sync` (an incremental sync with a cursor and pagination, against `plumb mock-api`).
        #[arg(long, value_enum, default_value_t = Example::Hello)]
        example: Example,
    },
    /// A mock CRM and warehouse on loopback, for the `sync` example (`plumb init --example sync`).
    MockApi(MockArgs),
    /// Validate the project: schema, references, expressions, egress. Exit 1 on problems.
    Check,
    /// Run a workflow once in the foreground, or resume an interrupted run.
    Run(RunArgs),
    /// Run history, step timelines and errors.
    Runs {
        /// List or show.
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Serve webhooks and the API, fire schedules and run workers, in one process.
    Serve(ServeArgs),
    /// Run workers only (no webhooks, no API, no scheduler), sharing the project's store.
    Worker(WorkerArgs),
    /// A self-contained demo: a server, a flaky mock upstream and a few events.
    Demo,
    /// The dead-letter list: failed runs, and replaying them.
    Dlq {
        /// List or replay.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Cancel a queued or running run.
    Cancel {
        /// The run id.
        run_id: String,
        /// Why (kept with the run).
        #[arg(long)]
        reason: Option<String>,
    },
    /// One screen: each workflow's health, queue, dead letters, next fire, undelivered alerts.
    Status,
    /// Sealed secrets: set, list, rotate, delete, rekey.
    Secrets {
        /// What to do.
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// API tokens with roles.
    Tokens {
        /// What to do.
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The processes sharing this project's store (serve and workers, on any host): role, host, pid, version, runs in hand, last heartbeat.
    Workers,
    /// A workflow's incremental-sync cursor: show it, or set or reset it by hand (audited).
    Cursor {
        /// What to do.
        #[command(subcommand)]
        command: CursorCommand,
    },
    /// What happened to one business record: every run, step and item that touched it (a workflow's `record_key`), oldest first — acceptance, dedupe hits, retries, outcomes with their effect, dead letters, replays.
    Trace {
        /// The record's key, as `record_key` yields it (`ord-1042`).
        key: String,
        /// Only this workflow's events.
        #[arg(long)]
        workflow: Option<String>,
    },
    /// The store itself: copy it to another backend.
    Store {
        /// What to do.
        #[command(subcommand)]
        command: StoreCommand,
    },
}

/// Which example `plumb init` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Example {
    /// A first workflow, run by hand.
    Hello,
    /// An incremental sync: schedule, cursor, pagination, a data contract.
    Sync,
}

/// `plumb mock-api`.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Where to listen (loopback).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// Contacts at the start.
    #[arg(long, default_value_t = 250)]
    pub records: usize,
    /// Seconds between changes (a new contact; every third time an old one renamed).
    #[arg(long, default_value_t = 5)]
    pub every: u64,
}

/// `plumb cursor …`.
#[derive(Debug, Subcommand)]
pub enum CursorCommand {
    /// The committed cursor, its version, and what moved it last.
    Show {
        /// The workflow.
        workflow: String,
    },
    /// Set the cursor by hand (audited); runs in progress then keep it. VALUE is JSON (`42`, `'{"since": 5}'`); text that is not JSON is taken as a string (`2026-01-01T00:00:00Z`).
    Set {
        /// The workflow.
        workflow: String,
        /// The new value.
        value: String,
    },
    /// Back to null (audited): the next run reads from the beginning.
    Reset {
        /// The workflow.
        workflow: String,
    },
}

/// `plumb store …`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy everything in this project's store (runs with their journals, the queue, schedule slots, alerts, sealed secrets, tokens, deployments, the audit log) into a new, empty store. Stop every plumb process of the project first.
    Copy {
        /// The target store's URL (`postgres://user@host:5432/db`); its password from PLUMB_STORE_PASSWORD or PLUMB_STORE_PASSWORD_FILE.
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

/// `plumb secrets …`.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Seal a new secret. The value is read from stdin (or a prompt that does not echo), never from the command line.
    Set {
        /// The secret's name.
        name: String,
    },
    /// Names, dates and which connections use each secret (never values).
    List,
    /// Replace a secret's value (read like `set`).
    Rotate {
        /// The secret's name.
        name: String,
    },
    /// Delete a secret; refused while a connection uses it.
    Delete {
        /// The secret's name.
        name: String,
        /// Delete even though something uses it.
        #[arg(long)]
        force: bool,
    },
    /// Make a new master key and re-seal every secret with it, in one transaction.
    Rekey {
        /// Where to write the new key (mode 0600) before anything is
        /// re-sealed. Required when the key comes from PLUMB_MASTER_KEY;
        /// otherwise the key file is replaced.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<std::path::PathBuf>,
    },
}

/// `plumb tokens …`.
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; it is printed once and only its hash is kept.
    Create {
        /// A unique name (who or what uses it).
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Tokens, their roles and whether they are revoked.
    List,
    /// Revoke a token by name.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// A role on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// Reads.
    Viewer,
    /// Also replays and cancels.
    Operator,
    /// Also manages secrets, tokens and deployments.
    Admin,
}

impl From<RoleArg> for plumb_store::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => Self::Viewer,
            RoleArg::Operator => Self::Operator,
            RoleArg::Admin => Self::Admin,
        }
    }
}

/// `plumb audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Entries, oldest first.
    List {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the hash chain; exit 1 and name the first bad entry if any was edited, deleted, reordered or inserted.
    Verify {
        /// A `SEQ:HASH` printed by an earlier verify and kept outside the
        /// store: proves the log up to SEQ was not rewritten (repeatable).
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<String>,
    },
}

/// `plumb serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen here instead of plumb.yaml's `listen` (`127.0.0.1:0` picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `plumb worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Serve /healthz, /readyz (which checks the store) and /metrics here, and nothing else (`127.0.0.1:0` picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `plumb dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Failed runs, newest first, with their error and failing step.
    List {
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Queue a failed run again: it resumes at its failed step, with the same id and keys.
    Replay {
        /// The run to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        run_id: Option<String>,
        /// Replay every failed run of `--workflow`.
        #[arg(long, requires = "workflow")]
        all: bool,
        /// The workflow whose failed runs to replay (with --all).
        #[arg(long)]
        workflow: Option<String>,
    },
}

/// `plumb run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The workflow to run.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    pub workflow: Option<String>,
    /// A JSON file whose content becomes `.trigger.body` (`-` for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub input: Option<PathBuf>,
    /// Continue an interrupted run at its first step without a committed outcome.
    #[arg(long, value_name = "RUN_ID")]
    pub resume: Option<String>,
}

/// `plumb runs …`.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Recent runs, newest first.
    List(ListArgs),
    /// One run: status, error and step timeline.
    Show {
        /// The run id (as printed by `plumb run` or `plumb runs list`).
        run_id: String,
    },
}

/// `plumb runs list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only runs of this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// How many runs to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

/// A run status on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    /// Waiting for a worker.
    Queued,
    /// In progress, or interrupted and resumable.
    Running,
    /// Ended well.
    Succeeded,
    /// Ended with a failed step.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl From<StatusArg> for plumb_store::RunStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Queued => Self::Queued,
            StatusArg::Running => Self::Running,
            StatusArg::Succeeded => Self::Succeeded,
            StatusArg::Failed => Self::Failed,
            StatusArg::Cancelled => Self::Cancelled,
        }
    }
}
