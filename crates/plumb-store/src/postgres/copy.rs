//! Writing a whole store into PostgreSQL for `plumb store copy`: every
//! table of [`crate::copy::TABLES`] in one transaction, so the target holds
//! all of the source or, after any error, nothing.

use async_trait::async_trait;
use sqlx::Row;

use super::{PgStore, map_err, sql};
use crate::StoreError;
use crate::copy::{BATCH, Cell, Copied, CopySource, CopyTarget, Kind, TABLES, Table};

#[async_trait]
impl CopyTarget for PgStore {
    async fn copy_from(&self, source: &dyn CopySource) -> Result<Vec<Copied>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // No process may write the target while it fills (a `plumb serve`
        // started on it too early): the copy waits for them, and they for it.
        sqlx::raw_sql("LOCK TABLE runs, secrets, api_tokens, audit_log IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let held: i64 = sqlx::query(
            "SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM secrets) \
             + (SELECT count(*) FROM api_tokens) + (SELECT count(*) FROM audit_log)",
        )
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(map_err)?;
        if held > 0 {
            return Err(StoreError::Rejected(
                "the target store already holds runs, secrets, tokens or audit entries; \
                 copy into a new, empty database"
                    .into(),
            ));
        }
        let mut copied = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            if table.singleton {
                sqlx::query(sql(format!("DELETE FROM {}", table.name)))
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            let mut after = None;
            let mut rows = 0_u64;
            loop {
                let batch = source.read_rows(table, after, BATCH).await?;
                let Some(last) = batch.last() else {
                    break;
                };
                after = Some(table.key_of(last));
                rows += batch.len() as u64;
                insert(&mut tx, table, batch).await?;
            }
            copied.push(Copied {
                table: table.name,
                rows,
            });
        }
        tx.commit().await.map_err(map_err)?;
        Ok(copied)
    }
}

/// One multi-row INSERT of `rows` into `table`.
async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    table: &'static Table,
    rows: Vec<Vec<Cell>>,
) -> Result<(), StoreError> {
    let width = table.columns.len();
    let mut values = Vec::with_capacity(rows.len());
    for r in 0..rows.len() {
        let params: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
        values.push(format!("({})", params.join(", ")));
    }
    // Names are the constants of `TABLES`; every value is bound.
    let text = format!(
        "INSERT INTO {} ({}) VALUES {}",
        table.name,
        table.column_list(),
        values.join(", ")
    );
    let mut query = sqlx::query(sql(text));
    for row in rows {
        if row.len() != width {
            return Err(StoreError::Corrupt(format!(
                "a row of `{}` has {} values for {width} columns",
                table.name,
                row.len()
            )));
        }
        for ((column, kind), cell) in table.columns.iter().zip(row) {
            query = match (kind, cell) {
                (Kind::Int, Cell::Int(v)) => query.bind(Some(v)),
                (Kind::Int, Cell::Null) => query.bind(None::<i64>),
                (Kind::Text, Cell::Text(v)) => query.bind(Some(v)),
                (Kind::Text, Cell::Null) => query.bind(None::<String>),
                (Kind::Bool, Cell::Bool(v)) => query.bind(Some(v)),
                (Kind::Bool, Cell::Null) => query.bind(None::<bool>),
                (Kind::Bytes, Cell::Bytes(v)) => query.bind(Some(v)),
                (Kind::Bytes, Cell::Null) => query.bind(None::<Vec<u8>>),
                (kind, cell) => {
                    return Err(StoreError::Corrupt(format!(
                        "`{}.{column}` holds {cell:?} where {kind:?} was expected",
                        table.name
                    )));
                }
            };
        }
    }
    query.execute(&mut **tx).await.map_err(map_err)?;
    Ok(())
}
