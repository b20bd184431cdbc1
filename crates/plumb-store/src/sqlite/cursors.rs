//! Workflow cursors on SQLite: every query of
//! [`CursorStore`](crate::CursorStore), and the compare-and-set a
//! successful run's end makes (called from `runs::finish`, inside its
//! transaction).

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::Value;

use super::audit::append_audit;
use super::{Done, Op, SqliteStore, map_err, unexpected};
use crate::cursors::{self, Cursor, CursorMove};
use crate::json::{from_json_text, to_json_text};
use crate::writes::entries;
use crate::{CursorStore, StoreError, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Set {
        workflow: String,
        value: Value,
        actor: String,
    },
    Pin {
        run_id: String,
        owner: String,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Cursors(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Set {
            workflow,
            value,
            actor,
        } => {
            let text = to_json_text(value, "a cursor")?;
            let version = current(tx, workflow)?.map_or(0, |c| c.version) + 1;
            let now = now_ms();
            tx.prepare_cached(
                "INSERT INTO cursors (workflow, value, version, updated_at, updated_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (workflow) DO UPDATE SET \
                 value = excluded.value, version = excluded.version, \
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            )
            .and_then(|mut st| st.execute(params![workflow, text, version, now, actor]))
            .map_err(map_err)?;
            append_audit(tx, &entries::cursor_set(actor, workflow, value, version))?;
            Ok(Done::Cursor(current(tx, workflow)?))
        }
        Write::Pin { run_id, owner } => {
            let row: Option<(String, Option<String>)> = tx
                .prepare_cached(
                    "SELECT workflow, cursor FROM runs \
                     WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
                )
                .and_then(|mut st| {
                    st.query_row(params![run_id, owner], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(map_err)?;
            let Some((workflow, pinned)) = row else {
                return Err(StoreError::LeaseLost {
                    run_id: run_id.clone(),
                });
            };
            if let Some(text) = pinned {
                return Ok(Done::Json(from_json_text(&text, "cursor")?));
            }
            let record = match current(tx, &workflow)? {
                Some(c) => cursors::pinned(c.value, c.version),
                None => cursors::pinned(Value::Null, 0),
            };
            let text = to_json_text(&record, "a cursor")?;
            tx.prepare_cached("UPDATE runs SET cursor = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![run_id, text]))
                .map_err(map_err)?;
            Ok(Done::Json(record))
        }
    }
}

/// Moves `workflow`'s cursor for run `run_id` if it is still at the version
/// the run pinned, and records what happened in the run's record.
pub(super) fn move_cursor(
    tx: &Transaction<'_>,
    run_id: &str,
    workflow: &str,
    wanted: &CursorMove,
) -> Result<(), StoreError> {
    let record: Option<Value> = tx
        .prepare_cached("SELECT cursor FROM runs WHERE id = ?1")
        .and_then(|mut st| st.query_row(params![run_id], |r| r.get::<_, Option<String>>(0)))
        .map_err(map_err)?
        .map(|t| from_json_text(&t, "cursor"))
        .transpose()?;
    let from = cursors::pinned_version(record.as_ref());
    let moved_to = if wanted.value.is_null() {
        None
    } else {
        compare_and_set(tx, workflow, from, &wanted.value, &format!("run:{run_id}"))?
    };
    let current_version = match moved_to {
        Some(_) => None,
        None => current(tx, workflow)?.map(|c| c.version),
    };
    let outcome = cursors::outcome(record.as_ref(), &wanted.value, moved_to, current_version);
    let text = to_json_text(&outcome, "a cursor")?;
    tx.prepare_cached("UPDATE runs SET cursor = ?2 WHERE id = ?1")
        .and_then(|mut st| st.execute(params![run_id, text]))
        .map_err(map_err)?;
    Ok(())
}

/// Moves `workflow`'s cursor to `value` if it is at version `from` (0: none
/// committed yet); the new version, or `None` when it had moved on.
pub(super) fn compare_and_set(
    tx: &Transaction<'_>,
    workflow: &str,
    from: i64,
    value: &Value,
    by: &str,
) -> Result<Option<i64>, StoreError> {
    let text = to_json_text(value, "a cursor")?;
    let changed = if from == 0 {
        tx.prepare_cached(
            "INSERT INTO cursors (workflow, value, version, updated_at, updated_by) \
             VALUES (?1, ?2, 1, ?3, ?4) ON CONFLICT (workflow) DO NOTHING",
        )
        .and_then(|mut st| st.execute(params![workflow, text, now_ms(), by]))
    } else {
        tx.prepare_cached(
            "UPDATE cursors SET value = ?2, version = version + 1, updated_at = ?3, \
             updated_by = ?4 WHERE workflow = ?1 AND version = ?5",
        )
        .and_then(|mut st| st.execute(params![workflow, text, now_ms(), by, from]))
    }
    .map_err(map_err)?;
    Ok((changed == 1).then_some(from + 1))
}

pub(super) fn current(
    conn: &rusqlite::Connection,
    workflow: &str,
) -> Result<Option<Cursor>, StoreError> {
    conn.prepare_cached(
        "SELECT workflow, value, version, updated_at, updated_by FROM cursors WHERE workflow = ?1",
    )
    .and_then(|mut st| st.query_row(params![workflow], raw).optional())
    .map_err(map_err)?
    .map(decode)
    .transpose()
}

type Raw = (String, String, i64, i64, String);

fn raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn decode((workflow, value, version, updated_at, updated_by): Raw) -> Result<Cursor, StoreError> {
    Ok(Cursor {
        workflow,
        value: from_json_text(&value, "value")?,
        version,
        updated_at,
        updated_by,
    })
}

#[async_trait]
impl CursorStore for SqliteStore {
    async fn cursor(&self, workflow: &str) -> Result<Option<Cursor>, StoreError> {
        let workflow = workflow.to_owned();
        self.read(move |conn| current(conn, &workflow)).await
    }

    async fn cursors(&self) -> Result<Vec<Cursor>, StoreError> {
        self.read(move |conn| {
            let rows: Vec<Raw> = conn
                .prepare_cached(
                    "SELECT workflow, value, version, updated_at, updated_by FROM cursors \
                     ORDER BY workflow",
                )
                .and_then(|mut st| st.query_map([], raw)?.collect())
                .map_err(map_err)?;
            rows.into_iter().map(decode).collect()
        })
        .await
    }

    async fn set_cursor(
        &self,
        workflow: &str,
        value: &Value,
        actor: &str,
    ) -> Result<Cursor, StoreError> {
        match self
            .write(Write::Set {
                workflow: workflow.to_owned(),
                value: value.clone(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Cursor(Some(c)) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn pin_cursor(&self, run_id: &str, owner: &str) -> Result<Value, StoreError> {
        match self
            .write(Write::Pin {
                run_id: run_id.to_owned(),
                owner: owner.to_owned(),
            })
            .await?
        {
            Done::Json(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }
}
