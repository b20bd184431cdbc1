//! Retention on SQLite: every query of
//! [`RetentionStore`](crate::RetentionStore). A batch is one write of the
//! writer thread, so it commits with whatever else is waiting and never
//! holds the store for long.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{Done, Op, SqliteStore, map_err};
use crate::retention::{BLANK, ENDED};
use crate::{
    Millis, PurgePosition, PurgeScope, Purged, RetentionStore, StoreError, StoreSize, now_ms, rows,
};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Purge {
        scope: PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
        position: PurgePosition,
    },
    PurgeDedupeKeys {
        now: Millis,
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
            position,
        } => {
            // Moved on only if the batch commits: the writer rolls back a
            // write that fails, and the caller keeps its old position.
            let mut moved = position.clone();
            purge(
                tx,
                scope,
                *runs_before,
                *payloads_before,
                *limit,
                &mut moved,
            )
            .map(|p| Done::Purged(p, moved))
        }
        Write::PurgeDedupeKeys { now, limit } => tx
            .prepare_cached(
                "DELETE FROM dedupe_keys WHERE (workflow, key) IN (SELECT workflow, key \
                 FROM dedupe_keys WHERE expires_at <= ?1 LIMIT ?2)",
            )
            .and_then(|mut st| st.execute(params![now, limit]))
            .map(Done::Rows)
            .map_err(map_err),
    }
}

fn purge(
    tx: &Transaction<'_>,
    scope: &PurgeScope,
    runs_before: Millis,
    payloads_before: Millis,
    limit: u32,
    position: &mut PurgePosition,
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
            done.runs += delete_old(tx, &workflow, runs_before, left, position)?;
        }
        let left = u64::from(limit).saturating_sub(done.payloads);
        if left > 0 {
            done.payloads +=
                blank_old(tx, &workflow, runs_before, payloads_before, left, position)?;
        }
        if done.runs >= u64::from(limit) && done.payloads >= u64::from(limit) {
            break;
        }
    }
    Ok(done)
}

/// The ids `lookup` finds with `params` (its last one the limit), with
/// `lane` of `workflow` in `position` moved to the last one (the lookups
/// return runs oldest first).
fn taken(
    tx: &Transaction<'_>,
    lookup: &str,
    params: &[&dyn rusqlite::ToSql],
    position: &mut PurgePosition,
    workflow: &str,
    lane: &'static str,
) -> Result<Vec<String>, StoreError> {
    let found: Vec<(String, Millis)> = tx
        .prepare_cached(lookup)
        .and_then(|mut st| {
            st.query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(map_err)?;
    if let Some((_, last)) = found.last() {
        position.advance(workflow, lane, *last);
    }
    Ok(found.into_iter().map(|(id, _)| id).collect())
}

fn limit_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Deletes up to `limit` runs of `workflow` that ended before `before`,
/// with everything that hangs off them. Walks
/// `runs_by_workflow_status_finished`: one range per ended status.
fn delete_old(
    tx: &Transaction<'_>,
    workflow: &str,
    before: Millis,
    limit: u64,
    position: &mut PurgePosition,
) -> Result<u64, StoreError> {
    let mut old = Vec::new();
    for status in ENDED {
        let left = limit.saturating_sub(old.len() as u64);
        if left == 0 {
            break;
        }
        let from = position.from(workflow, status);
        old.extend(taken(
            tx,
            DELETABLE,
            params![workflow, status, from, before, limit_of(left)],
            position,
            workflow,
            status,
        )?);
    }
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

/// Up to `?4` runs of workflow `?1` whose payloads may be blanked, ended
/// from `?2` to before `?3`, oldest first. The index is named: left to
/// itself SQLite walks `runs_by_workflow_status_finished`, through every
/// run already blanked.
const BLANKABLE: &str = "SELECT id, finished_at FROM runs INDEXED BY runs_to_blank \
    WHERE workflow = ?1 AND payloads_purged_at IS NULL \
    AND status IN ('succeeded', 'cancelled') AND finished_at >= ?2 AND finished_at < ?3 \
    ORDER BY finished_at LIMIT ?4";

/// Up to `?5` runs of workflow `?1` with ended status `?2` that ended from
/// `?3` to before `?4`, oldest first (one range of
/// `runs_by_workflow_status_finished`).
const DELETABLE: &str = "SELECT id, finished_at FROM runs WHERE workflow = ?1 \
    AND status = ?2 AND finished_at >= ?3 AND finished_at < ?4 \
    ORDER BY finished_at LIMIT ?5";

/// Blanks the payloads of up to `limit` succeeded or cancelled runs of
/// `workflow` that ended before `before` (dead letters keep theirs for a
/// replay). Walks `runs_to_blank`, which holds only runs not yet blanked.
fn blank_old(
    tx: &Transaction<'_>,
    workflow: &str,
    deleted_before: Millis,
    before: Millis,
    limit: u64,
    position: &mut PurgePosition,
) -> Result<u64, StoreError> {
    // What ended before `deleted_before` is deleted by this purge anyway:
    // blanking it first would write every old run twice.
    let from = position.from(workflow, BLANK).max(deleted_before);
    let blank = taken(
        tx,
        BLANKABLE,
        params![workflow, from, before, limit_of(limit)],
        position,
        workflow,
        BLANK,
    )?;
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
        position: &mut PurgePosition,
    ) -> Result<Purged, StoreError> {
        match self
            .write(Write::Purge {
                scope: scope.clone(),
                runs_before,
                payloads_before,
                limit,
                position: position.clone(),
            })
            .await?
        {
            Done::Purged(p, moved) => {
                *position = moved;
                Ok(p)
            }
            other => Err(super::unexpected(&other)),
        }
    }

    fn one_writer(&self) -> bool {
        true
    }

    async fn purge_dedupe_keys(&self, now: Millis, limit: u32) -> Result<u64, StoreError> {
        match self.write(Write::PurgeDedupeKeys { now, limit }).await? {
            Done::Rows(n) => Ok(n as u64),
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
    /// a range of an index from where the last batch ended, already in the
    /// order it is walked (no sort), never a walk of the history (the runs
    /// already blanked are most of a month's runs).
    #[tokio::test]
    async fn purge_lookups_are_index_ranges_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full)
            .await
            .expect("open");
        for (sql, index, params) in [
            (
                BLANKABLE,
                "INDEX runs_to_blank (workflow=? AND finished_at>? AND finished_at<?)",
                4,
            ),
            (
                DELETABLE,
                "INDEX runs_by_workflow_status_finished \
                 (workflow=? AND status=? AND finished_at>? AND finished_at<?)",
                5,
            ),
        ] {
            let plan: Vec<String> = store
                .read(move |conn| {
                    let values: Vec<rusqlite::types::Value> = (0..params)
                        .map(|i| match i {
                            0 => "w".to_owned().into(),
                            1 if params == 5 => "succeeded".to_owned().into(),
                            _ => 10_i64.into(),
                        })
                        .collect();
                    conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .and_then(|mut st| {
                            st.query_map(rusqlite::params_from_iter(values), |r| r.get(3))?
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
