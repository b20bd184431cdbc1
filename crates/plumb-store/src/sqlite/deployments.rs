//! Deployments on SQLite: every query of
//! [`DeploymentStore`](crate::DeploymentStore).

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Transaction, params};

use super::audit::append_audit;
use super::{Done, Op, SqliteStore, map_err, unexpected};
use crate::writes::{DeployChange, plan_deployment};
use crate::{Deployed, DeploymentStore, StoreError, now_ms};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    Deploy { items: Vec<Deployed>, actor: String },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Deployments(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::Deploy { items, actor } => record_deployment(tx, items, actor).map(Done::Names),
    }
}

fn record_deployment(
    tx: &Transaction<'_>,
    items: &[Deployed],
    actor: &str,
) -> Result<Vec<String>, StoreError> {
    let recorded: Vec<(String, String, String)> = tx
        .prepare_cached("SELECT kind, name, version FROM deployments")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(map_err)?;
    let now = now_ms();
    let mut changed = Vec::new();
    for (change, entry, label) in plan_deployment(&recorded, items, actor) {
        match change {
            DeployChange::Upsert(item) => tx
                .prepare_cached(
                    "INSERT INTO deployments (kind, name, version, file, deployed_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (kind, name) DO UPDATE SET \
                     version = excluded.version, file = excluded.file, \
                     deployed_at = excluded.deployed_at",
                )
                .and_then(|mut st| {
                    st.execute(params![item.kind, item.name, item.version, item.file, now])
                }),
            DeployChange::Remove(kind, name) => tx
                .prepare_cached("DELETE FROM deployments WHERE kind = ?1 AND name = ?2")
                .and_then(|mut st| st.execute(params![kind, name])),
        }
        .map_err(map_err)?;
        append_audit(tx, &entry)?;
        changed.push(label);
    }
    Ok(changed)
}

#[async_trait]
impl DeploymentStore for SqliteStore {
    async fn record_deployment(
        &self,
        items: &[Deployed],
        actor: &str,
    ) -> Result<Vec<String>, StoreError> {
        match self
            .write(Write::Deploy {
                items: items.to_vec(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Names(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn deployed_version(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        self.read(move |conn| {
            conn.prepare_cached("SELECT version FROM deployments WHERE kind = ?1 AND name = ?2")
                .and_then(|mut st| st.query_row(params![kind, name], |r| r.get(0)).optional())
                .map_err(map_err)
        })
        .await
    }
}
