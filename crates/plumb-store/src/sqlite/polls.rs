//! Poll triggers on SQLite: every query of [`PollStore`](crate::PollStore).
//! The one writer thread orders claims and commits; the lease and the
//! cursor's compare-and-set still fence a process that stalled past its
//! lease.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::runs::insert_run;
use super::{Done, Op, SqliteStore, map_err, unexpected};
use crate::json::to_json_text;
use crate::polls::{PollClaim, PollCommit, PollCommitted, PollState, poll_alert_subject};
use crate::{Millis, NewAlert, PollStore, StoreError, now_ms};

/// Most keys looked up in one statement.
const KEYS_PER_QUERY: usize = 500;

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Claim {
        workflow: String,
        owner: String,
        lease_ms: i64,
    },
    Renew {
        workflow: String,
        owner: String,
        lease_ms: i64,
    },
    Commit(Box<PollCommit>),
    Fail {
        workflow: String,
        owner: String,
        error: String,
        next_poll_at: Millis,
        alerts: Vec<NewAlert>,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Polls(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Claim {
            workflow,
            owner,
            lease_ms,
        } => claim(tx, workflow, owner, *lease_ms),
        Write::Renew {
            workflow,
            owner,
            lease_ms,
        } => {
            let rows = tx
                .prepare_cached(
                    "UPDATE polls SET lease_until = ?3 WHERE workflow = ?1 AND owner = ?2",
                )
                .and_then(|mut st| st.execute(params![workflow, owner, now_ms() + lease_ms]))
                .map_err(map_err)?;
            Ok(Done::Flag(rows == 1))
        }
        Write::Commit(commit) => commit_poll(tx, commit),
        Write::Fail {
            workflow,
            owner,
            error,
            next_poll_at,
            alerts,
        } => {
            held(tx, workflow, owner)?;
            let now = now_ms();
            tx.prepare_cached(
                "UPDATE polls SET owner = NULL, lease_until = NULL, last_poll_at = ?2, \
                 last_error = ?3, failures = failures + 1, next_poll_at = ?4 WHERE workflow = ?1",
            )
            .and_then(|mut st| st.execute(params![workflow, now, error, next_poll_at]))
            .map_err(map_err)?;
            for alert in alerts {
                let payload = to_json_text(&alert.payload, "an alert")?;
                tx.prepare_cached(
                    "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
                     next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        alert.id,
                        poll_alert_subject(workflow),
                        workflow,
                        alert.channel,
                        payload,
                        now
                    ])
                })
                .map_err(map_err)?;
            }
            Ok(Done::Unit)
        }
    }
}

fn claim(
    tx: &Transaction<'_>,
    workflow: &str,
    owner: &str,
    lease_ms: i64,
) -> Result<Done, StoreError> {
    let now = now_ms();
    tx.prepare_cached(
        "INSERT INTO polls (workflow, next_poll_at) VALUES (?1, ?2) \
         ON CONFLICT (workflow) DO NOTHING",
    )
    .and_then(|mut st| st.execute(params![workflow, now]))
    .map_err(map_err)?;
    let failures: Option<i64> = tx
        .prepare_cached(
            "UPDATE polls SET owner = ?2, lease_until = ?3 WHERE workflow = ?1 \
             AND next_poll_at <= ?4 AND (owner IS NULL OR lease_until < ?4) RETURNING failures",
        )
        .and_then(|mut st| {
            st.query_row(params![workflow, owner, now + lease_ms, now], |r| r.get(0))
                .optional()
        })
        .map_err(map_err)?;
    let Some(failures) = failures else {
        return Ok(Done::Poll(None));
    };
    let cursor = super::cursors::current(tx, workflow)?;
    Ok(Done::Poll(Some(PollClaim {
        cursor: cursor
            .as_ref()
            .map_or(serde_json::Value::Null, |c| c.value.clone()),
        cursor_version: cursor.map_or(0, |c| c.version),
        failures: u32::try_from(failures).unwrap_or(u32::MAX),
    })))
}

/// The caller must still hold the poll.
fn held(tx: &Transaction<'_>, workflow: &str, owner: &str) -> Result<(), StoreError> {
    let found: Option<i64> = tx
        .prepare_cached("SELECT 1 FROM polls WHERE workflow = ?1 AND owner = ?2")
        .and_then(|mut st| {
            st.query_row(params![workflow, owner], |r| r.get(0))
                .optional()
        })
        .map_err(map_err)?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::LeaseLost {
            run_id: poll_alert_subject(workflow),
        }),
    }
}

fn commit_poll(tx: &Transaction<'_>, c: &PollCommit) -> Result<Done, StoreError> {
    held(tx, &c.workflow, &c.owner)?;
    // The cursor first: if it moved meanwhile, nothing else is written.
    if let Some((from, value)) = &c.cursor
        && super::cursors::compare_and_set(tx, &c.workflow, *from, value, "poll")?.is_none()
    {
        // Released, and due at once: the next poll reads the new cursor.
        tx.prepare_cached("UPDATE polls SET owner = NULL, lease_until = NULL WHERE workflow = ?1")
            .and_then(|mut st| st.execute(params![c.workflow]))
            .map_err(map_err)?;
        return Ok(Done::PollCommitted(PollCommitted::CursorMoved));
    }
    let now = now_ms();
    for run in &c.runs {
        insert_run(tx, run)?;
    }
    for (key, index) in &c.seen {
        let Some(run) = c.runs.get(*index) else {
            continue;
        };
        tx.prepare_cached(
            "INSERT OR REPLACE INTO dedupe_keys (workflow, key, run_id, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut st| st.execute(params![c.workflow, key, run.id, now, c.seen_until]))
        .map_err(map_err)?;
    }
    let new_item_at = (!c.runs.is_empty()).then_some(now);
    tx.prepare_cached(
        "UPDATE polls SET owner = NULL, lease_until = NULL, last_poll_at = ?2, \
         last_success_at = ?2, last_new_item_at = coalesce(?3, last_new_item_at), \
         last_error = NULL, failures = 0, next_poll_at = ?4 WHERE workflow = ?1",
    )
    .and_then(|mut st| st.execute(params![c.workflow, now, new_item_at, c.next_poll_at]))
    .map_err(map_err)?;
    Ok(Done::PollCommitted(PollCommitted::Committed))
}

#[async_trait]
impl PollStore for SqliteStore {
    async fn claim_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<PollClaim>, StoreError> {
        match self
            .write(Write::Claim {
                workflow: workflow.to_owned(),
                owner: owner.to_owned(),
                lease_ms,
            })
            .await?
        {
            Done::Poll(claim) => Ok(claim),
            other => Err(unexpected(&other)),
        }
    }

    async fn renew_poll(
        &self,
        workflow: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::Renew {
                workflow: workflow.to_owned(),
                owner: owner.to_owned(),
                lease_ms,
            })
            .await?
        {
            Done::Flag(held) => Ok(held),
            other => Err(unexpected(&other)),
        }
    }

    async fn seen_keys(&self, workflow: &str, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let workflow = workflow.to_owned();
        let keys = keys.to_vec();
        self.read(move |conn| {
            let now = now_ms();
            let mut seen = std::collections::HashSet::new();
            for chunk in keys.chunks(KEYS_PER_QUERY) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let sql = format!(
                    "SELECT key FROM dedupe_keys WHERE workflow = ? AND expires_at > ? AND key IN ({marks})"
                );
                let mut values: Vec<rusqlite::types::Value> = vec![
                    workflow.clone().into(),
                    now.into(),
                ];
                values.extend(chunk.iter().cloned().map(Into::into));
                let mut st = conn.prepare(&sql).map_err(map_err)?;
                let found = st
                    .query_map(rusqlite::params_from_iter(values), |r| r.get::<_, String>(0))
                    .map_err(map_err)?;
                for key in found {
                    seen.insert(key.map_err(map_err)?);
                }
            }
            Ok(keys.iter().map(|k| seen.contains(k)).collect())
        })
        .await
    }

    async fn commit_poll(&self, commit: &PollCommit) -> Result<PollCommitted, StoreError> {
        match self.write(Write::Commit(Box::new(commit.clone()))).await? {
            Done::PollCommitted(result) => Ok(result),
            other => Err(unexpected(&other)),
        }
    }

    async fn fail_poll(
        &self,
        workflow: &str,
        owner: &str,
        error: &str,
        next_poll_at: Millis,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        self.write(Write::Fail {
            workflow: workflow.to_owned(),
            owner: owner.to_owned(),
            error: error.to_owned(),
            next_poll_at,
            alerts: alerts.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn poll_states(&self) -> Result<Vec<PollState>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT workflow, next_poll_at, last_poll_at, last_success_at, last_new_item_at, \
                 last_error, failures, owner FROM polls ORDER BY workflow",
            )
            .and_then(|mut st| {
                st.query_map([], |r| {
                    Ok(PollState {
                        workflow: r.get(0)?,
                        next_poll_at: r.get(1)?,
                        last_poll_at: r.get(2)?,
                        last_success_at: r.get(3)?,
                        last_new_item_at: r.get(4)?,
                        last_error: r.get(5)?,
                        failures: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(u32::MAX),
                        owner: r.get(7)?,
                    })
                })?
                .collect()
            })
            .map_err(map_err)
        })
        .await
    }
}
