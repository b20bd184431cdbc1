//! `if: ${{ … }}` with `then:` and `else:`: branch. The decision is
//! journaled before the branch runs, so a resumed run follows the same
//! branch whatever the condition would say now.

use serde_json::Value;

use super::{Checked, KindInput, StepKind};
use crate::load::{Checker, StepDefaults};
use crate::model::{Action, IfBranch};

pub(super) const KIND: StepKind = StepKind {
    name: "if",
    siblings: &["then", "else"],
    not_repeatable: Some((
        "`for_each` cannot repeat an `if` step",
        "put `for_each` on the steps inside the branch instead",
    )),
    check,
};

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path;
    if input.has_retry {
        cx.error(&path.key("retry"), "an `if` step has nothing to retry")
            .help = Some("remove `retry`; put it on the steps inside the branches".into());
    }
    let condition = cx.condition(input.raw, &path.key("if"))?;
    let Some(then_raw) = input.step.get("then") else {
        cx.error(path, "an `if` step needs `then:`").help =
            Some("list the steps to run when the condition holds under `then:`".into());
        return None;
    };
    let then_list: Vec<Value> = cx.deserialize(then_raw, &path.key("then"))?;
    let else_list: Vec<Value> = match input.step.get("else") {
        Some(raw) => cx.deserialize(raw, &path.key("else"))?,
        None => Vec::new(),
    };
    let child = StepDefaults {
        retry: input.defaults.retry,
        timeout: input.defaults.timeout,
    };
    let then = cx.steps(&then_list, &path.key("then"), &child);
    let otherwise = cx.steps(&else_list, &path.key("else"), &child);
    Some(Checked::action(Action::If(IfBranch {
        condition,
        then,
        otherwise,
    })))
}
