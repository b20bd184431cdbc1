//! Deployments: the version of `plumb.yaml`, each connection and each
//! workflow last deployed, so a start or reload audits exactly what changed.

use async_trait::async_trait;

use crate::StoreError;

/// One deployed definition: `plumb.yaml` (`kind` `config`), a
/// `connection` or a `workflow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployed {
    /// `config`, `connection` or `workflow`.
    pub kind: String,
    /// The connection's or workflow's name, or `plumb.yaml`.
    pub name: String,
    /// SHA-256 of the file (hex).
    pub version: String,
    /// The file, relative to the project.
    pub file: String,
}

/// What is deployed.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait DeploymentStore: Send + Sync + 'static {
    /// Records what a starting or reloading process deploys, in one
    /// transaction: every item whose version differs from the one recorded
    /// gets an audit entry (`config.changed`, `connection.changed`,
    /// `workflow.deployed`), and every recorded connection or workflow
    /// missing from `items` a `connection.removed` or `workflow.removed`.
    /// Returns the audited changes as `kind:name`.
    async fn record_deployment(
        &self,
        items: &[Deployed],
        actor: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// The version last deployed of `kind`/`name` (`workflow`, `connection`,
    /// `config`), if any.
    async fn deployed_version(&self, kind: &str, name: &str) -> Result<Option<String>, StoreError>;
}
