//! `trigger: manual` (or `trigger: { manual: … }`): runs start only by hand,
//! from `plumb run` or the API.

use serde_json::Value;

use super::TriggerKind;
use crate::load::Checker;
use crate::model::Trigger;
use crate::yaml::FieldPath;

pub(super) const KIND: TriggerKind = TriggerKind {
    name: "manual",
    check,
};

fn check(_cx: &mut Checker<'_>, _raw: &Value, _path: &FieldPath) -> Option<Trigger> {
    Some(Trigger::Manual)
}
