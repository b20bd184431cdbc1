//! Schedule slots on PostgreSQL: every query of
//! [`ScheduleStore`](crate::ScheduleStore).

use async_trait::async_trait;

use super::runs::insert_run;
use super::{PgStore, map_err};
use crate::writes::NewRunRow;
use crate::{Millis, NewRun, ScheduleStore, StoreError, now_ms};

#[async_trait]
impl ScheduleStore for PgStore {
    async fn last_fire(&self, workflow: &str) -> Result<Option<Millis>, StoreError> {
        sqlx::query_scalar("SELECT max(slot) FROM schedule_fires WHERE workflow = $1")
            .bind(workflow)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn record_fire(
        &self,
        workflow: &str,
        slot: Millis,
        run: Option<&NewRun>,
    ) -> Result<bool, StoreError> {
        let row = run.map(NewRunRow::new).transpose()?;
        let mut tx = self.begin().await?;
        // The slot's primary key decides which process fires it: a second
        // insert waits for the first to commit, then does nothing.
        let inserted = sqlx::query(
            "INSERT INTO schedule_fires (workflow, slot, run_id, fired_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (workflow, slot) DO NOTHING",
        )
        .bind(workflow)
        .bind(slot)
        .bind(run.map(|r| r.id.as_str()))
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected()
            == 1;
        if inserted && let (Some(run), Some(row)) = (run, &row) {
            // A run that cannot be inserted fails the fire whole (dropping
            // `tx` rolls the slot back): the slot can still fire.
            insert_run(&mut tx, run, row, self.notify).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(inserted)
    }
}
