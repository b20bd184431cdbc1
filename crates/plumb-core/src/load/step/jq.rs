//! `jq: '<program>'`: transform with a jq program; its single result is the
//! step's output.

use super::{Checked, KindInput, StepKind};
use crate::load::Checker;
use crate::model::Action;

pub(super) const KIND: StepKind = StepKind {
    name: "jq",
    siblings: &[],
    not_repeatable: None,
    check,
};

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("jq");
    let code: String = cx.deserialize(input.raw, &path)?;
    Some(Checked::action(Action::Jq(cx.program(&code, &path)?)))
}
