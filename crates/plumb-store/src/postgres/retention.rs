//! Retention on PostgreSQL: every query of
//! [`RetentionStore`](crate::RetentionStore). A batch is one transaction
//! whose runs are locked `SKIP LOCKED`: two processes purging at once take
//! different runs, and a run being read or written is left for later.

use async_trait::async_trait;

use super::{PgStore, map_err, sql};
use crate::{Millis, PurgeScope, Purged, RetentionStore, StoreError, StoreSize, now_ms};

/// Ended runs.
const ENDED: &str = "status IN ('succeeded', 'failed', 'cancelled') AND finished_at IS NOT NULL";

/// The scope as SQL over `runs`: the workflow is bound as `$1`, the names
/// to leave out as `$2`; both are typed in the text, since PostgreSQL
/// refuses a parameter whose type it cannot infer.
fn scope_sql(scope: &PurgeScope) -> &'static str {
    match scope {
        PurgeScope::Workflow(_) => "workflow = $1::text AND $2::text[] IS NOT NULL",
        PurgeScope::Others(_) => "$1::text IS NOT NULL AND workflow <> ALL($2::text[])",
    }
}

#[async_trait]
impl RetentionStore for PgStore {
    async fn purge(
        &self,
        scope: &PurgeScope,
        runs_before: Millis,
        payloads_before: Millis,
        limit: u32,
    ) -> Result<Purged, StoreError> {
        let (name, others) = match scope {
            PurgeScope::Workflow(name) => (name.clone(), Vec::new()),
            PurgeScope::Others(names) => (String::new(), names.clone()),
        };
        let of_scope = scope_sql(scope);
        let mut tx = self.begin().await?;
        let old: Vec<String> = sqlx::query_scalar(sql(format!(
            "SELECT id FROM runs WHERE {of_scope} AND {ENDED} AND finished_at < $3 \
             ORDER BY finished_at LIMIT $4 FOR UPDATE SKIP LOCKED"
        )))
        .bind(&name)
        .bind(&others)
        .bind(runs_before)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        if !old.is_empty() {
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
        }
        let blank: Vec<String> = sqlx::query_scalar(sql(format!(
            "SELECT id FROM runs WHERE {of_scope} AND {ENDED} AND status <> 'failed' \
             AND payloads_purged_at IS NULL AND finished_at < $3 \
             ORDER BY finished_at LIMIT $4 FOR UPDATE SKIP LOCKED"
        )))
        .bind(&name)
        .bind(&others)
        .bind(payloads_before)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        if !blank.is_empty() {
            sqlx::query("UPDATE steps SET output = NULL, state = NULL WHERE run_id = ANY($1)")
                .bind(&blank)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            sqlx::query(
                "UPDATE runs SET trigger_payload = 'null', payloads_purged_at = $2 \
                 WHERE id = ANY($1)",
            )
            .bind(&blank)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(Purged {
            runs: old.len() as u64,
            payloads: blank.len() as u64,
        })
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
