//! Alerts on PostgreSQL: every query of [`AlertStore`](crate::AlertStore).

use async_trait::async_trait;

use super::{PgStore, fetch_all, map_err, no_nul, sql};
use crate::rows::{self, ALERT_COLUMNS};
use crate::writes::AlertUpdate;
use crate::{Alert, AlertAttempt, AlertStore, Millis, StoreError};

#[async_trait]
impl AlertStore for PgStore {
    async fn claim_alert(
        &self,
        id: &str,
        attempts: u32,
        now: Millis,
        until: Millis,
    ) -> Result<bool, StoreError> {
        let rows = sqlx::query(
            "UPDATE alerts SET next_attempt_at = $4 \
             WHERE id = $1 AND status = 'pending' AND attempts = $2 AND next_attempt_at <= $3",
        )
        .bind(id)
        .bind(i64::from(attempts))
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        Ok(rows == 1)
    }

    async fn due_alerts(&self, now: Millis, limit: u32) -> Result<Vec<Alert>, StoreError> {
        let query = sqlx::query(sql(format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE status = 'pending' \
             AND next_attempt_at <= $1 ORDER BY next_attempt_at, id LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(limit));
        fetch_all(query, &self.pool, rows::alert).await
    }

    async fn record_alert_attempt(
        &self,
        id: &str,
        attempts: u32,
        result: &AlertAttempt,
    ) -> Result<bool, StoreError> {
        let u = AlertUpdate::new(result);
        // Only the attempt the caller made may be recorded: a slower
        // deliverer reporting the same attempt finds `attempts` moved on.
        let rows = sqlx::query(
            "UPDATE alerts SET status = $2, attempts = attempts + 1, next_attempt_at = $3, \
             last_error = COALESCE($4, last_error), delivered_at = $5 \
             WHERE id = $1 AND status = 'pending' AND attempts = $6",
        )
        .bind(id)
        .bind(u.status.as_str())
        .bind(u.next_attempt_at)
        .bind(u.error.map(no_nul))
        .bind(u.delivered_at)
        .bind(i64::from(attempts))
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        Ok(rows == 1)
    }

    async fn undelivered_alerts(&self, limit: u32) -> Result<Vec<Alert>, StoreError> {
        let query = sqlx::query(sql(format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE status IN ('pending', 'failed') \
             ORDER BY created_at DESC, id DESC LIMIT $1"
        )))
        .bind(i64::from(limit));
        fetch_all(query, &self.pool, rows::alert).await
    }
}
