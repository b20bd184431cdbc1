//! Reading a whole SQLite store for `plumb store copy`: every table of
//! [`crate::copy::TABLES`], in rowid order, a batch at a time.

use async_trait::async_trait;
use rusqlite::types::Value;

use super::{SqliteStore, map_err};
use crate::StoreError;
use crate::copy::{Cell, CopySource, Kind, Table};

/// Most bytes of values a batch carries (at least one row).
const BATCH_BYTES: usize = 8 * 1024 * 1024;

#[async_trait]
impl CopySource for SqliteStore {
    async fn read_rows(
        &self,
        table: &'static Table,
        after: Option<Vec<Cell>>,
        limit: u32,
    ) -> Result<Vec<Vec<Cell>>, StoreError> {
        self.read(move |conn| {
            // The table and column names are the constants of `TABLES`,
            // never input; the key values are bound.
            let key = table.key.join(", ");
            let marks = vec!["?"; table.key.len()].join(", ");
            let sql = match &after {
                None => format!(
                    "SELECT {} FROM {} ORDER BY {key} LIMIT {limit}",
                    table.column_list(),
                    table.name
                ),
                Some(_) => format!(
                    "SELECT {} FROM {} WHERE ({key}) > ({marks}) ORDER BY {key} LIMIT {limit}",
                    table.column_list(),
                    table.name
                ),
            };
            let values: Vec<Value> = after.unwrap_or_default().into_iter().map(value).collect();
            let mut rows = Vec::new();
            // Journal rows can be megabytes each: a batch also ends once it
            // holds this much, so a copy's memory stays small.
            let mut bytes = 0_usize;
            let mut st = conn.prepare(&sql).map_err(map_err)?;
            let mut found = st
                .query(rusqlite::params_from_iter(values))
                .map_err(map_err)?;
            while let Some(row) = found.next().map_err(map_err)? {
                let mut cells = Vec::with_capacity(table.columns.len());
                for (i, (_, kind)) in table.columns.iter().enumerate() {
                    let c = cell(row, i, *kind).map_err(map_err)?;
                    bytes += match &c {
                        Cell::Text(s) => s.len(),
                        Cell::Bytes(b) => b.len(),
                        _ => 8,
                    };
                    cells.push(c);
                }
                rows.push(cells);
                if bytes >= BATCH_BYTES {
                    break;
                }
            }
            Ok(rows)
        })
        .await
    }
}

/// A key cell as a SQLite value.
fn value(cell: Cell) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Int(v) => Value::Integer(v),
        Cell::Text(v) => Value::Text(v),
        Cell::Bool(v) => Value::Integer(i64::from(v)),
        Cell::Bytes(v) => Value::Blob(v),
    }
}

fn cell(row: &rusqlite::Row<'_>, i: usize, kind: Kind) -> rusqlite::Result<Cell> {
    Ok(match kind {
        Kind::Int => row.get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Int),
        Kind::Text => row
            .get::<_, Option<String>>(i)?
            .map_or(Cell::Null, Cell::Text),
        Kind::Bool => row
            .get::<_, Option<i64>>(i)?
            .map_or(Cell::Null, |v| Cell::Bool(v != 0)),
        Kind::Bytes => row
            .get::<_, Option<Vec<u8>>>(i)?
            .map_or(Cell::Null, Cell::Bytes),
    })
}

#[cfg(test)]
mod tests {
    use crate::copy::{NOT_COPIED, TABLES};

    /// A feature that adds a table must add it to the copy (or say why
    /// not): the list is checked against the schema every store gets.
    #[tokio::test]
    async fn every_table_of_the_schema_is_copied_with_every_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::SqliteStore::open(
            &dir.path().join("plumb.db"),
            super::super::Synchronous::Full,
        )
        .await
        .expect("open");
        let schema: Vec<(String, Vec<String>, Vec<String>)> = store
            .read(|conn| {
                let names: Vec<String> = conn
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
                    .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                    .map_err(super::map_err)?;
                let mut out = Vec::new();
                for name in names {
                    let cols: Vec<String> = conn
                        .prepare(&format!("SELECT name FROM pragma_table_info('{name}') ORDER BY cid"))
                        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                        .map_err(super::map_err)?;
                    let key: Vec<String> = conn
                        .prepare(&format!("SELECT name FROM pragma_table_info('{name}') WHERE pk > 0 ORDER BY pk"))
                        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                        .map_err(super::map_err)?;
                    out.push((name, cols, key));
                }
                Ok(out)
            })
            .await
            .expect("schema");
        for (name, cols, key) in &schema {
            if NOT_COPIED.contains(&name.as_str()) {
                continue;
            }
            let table = TABLES
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("table `{name}` is not in copy::TABLES"));
            let listed: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
            assert_eq!(listed, *cols, "the columns of `{name}`");
            assert_eq!(table.key, key.as_slice(), "the primary key of `{name}`");
        }
        assert_eq!(
            TABLES.len() + NOT_COPIED.len(),
            schema.len(),
            "copy::TABLES names a table the schema does not have"
        );
    }
}
