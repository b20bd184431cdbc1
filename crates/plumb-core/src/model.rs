//! The validated model: what a loaded project *means*.
//!
//! Everything here has passed validation: references resolve, expressions
//! are compiled, retry policies and timeouts are resolved from the step, the
//! workflow, the project defaults and the built-in defaults, in that order.
//! The engine never re-checks any of it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use crate::expr::{Program, Template};
pub use crate::spec::{Backoff, CatchUp};

/// Retry policy used when nothing is configured.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    backoff: Backoff::Exponential,
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
    jitter: true,
};

/// Per-attempt timeout used when nothing is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where runs are stored when `plumb.yaml` does not say.
pub const DEFAULT_STORE: &str = "sqlite://plumb.db";

/// Where `plumb serve` listens when `plumb.yaml` does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Runs one `plumb serve` executes at once when `plumb.yaml` does not say.
pub const DEFAULT_WORKERS: u32 = 64;

/// Largest webhook body accepted by default (1 MiB).
pub const DEFAULT_BODY_LIMIT: u64 = 1024 * 1024;

/// How long a lease lasts without a heartbeat, by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// A loaded, valid project.
#[derive(Clone, Debug)]
pub struct Project {
    /// `plumb.yaml`.
    pub config: Arc<ProjectConfig>,
    /// The workflows, in file name order.
    pub workflows: Vec<Arc<Workflow>>,
}

impl Project {
    /// The workflow called `name`.
    #[must_use]
    pub fn workflow(&self, name: &str) -> Option<&Arc<Workflow>> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

/// `plumb.yaml`, validated.
#[derive(Clone, Debug)]
pub struct ProjectConfig {
    /// Store URL as written (`sqlite://plumb.db`); relative paths are relative
    /// to the project directory.
    pub store: String,
    /// Listen address for `plumb serve`.
    pub listen: String,
    /// Connections by name.
    pub connections: BTreeMap<String, Connection>,
    /// Project defaults.
    pub defaults: Defaults,
    /// Alert channels by name.
    pub alerts: BTreeMap<String, AlertChannel>,
    /// Settings of `plumb serve`.
    pub serve: ServeConfig,
}

/// Settings of `plumb serve`, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Runs executed at once by one process.
    pub workers: u32,
    /// Largest webhook body accepted, in bytes.
    pub body_limit: u64,
    /// Lease duration.
    pub lease: Duration,
    /// Base URL for links in alerts (no trailing `/`).
    pub public_url: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            body_limit: DEFAULT_BODY_LIMIT,
            lease: DEFAULT_LEASE,
            public_url: None,
        }
    }
}

/// Where failure alerts go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertChannel {
    /// A JSON POST (or other method) through an http connection.
    Http {
        /// The connection.
        connection: String,
        /// Upper-case method.
        method: String,
        /// Path below the connection's base URL.
        path: String,
    },
}

/// Project-wide defaults, already merged over the built-in ones.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

/// A named connection.
#[derive(Clone, Debug)]
pub enum Connection {
    /// An HTTP API.
    Http(HttpConnection),
}

impl Connection {
    /// The kind as written in `plumb.yaml`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
        }
    }
}

/// An HTTP connection: the only origin its steps may call.
#[derive(Clone, Debug)]
pub struct HttpConnection {
    /// Scheme, host, port and path prefix.
    pub base_url: Url,
    /// Headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// Timeout for requests on this connection, if set.
    pub timeout: Option<Duration>,
}

/// A resolved retry policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub attempts: u32,
    /// Growth of the delay.
    pub backoff: Backoff,
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Cap on the delay.
    pub max: Duration,
    /// Randomise delays.
    pub jitter: bool,
}

/// What starts runs of a workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Started by hand.
    Manual,
    /// `POST /hooks/<path>`.
    Webhook {
        /// The path below `/hooks/`.
        path: String,
    },
    /// A cron schedule.
    Schedule {
        /// The cron expression.
        cron: String,
        /// IANA timezone name.
        timezone: String,
        /// Missed slots after downtime.
        catch_up: CatchUp,
    },
}

/// A validated workflow, pinned to the exact file text it came from.
#[derive(Clone, Debug)]
pub struct Workflow {
    /// Unique name.
    pub name: String,
    /// Who is paged.
    pub owner: String,
    /// What it does.
    pub description: String,
    /// What starts it.
    pub trigger: Trigger,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Runs executing at once, across all workers; `None` is unlimited.
    pub concurrency: Option<u32>,
    /// Alert channels told when a run fails for good.
    pub alerts_on_failure: Vec<String>,
    /// The file, relative to the project directory.
    pub file: String,
    /// SHA-256 of the file text, hex: the version a run is pinned to.
    pub version: String,
    /// The file text.
    pub source: Arc<str>,
}

impl Workflow {
    /// The first 12 hex digits of the version, for display.
    #[must_use]
    pub fn short_version(&self) -> &str {
        short_version(&self.version)
    }

    /// Every step, nested ones included, in execution order.
    #[must_use]
    pub fn all_steps(&self) -> Vec<&Step> {
        fn walk<'a>(steps: &'a [Step], out: &mut Vec<&'a Step>) {
            for step in steps {
                out.push(step);
                if let Action::If(branch) = &step.action {
                    walk(&branch.then, out);
                    walk(&branch.otherwise, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, &mut out);
        out
    }
}

/// The first 12 hex digits of a version hash.
#[must_use]
pub fn short_version(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

/// One step, with its policies resolved.
#[derive(Clone, Debug)]
pub struct Step {
    /// Unique id within the workflow.
    pub id: String,
    /// What it does.
    pub action: Action,
    /// Fan-out over a list, if any.
    pub for_each: Option<ForEach>,
    /// Retry policy in force.
    pub retry: RetryPolicy,
    /// Timeout of one attempt.
    pub timeout: Duration,
}

impl Step {
    /// Whether running the step can change the world outside plumb; such
    /// steps record each attempt before it starts, so a crash can never make
    /// an attempt invisible.
    #[must_use]
    pub fn has_effects(&self) -> bool {
        matches!(self.action, Action::Http(_))
    }
}

/// `for_each` on a step.
#[derive(Clone, Debug)]
pub struct ForEach {
    /// Yields the list of items.
    pub items: Template,
    /// Items in flight at once.
    pub concurrency: u32,
}

/// What a step does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Call an HTTP connection.
    Http(HttpAction),
    /// Transform with jq.
    Jq(Program),
    /// Branch.
    If(IfBranch),
    /// Wait; the template yields a duration text or a number of seconds.
    Sleep(Template),
    /// Fail the run unless the condition is true.
    Assert {
        /// Must evaluate to `true`.
        condition: Template,
        /// The failure message.
        message: Option<Template>,
    },
}

impl Action {
    /// The kind as written in the workflow file.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Jq(_) => "jq",
            Self::If(_) => "if",
            Self::Sleep(_) => "sleep",
            Self::Assert { .. } => "assert",
        }
    }
}

/// An `if` step.
#[derive(Clone, Debug)]
pub struct IfBranch {
    /// Decides the branch.
    pub condition: Template,
    /// Run when the condition is true.
    pub then: Vec<Step>,
    /// Run when it is false.
    pub otherwise: Vec<Step>,
}

/// An `http` step.
#[derive(Clone, Debug)]
pub struct HttpAction {
    /// The connection's name.
    pub connection: String,
    /// Upper-case HTTP method.
    pub method: String,
    /// Path below the connection's base URL.
    pub path: Template,
    /// Query parameters.
    pub query: Vec<(String, Template)>,
    /// Request headers.
    pub headers: Vec<(String, Template)>,
    /// JSON body.
    pub body: Option<Template>,
    /// Success statuses; `None` means any 2xx.
    pub expect_status: Option<Vec<u16>>,
}
