//! Workflow cursors on PostgreSQL: every query of
//! [`CursorStore`](crate::CursorStore), and the compare-and-set a
//! successful run's end makes (called from `runs::finish`, inside its
//! transaction). The `version` check in the `UPDATE` is the whole of the
//! concurrency story: a second mover waits for the first's row lock, then
//! finds the version changed and moves nothing.

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgConnection, Row};

use super::audit::append_audit;
use super::{PgStore, map_err};
use crate::cursors::{self, Cursor, CursorMove};
use crate::json::{from_json_text, to_json_text};
use crate::writes::entries;
use crate::{CursorStore, StoreError, now_ms};

fn decode(row: &sqlx::postgres::PgRow) -> Result<Cursor, StoreError> {
    let value: String = row.try_get("value").map_err(map_err)?;
    Ok(Cursor {
        workflow: row.try_get("workflow").map_err(map_err)?,
        value: from_json_text(&value, "value")?,
        version: row.try_get("version").map_err(map_err)?,
        updated_at: row.try_get("updated_at").map_err(map_err)?,
        updated_by: row.try_get("updated_by").map_err(map_err)?,
    })
}

/// Moves `workflow`'s cursor to `value` if it is at version `from` (0: none
/// committed yet); the new version, or `None` when it had moved on.
pub(super) async fn compare_and_set(
    conn: &mut PgConnection,
    workflow: &str,
    from: i64,
    value: &Value,
    by: &str,
) -> Result<Option<i64>, StoreError> {
    let text = to_json_text(value, "a cursor")?;
    let query = if from == 0 {
        sqlx::query(
            "INSERT INTO cursors (workflow, value, version, updated_at, updated_by) \
             VALUES ($1, $2, 1, $3, $4) ON CONFLICT (workflow) DO NOTHING",
        )
    } else {
        sqlx::query(
            "UPDATE cursors SET value = $2, version = version + 1, updated_at = $3, \
             updated_by = $4 WHERE workflow = $1 AND version = $5",
        )
    };
    let changed = query
        .bind(workflow)
        .bind(text)
        .bind(now_ms())
        .bind(by)
        .bind(from)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?
        .rows_affected();
    Ok((changed == 1).then_some(from + 1))
}

pub(super) async fn current(
    conn: &mut PgConnection,
    workflow: &str,
) -> Result<Option<Cursor>, StoreError> {
    sqlx::query(
        "SELECT workflow, value, version, updated_at, updated_by FROM cursors WHERE workflow = $1",
    )
    .bind(workflow)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?
    .as_ref()
    .map(decode)
    .transpose()
}

/// Moves `workflow`'s cursor for run `run_id` if it is still at the version
/// the run pinned, and records what happened in the run's record.
pub(super) async fn move_cursor(
    conn: &mut PgConnection,
    run_id: &str,
    workflow: &str,
    wanted: &CursorMove,
) -> Result<(), StoreError> {
    let text: Option<String> = sqlx::query_scalar("SELECT cursor FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    let record = text.map(|t| from_json_text(&t, "cursor")).transpose()?;
    let from = cursors::pinned_version(record.as_ref());
    let moved_to = if wanted.value.is_null() {
        None
    } else {
        compare_and_set(
            conn,
            workflow,
            from,
            &wanted.value,
            &format!("run:{run_id}"),
        )
        .await?
    };
    let current_version = match moved_to {
        Some(_) => None,
        None => current(conn, workflow).await?.map(|c| c.version),
    };
    let outcome = cursors::outcome(record.as_ref(), &wanted.value, moved_to, current_version);
    sqlx::query("UPDATE runs SET cursor = $2 WHERE id = $1")
        .bind(run_id)
        .bind(to_json_text(&outcome, "a cursor")?)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl CursorStore for PgStore {
    async fn cursor(&self, workflow: &str) -> Result<Option<Cursor>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        current(&mut conn, workflow).await
    }

    async fn cursors(&self) -> Result<Vec<Cursor>, StoreError> {
        sqlx::query(
            "SELECT workflow, value, version, updated_at, updated_by FROM cursors ORDER BY workflow",
        )
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?
            .iter()
            .map(decode)
            .collect()
    }

    async fn set_cursor(
        &self,
        workflow: &str,
        value: &Value,
        actor: &str,
    ) -> Result<Cursor, StoreError> {
        let text = to_json_text(value, "a cursor")?;
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "INSERT INTO cursors (workflow, value, version, updated_at, updated_by) \
             VALUES ($1, $2, 1, $3, $4) ON CONFLICT (workflow) DO UPDATE SET \
             value = excluded.value, version = cursors.version + 1, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by \
             RETURNING workflow, value, version, updated_at, updated_by",
        )
        .bind(workflow)
        .bind(text)
        .bind(now_ms())
        .bind(actor)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let cursor = decode(&row)?;
        append_audit(
            &mut tx,
            &entries::cursor_set(actor, workflow, value, cursor.version),
        )
        .await?;
        tx.commit().await.map_err(map_err)?;
        Ok(cursor)
    }

    async fn pin_cursor(&self, run_id: &str, owner: &str) -> Result<Value, StoreError> {
        let mut tx = self.begin().await?;
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT workflow, cursor FROM runs \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running' FOR UPDATE",
        )
        .bind(run_id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some((workflow, pinned)) = row else {
            return Err(StoreError::LeaseLost {
                run_id: run_id.to_owned(),
            });
        };
        if let Some(text) = pinned {
            return from_json_text(&text, "cursor");
        }
        let record = match current(&mut tx, &workflow).await? {
            Some(c) => cursors::pinned(c.value, c.version),
            None => cursors::pinned(Value::Null, 0),
        };
        sqlx::query("UPDATE runs SET cursor = $2 WHERE id = $1")
            .bind(run_id)
            .bind(to_json_text(&record, "a cursor")?)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(record)
    }
}
