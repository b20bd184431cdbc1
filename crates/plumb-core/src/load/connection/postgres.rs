//! `connections.<name>.postgres`: a PostgreSQL database for `sql` steps.

use serde_json::Value;

use super::ConnectionKind;
use super::sql::Dialect;
use crate::load::Checker;
use crate::model::{Connection, SqlDriver};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "postgres",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let dialect = Dialect {
        driver: SqlDriver::Postgres,
        title: "PostgreSQL",
        schemes: &["postgres", "postgresql"],
        example: "postgres://USER@HOST:5432/DATABASE",
    };
    super::sql::check(cx, raw, path, &dialect)
}
