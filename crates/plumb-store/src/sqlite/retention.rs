//! Retention on SQLite: every query of
//! [`RetentionStore`](crate::RetentionStore). A batch is one write of the
//! writer thread, so it commits with whatever else is waiting and never
//! holds the store for long.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{Done, Op, SqliteStore, map_err};
use crate::{Millis, PurgeScope, Purged, RetentionStore, StoreError, StoreSize, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Purge {
        scope: PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Retention(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Purge {
            scope,
            runs_before,
            payloads_before,
            limit,
        } => purge(tx, scope, *runs_before, *payloads_before, *limit).map(Done::Purged),
    }
}

/// The scope as SQL over `runs`, and its one parameter: a workflow name,
/// or the names to leave out as a JSON array. Never a fallback that would
/// widen the scope: an empty list would purge every workflow's runs under
/// the defaults.
fn scope_sql(scope: &PurgeScope) -> Result<(&'static str, String), StoreError> {
    Ok(match scope {
        PurgeScope::Workflow(name) => ("workflow = ?1", name.clone()),
        PurgeScope::Others(names) => (
            "workflow NOT IN (SELECT value FROM json_each(?1))",
            serde_json::to_string(names).map_err(|e| StoreError::Other(e.to_string()))?,
        ),
    })
}

fn purge(
    tx: &Transaction<'_>,
    scope: &PurgeScope,
    runs_before: Millis,
    payloads_before: Millis,
    limit: u32,
) -> Result<Purged, StoreError> {
    let (of_scope, param) = scope_sql(scope)?;
    let ended = "status IN ('succeeded', 'failed', 'cancelled') AND finished_at IS NOT NULL";
    let old: Vec<String> = tx
        .prepare_cached(&format!(
            "SELECT id FROM runs WHERE {of_scope} AND {ended} AND finished_at < ?2 \
             ORDER BY finished_at LIMIT ?3"
        ))
        .and_then(|mut st| {
            st.query_map(params![param, runs_before, i64::from(limit)], |r| r.get(0))?
                .collect()
        })
        .map_err(map_err)?;
    let ids = serde_json::to_string(&old).map_err(|e| StoreError::Other(e.to_string()))?;
    if !old.is_empty() {
        // The journal and attempts go with the run (ON DELETE CASCADE).
        for sql in [
            "DELETE FROM alerts WHERE run_id IN (SELECT value FROM json_each(?1))",
            "UPDATE schedule_fires SET run_id = NULL WHERE run_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?1))",
        ] {
            tx.prepare_cached(sql)
                .and_then(|mut st| st.execute(params![ids]))
                .map_err(map_err)?;
        }
    }
    let blank: Vec<String> = tx
        .prepare_cached(&format!(
            "SELECT id FROM runs WHERE {of_scope} AND {ended} AND status <> 'failed' \
             AND payloads_purged_at IS NULL AND finished_at < ?2 ORDER BY finished_at LIMIT ?3"
        ))
        .and_then(|mut st| {
            st.query_map(params![param, payloads_before, i64::from(limit)], |r| {
                r.get(0)
            })?
            .collect()
        })
        .map_err(map_err)?;
    if !blank.is_empty() {
        let ids = serde_json::to_string(&blank).map_err(|e| StoreError::Other(e.to_string()))?;
        tx.prepare_cached(
            "UPDATE steps SET output = NULL, state = NULL \
             WHERE run_id IN (SELECT value FROM json_each(?1))",
        )
        .and_then(|mut st| st.execute(params![ids]))
        .map_err(map_err)?;
        tx.prepare_cached(
            "UPDATE runs SET trigger_payload = 'null', payloads_purged_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .and_then(|mut st| st.execute(params![ids, now_ms()]))
        .map_err(map_err)?;
    }
    Ok(Purged {
        runs: old.len() as u64,
        payloads: blank.len() as u64,
    })
}

#[async_trait]
impl RetentionStore for SqliteStore {
    async fn purge(
        &self,
        scope: &PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
    ) -> Result<Purged, StoreError> {
        match self
            .write(Write::Purge {
                scope: scope.clone(),
                runs_before,
                payloads_before,
                limit,
            })
            .await?
        {
            Done::Purged(p) => Ok(p),
            other => Err(super::unexpected(&other)),
        }
    }

    async fn store_size(&self) -> Result<StoreSize, StoreError> {
        self.read(|conn| {
            let bytes: i64 = conn
                .query_row(
                    "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                    [],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            let oldest: Option<Millis> = conn
                .query_row("SELECT min(created_at) FROM runs", [], |r| r.get(0))
                .optional()
                .map_err(map_err)?
                .flatten();
            Ok(StoreSize {
                bytes: u64::try_from(bytes).unwrap_or(0),
                oldest_run_at: oldest,
            })
        })
        .await
    }
}
