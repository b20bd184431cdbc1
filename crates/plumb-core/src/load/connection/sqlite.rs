//! `connections.<name>.sqlite`: a SQLite database file for `sql` steps
//! (`url: sqlite://warehouse.db`, relative to the project).

use serde_json::Value;

use super::ConnectionKind;
use super::sql::Dialect;
use crate::load::Checker;
use crate::model::{Connection, SqlDriver};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "sqlite",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let dialect = Dialect {
        driver: SqlDriver::Sqlite,
        title: "SQLite",
        schemes: &["sqlite"],
        example: "sqlite://warehouse.db",
    };
    super::sql::check(cx, raw, path, &dialect)
}
