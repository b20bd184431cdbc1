//! The `assert` step: a condition that must hold, else the run fails with
//! the step's message (a data contract in the middle of a flow). Never
//! retried: the same data would fail the same way.

use std::time::Duration;

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_core::expr::Template;
use serde_json::Value;

use super::super::Outcome;
use super::super::context::{eval_bounded, permanent_eval, preview};

/// Checks the condition; the message (itself a template) explains a
/// failure.
pub(in crate::exec) async fn perform(
    condition: &Template,
    message: Option<&Template>,
    context: Val,
    timeout: Duration,
) -> Result<Outcome, ActionError> {
    let value = eval_bounded(condition.clone(), context.clone(), timeout)
        .await
        .map_err(permanent_eval)?;
    match value {
        Value::Bool(true) => Ok(Outcome {
            output: Value::Bool(true),
            status_code: None,
        }),
        Value::Bool(false) => {
            let text = match message {
                Some(m) => match eval_bounded(m.clone(), context, timeout).await {
                    Ok(Value::String(s)) => s,
                    Ok(other) => other.to_string(),
                    Err(e) => format!("assertion failed (and its message failed: {e})"),
                },
                None => format!("assertion failed: {}", condition_source(condition)),
            };
            Err(ActionError::Permanent {
                message: text,
                status: None,
            })
        }
        other => Err(ActionError::Permanent {
            message: format!(
                "the assert condition yielded {}, not true or false",
                preview(&other, 80)
            ),
            status: None,
        }),
    }
}

fn condition_source(t: &Template) -> String {
    match t {
        Template::Expr(p) => format!("`${{{{ {} }}}}` is false", p.source().trim()),
        _ => "the condition is false".to_owned(),
    }
}
