//! Retention on PostgreSQL: every query of
//! [`RetentionStore`](crate::RetentionStore). A batch is one transaction
//! whose runs are locked `SKIP LOCKED`: two processes purging at once take
//! different runs, and a run being read or written is left for later.

use async_trait::async_trait;
use sqlx::PgConnection;

use super::{PgStore, map_err};
use crate::retention::{BLANK, ENDED};
use crate::{
    Millis, PurgePosition, PurgeScope, Purged, RetentionStore, StoreError, StoreSize, now_ms, rows,
};

#[async_trait]
impl RetentionStore for PgStore {
    async fn purge(
        &self,
        scope: &PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
        position: &mut PurgePosition,
    ) -> Result<Purged, StoreError> {
        let mut tx = self.begin().await?;
        // Moved on only once the batch commits: a batch rolled back leaves
        // its runs where the next one looks.
        let mut moved = position.clone();
        let stored: Vec<String> = match scope {
            PurgeScope::Workflow(_) => Vec::new(),
            PurgeScope::Others(_) => sqlx::query_scalar(rows::STORED_WORKFLOWS)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?,
        };
        let mut done = Purged::default();
        for workflow in rows::purge_workflows(scope, stored) {
            let left = u64::from(limit).saturating_sub(done.runs);
            if left > 0 {
                done.runs += delete_old(&mut tx, &workflow, runs_before, left, &mut moved).await?;
            }
            let left = u64::from(limit).saturating_sub(done.payloads);
            if left > 0 {
                done.payloads += blank_old(
                    &mut tx,
                    &workflow,
                    runs_before,
                    payloads_before,
                    left,
                    &mut moved,
                )
                .await?;
            }
            if done.runs >= u64::from(limit) && done.payloads >= u64::from(limit) {
                break;
            }
        }
        tx.commit().await.map_err(map_err)?;
        *position = moved;
        Ok(done)
    }

    async fn purge_dedupe_keys(&self, now: Millis, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM dedupe_keys WHERE (workflow, key) IN (SELECT workflow, key \
             FROM dedupe_keys WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn store_size(&self) -> Result<StoreSize, StoreError> {
        // The tables of this store's schema, with their indexes and TOAST.
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let oldest: Option<Millis> = sqlx::query_scalar("SELECT min(created_at) FROM runs")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(StoreSize {
            bytes: bytes.and_then(|b| u64::try_from(b).ok()).unwrap_or(0),
            oldest_run_at: oldest,
        })
    }
}

/// Up to `$5` runs of workflow `$1` with ended status `$2` that ended from
/// `$3` to before `$4`, oldest first (one range of
/// `runs_by_workflow_status_finished`).
const DELETABLE: &str = "SELECT id, finished_at FROM runs WHERE workflow = $1 \
    AND status = $2 AND finished_at >= $3 AND finished_at < $4 \
    ORDER BY finished_at LIMIT $5 FOR UPDATE SKIP LOCKED";

/// Up to `$4` runs of workflow `$1` whose payloads may be blanked, ended
/// from `$2` to before `$3`, oldest first (through `runs_to_blank`).
const BLANKABLE: &str = "SELECT id, finished_at FROM runs WHERE workflow = $1 \
    AND payloads_purged_at IS NULL AND status IN ('succeeded', 'cancelled') \
    AND finished_at >= $2 AND finished_at < $3 \
    ORDER BY finished_at LIMIT $4 FOR UPDATE SKIP LOCKED";

/// The ids of `found` (id, finished_at), with `lane` of `workflow` in
/// `position` moved to the last one.
fn taken(
    found: Vec<(String, Millis)>,
    position: &mut PurgePosition,
    workflow: &str,
    lane: &'static str,
) -> Vec<String> {
    if let Some((_, last)) = found.last() {
        position.advance(workflow, lane, *last);
    }
    found.into_iter().map(|(id, _)| id).collect()
}

fn limit_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Deletes up to `limit` runs of `workflow` that ended before `before`,
/// with everything that hangs off them (locked `SKIP LOCKED`: a run being
/// read or written, or taken by another purger, is left for later).
async fn delete_old(
    tx: &mut PgConnection,
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
        let found = sqlx::query_as(DELETABLE)
            .bind(workflow)
            .bind(status)
            .bind(position.from(workflow, status))
            .bind(before)
            .bind(limit_of(left))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        old.extend(taken(found, position, workflow, status));
    }
    if old.is_empty() {
        return Ok(0);
    }
    // The journal and attempts go with the run (ON DELETE CASCADE).
    for statement in [
        "DELETE FROM alerts WHERE run_id = ANY($1)",
        "UPDATE schedule_fires SET run_id = NULL WHERE run_id = ANY($1)",
        "DELETE FROM runs WHERE id = ANY($1)",
    ] {
        sqlx::query(statement)
            .bind(&old)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    Ok(old.len() as u64)
}

/// Blanks the payloads of up to `limit` succeeded or cancelled runs of
/// `workflow` that ended before `before` (dead letters keep theirs for a
/// replay), through `runs_to_blank`, which holds only runs not yet blanked.
async fn blank_old(
    tx: &mut PgConnection,
    workflow: &str,
    deleted_before: Millis,
    before: Millis,
    limit: u64,
    position: &mut PurgePosition,
) -> Result<u64, StoreError> {
    // What ended before `deleted_before` is deleted by this purge anyway:
    // blanking it first would write every old run twice.
    let found = sqlx::query_as(BLANKABLE)
        .bind(workflow)
        .bind(position.from(workflow, BLANK).max(deleted_before))
        .bind(before)
        .bind(limit_of(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
    let blank = taken(found, position, workflow, BLANK);
    if blank.is_empty() {
        return Ok(0);
    }
    sqlx::query("UPDATE steps SET output = NULL, state = NULL WHERE run_id = ANY($1)")
        .bind(&blank)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    sqlx::query(
        "UPDATE runs SET trigger_payload = 'null', payloads_purged_at = $2 WHERE id = ANY($1)",
    )
    .bind(&blank)
    .bind(now_ms())
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    Ok(blank.len() as u64)
}
