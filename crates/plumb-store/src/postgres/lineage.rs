//! Record lineage on PostgreSQL: every query of
//! [`LineageStore`](crate::LineageStore).

use async_trait::async_trait;
use sqlx::Row;

use super::{PgStore, map_err};
use crate::lineage::{self, COLUMNS, LineageEntry};
use crate::{LineageStore, StoreError};

fn entry(row: &sqlx::postgres::PgRow) -> Result<LineageEntry, sqlx::Error> {
    let small = |v: Option<i64>| v.and_then(|n| u32::try_from(n).ok());
    Ok(LineageEntry {
        id: row.try_get(0)?,
        record_key: row.try_get(1)?,
        workflow: row.try_get(2)?,
        run_id: row.try_get(3)?,
        step_id: row.try_get(4)?,
        item: small(row.try_get(5)?),
        event: row.try_get(6)?,
        attempt: small(row.try_get(7)?),
        idempotency_key: row.try_get(8)?,
        effect: row.try_get(9)?,
        detail: row.try_get(10)?,
        at: row.try_get(11)?,
    })
}

#[async_trait]
impl LineageStore for PgStore {
    async fn record_lineage(&self, entries: &[LineageEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        lineage::check(entries)?;
        let mut tx = self.begin().await?;
        // An event of a run that is gone (purged meanwhile) is skipped, and
        // so are dedupe hits past the cap of one run.
        let sql = format!(
            "INSERT INTO lineage ({COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
             WHERE EXISTS (SELECT 1 FROM runs WHERE id = $4) AND ($7 <> 'dedupe_hit' OR \
             (SELECT count(*) FROM lineage WHERE run_id = $4 AND event = 'dedupe_hit') < {}) \
             ON CONFLICT (id) DO NOTHING",
            lineage::MAX_DEDUPE_HITS
        );
        for e in entries {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(&e.id)
                .bind(&e.record_key)
                .bind(&e.workflow)
                .bind(&e.run_id)
                .bind(&e.step_id)
                .bind(e.item.map(i64::from))
                .bind(&e.event)
                .bind(e.attempt.map(i64::from))
                .bind(&e.idempotency_key)
                .bind(&e.effect)
                .bind(&e.detail)
                .bind(e.at)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn trace(
        &self,
        record_key: &str,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageEntry>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM lineage WHERE record_key = $1 \
             AND ($2::text IS NULL OR workflow = $2) ORDER BY at DESC, id DESC LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(record_key)
            .bind(workflow)
            .bind(i64::from(limit.min(lineage::MAX_TRACE)))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut entries = rows
            .iter()
            .map(entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err)?;
        entries.reverse();
        Ok(entries)
    }
}
