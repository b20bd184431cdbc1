//! The processes sharing a PostgreSQL store: every query of
//! [`ProcessStore`](crate::ProcessStore). Beats are stamped with the
//! server's clock, so processes on hosts whose clocks disagree are listed
//! on one clock.

use async_trait::async_trait;
use sqlx::Row;

use super::{PgStore, map_err};
use crate::processes::connections_of;
use crate::{Millis, ProcessBeat, ProcessInfo, ProcessStore, StoreError};

/// The server's clock in Unix milliseconds.
const SERVER_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

#[async_trait]
impl ProcessStore for PgStore {
    async fn beat(&self, b: &ProcessBeat) -> Result<(), StoreError> {
        sqlx::query(super::sql(format!(
            "INSERT INTO processes (owner, role, host, pid, version, started_at, runs, capacity, \
             beat_at, connections) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {SERVER_NOW}, $9) \
             ON CONFLICT (owner) DO UPDATE SET runs = excluded.runs, \
             capacity = excluded.capacity, beat_at = excluded.beat_at, \
             connections = excluded.connections"
        )))
        .bind(&b.owner)
        .bind(&b.role)
        .bind(&b.host)
        .bind(i64::from(b.pid))
        .bind(&b.version)
        .bind(b.started_at)
        .bind(i64::from(b.runs))
        .bind(i64::from(b.capacity))
        .bind(b.connections.to_string())
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn processes(&self, since: Millis) -> Result<Vec<ProcessInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT owner, role, host, pid, version, started_at, runs, capacity, beat_at, \
             connections FROM processes WHERE beat_at >= $1 ORDER BY role, host, pid",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let int = |col: &str| -> Result<i64, StoreError> {
                    r.try_get::<i64, _>(col).map_err(map_err)
                };
                Ok(ProcessInfo {
                    owner: r.try_get("owner").map_err(map_err)?,
                    role: r.try_get("role").map_err(map_err)?,
                    host: r.try_get("host").map_err(map_err)?,
                    pid: u32::try_from(int("pid")?).unwrap_or(0),
                    version: r.try_get("version").map_err(map_err)?,
                    started_at: int("started_at")?,
                    runs: u32::try_from(int("runs")?).unwrap_or(0),
                    capacity: u32::try_from(int("capacity")?).unwrap_or(0),
                    beat_at: int("beat_at")?,
                    connections: connections_of(
                        &r.try_get::<String, _>("connections").map_err(map_err)?,
                    ),
                })
            })
            .collect()
    }

    async fn forget_processes(&self, owner: &str, before: Millis) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM processes WHERE owner = $1 OR beat_at < $2")
            .bind(owner)
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn store_now(&self) -> Result<Millis, StoreError> {
        sqlx::query_scalar(super::sql(format!("SELECT {SERVER_NOW}")))
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }
}
