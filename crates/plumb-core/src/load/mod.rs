//! Loading and validating a project: YAML text in, [`Project`] or every
//! problem found out.
//!
//! Validation never stops at the first problem of a file when it can go on:
//! each step and each connection is deserialized on its own, and semantic
//! checks (unique ids, references, expressions, egress) run over everything
//! that could be read. Every problem becomes a [`Diagnostic`] with the file,
//! line and column, the field, and how to fix it.
//!
//! # Layout
//!
//! This module holds the entry points and the [`Checker`] every check
//! reports through. Each kind of connection, trigger and step is checked in
//! a file of its own ([`connection`], [`trigger`], [`step`]), listed once in
//! its folder's registry: a new kind is a new file and one line there. The
//! engine executes the same kinds, one module each, in `plumb-engine`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use crate::contract::Contract;
use crate::diag::{Diagnostic, Diagnostics};
use crate::expr::{Program, Template};
use crate::lint::LintAllow;
use crate::model::{
    Action, DEFAULT_LISTEN, DEFAULT_RETENTION, DEFAULT_RETRY, DEFAULT_STORE, DEFAULT_TIMEOUT,
    Defaults, Project, ProjectConfig, RedactPath, Retention, RetryPolicy, ServeConfig, Step,
    Trigger, Workflow,
};
use crate::spec::{ProjectSpec, RetrySpec, ServeSpec, WorkflowSpec};
use crate::yaml::{self, Document, FieldPath, Segment};

mod alert;
mod connection;
pub(crate) mod step;
mod trigger;

/// The text of one project file.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Path relative to the project directory, as shown in diagnostics.
    pub path: String,
    /// The file's contents.
    pub text: String,
}

/// Longest `concurrency` a `for_each` may ask for.
pub const MAX_CONCURRENCY: u32 = 256;

/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;

/// Loads `plumb.yaml` and every workflow file.
///
/// # Errors
///
/// Returns every problem found in any file.
pub fn load_project(config: &SourceFile, workflows: &[SourceFile]) -> Result<Project, Diagnostics> {
    load_project_checking_secrets(config, workflows, &[], None)
}

/// Like [`load_project`], and also reports every secret reference that is
/// not among `known_secrets` (the names in the store).
///
/// # Errors
///
/// Returns every problem found in any file.
pub fn load_project_checking_secrets(
    config: &SourceFile,
    workflows: &[SourceFile],
    schemas: &[SourceFile],
    known_secrets: Option<&std::collections::BTreeSet<String>>,
) -> Result<Project, Diagnostics> {
    let partial = load_project_partial(config, workflows, schemas, known_secrets);
    match partial.config {
        Some(config) if partial.problems.is_empty() => Ok(Project {
            config,
            workflows: partial.workflows,
        }),
        _ => Err(partial.problems),
    }
}

/// What of a project loads: `plumb.yaml` if it is valid, every workflow
/// that is valid against it, and the problems of the rest. Commands that
/// touch one workflow (or none) work with this, so one broken file does
/// not block unrelated work.
#[derive(Clone, Debug)]
pub struct PartialProject {
    /// `plumb.yaml`, if it has no problems.
    pub config: Option<Arc<ProjectConfig>>,
    /// The workflows that load, in file name order.
    pub workflows: Vec<Arc<Workflow>>,
    /// Every problem found, in every file.
    pub problems: Diagnostics,
}

impl PartialProject {
    /// The files that have problems, each once.
    #[must_use]
    pub fn broken_files(&self) -> Vec<String> {
        let mut files: Vec<String> = self.problems.0.iter().map(|d| d.file.clone()).collect();
        files.dedup();
        files
    }
}

/// Loads what can be loaded of a project (see [`PartialProject`]), with
/// the JSON Schemas of `schemas/` (each file's path relative to the
/// project, `schemas/page.json`); with `known_secrets`, also reports secret
/// references not among them.
#[must_use]
pub fn load_project_partial(
    config: &SourceFile,
    workflows: &[SourceFile],
    schemas: &[SourceFile],
    known_secrets: Option<&std::collections::BTreeSet<String>>,
) -> PartialProject {
    let mut diags = Diagnostics::default();
    let (contracts, schema_problems) = load_schemas(schemas);
    diags.0.extend(schema_problems);
    let config = match load_config_inner(config, known_secrets) {
        Ok(mut c) => {
            c.schemas = contracts;
            Arc::new(c)
        }
        Err(d) => {
            diags.0.extend(d.0);
            // Keep checking the workflows against an empty configuration so
            // their own problems are reported in the same pass; references to
            // connections are not judged then, since we could not read them.
            for file in workflows {
                if let Err(d) = load_workflow_inner(file, None, known_secrets) {
                    diags.0.extend(d.0);
                }
            }
            diags.sort();
            return PartialProject {
                config: None,
                workflows: Vec::new(),
                problems: diags,
            };
        }
    };
    let mut loaded: Vec<Arc<Workflow>> = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut hooks: HashMap<String, String> = HashMap::new();
    for file in workflows {
        match load_workflow_inner(file, Some(&config), known_secrets) {
            Ok(w) => {
                if let Some(first) = names.get(&w.name) {
                    diags.push(
                        Diagnostic::file(
                            &file.path,
                            format!("another workflow is already named `{}` ({first})", w.name),
                        )
                        .field("name")
                        .help(
                            "workflow names must be unique across the project; rename one of them",
                        ),
                    );
                    continue;
                }
                if let Trigger::Webhook { path, .. } = &w.trigger {
                    if let Some(first) = hooks.get(path) {
                        diags.push(
                            Diagnostic::file(
                                &file.path,
                                format!("the webhook path `{path}` is already used by workflow `{first}`"),
                            )
                            .field("trigger.webhook.path")
                            .help("each webhook path can start only one workflow; choose another path"),
                        );
                        continue;
                    }
                    hooks.insert(path.clone(), w.name.clone());
                }
                names.insert(w.name.clone(), file.path.clone());
                loaded.push(Arc::new(w));
            }
            Err(d) => diags.0.extend(d.0),
        }
    }
    diags.sort();
    PartialProject {
        config: Some(config),
        workflows: loaded,
        problems: diags,
    }
}

/// Compiles every schema file (see [`crate::contract`]): the contracts
/// that compile, by path, and a problem for each one that does not.
pub fn load_schemas(files: &[SourceFile]) -> (BTreeMap<String, Contract>, Vec<Diagnostic>) {
    let mut contracts = BTreeMap::new();
    let mut problems = Vec::new();
    for file in files {
        match Contract::compile(&file.path, &file.text) {
            Ok(c) => {
                contracts.insert(file.path.clone(), c);
            }
            Err(e) => {
                let d = match e.location {
                    Some(at) => Diagnostic::at(&file.path, at, e.message),
                    None => Diagnostic::file(&file.path, e.message),
                };
                problems.push(d.help(
                    "a schema is one JSON document (draft 2020-12 unless `$schema` names \
                     another, e.g. draft 7); `$ref` may point inside it (`#/$defs/…`), not \
                     to another file or URL",
                ));
            }
        }
    }
    (contracts, problems)
}

/// `plumb.yaml` for commands that only need to find the store and the
/// server (history, status, secrets, tokens, audit): the file as loaded
/// when it is valid; otherwise its `store` and `listen` as written, with
/// everything else left at the defaults, and the file's problems.
///
/// # Errors
///
/// The problems, when not even `store` can be read (the YAML itself is
/// broken, or `store` is not a store URL).
pub fn load_config_lenient(file: &SourceFile) -> Result<(ProjectConfig, Diagnostics), Diagnostics> {
    let problems = match load_config_inner(file, None) {
        Ok(config) => return Ok((config, Diagnostics::default())),
        Err(d) => d,
    };
    let Ok(doc) = yaml::parse(&file.text) else {
        return Err(problems);
    };
    let text = |key: &str, default: &str| -> Option<String> {
        match doc.value.get(key) {
            None | Some(Value::Null) => Some(default.to_owned()),
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => None,
        }
    };
    // A key plumb does not know may be a misspelled `store` or `listen`:
    // then the defaults would point at another store or server than the
    // user meant, so nothing is read leniently.
    const KNOWN: [&str; 7] = [
        "store",
        "listen",
        "connections",
        "defaults",
        "alerts",
        "serve",
        "lint",
    ];
    let unknown_key = doc
        .value
        .as_object()
        .is_some_and(|m| m.keys().any(|k| !KNOWN.contains(&k.as_str())));
    let both_given = doc.value.get("store").is_some() && doc.value.get("listen").is_some();
    if unknown_key && !both_given {
        return Err(problems);
    }
    let (Some(store), Some(listen)) =
        (text("store", DEFAULT_STORE), text("listen", DEFAULT_LISTEN))
    else {
        return Err(problems);
    };
    if crate::store_url::parse_store_url(&store).is_err() {
        return Err(problems);
    }
    let config = ProjectConfig {
        store,
        listen,
        connections: BTreeMap::new(),
        defaults: Defaults {
            retry: DEFAULT_RETRY,
            timeout: DEFAULT_TIMEOUT,
            retention: DEFAULT_RETENTION,
        },
        alerts: BTreeMap::new(),
        serve: ServeConfig::default(),
        version: hex::encode(Sha256::digest(file.text.as_bytes())),
        connection_versions: BTreeMap::new(),
        lint_allow: Vec::new(),
        schemas: BTreeMap::new(),
    };
    Ok((config, problems))
}

/// Loads `plumb.yaml`.
///
/// # Errors
///
/// Returns every problem found in the file.
pub fn load_config(file: &SourceFile) -> Result<ProjectConfig, Diagnostics> {
    load_config_inner(file, None)
}

fn load_config_inner(
    file: &SourceFile,
    known_secrets: Option<&std::collections::BTreeSet<String>>,
) -> Result<ProjectConfig, Diagnostics> {
    let doc = parse_yaml(file)?;
    let mut cx = Checker::new(&file.path, &doc);
    cx.known_secrets = known_secrets;
    // The allow list is read leniently here so the lint runs even when the
    // rest of the file does not deserialize; the typed read below checks it.
    let lenient_allow: Vec<LintAllow> = doc
        .value
        .pointer("/lint/allow")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some(LintAllow {
                fingerprint: a.get("fingerprint")?.as_str()?.to_owned(),
                reason: a.get("reason")?.as_str()?.to_owned(),
            })
        })
        .collect();
    cx.diags
        .extend(crate::lint::lint(&file.path, &doc, &lenient_allow));
    let root = FieldPath::root();
    let value = if doc.value.is_null() {
        Value::Object(serde_json::Map::new())
    } else {
        doc.value.clone()
    };
    let Some(spec) = cx.deserialize::<ProjectSpec>(&value, &root) else {
        return Err(cx.finish());
    };
    let defaults_path = root.key("defaults");
    let retry = cx.resolve_retry(
        &DEFAULT_RETRY,
        spec.defaults.retry.as_ref(),
        &defaults_path.key("retry"),
    );
    let timeout = spec.defaults.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
    cx.check_timeout(timeout, &defaults_path.key("timeout"));
    let retention = cx.retention(
        DEFAULT_RETENTION,
        spec.defaults.retention.as_ref(),
        &defaults_path.key("retention"),
    );
    let mut connections = BTreeMap::new();
    let connection_versions = spec
        .connections
        .iter()
        .map(|(name, raw)| {
            (
                name.clone(),
                hex::encode(Sha256::digest(raw.to_string().as_bytes())),
            )
        })
        .collect();
    for (name, raw) in &spec.connections {
        let path = root.key("connections").key(name.clone());
        if !is_identifier(name) {
            cx.error(&path, format!("invalid connection name `{name}`"))
                .help = Some("use letters, digits and `_`, starting with a letter or `_`".into());
        }
        if let Some(c) = cx.connection(raw, &path) {
            connections.insert(name.clone(), c);
        }
    }
    let store = spec.store.unwrap_or_else(|| DEFAULT_STORE.to_owned());
    if let Err(message) = crate::store_url::parse_store_url(&store) {
        cx.error_at_value(&root.key("store"), message).help =
            Some(crate::store_url::STORE_URL_HELP.into());
    }
    let mut alerts = BTreeMap::new();
    for (name, raw) in &spec.alerts {
        let path = root.key("alerts").key(name.clone());
        if let Some(channel) = cx.alert_channel(raw, &path, &connections) {
            alerts.insert(name.clone(), channel);
        }
    }
    let serve = cx.serve(&spec.serve, &root.key("serve"));
    let config = ProjectConfig {
        store,
        listen: spec.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
        connections,
        defaults: Defaults {
            retry,
            timeout,
            retention,
        },
        alerts,
        serve,
        version: hex::encode(Sha256::digest(file.text.as_bytes())),
        connection_versions,
        lint_allow: cx.lint_allow(&spec.lint, &root.key("lint")),
        schemas: BTreeMap::new(),
    };
    if cx.diags.is_empty() {
        Ok(config)
    } else {
        Err(cx.finish())
    }
}

/// Loads one workflow file against a loaded configuration.
///
/// # Errors
///
/// Returns every problem found in the file.
pub fn load_workflow(file: &SourceFile, config: &ProjectConfig) -> Result<Workflow, Diagnostics> {
    load_workflow_inner(file, Some(config), None)
}

fn load_workflow_inner(
    file: &SourceFile,
    config: Option<&ProjectConfig>,
    known_secrets: Option<&std::collections::BTreeSet<String>>,
) -> Result<Workflow, Diagnostics> {
    let doc = parse_yaml(file)?;
    let mut cx = Checker::new(&file.path, &doc);
    cx.config = config;
    cx.known_secrets = known_secrets;
    cx.diags.extend(crate::lint::lint(
        &file.path,
        &doc,
        config.map_or(&[][..], |c| c.lint_allow.as_slice()),
    ));
    let root = FieldPath::root();
    if !doc.value.is_object() {
        cx.error(
            &root,
            "a workflow file must be a mapping with `name`, `owner`, `description` and `steps`",
        )
        .help = Some("see `plumb init` for an example workflow".into());
        return Err(cx.finish());
    }
    let Some(spec) = cx.deserialize::<WorkflowSpec>(&doc.value, &root) else {
        return Err(cx.finish());
    };
    // Every missing required field is reported, not only the first.
    let required = |cx: &mut Checker<'_>, field: &str, value: Option<String>| {
        value.unwrap_or_else(|| {
            cx.missing(&root, field);
            String::new()
        })
    };
    let name = required(&mut cx, "name", spec.name);
    let owner = required(&mut cx, "owner", spec.owner);
    let description = required(&mut cx, "description", spec.description);
    let has_name = doc.value.get("name").is_some();
    if has_name && !is_workflow_name(&name) {
        cx.error(&root.key("name"), format!("invalid workflow name `{name}`")).help = Some(
            "use letters, digits, `-`, `_` and `.`, starting with a letter or digit (at most 100 characters)".into(),
        );
    }
    if doc.value.get("owner").is_some() && owner.trim().is_empty() {
        cx.error(&root.key("owner"), "`owner` is empty").help =
            Some("name the team or person who is paged when this workflow fails".into());
    }
    if doc.value.get("description").is_some() && description.trim().is_empty() {
        cx.error(&root.key("description"), "`description` is empty")
            .help = Some("say in a sentence what this workflow does and why".into());
    }
    // `record_key` may sit under any trigger kind's mapping; it is the
    // workflow's, not the kind's, so it is taken out before the kind's check.
    let mut trigger_raw = spec.trigger.clone();
    let record_key = trigger_raw
        .as_mut()
        .and_then(Value::as_object_mut)
        .and_then(|kinds| {
            let (kind, body) = kinds.iter_mut().next()?;
            let raw = body.as_object_mut()?.remove("record_key")?;
            Some((kind.clone(), raw))
        })
        .and_then(|(kind, raw)| {
            let path = root.key("trigger").key(&kind).key("record_key");
            if matches!(kind.as_str(), "webhook" | "poll" | "queue") {
                cx.record_key(&raw, &path)
            } else {
                cx.error(&path, format!("a {kind} trigger has no record to name"))
                    .help = Some("`record_key` applies to webhook, poll and queue triggers, and to steps (per `for_each` item)".into());
                None
            }
        });
    let trigger = cx.trigger(trigger_raw.as_ref(), &root.key("trigger"));
    let base = StepDefaults {
        retry: cx.resolve_retry(
            &config.map_or(DEFAULT_RETRY, |c| c.defaults.retry),
            spec.retry.as_ref(),
            &root.key("retry"),
        ),
        timeout: spec
            .timeout
            .map(|d| d.0)
            .or(config.map(|c| c.defaults.timeout))
            .unwrap_or(DEFAULT_TIMEOUT),
    };
    cx.check_timeout(base.timeout, &root.key("timeout"));
    let raw_steps = match spec.steps {
        Some(steps) => {
            if steps.is_empty() {
                cx.error(&root.key("steps"), "the workflow has no steps")
                    .help = Some("add at least one step under `steps:`".into());
            }
            steps
        }
        None => {
            cx.missing(&root, "steps");
            Vec::new()
        }
    };
    let steps = cx.steps(&raw_steps, &root.key("steps"), &base);
    cx.check_references(&steps);
    let cursor = match &spec.cursor {
        None => None,
        Some(raw) => cx.workflow_cursor(raw, &root.key("cursor"), &steps),
    };
    if spec.cursor.is_some() && matches!(&trigger, Some(Trigger::Poll(p)) if p.cursor.is_some()) {
        cx.error_at_value(
            &root.key("cursor"),
            "the workflow has a `cursor` and its poll trigger has one too",
        )
        .help = Some(
            "keep one: `trigger.poll.cursor` moves with each poll that finds new items; a workflow `cursor` moves with each run's success".into(),
        );
    }
    let mut concurrency = spec.concurrency;
    if spec.cursor.is_some() {
        match spec.concurrency {
            Some(n) if n > 1 => {
                cx.error_at_value(
                    &root.key("concurrency"),
                    format!("`concurrency` is {n}, but a workflow with a `cursor` runs one run at a time"),
                )
                .help = Some(
                    "remove `concurrency` (or set it to 1): each run reads the window since the cursor the previous run committed".into(),
                );
            }
            _ => concurrency = Some(1),
        }
    }
    if spec.concurrency == Some(0) {
        cx.error_at_value(
            &root.key("concurrency"),
            "`concurrency` is 0: no run could ever start",
        )
        .help = Some("use 1 for one run at a time, or remove it for no limit".into());
    }
    let alerts_on_failure = spec
        .alerts
        .as_ref()
        .map(|a| a.on_failure.clone())
        .unwrap_or_default();
    if let Some(config) = config {
        for (i, name) in alerts_on_failure.iter().enumerate() {
            if !config.alerts.contains_key(name) {
                let names: Vec<&str> = config.alerts.keys().map(String::as_str).collect();
                let help = match closest(name, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => "define the channel under `alerts:` in plumb.yaml".to_owned(),
                };
                cx.error_at_value(
                    &root.key("alerts").key("on_failure").index(i),
                    format!("unknown alert channel `{name}`"),
                )
                .help = Some(help);
            }
        }
    }
    let redact = cx.redact_paths(&spec.redact, &root.key("redact"), &steps);
    let retention = cx.retention(
        config.map_or(DEFAULT_RETENTION, |c| c.defaults.retention),
        spec.retention.as_ref(),
        &root.key("retention"),
    );
    let version = hex::encode(Sha256::digest(file.text.as_bytes()));
    if !cx.diags.is_empty() {
        return Err(cx.finish());
    }
    Ok(Workflow {
        record_key,
        name,
        owner,
        description,
        trigger: trigger.unwrap_or(Trigger::Manual),
        steps,
        concurrency,
        cursor,
        alerts_on_failure,
        redact,
        retention,
        file: file.path.clone(),
        version,
        source: Arc::from(file.text.as_str()),
    })
}

fn parse_yaml(file: &SourceFile) -> Result<Document, Diagnostics> {
    yaml::parse(&file.text).map_err(|e| {
        Diagnostics(vec![
            Diagnostic::at(
                &file.path,
                e.location,
                format!("invalid YAML: {}", e.message),
            )
            .help("fix the YAML syntax at this position (indentation, quotes, `:` inside values)"),
        ])
    })
}

#[derive(Clone, Copy)]
struct StepDefaults {
    retry: RetryPolicy,
    timeout: Duration,
}

struct Checker<'a> {
    file: &'a str,
    doc: &'a Document,
    diags: Vec<Diagnostic>,
    config: Option<&'a ProjectConfig>,
    /// Step ids seen so far, with where they were defined.
    ids: HashMap<String, FieldPath>,
    /// How many fields the last [`Checker::deserialize`] set aside as
    /// problems (so a check that follows can avoid repeating them).
    set_aside: usize,
    /// Every step id written in the file, including steps with problems:
    /// a reference to one of those is not reported as unknown.
    written_ids: std::collections::HashSet<String>,
    /// Where each step was written, for reference errors.
    step_paths: HashMap<String, FieldPath>,
    /// Secret names in the store, when the caller could read them.
    known_secrets: Option<&'a std::collections::BTreeSet<String>>,
}

impl<'a> Checker<'a> {
    /// The contract a `schema:` field at `path` names (`schemas/page.json`,
    /// relative to the project directory). `None`, with a problem, when no
    /// such schema was loaded; `None` without one when `plumb.yaml` itself
    /// did not load (then nothing can be judged).
    fn contract(&mut self, reference: &str, path: &FieldPath) -> Option<Contract> {
        let config = self.config?;
        let key = reference.trim_start_matches("./");
        if let Some(c) = config.schemas.get(key) {
            return Some(c.clone());
        }
        let help = if !key.starts_with("schemas/") || !key.ends_with(".json") {
            "schemas live in the project's `schemas/` directory as `.json` files: write e.g. `schemas/order.json`".to_owned()
        } else if config.schemas.is_empty() {
            format!("create `{key}` (a JSON Schema) in the project directory")
        } else {
            let names: Vec<&str> = config.schemas.keys().map(String::as_str).collect();
            match closest(key, &names) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("create `{key}`, or use one of: {}", names.join(", ")),
            }
        };
        self.error_at_value(path, format!("no schema `{reference}` in the project"))
            .help = Some(help);
        None
    }

    fn lint_allow(&mut self, spec: &crate::spec::LintSpec, path: &FieldPath) -> Vec<LintAllow> {
        let mut out = Vec::new();
        for (i, a) in spec.allow.iter().enumerate() {
            let at = path.key("allow").index(i);
            if a.fingerprint.len() != 16 || !a.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.error(
                    &at.key("fingerprint"),
                    format!("`{}` is not a lint fingerprint", a.fingerprint),
                )
                .help = Some("copy the 16 hex digits `plumb check` printed for the finding".into());
            }
            if a.reason.trim().is_empty() {
                self.error(&at.key("reason"), "an allowed finding needs a reason")
                    .help = Some("say why the value is not a credential; the reason is audited with the deployment".into());
            }
            out.push(LintAllow {
                fingerprint: a.fingerprint.to_ascii_lowercase(),
                reason: a.reason.clone(),
            });
        }
        out
    }

    fn new(file: &'a str, doc: &'a Document) -> Self {
        Self {
            file,
            doc,
            diags: Vec::new(),
            config: None,
            ids: HashMap::new(),
            written_ids: std::collections::HashSet::new(),
            set_aside: 0,
            step_paths: HashMap::new(),
            known_secrets: None,
        }
    }

    fn finish(self) -> Diagnostics {
        let mut d = Diagnostics(self.diags);
        d.sort();
        d
    }

    fn error(&mut self, path: &FieldPath, message: impl Into<String>) -> &mut Diagnostic {
        let location = self.doc.locate(path);
        self.diags
            .push(Diagnostic::at(self.file, location, message).field(path.to_string()));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    fn error_at_value(&mut self, path: &FieldPath, message: impl Into<String>) -> &mut Diagnostic {
        let location = self.doc.locate_value(path);
        self.diags
            .push(Diagnostic::at(self.file, location, message).field(path.to_string()));
        let last = self.diags.len() - 1;
        &mut self.diags[last]
    }

    /// Deserializes `value` (found at `base`) into `T`, turning every serde
    /// error into a diagnostic at its exact field.
    ///
    /// serde stops at the first problem of a mapping, so each problem is
    /// reported and its field set aside (an unknown field, or a value of
    /// the wrong type), and the rest is read again, until it reads or only
    /// a missing required field is left. What reads without the bad fields
    /// is returned, so the checks after this one still run on it and do not
    /// report the same step again as missing.
    fn deserialize<T: DeserializeOwned>(&mut self, value: &Value, base: &FieldPath) -> Option<T> {
        /// More problems than this in one mapping are not worth reading on.
        const MAX_PROBLEMS: usize = 32;
        let mut value = std::borrow::Cow::Borrowed(value);
        let mut set_aside: Vec<(Vec<Segment>, String)> = Vec::new();
        self.set_aside = 0;
        for _ in 0..MAX_PROBLEMS {
            let e = match serde_path_to_error::deserialize::<_, T>(value.as_ref()) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            self.set_aside += 1;
            let mut segments: Vec<Segment> = Vec::new();
            for seg in e.path().iter() {
                match seg {
                    serde_path_to_error::Segment::Seq { index } => {
                        segments.push(Segment::Index(*index));
                    }
                    serde_path_to_error::Segment::Map { key } => {
                        segments.push(Segment::Key(key.clone()));
                    }
                    serde_path_to_error::Segment::Enum { .. }
                    | serde_path_to_error::Segment::Unknown => {}
                }
            }
            let message = e.inner().to_string();
            // A required field whose bad value was set aside is now missing,
            // and so is one whose name was misspelled: either problem is
            // already reported.
            if let Some(rest) = message.strip_prefix("missing field `") {
                let name = rest.split('`').next().unwrap_or_default();
                let reported = set_aside.iter().any(|(parent, key)| {
                    parent == &segments && (key == name || closest(key, &[name]).is_some())
                });
                if !reported {
                    self.serde_error(&extend(base, &segments), &message);
                }
                return None;
            }
            self.serde_error(&extend(base, &segments), &message);
            // Set the offending field aside: the unknown key itself, or the
            // field holding the bad value (a whole list, for a bad element,
            // so later indices keep their meaning).
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let name = rest.split('`').next().unwrap_or_default().to_owned();
                if segments.last() == Some(&Segment::Key(name.clone())) {
                    segments.pop();
                }
                segments.push(Segment::Key(name));
            }
            while matches!(segments.last(), Some(Segment::Index(_))) {
                segments.pop();
            }
            let Some(Segment::Key(key)) = segments.pop() else {
                return None;
            };
            let Some(Value::Object(map)) = value_at_mut(value.to_mut(), &segments) else {
                return None;
            };
            map.remove(&key)?;
            set_aside.push((segments, key));
        }
        None
    }

    fn serde_error(&mut self, path: &FieldPath, message: &str) {
        let ticks: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default().to_owned();
            let expected: Vec<&str> = ticks.iter().skip(1).copied().collect();
            let help = match closest(&name, &expected) {
                Some(best) => format!("did you mean `{best}`?"),
                None if expected.is_empty() => "remove it: this mapping takes no fields".to_owned(),
                None => format!("remove it, or use one of: {}", expected.join(", ")),
            };
            // serde_path_to_error already ends the path with the unknown key.
            let at = match path.segments().last() {
                Some(Segment::Key(k)) if *k == name => path.clone(),
                _ => path.key(name.clone()),
            };
            self.error(&at, format!("unknown field `{name}`")).help = Some(help);
        } else if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or_default().to_owned();
            self.missing(path, &name);
        } else {
            let (text, help) = plain_words(message);
            self.error_at_value(path, text).help = help;
        }
    }

    /// A required field that is not there.
    fn missing(&mut self, path: &FieldPath, name: &str) {
        let help = match name {
            "name" => "add `name: <unique-name>`; it is how you run and find this workflow".to_owned(),
            "owner" => "add `owner: <team or email>`: who is paged when this workflow fails".to_owned(),
            "description" => "add `description: <what this workflow does and why>`".to_owned(),
            "steps" => "add `steps:` with at least one step".to_owned(),
            "id" => "give the step an `id:` (letters, digits and `_`); later steps read its output as `.steps.<id>`".to_owned(),
            other => format!("add `{other}:`"),
        };
        self.error(path, format!("missing required field `{name}`"))
            .help = Some(help);
    }

    /// The one kind a mapping names among `kinds` (`http:` under a
    /// connection, `webhook:` under a trigger), with its value. Any other
    /// key is reported as unknown (with the closest kind), a kind SPEC
    /// describes but this version does not have as not available yet, and
    /// none or several kinds as such.
    fn one_kind<'v>(
        &mut self,
        raw: &'v Value,
        path: &FieldPath,
        what: &str,
        kinds: &[&str],
        planned: &[&str],
    ) -> Option<(usize, &'v Value)> {
        let choices = kinds
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let Value::Object(map) = raw else {
            self.error_at_value(path, format!("a {what} is a mapping with one kind"))
                .help = Some(format!("write one of {choices} under it"));
            return None;
        };
        let mut found = Vec::new();
        for (key, value) in map {
            if let Some(i) = kinds.iter().position(|k| k == key) {
                found.push((i, value));
            } else if planned.contains(&key.as_str()) {
                self.error(
                    &path.key(key.clone()),
                    format!("`{key}` {what}s are not available in this version of plumb"),
                )
                .help = Some(format!(
                    "this version has {choices}; see the README's table of what works today"
                ));
                return None;
            } else {
                let help = match closest(key, kinds) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("use one of: {choices}"),
                };
                self.error(&path.key(key.clone()), format!("unknown field `{key}`"))
                    .help = Some(help);
            }
        }
        match found.as_slice() {
            [one] => Some(*one),
            [] if map.len() > found.len() => None,
            [] => {
                self.error(path, format!("the {what} has no kind")).help =
                    Some(format!("write one of {choices} under it"));
                None
            }
            _ => {
                self.error(path, format!("a {what} needs exactly one kind"))
                    .help = Some(format!("write only one of {choices}"));
                None
            }
        }
    }

    /// A retention: `spec` over `base`, each at least an hour, payloads
    /// kept no longer than their runs.
    fn retention(
        &mut self,
        base: Retention,
        spec: Option<&crate::spec::RetentionSpec>,
        path: &FieldPath,
    ) -> Retention {
        let runs = spec.and_then(|s| s.runs).map_or(base.runs, |d| d.0);
        let payloads = spec.and_then(|s| s.payloads).map_or(base.payloads, |d| d.0);
        for (field, value) in [("runs", runs), ("payloads", payloads)] {
            if value < Duration::from_secs(3600) {
                self.error_at_value(
                    &path.key(field),
                    format!("`retention.{field}` is under an hour: ended runs would be deleted before anyone could look at them"),
                )
                .help = Some("use a duration of at least `1h` (the defaults are runs 30d, payloads 7d)".into());
            }
        }
        if payloads > runs {
            self.error_at_value(
                &path.key("payloads"),
                "`retention.payloads` is longer than `retention.runs`: payloads go with their run",
            )
            .help = Some("make `payloads` at most as long as `runs`".into());
        }
        Retention { runs, payloads }
    }

    fn check_timeout(&mut self, timeout: Duration, path: &FieldPath) {
        if timeout.is_zero() {
            self.error(path, "a timeout of zero would fail every attempt")
                .help = Some("use a positive duration such as `30s`".into());
        }
    }

    fn resolve_retry(
        &mut self,
        base: &RetryPolicy,
        spec: Option<&RetrySpec>,
        path: &FieldPath,
    ) -> RetryPolicy {
        let Some(spec) = spec else { return *base };
        let policy = RetryPolicy {
            attempts: spec.attempts.unwrap_or(base.attempts),
            backoff: spec.backoff.unwrap_or(base.backoff),
            initial: spec.initial.map_or(base.initial, |d| d.0),
            max: spec.max.map_or(base.max, |d| d.0),
            jitter: spec.jitter.unwrap_or(base.jitter),
        };
        if policy.attempts == 0 || policy.attempts > MAX_ATTEMPTS {
            self.error(
                &path.key("attempts"),
                format!("`attempts` is {}", policy.attempts),
            )
            .help = Some(format!(
                "attempts counts the first try too: use 1 (no retry) to {MAX_ATTEMPTS}"
            ));
        }
        if policy.initial > policy.max {
            self.error(path, "`initial` is longer than `max`").help =
                Some("make `max` at least as long as `initial`".into());
        }
        policy
    }

    fn secret_name(&mut self, name: &str, path: &FieldPath) {
        // The field may hold the credential itself, pasted where its name
        // belongs: what the lint flags, or what is not a plain name, is
        // shown only by its fingerprint.
        let flagged = crate::lint::is_flagged(path, name);
        if flagged {
            if self
                .known_secrets
                .is_some_and(|known| !known.contains(name))
            {
                let fingerprint = crate::lint::fingerprint(name);
                self.error_at_value(
                    path,
                    format!("no secret has this name (fingerprint {fingerprint}); it looks like a credential, not a name"),
                )
                .help = Some(
                    "write the name of a secret here, never its value: seal the value with `plumb secrets set NAME` and write NAME".into(),
                );
            }
            return;
        }
        if !is_identifier(name) {
            self.error_at_value(path, "this is not a secret name")
                .help = Some(
                "write the name of a secret here (letters, digits and `_`, starting with a letter or `_`), never its value: seal the value with `plumb secrets set NAME` and write NAME".into(),
            );
        } else if self
            .known_secrets
            .is_some_and(|known| !known.contains(name))
        {
            self.error_at_value(path, format!("no secret named `{name}`"))
                .help = Some(format!(
                "set it with `plumb secrets set {name}` (the value is read from stdin or a prompt, never from the command line)"
            ));
        }
    }

    /// `cursor:` on a workflow: one expression, over steps that exist.
    fn workflow_cursor(
        &mut self,
        raw: &Value,
        path: &FieldPath,
        steps: &[Step],
    ) -> Option<crate::model::WorkflowCursor> {
        let template = self.template(raw, path)?;
        if matches!(template, Template::Literal(_)) {
            self.error_at_value(path, "`cursor` must be an expression over the run's results")
                .help = Some(
                "e.g. `cursor: \"${{ [.steps.fetch.pages[].body.items[].updated_at] | max }}\"`; it is committed when a run succeeds and read as `.cursor` by the next".into(),
            );
            return None;
        }
        let mut reads = crate::expr::StepsRead::default();
        for program in template.programs() {
            reads.merge(crate::expr::steps_read(program.source()));
        }
        let ids = step_ids(steps);
        for referenced in &reads.ids {
            if !ids.contains(&referenced.as_str()) && !self.written_ids.contains(referenced) {
                let help = match closest(referenced, &ids) {
                    Some(best) => format!("did you mean `.steps.{best}`?"),
                    None => format!("the steps of this workflow are: {}", ids.join(", ")),
                };
                self.error_at_value(
                    path,
                    format!("`cursor` reads `.steps.{referenced}`, but no step has the id `{referenced}`"),
                )
                .help = Some(help);
            }
        }
        Some(crate::model::WorkflowCursor { template, reads })
    }

    /// `redact:` paths: `.trigger…` or `.steps.<id>…`, keys, `[n]` and `[]`.
    fn redact_paths(
        &mut self,
        raws: &[String],
        path: &FieldPath,
        steps: &[Step],
    ) -> Vec<RedactPath> {
        let ids = step_ids(steps);
        let mut out = Vec::new();
        for (i, raw) in raws.iter().enumerate() {
            let at = path.index(i);
            let segments = match parse_field_path(raw) {
                Some(s) if s.len() >= 2 => s,
                _ => {
                    self.error_at_value(&at, format!("`{raw}` is not a field path")).help = Some(
                        "write a path such as `.trigger.body.ssn` or `.steps.fetch.body.card.number`".into(),
                    );
                    continue;
                }
            };
            match segments[0].as_str() {
                "trigger" => {}
                "steps" if segments.len() >= 3 && ids.contains(&segments[1].as_str()) => {}
                "steps" => {
                    self.error_at_value(&at, format!("`{raw}` names no step of this workflow"))
                        .help = Some("write `.steps.<id>.<field>` with the id of a step".into());
                    continue;
                }
                _ => {
                    self.error_at_value(
                        &at,
                        format!("`{raw}` is neither under `.trigger` nor `.steps`"),
                    )
                    .help =
                        Some("only payloads are journaled: the trigger and step outputs".into());
                    continue;
                }
            }
            out.push(RedactPath {
                text: raw.clone(),
                segments,
            });
        }
        out
    }

    fn serve(&mut self, spec: &ServeSpec, path: &FieldPath) -> ServeConfig {
        let mut serve = ServeConfig::default();
        if let Some(workers) = spec.workers {
            if workers == 0 || workers > 10_000 {
                self.error_at_value(&path.key("workers"), format!("`workers` is {workers}"))
                    .help = Some("use 1 to 10000 runs at once".into());
            } else {
                serve.workers = workers;
            }
        }
        if let Some(raw) = &spec.body_limit {
            match parse_size(raw) {
                Ok(bytes) if bytes > 0 => serve.body_limit = bytes,
                Ok(_) => {
                    self.error_at_value(&path.key("body_limit"), "`body_limit` is 0")
                        .help = Some("use a size such as `1MiB` or `256KiB`".into());
                }
                Err(message) => {
                    self.error_at_value(&path.key("body_limit"), message).help =
                        Some("use a size such as `1MiB`, `256KiB` or a number of bytes".into());
                }
            }
        }
        if let Some(lease) = spec.lease {
            if lease.0 < Duration::from_secs(1) {
                self.error_at_value(
                    &path.key("lease"),
                    "a lease shorter than 1s would expire between heartbeats",
                )
                .help = Some("use at least `1s`; the default is `30s`".into());
            } else if lease.0 > Duration::from_secs(120) {
                // `plumb run --resume` watches a lease that ran out by the
                // clock for at most two minutes before taking the run.
                self.error_at_value(
                    &path.key("lease"),
                    "a lease longer than 2m would leave a stopped run waiting that long, and outlast what `plumb run --resume` watches before taking a run over",
                )
                .help = Some("use at most `2m`; the default is `30s`".into());
            } else {
                serve.lease = lease.0;
            }
        }
        if let Some(n) = spec.max_crashes {
            if n == 0 || n > 100 {
                self.error_at_value(&path.key("max_crashes"), format!("`max_crashes` is {n}"))
                    .help = Some("use 1 to 100; the default is 5".into());
            } else {
                serve.max_crashes = n;
            }
        }
        if let Some(url) = &spec.public_url {
            match Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {
                    serve.public_url = Some(url.trim_end_matches('/').to_owned());
                }
                _ => {
                    self.error_at_value(&path.key("public_url"), format!("invalid public_url `{url}`"))
                        .help = Some("write the URL people use to reach this server, e.g. `https://plumb.internal.example`".into());
                }
            }
        }
        serve
    }

    fn condition(&mut self, raw: &Value, path: &FieldPath) -> Option<Template> {
        let template = self.template(raw, path)?;
        match &template {
            Template::Expr(_) | Template::Literal(Value::Bool(_)) => Some(template),
            _ => {
                self.error_at_value(path, "a condition must be a single `${{ … }}` expression")
                    .help = Some("e.g. `${{ .steps.fetch.status == 200 }}`".into());
                None
            }
        }
    }

    /// A `record_key:`: exactly one `${{ … }}` (a fixed key would make
    /// every run one record).
    fn record_key(&mut self, raw: &Value, path: &FieldPath) -> Option<Template> {
        let key = self.template(raw, path)?;
        if matches!(key, Template::Expr(_)) {
            return Some(key);
        }
        self.error_at_value(path, "`record_key` must be exactly one `${{ … }}` expression")
            .help = Some("name the record's id, e.g. `record_key: '${{ .trigger.body.order_id }}'` or, on a step, `'${{ .item.id }}'`".into());
        None
    }

    fn template(&mut self, raw: &Value, path: &FieldPath) -> Option<Template> {
        match Template::compile(raw) {
            Ok(t) => Some(t),
            Err(errors) => {
                for e in errors {
                    let mut p = path.clone();
                    for seg in e.path {
                        p = match seg {
                            Segment::Key(k) => p.key(k),
                            Segment::Index(i) => p.index(i),
                        };
                    }
                    self.error_at_value(
                        &p,
                        format!(
                            "invalid expression `${{{{ {} }}}}`: {}",
                            e.expression, e.error
                        ),
                    )
                    .help = Some(expression_help(&e.expression, &e.error));
                }
                None
            }
        }
    }

    fn program(&mut self, code: &str, path: &FieldPath) -> Option<Program> {
        match Program::compile(code) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error_at_value(path, format!("invalid jq program: {e}"))
                    .help = Some(expression_help(code, &e));
                None
            }
        }
    }

    /// Every `.steps.<id>` an expression reads must name a step that runs
    /// before it: a typo or a forward reference would otherwise be a silent
    /// `null` at run time.
    fn check_references(&mut self, steps: &[Step]) {
        let mut order: HashMap<String, usize> = HashMap::new();
        let mut flat: Vec<&Step> = Vec::new();
        fn walk<'s>(steps: &'s [Step], out: &mut Vec<&'s Step>) {
            for s in steps {
                out.push(s);
                if let Action::If(b) = &s.action {
                    walk(&b.then, out);
                    walk(&b.otherwise, out);
                }
            }
        }
        walk(steps, &mut flat);
        for (i, s) in flat.iter().enumerate() {
            order.insert(s.id.clone(), i);
        }
        let known: Vec<String> = flat.iter().map(|s| s.id.clone()).collect();
        let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
        for (position, step) in flat.iter().enumerate() {
            let Some(step_path) = self.step_paths.get(&step.id).cloned() else {
                continue;
            };
            for program in step_programs(step) {
                for referenced in crate::expr::steps_read(program.source()).ids {
                    match order.get(&referenced) {
                        // A step written with problems of its own: those
                        // are reported where it is.
                        None if self.written_ids.contains(&referenced) => {}
                        None => {
                            let help = match closest(&referenced, &known_refs) {
                                Some(best) => format!("did you mean `.steps.{best}`?"),
                                None => {
                                    format!("the steps of this workflow are: {}", known.join(", "))
                                }
                            };
                            self.error(&step_path.key("id"), format!(
                                "step `{}` reads `.steps.{referenced}`, but no step has the id `{referenced}`",
                                step.id
                            ))
                            .help = Some(help);
                        }
                        Some(&at) if at >= position => {
                            self.error(&step_path.key("id"), format!(
                                "step `{}` reads `.steps.{referenced}`, which has not run yet at that point",
                                step.id
                            ))
                            .help = Some("a step can only read the outputs of steps before it; move it after `".to_owned() + &referenced + "`");
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// A serde message in the words of someone writing YAML, not Rust:
/// "expected a whole number, found the text \"x\"" instead of
/// "invalid type: string \"x\", expected u32". Returns the message and,
/// for an unknown value of a fixed set, the values to choose from.
fn plain_words(message: &str) -> (String, Option<String>) {
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let value = rest.split('`').next().unwrap_or_default();
        let choices: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let help = match closest(value, &choices) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("use one of: {}", choices.join(", ")),
        };
        return (format!("unknown value `{value}`"), Some(help));
    }
    let body = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some(body) = body else {
        return (message.to_owned(), None);
    };
    let Some((found, expected)) = body.rsplit_once(", expected ") else {
        return (message.to_owned(), None);
    };
    let found = if let Some(text) = found.strip_prefix("string ") {
        format!("the text {text}")
    } else if let Some(n) = found
        .strip_prefix("integer ")
        .or_else(|| found.strip_prefix("floating point "))
    {
        format!("the number {}", n.trim_matches('`'))
    } else if let Some(b) = found.strip_prefix("boolean ") {
        b.trim_matches('`').to_owned()
    } else {
        match found {
            "map" => "a mapping".to_owned(),
            "sequence" => "a list".to_owned(),
            "unit value" | "null" => "nothing (null)".to_owned(),
            other => other.to_owned(),
        }
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number of 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a string" => "text",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "a map" => "a mapping (`key: value` pairs)",
        other if other.starts_with("struct ") => "a mapping (`key: value` pairs)",
        other => other,
    };
    (format!("expected {expected}, found {found}"), None)
}

/// `base` extended by `segments`.
fn extend(base: &FieldPath, segments: &[Segment]) -> FieldPath {
    let mut path = base.clone();
    for seg in segments {
        path = match seg {
            Segment::Key(k) => path.key(k.clone()),
            Segment::Index(i) => path.index(*i),
        };
    }
    path
}

/// The value at `segments` inside `value`, if there is one.
fn value_at_mut<'v>(value: &'v mut Value, segments: &[Segment]) -> Option<&'v mut Value> {
    let mut at = value;
    for seg in segments {
        at = match (seg, at) {
            (Segment::Key(k), Value::Object(map)) => map.get_mut(k)?,
            (Segment::Index(i), Value::Array(list)) => list.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

fn step_programs(step: &Step) -> Vec<&Program> {
    let mut out: Vec<&Program> = Vec::new();
    if let Some(f) = &step.for_each {
        out.extend(f.items.programs());
    }
    if let Some(k) = &step.record_key {
        out.extend(k.programs());
    }
    match &step.action {
        Action::Http(h) => {
            out.extend(h.path.programs());
            for (_, t) in &h.query {
                out.extend(t.programs());
            }
            for (_, t) in &h.headers {
                out.extend(t.programs());
            }
            if let Some(b) = &h.body {
                out.extend(b.programs());
            }
            if let Some(p) = &h.paginate {
                out.extend(p.next.programs());
            }
        }
        Action::Sql(q) => {
            for t in &q.params {
                out.extend(t.programs());
            }
            if let Some(b) = &q.batch {
                out.extend(b.programs());
            }
        }
        Action::Publish(p) => {
            out.extend(p.to.programs());
            out.extend(p.body.programs());
            for (_, t) in &p.headers {
                out.extend(t.programs());
            }
        }
        Action::Jq(p) => out.push(p),
        Action::If(b) => out.extend(b.condition.programs()),
        Action::Sleep(t) => out.extend(t.programs()),
        Action::Assert { condition, message } => {
            out.extend(condition.programs());
            if let Some(m) = message {
                out.extend(m.programs());
            }
        }
    }
    out
}

fn expression_help(expression: &str, error: &crate::expr::CompileError) -> String {
    let mut pointer = String::new();
    let mut at = error.offset.min(expression.len());
    while !expression.is_char_boundary(at) {
        at -= 1;
    }
    let column = expression[..at].chars().count();
    pointer.push_str(expression);
    pointer.push('\n');
    pointer.push_str(&" ".repeat(column + 8));
    pointer.push('^');
    format!("fix the jq syntax here:\n        {pointer}")
}

/// Parses a literal `sleep:` value: a duration text or a number of seconds.
///
/// # Errors
///
/// Returns a message saying what is wrong with the value.
pub fn sleep_duration(value: &Value) -> Result<Duration, String> {
    match value {
        Value::String(s) => {
            humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration `{s}`: {e}"))
        }
        Value::Number(n) => match n.as_f64() {
            Some(secs) => Duration::try_from_secs_f64(secs).map_err(|_| {
                format!("invalid number of seconds `{n}`: use 0 or more, and less than centuries")
            }),
            None => Err(format!("invalid number of seconds `{n}`")),
        },
        other => Err(format!("`{other}` is not a duration")),
    }
}

/// Parses a size: a number of bytes, or a number with `B`, `KB`, `KiB`,
/// `MB`, `MiB`, `GB` or `GiB`.
///
/// # Errors
///
/// Returns a message naming the value when it is not a size.
pub fn parse_size(value: &Value) -> Result<u64, String> {
    if let Some(n) = value.as_u64() {
        return Ok(n);
    }
    let Some(text) = value.as_str() else {
        return Err(format!("`{value}` is not a size"));
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1024,
        "mb" => 1_000_000,
        "mib" => 1024 * 1024,
        "gb" => 1_000_000_000,
        "gib" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// `.a.b[0].c` → `["a", "b", "0", "c"]`; `None` if it is not such a path.
fn parse_field_path(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text.trim().strip_prefix('.')?;
    loop {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let key = &rest[..end];
        if !key.is_empty() {
            if !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return None;
            }
            out.push(key.to_owned());
        }
        rest = &rest[end..];
        if let Some(r) = rest.strip_prefix('[') {
            let close = r.find(']')?;
            let index = &r[..close];
            if index.is_empty() {
                // `[]`: every element, as in jq.
                out.push("*".to_owned());
            } else if index.chars().all(|c| c.is_ascii_digit()) {
                out.push(index.to_owned());
            } else {
                return None;
            }
            rest = &r[close + 1..];
        } else if let Some(r) = rest.strip_prefix('.') {
            if r.is_empty() || r.starts_with('.') {
                return None;
            }
            rest = r;
        } else {
            break;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The ids of `steps` and of the steps nested in their branches, in
/// execution order.
fn step_ids(steps: &[Step]) -> Vec<&str> {
    fn walk<'s>(steps: &'s [Step], out: &mut Vec<&'s str>) {
        for s in steps {
            out.push(&s.id);
            if let Action::If(b) = &s.action {
                walk(&b.then, out);
                walk(&b.otherwise, out);
            }
        }
    }
    let mut ids = Vec::new();
    walk(steps, &mut ids);
    ids
}

/// Whether `s` is a valid name for a step id, a workflow name part or a
/// secret: ASCII letters, digits and `_`, not starting with a digit, at
/// most 100 bytes. The CLI and the API validate secret names with it too.
#[must_use]
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 100
}

fn is_workflow_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.len() <= 100
}

/// Headers neither a step nor a page's `next` may set: they would change
/// where a request goes or how it is framed, with the connection's
/// credential on it.
pub const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
];

/// Whether `s` is a valid HTTP header name (an RFC 9110 token).
#[must_use]
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

fn closest<'n>(name: &str, candidates: &[&'n str]) -> Option<&'n str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_config_is_read_leniently_only_when_store_and_listen_are_certain() {
        let lenient = |text: &str| {
            load_config_lenient(&SourceFile {
                path: "plumb.yaml".into(),
                text: text.into(),
            })
        };
        let (cfg, problems) = lenient("store: sqlite://x.db\nserve:\n  workers: many\n")
            .expect("store and listen still read");
        assert_eq!(cfg.store, "sqlite://x.db");
        assert!(!problems.is_empty());
        // `stor` may be `store` misspelled: the default store would be
        // another file than the one meant.
        assert!(lenient("stor: sqlite://x.db\n").is_err());
        assert!(lenient("store: sqlite://x.db\nlisen: 127.0.0.1:9\n").is_err());
        let (cfg, _) =
            lenient("store: sqlite://x.db\nlisten: 127.0.0.1:9\nextra: 1\n").expect("both given");
        assert_eq!(cfg.listen, "127.0.0.1:9");
    }

    fn config(text: &str) -> ProjectConfig {
        load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: text.into(),
        })
        .expect("valid config")
    }

    fn workflow(text: &str) -> Result<Workflow, Diagnostics> {
        let cfg =
            config("connections:\n  crm:\n    http:\n      base_url: https://api.crm.example/v1\n");
        load_workflow(
            &SourceFile {
                path: "workflows/w.yaml".into(),
                text: text.into(),
            },
            &cfg,
        )
    }

    const HEAD: &str = "name: w\nowner: team@example.com\ndescription: test\n";

    fn dedupe_of(trigger: &str) -> Result<Option<(String, Duration)>, Diagnostics> {
        let w = workflow(&format!(
            "{HEAD}trigger:\n{trigger}steps:\n  - id: a\n    jq: '1'\n"
        ))?;
        match w.trigger {
            Trigger::Webhook { dedupe, .. } => Ok(dedupe.map(|d| (d.source.clone(), d.window))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dedupe_key_is_a_digest_and_null_or_empty_keys_dedupe_nothing() {
        use serde_json::json;
        let a = crate::model::TriggerDedupe::key_text(&json!("evt-1")).expect("key");
        assert_eq!(a.len(), 64, "a SHA-256 in hex");
        assert_ne!(
            Some(a.clone()),
            crate::model::TriggerDedupe::key_text(&json!("evt-2"))
        );
        assert_eq!(
            Some(a),
            crate::model::TriggerDedupe::key_text(&json!("evt-1"))
        );
        assert!(crate::model::TriggerDedupe::key_text(&json!(null)).is_none());
        assert!(crate::model::TriggerDedupe::key_text(&json!("")).is_none());
        assert!(crate::model::TriggerDedupe::key_text(&json!(["a", 1])).is_some());
    }

    #[test]
    fn webhook_dedupe_takes_a_key_a_window_or_the_senders_delivery_id() {
        let day = Duration::from_secs(86_400);
        assert_eq!(
            dedupe_of("  webhook: { path: a, dedupe: '${{ .trigger.body.id }}' }\n").expect("ok"),
            Some(("${{ .trigger.body.id }}".into(), day))
        );
        assert_eq!(
            dedupe_of("  webhook:\n    path: a\n    dedupe: { key: '${{ .trigger.body.id }}', window: 7d }\n")
                .expect("ok")
                .map(|d| d.1),
            Some(7 * day)
        );
        let github = dedupe_of("  webhook: { path: a, auth: { preset: github, secret: gh } }\n")
            .expect("ok")
            .expect("a preset dedupes by default");
        assert!(github.0.contains("x-github-delivery"), "{github:?}");
        assert_eq!(
            dedupe_of("  webhook: { path: a, auth: { preset: slack, secret: s } }\n").expect("ok"),
            None,
            "Slack sends no delivery id"
        );
        assert_eq!(
            dedupe_of(
                "  webhook: { path: a, auth: { preset: github, secret: gh }, dedupe: false }\n"
            )
            .expect("ok"),
            None
        );
        for bad in [
            "  webhook: { path: a, dedupe: constant }\n",
            "  webhook: { path: a, dedupe: 'evt-${{ .trigger.body.id }}' }\n",
            "  webhook: { path: a, dedupe: { key: '${{ .trigger.body.id }}', window: 0s } }\n",
            "  webhook: { path: a, dedupe: 3 }\n",
            "  webhook: { path: a, dedupe: '${{ .trigger.body.id' }\n",
        ] {
            let err = dedupe_of(bad).expect_err(bad);
            assert!(
                err.0
                    .iter()
                    .any(|d| d.field.as_deref().is_some_and(|f| f.contains("dedupe"))),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_valid_workflow_loads_with_resolved_policies() {
        let w = workflow(&format!(
            "{HEAD}retry: {{ attempts: 7 }}\nsteps:\n  - id: fetch\n    http: {{ connection: crm, path: /contacts }}\n    retry: {{ initial: 2s }}\n  - id: shape\n    jq: '.steps.fetch.body'\n"
        ))
        .expect("valid");
        assert_eq!(w.steps.len(), 2);
        assert_eq!(w.steps[0].retry.attempts, 7);
        assert_eq!(w.steps[0].retry.initial, Duration::from_secs(2));
        assert_eq!(w.steps[1].retry.initial, DEFAULT_RETRY.initial);
        assert_eq!(w.trigger, Trigger::Manual);
        assert_eq!(w.version.len(), 64);
    }

    #[test]
    fn unknown_field_names_file_line_field_and_suggests_the_fix() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: fetch\n    http:\n      conection: crm\n      path: /x\n"
        ))
        .expect_err("typo");
        let d = &err.0[0];
        assert_eq!(d.file, "workflows/w.yaml");
        assert_eq!(d.line, Some(7));
        assert_eq!(d.field.as_deref(), Some("steps[0].http.conection"));
        assert!(d.message.contains("unknown field `conection`"), "{d}");
        assert_eq!(d.help.as_deref(), Some("did you mean `connection`?"));
    }

    #[test]
    fn all_problems_are_reported_not_just_the_first() {
        let err = workflow(
            "name: w\nowner: ''\ndescription: d\nsteps:\n  - id: a\n    jq: '.x +'\n  - id: a\n    http: { connection: nope, path: /x }\n  - id: c\n    jq: '.steps.zzz'\n",
        )
        .expect_err("several problems");
        let messages: Vec<String> = err.0.iter().map(|d| d.message.clone()).collect();
        assert!(
            messages.iter().any(|m| m.contains("`owner` is empty")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("invalid jq program")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("used twice")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unknown connection `nope`")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("no step has the id `zzz`")),
            "{messages:?}"
        );
        assert!(err.0.len() >= 5);
    }

    #[test]
    fn missing_owner_is_reported_with_help() {
        let err = workflow("name: w\ndescription: d\nsteps:\n  - id: a\n    jq: .\n")
            .expect_err("no owner");
        assert!(err.0[0].message.contains("missing required field `owner`"));
        assert!(err.0[0].help.as_deref().unwrap_or("").contains("paged"));
    }

    #[test]
    fn forward_references_are_rejected() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: a\n    jq: '.steps.b'\n  - id: b\n    jq: '1'\n"
        ))
        .expect_err("forward ref");
        assert!(err.0[0].message.contains("has not run yet"), "{}", err.0[0]);
        assert_eq!(err.0[0].line, Some(5));
    }

    #[test]
    fn absolute_urls_in_http_path_are_an_egress_error() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: a\n    http: {{ connection: crm, path: 'https://evil.example/x' }}\n"
        ))
        .expect_err("absolute url");
        assert!(
            err.0[0].message.contains("must start with a single `/`"),
            "{}",
            err.0[0]
        );
    }

    #[test]
    fn expression_syntax_errors_point_at_the_field() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: a\n    http:\n      connection: crm\n      path: /x\n      body:\n        n: '${{{{ .trigger.body.n + }}}}'\n"
        ))
        .expect_err("bad expression");
        let d = &err.0[0];
        assert_eq!(d.field.as_deref(), Some("steps[0].http.body.n"));
        assert_eq!(d.line, Some(10));
        assert!(d.message.contains("invalid expression"), "{d}");
    }

    #[test]
    fn if_branches_and_for_each_are_validated() {
        let w = workflow(&format!(
            "{HEAD}steps:\n  - id: check\n    if: '${{{{ .trigger.body.big }}}}'\n    then:\n      - id: notify\n        jq: '1'\n    else:\n      - id: quiet\n        jq: '2'\n  - id: each\n    for_each: '${{{{ [.steps.notify, .steps.quiet] }}}}'\n    concurrency: 4\n    jq: '.item'\n"
        ))
        .expect("valid");
        assert_eq!(w.all_steps().len(), 4);
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: x\n    jq: '1'\n    concurrency: 2\n"
        ))
        .expect_err("concurrency without for_each");
        assert!(err.0[0].message.contains("only applies to `for_each`"));
    }

    #[test]
    fn retention_is_resolved_over_the_defaults_and_checked() {
        let cfg = config("defaults:\n  retention: { payloads: 2d }\n");
        assert_eq!(
            cfg.defaults.retention,
            Retention {
                runs: Duration::from_secs(30 * 24 * 3600),
                payloads: Duration::from_secs(2 * 24 * 3600)
            }
        );
        let w = load_workflow(
            &SourceFile {
                path: "workflows/w.yaml".into(),
                text: format!("{HEAD}retention: {{ runs: 90d }}\nsteps:\n  - id: x\n    jq: '1'\n"),
            },
            &cfg,
        )
        .expect("valid");
        assert_eq!(w.retention.runs, Duration::from_secs(90 * 24 * 3600));
        assert_eq!(w.retention.payloads, Duration::from_secs(2 * 24 * 3600));
        let err = workflow(&format!(
            "{HEAD}retention: {{ runs: 10m, payloads: 60d }}\nsteps:\n  - id: x\n    jq: '1'\n"
        ))
        .expect_err("too short, and payloads past runs");
        let text = err.to_string();
        assert!(text.contains("retention.runs` is under an hour"), "{text}");
        assert!(text.contains("longer than `retention.runs`"), "{text}");
        assert!(
            workflow(&format!(
                "{HEAD}retention: {{ rows: 1d }}\nsteps:\n  - id: x\n    jq: '1'\n"
            ))
            .is_err(),
            "unknown field"
        );
    }

    #[test]
    fn step_with_two_actions_is_rejected() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: x\n    jq: '1'\n    sleep: 1s\n"
        ))
        .expect_err("two actions");
        assert!(
            err.0[0].message.contains("found jq and sleep"),
            "{}",
            err.0[0]
        );
    }

    #[test]
    fn schedule_trigger_checks_cron_and_timezone() {
        let err = workflow(&format!(
            "{HEAD}trigger:\n  schedule: {{ cron: '61 * * * *', timezone: Mars/Olympus }}\nsteps:\n  - id: x\n    jq: '1'\n"
        ))
        .expect_err("bad schedule");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn alerts_serve_settings_and_concurrency_are_validated() {
        let cfg = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: "connections:\n  chat:\n    http: { base_url: 'https://chat.example' }\nalerts:\n  ops:\n    http: { connection: chat, path: /hooks/ops }\nserve:\n  workers: 8\n  body_limit: 256KiB\n  lease: 5s\n  public_url: https://plumb.example/\n".into(),
        })
        .expect("valid config");
        assert_eq!(cfg.serve.workers, 8);
        assert_eq!(cfg.serve.body_limit, 256 * 1024);
        assert_eq!(cfg.serve.lease, Duration::from_secs(5));
        assert_eq!(
            cfg.serve.public_url.as_deref(),
            Some("https://plumb.example")
        );
        assert!(
            matches!(cfg.alerts.get("ops"), Some(crate::model::AlertChannel::Http { method, .. }) if method == "POST")
        );
        let w = load_workflow(
            &SourceFile {
                path: "workflows/w.yaml".into(),
                text: format!("{HEAD}concurrency: 2\nalerts: {{ on_failure: [ops] }}\ntrigger:\n  schedule: {{ cron: '*/5 * * * *', catch_up: all }}\nsteps:\n  - id: a\n    jq: '1'\n"),
            },
            &cfg,
        )
        .expect("valid workflow");
        assert_eq!(w.concurrency, Some(2));
        assert_eq!(w.alerts_on_failure, vec!["ops"]);
        assert!(matches!(
            w.trigger,
            Trigger::Schedule {
                catch_up: crate::model::CatchUp::All,
                ..
            }
        ));
        let err = load_workflow(
            &SourceFile {
                path: "workflows/w.yaml".into(),
                text: format!("{HEAD}concurrency: 0\nalerts: {{ on_failure: [opz] }}\nsteps:\n  - id: a\n    jq: '1'\n"),
            },
            &cfg,
        )
        .expect_err("bad");
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.0
                .iter()
                .any(|d| d.help.as_deref() == Some("did you mean `ops`?"))
        );
        let err = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: "alerts:\n  ops:\n    http: { connection: nope, path: x }\nserve: { body_limit: 1 parsec }\n".into(),
        })
        .expect_err("bad config");
        assert_eq!(err.0.len(), 3, "{err}");
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size(&Value::from("1MiB")), Ok(1024 * 1024));
        assert_eq!(parse_size(&Value::from("10 kb")), Ok(10_000));
        assert_eq!(parse_size(&Value::from(512)), Ok(512));
        assert!(parse_size(&Value::from("lots")).is_err());
    }

    #[test]
    fn connections_cannot_set_the_idempotency_key() {
        let err = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: "connections:\n  c:\n    http:\n      base_url: https://x.example\n      headers: { Idempotency-Key: fixed }\n".into(),
        })
        .expect_err("reserved header");
        assert!(err.0[0].message.contains("set by plumb"), "{}", err.0[0]);
        assert_eq!(err.0[0].line, Some(5));
    }

    #[test]
    fn inputs_that_used_to_panic_are_diagnostics() {
        let err = workflow(&format!("{HEAD}steps:\n  - id: x\n    sleep: 1e300\n"))
            .expect_err("absurd sleep");
        assert!(
            err.0[0].message.contains("invalid number of seconds"),
            "{}",
            err.0[0]
        );
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: x\n    http: {{ connection: crm, path: '/x/${{{{ .a == “b” }}}}' }}\n"
        ))
        .expect_err("smart quotes");
        assert!(err.0[0].help.as_deref().unwrap_or("").contains('^'));
    }

    #[test]
    fn duration_without_unit_is_explained() {
        let err = workflow(&format!(
            "{HEAD}timeout: 30\nsteps:\n  - id: x\n    jq: '1'\n"
        ))
        .expect_err("no unit");
        assert!(err.0[0].message.contains("no unit"), "{}", err.0[0]);
        assert_eq!(err.0[0].line, Some(4));
    }

    #[test]
    fn every_problem_of_a_mapping_is_reported_in_one_pass() {
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: a\n    jq: '1'\n    colour: red\n    shade: dark\n    concurrency: many\n    retry: {{ attempts: lots, backof: fixed }}\n"
        ))
        .expect_err("several problems");
        let messages: Vec<&str> = err.0.iter().map(|d| d.message.as_str()).collect();
        for want in [
            "unknown field `colour`",
            "unknown field `shade`",
            "unknown field `backof`",
            "expected a whole number of 0 or more, found the text \"many\"",
            "expected a whole number of 0 or more, found the text \"lots\"",
        ] {
            assert!(messages.contains(&want), "{want} missing from {messages:?}");
        }
        assert_eq!(err.0.len(), 5, "{messages:?}");
    }

    #[test]
    fn every_missing_required_field_is_reported() {
        let err = workflow("name: w\nsteps:\n  - jq: '1'\n").expect_err("missing fields");
        let mut messages: Vec<&str> = err.0.iter().map(|d| d.message.as_str()).collect();
        messages.sort_unstable();
        assert_eq!(
            messages,
            vec![
                "missing required field `description`",
                "missing required field `id`",
                "missing required field `owner`",
            ]
        );
    }

    #[test]
    fn a_broken_step_does_not_make_its_readers_report_it_missing() {
        // Three real problems: a misspelled action, an unknown connection
        // and a bad value; each reported once, and nothing about `fetch`
        // being missing for the steps that read it.
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: fetch\n    htpp: {{ connection: crm, path: /x }}\n  - id: post\n    http: {{ connection: nope, path: '/y/${{{{ .steps.fetch.body.id }}}}' }}\n  - id: shape\n    jq: '.steps.fetch'\n    timeout: soon\n"
        ))
        .expect_err("three problems");
        let messages: Vec<&str> = err.0.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(err.0.len(), 3, "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("unknown field `htpp`")));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("unknown connection `nope`"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("invalid duration `soon`"))
        );
        assert!(
            err.0
                .iter()
                .any(|d| d.help.as_deref() == Some("did you mean `http`?"))
        );
    }

    #[test]
    fn unknown_values_of_a_fixed_set_name_the_choices() {
        let err = workflow(&format!(
            "{HEAD}retry: {{ backoff: expo }}\nsteps:\n  - id: a\n    jq: '1'\n"
        ))
        .expect_err("bad backoff");
        assert_eq!(err.0[0].message, "unknown value `expo`");
        assert_eq!(
            err.0[0].help.as_deref(),
            Some("use one of: exponential, fixed")
        );
    }

    #[test]
    fn kinds_from_spec_not_built_yet_are_named_so() {
        let err = load_config(&SourceFile {
            path: "plumb.yaml".into(),
            text: "connections:\n  mail:\n    smtp: { url: { secret: smtp_url } }\n  crm:\n    htp: { base_url: 'https://x.example' }\n".into(),
        })
        .expect_err("no smtp yet, and a typo");
        let messages: Vec<&str> = err.0.iter().map(|d| d.message.as_str()).collect();
        assert!(
            messages.contains(&"`smtp` connections are not available in this version of plumb"),
            "{messages:?}"
        );
        assert!(messages.contains(&"unknown field `htp`"), "{messages:?}");
        assert!(
            err.0
                .iter()
                .any(|d| d.help.as_deref() == Some("did you mean `http`?"))
        );
        let err = workflow(&format!(
            "{HEAD}steps:\n  - id: a\n    workflow: {{ name: other }}\n"
        ))
        .expect_err("no workflow steps yet");
        let messages: Vec<&str> = err.0.iter().map(|d| d.message.as_str()).collect();
        assert!(
            messages.contains(&"`workflow` steps are not available in this version of plumb"),
            "{messages:?}"
        );
    }
}
