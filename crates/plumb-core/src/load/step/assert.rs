//! `assert: { condition: ${{ … }}, message: … }`: fail the run with a clear
//! message unless the condition holds — a data contract in the middle of a
//! flow.

use serde::Deserialize;
use serde_json::Value;

use super::{Checked, KindInput, StepKind};
use crate::load::Checker;
use crate::model::Action;

pub(super) const KIND: StepKind = StepKind {
    name: "assert",
    siblings: &[],
    not_repeatable: None,
    check,
};

/// `assert:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertSpec {
    /// A `${{ … }}` that must be true.
    pub condition: Value,
    /// The failure message (may hold `${{ … }}`).
    pub message: Option<Value>,
}

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("assert");
    let spec: AssertSpec = cx.deserialize(input.raw, &path)?;
    let condition = cx.condition(&spec.condition, &path.key("condition"));
    let message = match &spec.message {
        Some(m) => Some(cx.template(m, &path.key("message"))?),
        None => None,
    };
    Some(Checked::action(Action::Assert {
        condition: condition?,
        message,
    }))
}
