//! `trigger.poll`: an HTTP request on an interval (`every`), with the
//! http step's fields (`connection`, `path`, `query`, `headers`, `paginate`,
//! `expect`); `items` picks the items out of the answer, `key` names each,
//! and only items whose key was not seen within `remember` start runs (one
//! each, or one for all with `batch: true`). An optional `cursor` is the
//! workflow's cursor, moved with the poll that found the items.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::TriggerKind;
use crate::expr::Template;
use crate::load::Checker;
use crate::load::step::http::{HttpStepSpec, http_action};
use crate::model::{PollTrigger, Trigger};
use crate::spec::Dur;
use crate::yaml::FieldPath;

pub(super) const KIND: TriggerKind = TriggerKind {
    name: "poll",
    check,
};

/// The shortest `every`.
const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest `every` and `remember`.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long a seen key counts unless `remember` says otherwise.
pub const DEFAULT_REMEMBER: Duration = Duration::from_secs(30 * 24 * 3600);

/// `trigger.poll`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollSpec {
    /// How often to poll.
    pub every: Dur,
    /// The request, as in an http step.
    pub http: Value,
    /// `${{ … }}` over `.response` (the first page) and `.pages`: the list
    /// of items.
    pub items: Value,
    /// `${{ … }}` over one item: its identity.
    pub key: Value,
    /// `${{ … }}`: the cursor to commit with the poll.
    pub cursor: Option<Value>,
    /// One run for all new items (`.trigger.items`) instead of one each.
    #[serde(default)]
    pub batch: bool,
    /// How long a seen key counts (default 30d).
    pub remember: Option<Dur>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Trigger> {
    let spec: PollSpec = cx.deserialize(raw, path)?;
    let every = spec.every.0;
    if !(MIN_EVERY..=MAX_PERIOD).contains(&every) {
        cx.error_at_value(&path.key("every"), "`every` must be between 1s and 366d")
            .help = Some("e.g. `every: 1m`".into());
    }
    let remember = spec.remember.map_or(DEFAULT_REMEMBER, |d| d.0);
    if !(MIN_EVERY..=MAX_PERIOD).contains(&remember) {
        cx.error_at_value(
            &path.key("remember"),
            "`remember` must be between 1s and 366d",
        )
        .help = Some("how long an item's key counts as seen, e.g. `remember: 30d`".into());
    }
    if remember < every {
        cx.error_at_value(
            &path.key("remember"),
            "`remember` is shorter than `every`: an item would be forgotten before the next poll and run again",
        )
        .help = Some("remember a key for longer than one poll interval (the default is 30d)".into());
    }
    let http_path = path.key("http");
    let http_spec: Option<HttpStepSpec> = cx.deserialize(&spec.http, &http_path);
    let http = http_spec.and_then(|h| http_action(cx, &h, &http_path));
    let items = expression(
        cx,
        &spec.items,
        &path.key("items"),
        "items",
        "`items: \"${{ .response.body.data }}\"` (or over all pages: `\"${{ [.pages[].body.data[]] }}\"`)",
    );
    let key = expression(
        cx,
        &spec.key,
        &path.key("key"),
        "key",
        "`key: \"${{ .id }}\"` (evaluated over each item)",
    );
    let cursor = match &spec.cursor {
        Some(raw) => Some(expression(
            cx,
            raw,
            &path.key("cursor"),
            "cursor",
            "`cursor: \"${{ [.items[].updated_at] | max }}\"`",
        )?),
        None => None,
    };
    let (http, timeout) = http?;
    Some(Trigger::Poll(Box::new(PollTrigger {
        every,
        http,
        timeout,
        items: items?,
        key: key?,
        cursor,
        batch: spec.batch,
        remember,
    })))
}

/// A field that must be an expression (a constant would mean the same
/// thing on every poll).
fn expression(
    cx: &mut Checker<'_>,
    raw: &Value,
    path: &FieldPath,
    field: &str,
    example: &str,
) -> Option<Template> {
    let template = cx.template(raw, path)?;
    if matches!(template, Template::Literal(_)) {
        cx.error_at_value(path, format!("`{field}` must be an expression"))
            .help = Some(format!("e.g. {example}"));
        return None;
    }
    Some(template)
}
