//! Steps in a workflow: what every step has (`id`, `retry`, `timeout`,
//! `for_each`, `concurrency`) is checked here; what a step *does* is one
//! file per step kind, listed in [`KINDS`]. A step names exactly one kind
//! (`http:`, `jq:`, …); a kind may own sibling keys too (`if` owns `then`
//! and `else`).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Checker, MAX_CONCURRENCY, StepDefaults, closest, is_identifier, step_programs};
use crate::expr::Template;
use crate::model::{Action, ForEach, Step};
use crate::spec::{Dur, RetrySpec};
use crate::yaml::FieldPath;

mod assert;
mod branch;
pub(in crate::load) mod http;
mod jq;
mod publish;
mod sleep;
mod sql;

/// One kind of step: how it is written and how it is checked.
pub(super) struct StepKind {
    /// The key naming it in a step (`http`).
    pub name: &'static str,
    /// Other keys of the step mapping it owns (`then`, `else` for `if`).
    pub siblings: &'static [&'static str],
    /// Why `for_each` cannot repeat it, and the fix; `None` when it can.
    pub not_repeatable: Option<(&'static str, &'static str)>,
    /// Checks the kind's value and builds the action.
    pub check: fn(&mut Checker<'_>, &KindInput<'_>) -> Option<Checked>,
}

/// What a kind's check gets.
pub(super) struct KindInput<'i> {
    /// The value under the kind's key.
    pub raw: &'i Value,
    /// The whole step mapping, for sibling keys.
    pub step: &'i Map<String, Value>,
    /// The step's path (`steps[2]`).
    pub path: &'i FieldPath,
    /// Retry policy and timeout the step inherits.
    pub defaults: &'i StepDefaults,
    /// Whether the step sets `retry:` itself.
    pub has_retry: bool,
}

/// What a kind's check builds.
pub(super) struct Checked {
    /// The action.
    pub action: Action,
    /// A timeout the kind brings when the step sets none (an http step's
    /// connection timeout).
    pub timeout: Option<Duration>,
}

impl Checked {
    fn action(action: Action) -> Self {
        Self {
            action,
            timeout: None,
        }
    }
}

/// Every step kind this version has.
const KINDS: &[StepKind] = &[
    http::KIND,
    sql::KIND,
    publish::KIND,
    jq::KIND,
    branch::KIND,
    sleep::KIND,
    assert::KIND,
];

/// Kinds SPEC describes that are not built yet.
const PLANNED: &[&str] = &["workflow"];

/// What every step may have, whatever its kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepCommonSpec {
    /// Unique within the workflow; other steps read its output as
    /// `.steps.<id>`. Required; read as optional so the rest of the step
    /// is still checked when it is missing.
    id: Option<String>,
    /// Run the action once per element of this list.
    for_each: Option<Value>,
    /// How many `for_each` items run at once.
    concurrency: Option<u32>,
    /// Retry policy for this step.
    retry: Option<RetrySpec>,
    /// Timeout for one attempt of this step.
    timeout: Option<Dur>,
    /// The business record the step or each item is about (lineage).
    record_key: Option<Value>,
}

/// The keys of [`StepCommonSpec`].
const COMMON: &[&str] = &[
    "id",
    "for_each",
    "concurrency",
    "retry",
    "timeout",
    "record_key",
];

impl Checker<'_> {
    /// A list of steps; each is checked on its own, so one broken step does
    /// not hide the problems of the next.
    pub(super) fn steps(
        &mut self,
        raws: &[Value],
        path: &FieldPath,
        base: &StepDefaults,
    ) -> Vec<Step> {
        let mut out = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            if let Some(step) = self.step(raw, &path.index(i), base) {
                out.push(step);
            }
        }
        out
    }

    fn step(&mut self, raw: &Value, path: &FieldPath, base: &StepDefaults) -> Option<Step> {
        // The id as written, even if the step does not read: references to
        // a broken step are its problem, not theirs.
        if let Some(id) = raw.get("id").and_then(Value::as_str) {
            self.written_ids.insert(id.to_owned());
        }
        let Value::Object(map) = raw else {
            self.error_at_value(path, "a step is a mapping with an `id` and one action")
                .help = Some(format!(
                "write e.g. `- id: shape` and `jq: '.'` under it ({})",
                kind_list()
            ));
            return None;
        };
        // Split the mapping: the common fields, the kinds it names, and
        // anything else (unknown, reported with the closest known key).
        let mut common = Map::new();
        let mut named: Vec<(&StepKind, &Value)> = Vec::new();
        let mut unknown = 0;
        for (key, value) in map {
            if COMMON.contains(&key.as_str()) {
                common.insert(key.clone(), value.clone());
            } else if let Some(kind) = KINDS.iter().find(|k| k.name == key) {
                named.push((kind, value));
            } else if KINDS.iter().any(|k| k.siblings.contains(&key.as_str())) {
                // Checked once the step's kind is known.
            } else if PLANNED.contains(&key.as_str()) {
                unknown += 1;
                self.error(
                    &path.key(key.clone()),
                    format!("`{key}` steps are not available in this version of plumb"),
                )
                .help = Some(format!(
                    "this version has {}; see the README's table of what works today",
                    kind_list()
                ));
            } else {
                unknown += 1;
                let mut known: Vec<&str> = COMMON.to_vec();
                for k in KINDS {
                    known.push(k.name);
                    known.extend_from_slice(k.siblings);
                }
                let help = match closest(key, &known) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("remove it, or use one of: {}", known.join(", ")),
                };
                self.error(&path.key(key.clone()), format!("unknown field `{key}`"))
                    .help = Some(help);
            }
        }
        let spec: StepCommonSpec = self.deserialize(&Value::Object(common), path)?;
        let fields_set_aside = self.set_aside + unknown;
        let id_path = path.key("id");
        let id_missing = spec.id.is_none();
        let id = spec.id.clone().unwrap_or_default();
        if id_missing {
            self.missing(path, "id");
        } else if !is_identifier(&id) {
            self.error_at_value(&id_path, format!("invalid step id `{id}`")).help = Some(
                "use letters, digits and `_`, starting with a letter or `_`, so that `.steps.<id>` works in expressions".into(),
            );
        }
        if let Some(first) = self.ids.get(&id).filter(|_| !id_missing) {
            let line = self.doc.locate(first).line;
            self.error_at_value(&id_path, format!("the step id `{id}` is used twice"))
                .help = Some(format!(
                "it is first used on line {line}; step ids must be unique in a workflow"
            ));
        } else if !id_missing {
            self.ids.insert(id.clone(), id_path.clone());
            self.step_paths.insert(id.clone(), path.clone());
        }
        // No action, but an unknown field was reported: most likely the
        // action's name misspelled, which that report already says.
        if named.is_empty() && fields_set_aside > 0 {
            return None;
        }
        let [(kind, kind_raw)] = named.as_slice() else {
            let found = if named.is_empty() {
                "none".to_owned()
            } else {
                named
                    .iter()
                    .map(|(k, _)| k.name)
                    .collect::<Vec<_>>()
                    .join(" and ")
            };
            self.error(
                path,
                format!("step `{id}` needs exactly one action (found {found})"),
            )
            .help = Some(format!(
                "give the step one of {}; split it into several steps to do more",
                kind_list()
            ));
            return None;
        };
        // Keys another kind owns (`then:` on a `jq` step).
        for other in KINDS.iter().filter(|k| k.name != kind.name) {
            for sibling in other.siblings {
                if map.contains_key(*sibling) {
                    self.error(
                        &path.key(*sibling),
                        format!("`{sibling}` belongs to an `{}` step", other.name),
                    )
                    .help = Some(format!(
                        "add `{}: …` to this step, or move these steps out",
                        other.name
                    ));
                }
            }
        }
        let retry = self.resolve_retry(&base.retry, spec.retry.as_ref(), &path.key("retry"));
        let mut timeout = spec.timeout.map_or(base.timeout, |d| d.0);
        self.check_timeout(timeout, &path.key("timeout"));
        let for_each = self.for_each(&spec, kind, path);
        let record_key = match &spec.record_key {
            Some(raw) => self.record_key(raw, &path.key("record_key")),
            None => None,
        };
        let input = KindInput {
            raw: kind_raw,
            step: map,
            path,
            defaults: base,
            has_retry: spec.retry.is_some(),
        };
        let checked = (kind.check)(self, &input)?;
        if spec.timeout.is_none()
            && let Some(t) = checked.timeout
        {
            timeout = t;
        }
        if id_missing {
            return None;
        }
        let mut step = Step {
            id,
            action: checked.action,
            for_each,
            retry,
            timeout,
            reads: crate::expr::StepsRead::default(),
            record_key,
        };
        let mut reads = crate::expr::StepsRead::default();
        for program in step_programs(&step) {
            reads.merge(crate::expr::steps_read(program.source()));
        }
        step.reads = reads;
        Some(step)
    }

    fn for_each(
        &mut self,
        spec: &StepCommonSpec,
        kind: &StepKind,
        path: &FieldPath,
    ) -> Option<ForEach> {
        let Some(items) = &spec.for_each else {
            if spec.concurrency.is_some() {
                self.error(
                    &path.key("concurrency"),
                    "`concurrency` only applies to `for_each` steps",
                )
                .help = Some("remove it, or add `for_each: ${{ … }}`".into());
            }
            return None;
        };
        if let Some((message, help)) = kind.not_repeatable {
            self.error(&path.key("for_each"), message).help = Some(help.into());
        }
        let concurrency = spec.concurrency.unwrap_or(1);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            self.error(
                &path.key("concurrency"),
                format!("`concurrency` is {concurrency}"),
            )
            .help = Some(format!("use 1 to {MAX_CONCURRENCY}"));
        }
        let items_path = path.key("for_each");
        let items = self.template(items, &items_path)?;
        if let Template::Literal(v) = &items
            && !v.is_array()
        {
            self.error_at_value(
                &items_path,
                "`for_each` must be a list or a `${{ … }}` that yields one",
            )
            .help = Some("e.g. `for_each: ${{ .steps.fetch.body.items }}`".into());
        }
        Some(ForEach { items, concurrency })
    }
}

/// The connection a step names, when `fits` accepts its kind; otherwise
/// an error at `path` (the step kind's mapping) saying what is wrong:
/// `wanted` ("a sql step runs on a database connection") and how to define
/// one (`example`). `None` without a `plumb.yaml` to look in, too.
pub(super) fn step_connection(
    cx: &mut Checker<'_>,
    name: &str,
    path: &FieldPath,
    wanted: &str,
    example: &str,
    fits: fn(&crate::model::Connection) -> bool,
) -> Option<crate::model::Connection> {
    let config = cx.config?;
    match config.connections.get(name) {
        Some(c) if fits(c) => Some(c.clone()),
        Some(other) => {
            cx.error_at_value(
                &path.key("connection"),
                format!("`{name}` is an {} connection; {wanted}", other.kind()),
            )
            .help = Some(format!("define one under `connections:` with {example}"));
            None
        }
        None => {
            let names: Vec<&str> = config.connections.keys().map(String::as_str).collect();
            cx.error_at_value(
                &path.key("connection"),
                format!("unknown connection `{name}`"),
            )
            .help = Some(match super::closest(name, &names) {
                Some(best) => format!("did you mean `{best}`?"),
                None => format!("define it under `connections:` in plumb.yaml with {example}"),
            });
            None
        }
    }
}

/// "`http:`, `jq:`, `if:`, `sleep:` or `assert:`", from the registry.
fn kind_list() -> String {
    let names: Vec<String> = KINDS.iter().map(|k| format!("`{}:`", k.name)).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}
