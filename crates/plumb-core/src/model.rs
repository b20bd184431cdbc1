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

/// How long runs and payloads are kept when nothing says: ended runs 30
/// days, their payloads 7.
pub const DEFAULT_RETENTION: Retention = Retention {
    runs: Duration::from_secs(30 * 24 * 3600),
    payloads: Duration::from_secs(7 * 24 * 3600),
};

/// How long ended runs are kept, and their payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Ended runs older than this are deleted with their journal,
    /// attempts and alerts. Dead letters too: they are kept this long.
    pub runs: Duration,
    /// Trigger payloads and step outputs of succeeded or cancelled runs
    /// older than this are blanked; dead letters keep theirs for a replay.
    pub payloads: Duration,
}

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

/// Executions of one run that may stop without ending it before the run
/// fails as a poison run, by default.
pub const DEFAULT_MAX_CRASHES: u32 = 5;

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

    /// Every secret the project uses, with who uses it
    /// (`connection crm`, `webhook of workflow orders`).
    #[must_use]
    pub fn secret_uses(&self) -> BTreeMap<String, Vec<String>> {
        let mut uses = self.config.secret_uses();
        for w in &self.workflows {
            if let Trigger::Webhook { auth: Some(a), .. } = &w.trigger {
                uses.entry(a.secret().to_owned())
                    .or_default()
                    .push(format!("webhook of workflow {}", w.name));
            }
        }
        uses
    }
}

impl ProjectConfig {
    /// The secrets connections use, with the connections using them.
    #[must_use]
    pub fn secret_uses(&self) -> BTreeMap<String, Vec<String>> {
        let mut uses: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, c) in &self.connections {
            for secret in c.secrets() {
                uses.entry(secret.to_owned())
                    .or_default()
                    .push(format!("connection {name}"));
            }
        }
        uses
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
    /// SHA-256 of `plumb.yaml` (hex), recorded when it is deployed.
    pub version: String,
    /// SHA-256 of each connection's definition (hex), so a deployment can
    /// say which connections changed.
    pub connection_versions: BTreeMap<String, String>,
    /// Lint findings allowed as not being credentials.
    pub lint_allow: Vec<crate::lint::LintAllow>,
    /// The data contracts in `schemas/`, compiled, by their path in the
    /// project (`schemas/page.json`).
    pub schemas: BTreeMap<String, crate::contract::Contract>,
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
    /// Executions of one run that may stop without ending it (crash, panic,
    /// refused journal) before the run fails for good.
    pub max_crashes: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            body_limit: DEFAULT_BODY_LIMIT,
            lease: DEFAULT_LEASE,
            public_url: None,
            max_crashes: DEFAULT_MAX_CRASHES,
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
    /// Retention of runs and payloads.
    pub retention: Retention,
}

/// A named connection.
#[derive(Clone, Debug)]
pub enum Connection {
    /// An HTTP API.
    Http(HttpConnection),
    /// A SQL database.
    Sql(SqlConnection),
    /// A message broker: `queue` triggers consume from it, `publish` steps
    /// send to it.
    Broker(BrokerConnection),
}

impl Connection {
    /// The kind as written in `plumb.yaml`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Sql(s) => s.driver.name(),
            Self::Broker(b) => b.kind.name(),
        }
    }

    /// The secrets it uses.
    #[must_use]
    pub fn secrets(&self) -> Vec<&str> {
        match self {
            Self::Http(h) => h.auth.iter().map(HttpAuth::secret).collect(),
            Self::Sql(s) => url_secrets(&s.url, s.password.as_deref()),
            Self::Broker(b) => url_secrets(&b.url, b.password.as_deref()),
        }
    }
}

/// The secrets of a URL kept as a secret, and of a password.
fn url_secrets<'a>(url: &'a SqlUrl, password: Option<&'a str>) -> Vec<&'a str> {
    let mut names = Vec::new();
    if let SqlUrl::Secret(name) = url {
        names.push(name.as_str());
    }
    names.extend(password);
    names
}

/// Which message broker a connection talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// An MQTT 5 broker (Mosquitto, EMQX, HiveMQ).
    Mqtt,
    /// NATS with JetStream.
    Nats,
    /// Redis Streams.
    Redis,
}

impl BrokerKind {
    /// The kind as written in `plumb.yaml`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Amqp => "amqp",
            Self::Mqtt => "mqtt",
            Self::Nats => "nats",
            Self::Redis => "redis",
        }
    }

    /// What a `queue` trigger reads from and a `publish` step's `to`
    /// names, in the broker's words.
    #[must_use]
    pub fn source_field(self) -> &'static str {
        match self {
            Self::Amqp => "queue",
            Self::Mqtt => "topic",
            Self::Nats => "subject",
            Self::Redis => "stream",
        }
    }
}

/// A broker connection: opened on first use, bound to the host its URL
/// names, reconnected with backoff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConnection {
    /// Which broker.
    pub kind: BrokerKind,
    /// Where: a URL without a password, or a secret holding the whole URL.
    pub url: SqlUrl,
    /// The secret holding the password, for a URL written without one.
    pub password: Option<String>,
    /// Timeout of one command (and of connecting).
    pub timeout: Option<Duration>,
}

/// The header (stream field) every published message carries its
/// idempotency key in.
pub const IDEMPOTENCY_FIELD: &str = "plumb-idempotency-key";

/// A SQL database connection: a pool opened on first use, bound to the
/// host its URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlConnection {
    /// Which database.
    pub driver: SqlDriver,
    /// Where: a URL without a password, a secret holding the whole URL, or
    /// (SQLite) a file.
    pub url: SqlUrl,
    /// The secret holding the password, for a URL written without one.
    pub password: Option<String>,
    /// Connections in the pool.
    pub pool: u32,
    /// Timeout of one statement (and of getting a connection).
    pub timeout: Option<Duration>,
    /// Where `exactly_once` records each step's idempotency key, in the
    /// target database, in the same transaction as the write; `None` when
    /// the connection is not `exactly_once`.
    pub effects_table: Option<String>,
}

/// The table `exactly_once` uses unless `effects_table` names another.
pub const DEFAULT_EFFECTS_TABLE: &str = "plumb_effects";

/// The databases a `sql` step can talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlDriver {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
    /// A SQLite database file.
    Sqlite,
}

impl SqlDriver {
    /// As written in `plumb.yaml`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Sqlite => "sqlite",
        }
    }
}

/// Where a SQL connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SqlUrl {
    /// Written in `plumb.yaml` (never with a password).
    Literal(Url),
    /// The whole URL is this secret's value.
    Secret(String),
    /// A SQLite database file, relative to the project directory unless
    /// absolute.
    File(std::path::PathBuf),
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
    /// Credentials, from secrets.
    pub auth: Option<HttpAuth>,
}

/// How an http connection authenticates; every kind names a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAuth {
    /// `Authorization: Bearer <secret>`.
    Bearer {
        /// Secret name.
        secret: String,
    },
    /// `Authorization: Basic base64(username:<secret>)`.
    Basic {
        /// User name.
        username: String,
        /// Secret name of the password.
        secret: String,
    },
    /// `<name>: <secret>`.
    Header {
        /// Header name.
        name: String,
        /// Secret name.
        secret: String,
    },
}

impl HttpAuth {
    /// The secret this auth sends.
    #[must_use]
    pub fn secret(&self) -> &str {
        match self {
            Self::Bearer { secret } | Self::Basic { secret, .. } | Self::Header { secret, .. } => {
                secret
            }
        }
    }
}

/// How a webhook sender proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookAuth {
    /// A generic HMAC-SHA256 over the body (or `{timestamp}.{body}`).
    Hmac {
        /// Secret name.
        secret: String,
        /// Signature header.
        header: String,
        /// Text before the hex signature.
        prefix: String,
        /// Signed timestamp header, if any.
        timestamp_header: Option<String>,
        /// Oldest accepted timestamp age.
        tolerance: Duration,
    },
    /// `Authorization: Bearer <secret>`.
    Bearer {
        /// Secret name.
        secret: String,
    },
    /// A known sender's published scheme.
    Preset {
        /// Which sender.
        preset: WebhookPreset,
        /// Secret name.
        secret: String,
    },
}

impl WebhookAuth {
    /// The secret it checks against.
    #[must_use]
    pub fn secret(&self) -> &str {
        match self {
            Self::Hmac { secret, .. } | Self::Bearer { secret } | Self::Preset { secret, .. } => {
                secret
            }
        }
    }
}

/// Senders whose signing schemes plumb knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookPreset {
    /// `X-Hub-Signature-256: sha256=<hex>` over the body.
    Github,
    /// `Stripe-Signature: t=<ts>,v1=<hex>` over `{t}.{body}`.
    Stripe,
    /// `X-Slack-Signature: v0=<hex>` over `v0:{ts}:{body}`.
    Slack,
    /// `X-Shopify-Hmac-Sha256: <base64>` over the body.
    Shopify,
    /// Standard Webhooks: `webhook-signature: v1,<base64>` over
    /// `{id}.{timestamp}.{body}`, secret `whsec_<base64>`.
    StandardWebhooks,
}

impl WebhookPreset {
    /// Parses a preset name as written in a workflow.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "github" => Self::Github,
            "stripe" => Self::Stripe,
            "slack" => Self::Slack,
            "shopify" => Self::Shopify,
            "standard_webhooks" => Self::StandardWebhooks,
            _ => return None,
        })
    }
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
        /// How senders authenticate, if they must.
        auth: Option<WebhookAuth>,
        /// The contract a body must keep to start a run (`schema:`); manual
        /// runs of the workflow are held to it too.
        schema: Option<crate::contract::Contract>,
        /// How a second delivery of one event is recognised (`dedupe:`, or
        /// the sender preset's delivery id).
        dedupe: Option<Box<TriggerDedupe>>,
    },
    /// An HTTP request on an interval; each new item starts a run.
    Poll(Box<PollTrigger>),
    /// Messages from a broker; each starts a run, acknowledged once the run
    /// is committed.
    Queue(Box<QueueTrigger>),
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

/// `trigger.queue`: where messages come from and how they are taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueTrigger {
    /// The broker connection.
    pub connection: String,
    /// Its kind (copied from the connection when the project was loaded).
    pub kind: BrokerKind,
    /// The AMQP queue, MQTT topic filter, NATS subject or Redis stream.
    pub source: String,
    /// NATS only: the JetStream stream (found by `source` when not given).
    pub stream: Option<String>,
    /// The consumer's durable identity: the Redis consumer group, the NATS
    /// durable consumer, the MQTT client id (`plumb-<workflow>` when not
    /// given: see [`QueueTrigger::group_for`]). It must not change, or the
    /// broker forgets what was taken.
    pub group: Option<String>,
    /// How many messages may be taken and not yet acknowledged at once.
    pub prefetch: u16,
    /// AMQP: declare the queue (durable) if it does not exist; NATS:
    /// create the stream for `subject` if none holds it.
    pub declare: bool,
    /// The contract a message body must keep; a message that breaks it is a
    /// failed run (a dead letter), never dropped.
    pub schema: Option<crate::contract::Contract>,
    /// How a second delivery of one message is recognised (besides the
    /// broker's message id).
    pub dedupe: Option<Box<TriggerDedupe>>,
    /// How long a message's id (or `dedupe` key) counts.
    pub window: Duration,
}

impl QueueTrigger {
    /// The consumer's durable identity for `workflow`.
    #[must_use]
    pub fn group_for(&self, workflow: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("plumb-{workflow}"))
    }
}

/// `trigger.poll`.
#[derive(Clone, Debug)]
pub struct PollTrigger {
    /// How often it polls.
    pub every: Duration,
    /// The request (with `paginate`, every page).
    pub http: HttpAction,
    /// The connection's timeout for each request, if it sets one.
    pub timeout: Option<Duration>,
    /// Over `.response` and `.pages`: the items.
    pub items: Template,
    /// Over one item: its identity (its SHA-256 is what is remembered).
    pub key: Template,
    /// The workflow's cursor, committed with the poll.
    pub cursor: Option<Template>,
    /// One run for all new items instead of one each.
    pub batch: bool,
    /// How long a seen key counts.
    pub remember: Duration,
}

impl PartialEq for PollTrigger {
    fn eq(&self, other: &Self) -> bool {
        // Compiled expressions have no equality of their own; what they
        // were compiled from, and every other field, shows in the debug form.
        format!("{self:?}") == format!("{other:?}")
    }
}

impl Eq for PollTrigger {}

/// A webhook's dedupe key: the events whose key evaluates equal within
/// `window` start one run between them.
#[derive(Clone, Debug)]
pub struct TriggerDedupe {
    /// The key expression as written (or the sender preset's).
    pub source: String,
    /// The key, evaluated over `.trigger`; `null` means "this event
    /// cannot be deduplicated" and starts a run.
    pub key: crate::expr::Template,
    /// How long a key counts.
    pub window: Duration,
}

impl TriggerDedupe {
    /// The key an evaluated `value` stands for, as stored: the SHA-256
    /// (hex) of the value's text (a string as it is, anything else as
    /// compact JSON), so the store keeps an event's identity, never its
    /// content, in a fixed size. `None` for `null` or an empty string: that
    /// event cannot be deduplicated (a missing field must not make every
    /// such event a duplicate of the first).
    #[must_use]
    pub fn key_text(value: &serde_json::Value) -> Option<String> {
        use sha2::Digest;
        let text = match value {
            serde_json::Value::Null => return None,
            serde_json::Value::String(s) if s.is_empty() => return None,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(hex::encode(sha2::Sha256::digest(text.as_bytes())))
    }
}

impl PartialEq for TriggerDedupe {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.window == other.window
    }
}

impl Eq for TriggerDedupe {}

/// A validated workflow, pinned to the exact file text it came from.
#[derive(Clone, Debug)]
pub struct Workflow {
    /// `trigger.<webhook|poll>.record_key`: the business record a run is
    /// about, evaluated over `.trigger` when it is accepted (lineage).
    pub record_key: Option<Template>,
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
    /// `cursor:`: evaluated when a run succeeds and committed with its
    /// success (SPEC G7); such a workflow runs one run at a time.
    pub cursor: Option<WorkflowCursor>,
    /// Alert channels told when a run fails for good.
    pub alerts_on_failure: Vec<String>,
    /// Fields masked before payloads are journaled.
    pub redact: Vec<RedactPath>,
    /// How long its ended runs and their payloads are kept.
    pub retention: Retention,
    /// The file, relative to the project directory.
    pub file: String,
    /// SHA-256 of the file text, hex: the version a run is pinned to.
    pub version: String,
    /// The file text.
    pub source: Arc<str>,
}

impl Workflow {
    /// The contract a run's input must keep: the webhook trigger's
    /// `schema:`, for webhook deliveries and manual runs alike.
    #[must_use]
    pub fn input_contract(&self) -> Option<&crate::contract::Contract> {
        match &self.trigger {
            Trigger::Webhook { schema, .. } => schema.as_ref(),
            _ => None,
        }
    }

    /// Whether its poll trigger keeps a cursor (the workflow's cursor).
    #[must_use]
    pub fn polls_with_cursor(&self) -> bool {
        matches!(&self.trigger, Trigger::Poll(p) if p.cursor.is_some())
    }

    /// How long the `cursor` expression may take: the longest step
    /// timeout (it reads what the steps produced).
    #[must_use]
    pub fn cursor_timeout(&self) -> std::time::Duration {
        self.all_steps()
            .iter()
            .map(|s| s.timeout)
            .max()
            .unwrap_or(std::time::Duration::from_secs(30))
    }

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

/// A field path under `.trigger` or `.steps.<id>`, as keys and indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedactPath {
    /// As written (`.trigger.body.card.number`).
    pub text: String,
    /// The segments after the leading `.`: `["trigger", "body", "card", "number"]`.
    pub segments: Vec<String>,
}

/// What a masked field holds instead of its value.
pub const MASKED: &str = "[redacted]";

impl RedactPath {
    /// Masks this path in a trigger document, if it is a `.trigger` path.
    pub fn mask_trigger(&self, trigger: &mut serde_json::Value) {
        if self.segments.first().map(String::as_str) == Some("trigger") {
            mask(trigger, &self.segments[1..]);
        }
    }

    /// Whether this path is in the output of step `step_id`.
    #[must_use]
    pub fn names_step(&self, step_id: &str) -> bool {
        matches!(self.segments.as_slice(), [first, id, _, ..] if first == "steps" && id == step_id)
    }

    /// Masks this path in the output of step `step_id`, if it names that
    /// step. For a `for_each` step, `items` says the output is one result
    /// per item (or one item's result), and the path applies to each.
    pub fn mask_step_output(
        &self,
        step_id: &str,
        output: &mut serde_json::Value,
        items: ForEachShape,
    ) {
        let [first, id, rest @ ..] = self.segments.as_slice() else {
            return;
        };
        if first != "steps" || id != step_id {
            return;
        }
        match (items, output) {
            (ForEachShape::AllItems, serde_json::Value::Array(results)) => {
                for result in results {
                    mask(result, rest);
                }
            }
            // One page of `{pages: [...]}`: `steps.fetch.pages.3.body.x`
            // masks page 3, `steps.fetch.pages.*.body.x` every page.
            (ForEachShape::Page(index), output) => match rest {
                [pages, at, inner @ ..]
                    if pages == "pages" && (at == "*" || at.parse() == Ok(index)) =>
                {
                    mask(output, inner);
                }
                [pages] if pages == "pages" => mask(output, &[]),
                _ => {}
            },
            (_, output) => mask(output, rest),
        }
    }
}

/// The shape of a step output being masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForEachShape {
    /// A plain step's output, or one item's result.
    One,
    /// A `for_each` step's list of item results.
    AllItems,
    /// One page (this index) of a paginated http step's `{pages: [...]}`.
    Page(u32),
}

/// Replaces the value at `segments` (keys, indices for arrays, `*` for
/// every element) with [`MASKED`]; a path that is not there changes nothing.
fn mask(value: &mut serde_json::Value, segments: &[String]) {
    let Some((first, rest)) = segments.split_first() else {
        *value = serde_json::Value::String(MASKED.to_owned());
        return;
    };
    match value {
        serde_json::Value::Object(map) => {
            if let Some(next) = map.get_mut(first.as_str()) {
                mask(next, rest);
            }
        }
        serde_json::Value::Array(list) if first == "*" => {
            for element in list {
                mask(element, rest);
            }
        }
        serde_json::Value::Array(list) => {
            if let Some(next) = first.parse::<usize>().ok().and_then(|i| list.get_mut(i)) {
                mask(next, rest);
            }
        }
        _ => {}
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
    /// Which earlier steps' outputs its expressions may read (a `for_each`
    /// step's item outputs are loaded for it only if so).
    pub reads: crate::expr::StepsRead,
    /// `record_key:`: the business record the step (each `for_each` item,
    /// evaluated with `.item`) is about, for lineage.
    pub record_key: Option<Template>,
}

impl Step {
    /// Whether running the step can change the world outside plumb; such
    /// steps record each attempt before it starts, so a crash can never make
    /// an attempt invisible.
    #[must_use]
    pub fn has_effects(&self) -> bool {
        matches!(
            self.action,
            Action::Http(_) | Action::Sql(_) | Action::Publish(_)
        )
    }

    /// The step's `paginate:`, if it fetches pages.
    #[must_use]
    pub fn paginate(&self) -> Option<&Paginate> {
        match &self.action {
            Action::Http(h) => h.paginate.as_deref(),
            _ => None,
        }
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
    /// Run a statement on a SQL connection.
    Sql(SqlAction),
    /// Send one message to a broker.
    Publish(PublishAction),
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
            Self::Sql(_) => "sql",
            Self::Publish(_) => "publish",
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
    /// The contract a successful response's body must keep
    /// (`expect.schema`): one that breaks it fails the step for good.
    pub expect_schema: Option<crate::contract::Contract>,
    /// Fetch page after page (`paginate:`), each journaled as it arrives.
    pub paginate: Option<Box<Paginate>>,
}

/// A workflow's `cursor:` expression.
#[derive(Clone, Debug)]
pub struct WorkflowCursor {
    /// Yields the new cursor from the run's context; `null` keeps it.
    pub template: Template,
    /// The step outputs it may read.
    pub reads: crate::expr::StepsRead,
}

/// A `publish` step: one message to a broker.
#[derive(Clone, Debug)]
pub struct PublishAction {
    /// The broker connection.
    pub connection: String,
    /// Where: a Redis stream, an AMQP routing key (a queue, on the default
    /// exchange), an MQTT topic, a NATS subject.
    pub to: Template,
    /// AMQP only: the exchange (the default exchange when not given).
    pub exchange: Option<String>,
    /// The message, sent as JSON text.
    pub body: Template,
    /// Extra headers (stream fields, AMQP headers, MQTT user properties,
    /// NATS headers).
    pub headers: Vec<(String, Template)>,
}

/// A `sql` step: one statement, values only as bind parameters.
#[derive(Clone, Debug)]
pub struct SqlAction {
    /// The connection's name.
    pub connection: String,
    /// The statement, as written (`$1`, `$2` … for the parameters).
    pub query: String,
    /// The parameters, in order (with `batch`, over each element).
    pub params: Vec<Template>,
    /// Yields a list: the statement runs once per element, in one
    /// transaction, as one effect.
    pub batch: Option<Template>,
}

/// `paginate: { next, max_pages }` on an http step.
#[derive(Clone, Debug)]
pub struct Paginate {
    /// Evaluated over each page (`.response`, `.request`, `.page`,
    /// `.link_next`): `null` stops, a URL or a partial request
    /// `{path, query, headers, body}` is the next page.
    pub next: Template,
    /// The most pages one run may fetch: more fails the step, so a sync is
    /// never cut short silently.
    pub max_pages: u32,
}

/// `max_pages` when `paginate:` does not set it.
pub const DEFAULT_MAX_PAGES: u32 = 1000;
/// The highest `max_pages` a step may set.
pub const MAX_MAX_PAGES: u32 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(segments: &[&str]) -> RedactPath {
        RedactPath {
            text: segments.join("."),
            segments: segments.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_redact_path_reaches_every_element_and_every_page() {
        let mut page =
            json!({"status": 200, "body": {"items": [{"email": "a@x"}, {"email": "b@x"}]}});
        path(&[
            "steps", "fetch", "pages", "*", "body", "items", "*", "email",
        ])
        .mask_step_output("fetch", &mut page, ForEachShape::Page(7));
        assert_eq!(page["body"]["items"][0]["email"], MASKED);
        assert_eq!(page["body"]["items"][1]["email"], MASKED);
        assert_eq!(page["status"], 200);
    }

    #[test]
    fn a_redact_path_naming_one_page_leaves_the_others() {
        let one = path(&["steps", "fetch", "pages", "1", "body"]);
        let mut first = json!({"body": "secret"});
        one.mask_step_output("fetch", &mut first, ForEachShape::Page(0));
        assert_eq!(first["body"], "secret");
        let mut second = json!({"body": "secret"});
        one.mask_step_output("fetch", &mut second, ForEachShape::Page(1));
        assert_eq!(second["body"], MASKED);
    }
}
