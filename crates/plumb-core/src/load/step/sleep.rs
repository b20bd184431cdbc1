//! `sleep: 5m`: wait, durably (the wake-up time is journaled first, so a
//! resumed run waits only the remainder). A duration text, a number of
//! seconds, or a `${{ … }}` that yields one.

use super::{Checked, KindInput, StepKind};
use crate::expr::Template;
use crate::load::{Checker, sleep_duration};
use crate::model::Action;

pub(super) const KIND: StepKind = StepKind {
    name: "sleep",
    siblings: &[],
    not_repeatable: Some((
        "`for_each` cannot repeat a `sleep` step",
        "sleep once for the whole duration instead",
    )),
    check,
};

fn check(cx: &mut Checker<'_>, input: &KindInput<'_>) -> Option<Checked> {
    let path = input.path.key("sleep");
    let template = cx.template(input.raw, &path)?;
    if let Template::Literal(value) = &template
        && let Err(message) = sleep_duration(value)
    {
        cx.error_at_value(&path, message).help =
            Some("write a duration such as `30s` or `5m`, or a `${{ … }}` that yields one".into());
    }
    Some(Checked::action(Action::Sleep(template)))
}
