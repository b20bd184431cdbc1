//! Retention on SQLite: every query of
//! [`RetentionStore`](crate::RetentionStore). A batch is one write of the
//! writer thread, so it commits with whatever else is waiting and never
//! holds the store for long.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{Done, Op, SqliteStore, map_err};
use crate::{Millis, PurgeScope, Purged, RetentionStore, StoreError, StoreSize, now_ms, rows};

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

fn purge(
    tx: &Transaction<'_>,
    scope: &PurgeScope,
    runs_before: Millis,
    payloads_before: Millis,
    limit: u32,
) -> Result<Purged, StoreError> {
    let stored = match scope {
        PurgeScope::Workflow(_) => Vec::new(),
        PurgeScope::Others(_) => tx
            .prepare_cached(rows::STORED_WORKFLOWS)
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(map_err)?,
    };
    let mut done = Purged::default();
    for workflow in rows::purge_workflows(scope, stored) {
        let left = u64::from(limit).saturating_sub(done.runs);
        if left > 0 {
            done.runs += delete_old(tx, &workflow, runs_before, left)?;
        }
        let left = u64::from(limit).saturating_sub(done.payloads);
        if left > 0 {
            done.payloads += blank_old(tx, &workflow, payloads_before, left)?;
        }
        if done.runs >= u64::from(limit) && done.payloads >= u64::from(limit) {
            break;
        }
    }
    Ok(done)
}

/// The ids a purge lookup (`DELETABLE`, `BLANKABLE`) finds.
fn ids_of(
    tx: &Transaction<'_>,
    lookup: &str,
    workflow: &str,
    before: Millis,
    limit: u64,
) -> Result<Vec<String>, StoreError> {
    tx.prepare_cached(lookup)
        .and_then(|mut st| {
            st.query_map(
                params![workflow, before, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| r.get(0),
            )?
            .collect()
        })
        .map_err(map_err)
}

/// Deletes up to `limit` runs of `workflow` that ended before `before`,
/// with everything that hangs off them. Walks
/// `runs_by_workflow_status_finished`: one range per ended status.
fn delete_old(
    tx: &Transaction<'_>,
    workflow: &str,
    before: Millis,
    limit: u64,
) -> Result<u64, StoreError> {
    let old = ids_of(tx, DELETABLE, workflow, before, limit)?;
    if old.is_empty() {
        return Ok(0);
    }
    let ids = serde_json::to_string(&old).map_err(|e| StoreError::Other(e.to_string()))?;
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
    Ok(old.len() as u64)
}

/// Up to `?3` runs of workflow `?1` whose payloads may be blanked, ended
/// before `?2`. The index is named: left to itself SQLite walks
/// `runs_by_workflow_status_finished`, through every run already blanked.
const BLANKABLE: &str = "SELECT id FROM runs INDEXED BY runs_to_blank \
    WHERE workflow = ?1 AND payloads_purged_at IS NULL \
    AND status IN ('succeeded', 'cancelled') AND finished_at < ?2 LIMIT ?3";

/// Up to `?3` runs of workflow `?1` that ended before `?2`.
const DELETABLE: &str = "SELECT id FROM runs WHERE workflow = ?1 \
    AND status IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?2 LIMIT ?3";

/// Blanks the payloads of up to `limit` succeeded or cancelled runs of
/// `workflow` that ended before `before` (dead letters keep theirs for a
/// replay). Walks `runs_to_blank`, which holds only runs not yet blanked.
fn blank_old(
    tx: &Transaction<'_>,
    workflow: &str,
    before: Millis,
    limit: u64,
) -> Result<u64, StoreError> {
    let blank = ids_of(tx, BLANKABLE, workflow, before, limit)?;
    if blank.is_empty() {
        return Ok(0);
    }
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
    Ok(blank.len() as u64)
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

#[cfg(test)]
mod tests {
    use super::{BLANKABLE, DELETABLE};
    use crate::{SqliteStore, Synchronous};

    /// A purge batch reads only what it removes or blanks: each lookup is
    /// a range of an index, never a walk of the history (the runs already
    /// blanked are most of a month's runs).
    #[tokio::test]
    async fn purge_lookups_are_index_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full)
            .await
            .expect("open");
        for (sql, index) in [
            (
                BLANKABLE,
                "INDEX runs_to_blank (workflow=? AND finished_at<?)",
            ),
            (
                DELETABLE,
                "INDEX runs_by_workflow_status_finished (workflow=? AND status=? AND finished_at<?)",
            ),
        ] {
            let plan: Vec<String> = store
                .read(move |conn| {
                    conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .and_then(|mut st| {
                            st.query_map(rusqlite::params!["w", 1, 10], |r| r.get(3))?
                                .collect()
                        })
                        .map_err(super::map_err)
                })
                .await
                .expect("plan");
            assert_eq!(plan, vec![format!("SEARCH runs USING {index}")], "{sql}");
        }
    }
}
