//! `connections:` in `plumb.yaml`: one file per connection kind, listed in
//! [`KINDS`]. A kind turns its mapping into a [`Connection`] of the model
//! and reports every problem through the [`Checker`]; it performs no I/O
//! (the connectors in `plumb-connectors` do, at run time).

use serde_json::Value;

use super::Checker;
use crate::model::Connection;
use crate::yaml::FieldPath;

mod amqp;
mod broker;
mod http;
mod mqtt;
mod mysql;
mod nats;
mod postgres;
mod redis;
mod sql;
mod sqlite;

/// One kind of connection: the key naming it and its check.
pub(super) struct ConnectionKind {
    /// The key under the connection's name (`http:`).
    pub name: &'static str,
    /// Checks the kind's mapping (found at `path`, which ends with the
    /// kind's key) and builds the connection.
    pub check: fn(&mut Checker<'_>, &Value, &FieldPath) -> Option<Connection>,
}

/// Every connection kind this version has.
const KINDS: &[ConnectionKind] = &[
    http::KIND,
    postgres::KIND,
    mysql::KIND,
    sqlite::KIND,
    redis::KIND,
    amqp::KIND,
    mqtt::KIND,
    nats::KIND,
];

/// Kinds SPEC describes that are not built yet: named so, not "unknown".
const PLANNED: &[&str] = &["smtp"];

impl Checker<'_> {
    /// `connections.<name>`: exactly one kind.
    pub(super) fn connection(&mut self, raw: &Value, path: &FieldPath) -> Option<Connection> {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        let (i, value) = self.one_kind(raw, path, "connection", &names, PLANNED)?;
        let kind = &KINDS[i];
        (kind.check)(self, value, &path.key(kind.name))
    }
}
