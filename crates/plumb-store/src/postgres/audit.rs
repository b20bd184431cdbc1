//! The audit log on PostgreSQL: every query of
//! [`AuditStore`](crate::AuditStore), and the append that other writes call
//! inside their own transaction.
//!
//! Appends from many processes must never fork the chain, so each one
//! locks the head row (`FOR UPDATE`) before reading it: the next append
//! waits for this one to commit and chains from its entry. The head row is
//! created by the migration; should it be missing, it is created again
//! without a race (`ON CONFLICT DO NOTHING`, then locked).

use async_trait::async_trait;
use sqlx::postgres::PgConnection;

use super::{PgStore, fetch_all, map_err, sql};
use crate::audit::GENESIS;
use crate::rows::{self, AUDIT_COLUMNS};
use crate::writes::Chained;
use crate::{AuditEntry, AuditStore, NewAuditEntry, StoreError};

/// The chain's head, locked until the caller's transaction ends.
async fn lock_head(conn: &mut PgConnection) -> Result<Option<(i64, String)>, StoreError> {
    sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_optional(conn)
        .await
        .map_err(map_err)
}

/// Appends an audit entry, chained to the head, inside the caller's
/// transaction (so the change and its record commit together).
pub(super) async fn append_audit(
    conn: &mut PgConnection,
    e: &NewAuditEntry,
) -> Result<(), StoreError> {
    let head = match lock_head(conn).await? {
        Some(head) => head,
        None => {
            sqlx::query(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, $1) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(GENESIS)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
            lock_head(conn).await?.ok_or_else(|| {
                StoreError::Other("the audit chain's head row cannot be created".into())
            })?
        }
    };
    let c = Chained::new(Some(head), e);
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(c.seq)
    .bind(c.at)
    .bind(&e.actor)
    .bind(&e.action)
    .bind(&e.subject)
    .bind(&c.details)
    .bind(&c.prev_hash)
    .bind(&c.hash)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(c.seq)
        .bind(&c.hash)
        .execute(conn)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl AuditStore for PgStore {
    async fn append_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        append_audit(&mut tx, entry).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let query = sqlx::query(sql(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        )))
        .bind(after_seq)
        .bind(i64::from(limit));
        fetch_all(query, &self.pool, rows::audit_entry).await
    }

    async fn instance_secret(&self) -> Result<String, StoreError> {
        sqlx::query_scalar("SELECT secret FROM instance WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        // The head row exists from the start; seq 0 means no entry yet.
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 AND seq > 0")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }
}
