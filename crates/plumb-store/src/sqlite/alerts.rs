//! Alerts on SQLite: every query of [`AlertStore`](crate::AlertStore).

use async_trait::async_trait;
use rusqlite::{Row, Transaction, params};
use serde_json::Value;

use super::{Done, Op, SqliteStore, json_col, map_err, opt_u32, parse_col, query_all, unexpected};
use crate::{Alert, AlertAttempt, AlertStatus, AlertStore, Millis, StoreError, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    AlertAttempt {
        id: String,
        attempts: u32,
        result: AlertAttempt,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Alerts(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::AlertAttempt {
            id,
            attempts,
            result,
        } => {
            let now = now_ms();
            let (status, next, error, delivered) = match result {
                AlertAttempt::Delivered => (AlertStatus::Delivered, now, None, Some(now)),
                AlertAttempt::RetryAt { error, at } => {
                    (AlertStatus::Pending, *at, Some(error.as_str()), None)
                }
                AlertAttempt::GaveUp { error } => {
                    (AlertStatus::Failed, now, Some(error.as_str()), None)
                }
            };
            tx.prepare_cached(
                "UPDATE alerts SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3, \
                 last_error = COALESCE(?4, last_error), delivered_at = ?5 \
                 WHERE id = ?1 AND status = 'pending' AND attempts = ?6",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    status.as_str(),
                    next,
                    error,
                    delivered,
                    i64::from(*attempts)
                ])
            })
            .map(Done::Rows)
            .map_err(map_err)
        }
    }
}

fn alert_from_row(row: &Row<'_>) -> rusqlite::Result<Alert> {
    Ok(Alert {
        id: row.get("id")?,
        run_id: row.get("run_id")?,
        workflow: row.get("workflow")?,
        channel: row.get("channel")?,
        payload: json_col(row, "payload")?.unwrap_or(Value::Null),
        status: parse_col(AlertStatus::parse(&row.get::<_, String>("status")?))?,
        attempts: opt_u32(row.get("attempts")?).unwrap_or(0),
        next_attempt_at: row.get("next_attempt_at")?,
        last_error: row.get("last_error")?,
        created_at: row.get("created_at")?,
        delivered_at: row.get("delivered_at")?,
    })
}

const ALERT_COLUMNS: &str = "id, run_id, workflow, channel, payload, status, attempts, \
    next_attempt_at, last_error, created_at, delivered_at";

#[async_trait]
impl AlertStore for SqliteStore {
    async fn due_alerts(&self, now: Millis, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.read(move |conn| {
            query_all(conn, &format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE status = 'pending' AND next_attempt_at <= ?1 \
                 ORDER BY next_attempt_at, id LIMIT ?2"
            ), params![now, i64::from(limit)], alert_from_row)
        })
        .await
    }

    async fn record_alert_attempt(
        &self,
        id: &str,
        attempts: u32,
        result: &AlertAttempt,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::AlertAttempt {
                id: id.to_owned(),
                attempts,
                result: result.clone(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn undelivered_alerts(&self, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts WHERE status IN ('pending', 'failed') \
                 ORDER BY created_at DESC, id DESC LIMIT ?1"
                ),
                params![i64::from(limit)],
                alert_from_row,
            )
        })
        .await
    }
}
