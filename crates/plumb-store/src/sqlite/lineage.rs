//! Record lineage on SQLite: every query of
//! [`LineageStore`](crate::LineageStore).

use async_trait::async_trait;
use rusqlite::{Transaction, params};

use super::{Done, Op, SqliteStore, map_err, unexpected};
use crate::lineage::{self, COLUMNS, LineageEntry};
use crate::{LineageStore, StoreError};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Record(Vec<LineageEntry>),
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Lineage(w)
    }
}

/// Performs one write inside the writer's open transaction. An event of a
/// run that is gone (purged meanwhile) is skipped, and so are dedupe hits
/// past [`lineage::MAX_DEDUPE_HITS`] of one run.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    let Write::Record(entries) = op;
    let mut st = tx
        .prepare_cached(&format!(
            "INSERT INTO lineage ({COLUMNS}) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 \
             WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?4) AND (?7 <> 'dedupe_hit' OR \
             (SELECT count(*) FROM lineage WHERE run_id = ?4 AND event = 'dedupe_hit') < {}) \
             ON CONFLICT (id) DO NOTHING",
            lineage::MAX_DEDUPE_HITS
        ))
        .map_err(map_err)?;
    for e in entries {
        st.execute(params![
            e.id,
            e.record_key,
            e.workflow,
            e.run_id,
            e.step_id,
            e.item,
            e.event,
            e.attempt,
            e.idempotency_key,
            e.effect,
            e.detail,
            e.at
        ])
        .map_err(map_err)?;
    }
    Ok(Done::Unit)
}

fn entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<LineageEntry> {
    Ok(LineageEntry {
        id: row.get(0)?,
        record_key: row.get(1)?,
        workflow: row.get(2)?,
        run_id: row.get(3)?,
        step_id: row.get(4)?,
        item: row.get(5)?,
        event: row.get(6)?,
        attempt: row.get(7)?,
        idempotency_key: row.get(8)?,
        effect: row.get(9)?,
        detail: row.get(10)?,
        at: row.get(11)?,
    })
}

#[async_trait]
impl LineageStore for SqliteStore {
    async fn record_lineage(&self, entries: &[LineageEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        lineage::check(entries)?;
        match self.write(Write::Record(entries.to_vec())).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn trace(
        &self,
        record_key: &str,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<LineageEntry>, StoreError> {
        let (key, workflow) = (record_key.to_owned(), workflow.map(str::to_owned));
        let limit = limit.min(lineage::MAX_TRACE);
        self.read(move |conn| {
            let mut rows: Vec<LineageEntry> = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM lineage WHERE record_key = ?1 \
                     AND (?2 IS NULL OR workflow = ?2) ORDER BY at DESC, id DESC LIMIT ?3"
                ))
                .and_then(|mut st| {
                    st.query_map(params![key, workflow, limit], entry)?
                        .collect()
                })
                .map_err(map_err)?;
            rows.reverse();
            Ok(rows)
        })
        .await
    }
}
