//! `connections.<name>.mysql`: a MySQL or MariaDB database for `sql` steps.

use serde_json::Value;

use super::ConnectionKind;
use super::sql::Dialect;
use crate::load::Checker;
use crate::model::{Connection, SqlDriver};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "mysql",
    check,
};

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let dialect = Dialect {
        driver: SqlDriver::Mysql,
        title: "MySQL",
        schemes: &["mysql", "mariadb"],
        example: "mysql://USER@HOST:3306/DATABASE",
    };
    super::sql::check(cx, raw, path, &dialect)
}
