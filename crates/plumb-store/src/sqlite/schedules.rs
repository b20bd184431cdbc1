//! Schedule slots on SQLite: every query of
//! [`ScheduleStore`](crate::ScheduleStore).

use async_trait::async_trait;
use rusqlite::{Transaction, params};

use super::runs::insert_run;
use super::{Done, Op, SqliteStore, map_err, unexpected};
use crate::{Millis, NewRun, ScheduleStore, StoreError, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Fire {
        workflow: String,
        slot: Millis,
        run: Option<NewRun>,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Schedules(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Fire {
            workflow,
            slot,
            run,
        } => {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO schedule_fires (workflow, slot, run_id, fired_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (workflow, slot) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![workflow, slot, run.as_ref().map(|r| r.id.as_str()), now_ms()])
                })
                .map_err(map_err)?;
            if inserted == 1
                && let Some(run) = run
            {
                insert_run(tx, run)?;
            }
            Ok(Done::Rows(inserted))
        }
    }
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn last_fire(&self, workflow: &str) -> Result<Option<Millis>, StoreError> {
        let workflow = workflow.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT max(slot) FROM schedule_fires WHERE workflow = ?1")
                .and_then(|mut st| st.query_row(params![workflow], |r| r.get(0)))
                .map_err(map_err)
        })
        .await
    }

    async fn record_fire(
        &self,
        workflow: &str,
        slot: Millis,
        run: Option<&NewRun>,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::Fire {
                workflow: workflow.to_owned(),
                slot,
                run: run.cloned(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }
}
