//! Deployments on PostgreSQL: every query of
//! [`DeploymentStore`](crate::DeploymentStore).

use async_trait::async_trait;

use super::audit::append_audit;
use super::{PgStore, map_err};
use crate::writes::{DeployChange, plan_deployment};
use crate::{Deployed, DeploymentStore, StoreError, now_ms};

#[async_trait]
impl DeploymentStore for PgStore {
    async fn record_deployment(
        &self,
        items: &[Deployed],
        actor: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin().await?;
        // Processes starting at once deploy one after the other (this mode
        // conflicts with itself, not with readers): the second finds the
        // first's versions recorded and audits nothing again.
        sqlx::query("LOCK TABLE deployments IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let recorded: Vec<(String, String, String)> =
            sqlx::query_as("SELECT kind, name, version FROM deployments")
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
        let now = now_ms();
        let mut changed = Vec::new();
        for (change, entry, label) in plan_deployment(&recorded, items, actor) {
            match change {
                DeployChange::Upsert(item) => sqlx::query(
                    "INSERT INTO deployments (kind, name, version, file, deployed_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, name) DO UPDATE SET \
                     version = excluded.version, file = excluded.file, \
                     deployed_at = excluded.deployed_at",
                )
                .bind(&item.kind)
                .bind(&item.name)
                .bind(&item.version)
                .bind(&item.file)
                .bind(now),
                DeployChange::Remove(kind, name) => {
                    sqlx::query("DELETE FROM deployments WHERE kind = $1 AND name = $2")
                        .bind(kind)
                        .bind(name)
                }
            }
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            append_audit(&mut tx, &entry).await?;
            changed.push(label);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(changed)
    }

    async fn deployed_version(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT version FROM deployments WHERE kind = $1 AND name = $2")
            .bind(kind)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }
}
