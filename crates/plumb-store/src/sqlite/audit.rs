//! The audit log on SQLite: every query of [`AuditStore`](crate::AuditStore),
//! and the append that other writes call inside their own transaction.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{Done, Op, SqliteStore, map_err, query_all};
use crate::rows::{self, AUDIT_COLUMNS};
use crate::writes::Chained;
use crate::{AuditEntry, AuditStore, NewAuditEntry, StoreError};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Audit(NewAuditEntry),
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Audit(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Audit(entry) => append_audit(tx, entry).map(|()| Done::Unit),
    }
}

/// Appends an audit entry, chained to the last one, inside the caller's
/// transaction (so the change and its record commit together).
pub(super) fn append_audit(tx: &Transaction<'_>, e: &NewAuditEntry) -> Result<(), StoreError> {
    let head: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(map_err)?;
    let c = Chained::new(head, e);
    tx.prepare_cached(
        "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            c.seq,
            c.at,
            e.actor,
            e.action,
            e.subject,
            c.details,
            c.prev_hash,
            c.hash
        ])
    })
    .map_err(map_err)?;
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )
    .and_then(|mut st| st.execute(params![c.seq, c.hash]))
    .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError> {
        self.write(Write::Audit(entry.clone())).await.map(|_| ())
    }

    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ),
                params![after_seq, i64::from(limit)],
                |r| rows::audit_entry(r),
            )
        })
        .await
    }

    async fn instance_secret(&self) -> Result<String, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT secret FROM instance WHERE id = 1")
                .and_then(|mut st| st.query_row([], |r| r.get(0)))
                .map_err(map_err)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
                .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(map_err)
        })
        .await
    }
}
