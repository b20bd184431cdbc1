//! `sql: { connection, query, params, batch }`: one statement on a SQL
//! connection (with `batch`, once per element of a list, in one
//! transaction). Values reach the database only as bind parameters (`$1`,
//! `$2` …): an expression inside `query` is an error with the fix.

use serde::Deserialize;
use serde_json::Value;

use super::{Checked, KindInput, StepKind};
use crate::load::Checker;
use crate::model::{Action, Connection, SqlAction};

pub(super) const KIND: StepKind = StepKind {
    name: "sql",
    siblings: &[],
    not_repeatable: None,
    check,
};

/// `sql:` in a step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlStepSpec {
    /// The connection (a `postgres` one).
    pub connection: String,
    /// The statement, with `$1`, `$2` … for the parameters.
    pub query: String,
    /// The parameters, in order: values or `${{ … }}`.
    #[serde(default)]
    pub params: Vec<Value>,
    /// `${{ … }}` yielding a list: the statement runs once per element, in
    /// one transaction, with `params` evaluated over each element.
    pub batch: Option<Value>,
}

/// The most parameters one statement may bind.
const MAX_PARAMS: usize = 1000;

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("sql");
    let spec: SqlStepSpec = cx.deserialize(input.raw, &path)?;
    let timeout = match super::step_connection(
        cx,
        &spec.connection,
        &path,
        "a sql step runs on a database connection",
        "`postgres: { url: … }` (or `mysql:`, `sqlite:`)",
        |c| matches!(c, Connection::Sql(_)),
    ) {
        Some(Connection::Sql(c)) => c.timeout,
        _ => None,
    };
    if spec.query.contains("${{") {
        cx.error_at_value(
            &path.key("query"),
            "`query` holds an expression: values reach the database only as bind parameters",
        )
        .help = Some(
            "use params: write a placeholder in the query (`$1` on PostgreSQL, `?` on MySQL, `?1` on SQLite) and `params: [\"${{ … }}\"]`; a value pasted into SQL text is how injections happen".into(),
        );
    }
    if spec.query.trim().is_empty() {
        cx.error_at_value(&path.key("query"), "`query` is empty")
            .help = Some(
            "write the statement, e.g. `INSERT INTO contacts (id, email) VALUES ($1, $2)`".into(),
        );
    }
    if spec.params.len() > MAX_PARAMS {
        cx.error_at_value(
            &path.key("params"),
            format!(
                "{} parameters; one statement binds at most {MAX_PARAMS}",
                spec.params.len()
            ),
        )
        .help = Some("split the statement, or pass a list as one JSON parameter".into());
    }
    let batch = match &spec.batch {
        None => None,
        Some(raw) => {
            let t = cx.template(raw, &path.key("batch"))?;
            if matches!(t, crate::expr::Template::Literal(_)) {
                cx.error_at_value(&path.key("batch"), "`batch` must be an expression yielding a list")
                    .help = Some("e.g. `batch: \"${{ .steps.shape }}\"`, with `params: [\"${{ .id }}\", …]` over each element".into());
                return None;
            }
            Some(t)
        }
    };
    let mut params = Vec::with_capacity(spec.params.len());
    for (i, raw) in spec.params.iter().enumerate() {
        if let Some(t) = cx.template(raw, &path.key("params").index(i)) {
            params.push(t);
        }
    }
    Some(Checked {
        action: Action::Sql(SqlAction {
            connection: spec.connection,
            query: spec.query,
            params,
            batch,
        }),
        timeout,
    })
}
