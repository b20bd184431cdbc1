//! `http: { connection, method, path, query, headers, body, expect,
//! paginate }`: one request to a connection's origin (the path is appended
//! to its `base_url`; a full URL is refused), with the step's idempotency
//! key; with `paginate`, one such request per page.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Checked, KindInput, StepKind};
use crate::expr::Template;
use crate::load::{Checker, closest, is_header_name};
use crate::model::{Action, Connection, DEFAULT_MAX_PAGES, HttpAction, MAX_MAX_PAGES, Paginate};
use crate::yaml::FieldPath;

pub(super) const KIND: StepKind = StepKind {
    name: "http",
    siblings: &[],
    not_repeatable: None,
    check,
};

/// `http:` in a step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStepSpec {
    /// The connection to call (its host is the only one reachable).
    pub connection: String,
    /// HTTP method; `GET` when omitted.
    pub method: Option<String>,
    /// Path below the connection's `base_url`.
    #[serde(default = "default_path")]
    pub path: Value,
    /// Query parameters.
    #[serde(default)]
    pub query: Map<String, Value>,
    /// Request headers.
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// JSON request body.
    pub body: Option<Value>,
    /// What counts as success.
    pub expect: Option<ExpectSpec>,
    /// Fetch page after page.
    pub paginate: Option<PaginateSpec>,
}

/// `paginate:` in an http step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaginateSpec {
    /// `${{ … }}` over `.response` (and `.request`, `.page`, `.link_next`):
    /// `null` stops; a URL or `{path, query, headers, body}` is the next
    /// request.
    pub next: Value,
    /// The most pages one run may fetch (default 1000).
    pub max_pages: Option<u64>,
}

fn default_path() -> Value {
    Value::String("/".to_owned())
}

/// `expect:` in an http step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// Status codes that count as success (default: any 2xx).
    #[serde(default)]
    pub status: Vec<u16>,
    /// The data contract a successful response's body must keep
    /// (`schemas/page.json`).
    pub schema: Option<String>,
}

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("http");
    let spec: HttpStepSpec = cx.deserialize(input.raw, &path)?;
    if spec.paginate.is_some() && input.step.contains_key("for_each") {
        cx.error(
            &path.key("paginate"),
            "`paginate` cannot be combined with `for_each` on one step",
        )
        .help = Some(
            "fetch the pages in a step of its own, then `for_each` over `.steps.<id>.pages` in the next step".into(),
        );
    }
    let (action, timeout) = http_action(cx, &spec, &path)?;
    Some(Checked {
        action: Action::Http(action),
        timeout,
    })
}

pub(in crate::load) fn http_action(
    cx: &mut Checker<'_>,
    spec: &HttpStepSpec,
    path: &FieldPath,
) -> Option<(HttpAction, Option<Duration>)> {
    let mut connection_timeout = None;
    if let Some(config) = cx.config {
        match config.connections.get(&spec.connection) {
            None => {
                let names: Vec<&str> = config.connections.keys().map(String::as_str).collect();
                let help = match closest(&spec.connection, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None if names.is_empty() => {
                        "define it under `connections:` in plumb.yaml".to_owned()
                    }
                    None => format!(
                        "define it under `connections:` in plumb.yaml, or use one of: {}",
                        names.join(", ")
                    ),
                };
                cx.error_at_value(
                    &path.key("connection"),
                    format!("unknown connection `{}`", spec.connection),
                )
                .help = Some(help);
            }
            Some(Connection::Http(c)) => connection_timeout = c.timeout,
            Some(other) => {
                cx.error_at_value(
                    &path.key("connection"),
                    format!(
                        "`{}` is a {} connection; an http step calls an http connection",
                        spec.connection,
                        other.kind()
                    ),
                )
                .help = Some("use a `sql:` step for a database connection".into());
            }
        }
    }
    let method = spec.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    if !matches!(
        method.as_str(),
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS"
    ) {
        cx.error_at_value(
            &path.key("method"),
            format!("unsupported HTTP method `{method}`"),
        )
        .help = Some("use GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS".into());
    }
    let path_template = cx.template(&spec.path, &path.key("path"));
    if let Some(t) = &path_template {
        let literal_start = match t {
            Template::Literal(Value::String(s)) => Some(s.as_str()),
            Template::Text(parts) => match parts.first() {
                Some(crate::expr::TextPart::Literal(s)) => Some(s.as_str()),
                _ => None,
            },
            Template::Literal(_) => Some(""),
            _ => None,
        };
        if let Some(start) = literal_start
            && (!start.starts_with('/') || start.starts_with("//"))
        {
            cx.error_at_value(&path.key("path"), "the path must start with a single `/`: it is appended to the connection's base_url")
                    .help = Some("a step may only call its connection's host; write the path, e.g. `/orders`, not a full URL".into());
        }
    }
    let mut query = Vec::new();
    for (k, v) in &spec.query {
        if let Some(t) = cx.template(v, &path.key("query").key(k.clone())) {
            query.push((k.clone(), t));
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &spec.headers {
        let hp = path.key("headers").key(k.clone());
        if !is_header_name(k) {
            cx.error(&hp, format!("invalid header name `{k}`")).help =
                Some("header names are letters, digits and `-`".into());
        }
        if crate::load::FORBIDDEN_HEADERS
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
        {
            cx.error(&hp, format!("`{k}` cannot be set by a step"))
                .help = Some(
                "plumb sets it from the connection's base_url and the body; a step may only call its connection's host".into(),
            );
        }
        if k.eq_ignore_ascii_case("idempotency-key") {
            cx.error(&hp, "`Idempotency-Key` is set by plumb").help = Some(
                "remove it: every request carries `<run_id>:<step_id>[:<item>]`, the same on every retry".into(),
            );
        }
        if let Some(t) = cx.template(v, &hp) {
            headers.push((k.clone(), t));
        }
    }
    let body = match &spec.body {
        Some(b) => Some(cx.template(b, &path.key("body"))?),
        None => None,
    };
    let mut expect_schema = None;
    if let Some(expect) = &spec.expect {
        if let Some(reference) = &expect.schema {
            expect_schema = Some(cx.contract(reference, &path.key("expect").key("schema"))?);
        }
        for (i, s) in expect.status.iter().enumerate() {
            if !(100..=599).contains(s) {
                cx.error_at_value(
                    &path.key("expect").key("status").index(i),
                    format!("`{s}` is not an HTTP status"),
                )
                .help = Some("use codes between 100 and 599".into());
            }
        }
    }
    let paginate = match &spec.paginate {
        Some(p) => Some(Box::new(paginate(cx, p, &path.key("paginate"))?)),
        None => None,
    };
    Some((
        HttpAction {
            connection: spec.connection.clone(),
            method,
            path: path_template?,
            query,
            headers,
            body,
            expect_status: spec
                .expect
                .as_ref()
                .map(|e| e.status.clone())
                .filter(|s| !s.is_empty()),
            expect_schema,
            paginate,
        },
        connection_timeout,
    ))
}

fn paginate(cx: &mut Checker<'_>, spec: &PaginateSpec, path: &FieldPath) -> Option<Paginate> {
    let next = cx.template(&spec.next, &path.key("next"))?;
    if matches!(next, Template::Literal(_)) {
        // A fixed answer either never stops or never starts.
        cx.error_at_value(&path.key("next"), "`next` must be an expression over the page just received")
            .help = Some(
            "e.g. `next: \"${{ .response.body.next_page }}\"` (null stops), or `\"${{ .link_next }}\"` for a `Link: <…>; rel=\"next\"` header".into(),
        );
    }
    let max_pages = match spec.max_pages {
        None => DEFAULT_MAX_PAGES,
        Some(n) if (1..=u64::from(MAX_MAX_PAGES)).contains(&n) => {
            u32::try_from(n).unwrap_or(MAX_MAX_PAGES)
        }
        Some(n) => {
            cx.error_at_value(&path.key("max_pages"), format!("`max_pages` is {n}"))
                .help = Some(format!("use a number from 1 to {MAX_MAX_PAGES}"));
            return None;
        }
    };
    Some(Paginate { next, max_pages })
}
