//! Poll triggers on PostgreSQL: every query of
//! [`PollStore`](crate::PollStore). The claim is one conditional `UPDATE`
//! (the row lock decides between processes); a commit locks the poll's row
//! first and checks it still holds the lease.

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::runs::insert_run;
use super::{PgStore, map_err};
use crate::json::to_json_text;
use crate::polls::{PollClaim, PollCommit, PollCommitted, PollState, poll_alert_subject};
use crate::writes::NewRunRow;
use crate::{Millis, NewAlert, PollStore, StoreError, now_ms};

async fn held(conn: &mut PgConnection, workflow: &str, owner: &str) -> Result<(), StoreError> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM polls WHERE workflow = $1 AND owner = $2 FOR UPDATE")
            .bind(workflow)
            .bind(owner)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::LeaseLost {
            run_id: poll_alert_subject(workflow),
        }),
    }
}

#[async_trait]
impl PollStore for PgStore {
    async fn claim_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<PollClaim>, StoreError> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO polls (workflow, next_poll_at) VALUES ($1, $2) \
             ON CONFLICT (workflow) DO NOTHING",
        )
        .bind(workflow)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let failures: Option<i64> = sqlx::query_scalar(
            "UPDATE polls SET owner = $2, lease_until = $3 WHERE workflow = $1 \
             AND next_poll_at <= $4 AND (owner IS NULL OR lease_until < $4) RETURNING failures",
        )
        .bind(workflow)
        .bind(owner)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(failures) = failures else {
            tx.commit().await.map_err(map_err)?;
            return Ok(None);
        };
        let cursor = super::cursors::current(&mut tx, workflow).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(PollClaim {
            cursor: cursor
                .as_ref()
                .map_or(serde_json::Value::Null, |c| c.value.clone()),
            cursor_version: cursor.map_or(0, |c| c.version),
            failures: u32::try_from(failures).unwrap_or(u32::MAX),
        }))
    }

    async fn renew_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        let rows =
            sqlx::query("UPDATE polls SET lease_until = $3 WHERE workflow = $1 AND owner = $2")
                .bind(workflow)
                .bind(owner)
                .bind(now_ms() + lease_ms)
                .execute(&self.pool)
                .await
                .map_err(map_err)?
                .rows_affected();
        Ok(rows == 1)
    }

    async fn seen_keys(&self, workflow: &str, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT key FROM dedupe_keys WHERE workflow = $1 AND expires_at > $2 AND key = ANY($3)",
        )
        .bind(workflow)
        .bind(now_ms())
        .bind(keys)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let found: std::collections::HashSet<String> = found.into_iter().collect();
        Ok(keys.iter().map(|k| found.contains(k)).collect())
    }

    async fn commit_poll(&self, c: &PollCommit) -> Result<PollCommitted, StoreError> {
        let rows = c
            .runs
            .iter()
            .map(NewRunRow::new)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.begin().await?;
        held(&mut tx, &c.workflow, &c.owner).await?;
        // The cursor first: if it moved meanwhile, nothing is committed.
        if let Some((from, value)) = &c.cursor
            && super::cursors::compare_and_set(&mut tx, &c.workflow, *from, value, "poll")
                .await?
                .is_none()
        {
            // Released, and due at once: the next poll reads the new cursor.
            sqlx::query("UPDATE polls SET owner = NULL, lease_until = NULL WHERE workflow = $1")
                .bind(&c.workflow)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            return Ok(PollCommitted::CursorMoved);
        }
        let now = now_ms();
        for (i, (run, row)) in c.runs.iter().zip(&rows).enumerate() {
            // One notification is enough for the whole poll.
            insert_run(&mut tx, run, row, self.notify && i == 0).await?;
        }
        for (key, index) in &c.seen {
            let Some(run) = c.runs.get(*index) else {
                continue;
            };
            sqlx::query(
                "INSERT INTO dedupe_keys (workflow, key, run_id, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workflow, key) DO UPDATE SET \
                 run_id = excluded.run_id, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at",
            )
            .bind(&c.workflow)
            .bind(key)
            .bind(&run.id)
            .bind(now)
            .bind(c.seen_until)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        let new_item_at = (!c.runs.is_empty()).then_some(now);
        sqlx::query(
            "UPDATE polls SET owner = NULL, lease_until = NULL, last_poll_at = $2, \
             last_success_at = $2, last_new_item_at = coalesce($3, last_new_item_at), \
             last_error = NULL, failures = 0, next_poll_at = $4 WHERE workflow = $1",
        )
        .bind(&c.workflow)
        .bind(now)
        .bind(new_item_at)
        .bind(c.next_poll_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(PollCommitted::Committed)
    }

    async fn fail_poll(
        &self,
        workflow: &str,
        owner: &str,
        error: &str,
        next_poll_at: Millis,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        let payloads = alerts
            .iter()
            .map(|a| to_json_text(&a.payload, "an alert"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.begin().await?;
        held(&mut tx, workflow, owner).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE polls SET owner = NULL, lease_until = NULL, last_poll_at = $2, \
             last_error = $3, failures = failures + 1, next_poll_at = $4 WHERE workflow = $1",
        )
        .bind(workflow)
        .bind(now)
        .bind(error.replace('\0', ""))
        .bind(next_poll_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        for (alert, payload) in alerts.iter().zip(payloads) {
            sqlx::query(
                "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
                 next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
            )
            .bind(&alert.id)
            .bind(poll_alert_subject(workflow))
            .bind(workflow)
            .bind(&alert.channel)
            .bind(payload)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn poll_states(&self) -> Result<Vec<PollState>, StoreError> {
        let rows = sqlx::query(
            "SELECT workflow, next_poll_at, last_poll_at, last_success_at, last_new_item_at, \
             last_error, failures, owner FROM polls ORDER BY workflow",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(PollState {
                    workflow: r.try_get("workflow").map_err(map_err)?,
                    next_poll_at: r.try_get("next_poll_at").map_err(map_err)?,
                    last_poll_at: r.try_get("last_poll_at").map_err(map_err)?,
                    last_success_at: r.try_get("last_success_at").map_err(map_err)?,
                    last_new_item_at: r.try_get("last_new_item_at").map_err(map_err)?,
                    last_error: r.try_get("last_error").map_err(map_err)?,
                    failures: u32::try_from(r.try_get::<i64, _>("failures").map_err(map_err)?)
                        .unwrap_or(u32::MAX),
                    owner: r.try_get("owner").map_err(map_err)?,
                })
            })
            .collect()
    }
}
