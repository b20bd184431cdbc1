//! The processes sharing a SQLite store: every query of
//! [`ProcessStore`](crate::ProcessStore).

use async_trait::async_trait;
use rusqlite::{Transaction, params};

use super::{Done, Op, SqliteStore, map_err, query_all};
use crate::processes::connections_of;
use crate::{Millis, ProcessBeat, ProcessInfo, ProcessStore, StoreError, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Beat(ProcessBeat),
    Forget { owner: String, before: Millis },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Processes(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Beat(b) => tx
            .prepare_cached(
                "INSERT INTO processes (owner, role, host, pid, version, started_at, runs, \
                 capacity, beat_at, connections) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (owner) DO UPDATE SET runs = excluded.runs, \
                 capacity = excluded.capacity, beat_at = excluded.beat_at, \
                 connections = excluded.connections",
            )
            .and_then(|mut st| {
                st.execute(params![
                    b.owner,
                    b.role,
                    b.host,
                    i64::from(b.pid),
                    b.version,
                    b.started_at,
                    i64::from(b.runs),
                    i64::from(b.capacity),
                    now_ms(),
                    b.connections.to_string()
                ])
            })
            .map(Done::Rows)
            .map_err(map_err),
        Write::Forget { owner, before } => tx
            .prepare_cached("DELETE FROM processes WHERE owner = ?1 OR beat_at < ?2")
            .and_then(|mut st| st.execute(params![owner, before]))
            .map(Done::Rows)
            .map_err(map_err),
    }
}

#[async_trait]
impl ProcessStore for SqliteStore {
    async fn beat(&self, beat: &ProcessBeat) -> Result<(), StoreError> {
        self.write(Write::Beat(beat.clone())).await.map(|_| ())
    }

    async fn processes(&self, since: Millis) -> Result<Vec<ProcessInfo>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT owner, role, host, pid, version, started_at, runs, capacity, beat_at, \
                 connections FROM processes WHERE beat_at >= ?1 ORDER BY role, host, pid",
                params![since],
                |r| {
                    Ok(ProcessInfo {
                        owner: r.get(0)?,
                        role: r.get(1)?,
                        host: r.get(2)?,
                        pid: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                        version: r.get(4)?,
                        started_at: r.get(5)?,
                        runs: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                        capacity: u32::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                        beat_at: r.get(8)?,
                        connections: connections_of(&r.get::<_, String>(9)?),
                    })
                },
            )
        })
        .await
    }

    async fn forget_processes(&self, owner: &str, before: Millis) -> Result<(), StoreError> {
        self.write(Write::Forget {
            owner: owner.to_owned(),
            before,
        })
        .await
        .map(|_| ())
    }

    async fn store_now(&self) -> Result<Millis, StoreError> {
        Ok(now_ms())
    }
}
