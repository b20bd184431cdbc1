//! The audit log on SQLite: every query of [`AuditStore`](crate::AuditStore),
//! and the append that other writes call inside their own transaction.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde_json::Value;

use super::{Done, Op, SqliteStore, json_col, map_err, query_all};
use crate::{AuditEntry, AuditStore, NewAuditEntry, StoreError, now_ms};

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
    let last: Option<(i64, String)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_head WHERE id = 1")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(map_err)?;
    let (last_seq, prev) = last.unwrap_or_else(|| (0, crate::audit::GENESIS.to_owned()));
    let seq = last_seq + 1;
    let at = now_ms();
    let hash =
        crate::audit::entry_hash(&prev, seq, at, &e.actor, &e.action, &e.subject, &e.details);
    tx.prepare_cached(
        "INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            seq,
            at,
            e.actor,
            e.action,
            e.subject,
            crate::audit::canonical_json(&e.details),
            prev,
            hash
        ])
    })
    .map_err(map_err)?;
    tx.prepare_cached(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )
    .and_then(|mut st| st.execute(params![seq, hash]))
    .map_err(map_err)?;
    Ok(())
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get("seq")?,
        at: r.get("at")?,
        actor: r.get("actor")?,
        action: r.get("action")?,
        subject: r.get("subject")?,
        details: json_col(r, "details")?.unwrap_or(Value::Null),
        prev_hash: r.get("prev_hash")?,
        hash: r.get("hash")?,
    })
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
                "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit_log \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                params![after_seq, i64::from(limit)],
                audit_from_row,
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
