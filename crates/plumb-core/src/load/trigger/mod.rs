//! `trigger:` in a workflow: one file per trigger kind, listed in
//! [`KINDS`]. A kind turns its mapping into a [`Trigger`] of the model;
//! serving it (webhook routes, schedules, polls) is the server's and the
//! engine's.

use serde_json::Value;

use super::Checker;
use crate::model::Trigger;
use crate::yaml::FieldPath;

mod manual;
mod poll;
mod queue;
mod schedule;
mod webhook;

/// One kind of trigger: the key naming it and its check.
pub(super) struct TriggerKind {
    /// The key under `trigger:` (`webhook:`).
    pub name: &'static str,
    /// Checks the kind's value (found at `path`, which ends with the
    /// kind's key) and builds the trigger.
    pub check: fn(&mut Checker<'_>, &Value, &FieldPath) -> Option<Trigger>,
}

/// Every trigger kind this version has.
const KINDS: &[TriggerKind] = &[
    webhook::KIND,
    schedule::KIND,
    poll::KIND,
    queue::KIND,
    manual::KIND,
];

/// Kinds SPEC describes that are not built yet.
const PLANNED: &[&str] = &[];

impl Checker<'_> {
    /// `trigger:`: `manual` (the default), or a mapping with one kind.
    pub(super) fn trigger(&mut self, raw: Option<&Value>, path: &FieldPath) -> Option<Trigger> {
        let raw = raw?;
        if raw.as_str() == Some("manual") {
            return Some(Trigger::Manual);
        }
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        let (i, value) = self.one_kind(raw, path, "trigger", &names, PLANNED)?;
        let kind = &KINDS[i];
        (kind.check)(self, value, &path.key(kind.name))
    }
}
