//! Alerts on SQLite: every query of [`AlertStore`](crate::AlertStore).

use async_trait::async_trait;
use rusqlite::{Transaction, params};

use super::{Done, Op, SqliteStore, map_err, query_all, unexpected};
use crate::rows::{self, ALERT_COLUMNS};
use crate::writes::AlertUpdate;
use crate::{Alert, AlertAttempt, AlertStore, Millis, StoreError};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Claim {
        id: String,
        attempts: u32,
        now: Millis,
        until: Millis,
    },
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
        Write::Claim {
            id,
            attempts,
            now,
            until,
        } => tx
            .prepare_cached(CLAIM_ALERT)
            .and_then(|mut st| st.execute(params![id, i64::from(*attempts), now, until]))
            .map(Done::Rows)
            .map_err(map_err),
        Write::AlertAttempt {
            id,
            attempts,
            result,
        } => {
            let u = AlertUpdate::new(result);
            tx.prepare_cached(
                "UPDATE alerts SET status = ?2, attempts = attempts + 1, next_attempt_at = ?3, \
                 last_error = COALESCE(?4, last_error), delivered_at = ?5 \
                 WHERE id = ?1 AND status = 'pending' AND attempts = ?6",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    u.status.as_str(),
                    u.next_attempt_at,
                    u.error,
                    u.delivered_at,
                    i64::from(*attempts)
                ])
            })
            .map(Done::Rows)
            .map_err(map_err)
        }
    }
}

/// Moves a due alert's next attempt to `until` if it is still due with
/// that many attempts.
const CLAIM_ALERT: &str = "UPDATE alerts SET next_attempt_at = ?4 \
    WHERE id = ?1 AND status = 'pending' AND attempts = ?2 AND next_attempt_at <= ?3";

#[async_trait]
impl AlertStore for SqliteStore {
    async fn claim_alert(
        &self,
        id: &str,
        attempts: u32,
        now: Millis,
        until: Millis,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::Claim {
                id: id.to_owned(),
                attempts,
                now,
                until,
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn due_alerts(&self, now: Millis, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.read(move |conn| {
            query_all(conn, &format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE status = 'pending' AND next_attempt_at <= ?1 \
                 ORDER BY next_attempt_at, id LIMIT ?2"
            ), params![now, i64::from(limit)], |r| rows::alert(r))
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
                |r| rows::alert(r),
            )
        })
        .await
    }
}
