//! Sealed secrets and API tokens: the credentials the store keeps. Secrets
//! arrive sealed (the vault seals and opens them; the store never sees a
//! plaintext or a key); tokens are kept as hashes. Every change is audited
//! in the same transaction.

use std::fmt;

use async_trait::async_trait;
use serde::Serialize;

use crate::{Millis, StoreError};

/// A secret as stored: sealed, never plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// The AEAD nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
    /// Fingerprint of the master key that sealed it.
    pub key_id: String,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedSecret(key {}, {} bytes)",
            self.key_id,
            self.ciphertext.len()
        )
    }
}

/// What is known of a secret without opening it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretMeta {
    /// Name.
    pub name: String,
    /// Fingerprint of the key that sealed it.
    pub key_id: String,
    /// First set.
    pub created_at: Millis,
    /// Last rotated.
    pub rotated_at: Option<Millis>,
}

/// How `put_secret` treats an existing name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretWrite {
    /// Only a new name (`plumb secrets set`).
    Create,
    /// Only an existing name (`plumb secrets rotate`).
    Rotate,
}

/// What `put_secret` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretWriteResult {
    /// Stored under a new name.
    Created,
    /// Replaced an existing value.
    Rotated,
    /// `Create` of a name that exists.
    AlreadyExists,
    /// `Rotate` of a name that does not exist.
    NotFound,
    /// Other secrets are sealed under another master key (a rekey
    /// committed since this key was loaded): nothing was written.
    KeyMismatch {
        /// The key fingerprint the other secrets carry.
        stored: String,
    },
}

/// A role of an API token; each includes the ones before it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Also replays and cancels.
    Operator,
    /// Also manages secrets, tokens and deployments.
    Admin,
}

impl Role {
    /// As stored.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// Parses a stored role.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] for an unknown value.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "viewer" => Self::Viewer,
            "operator" => Self::Operator,
            "admin" => Self::Admin,
            other => return Err(StoreError::Corrupt(format!("unknown role `{other}`"))),
        })
    }
}

/// An API token as stored (only its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    /// Id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Created.
    pub created_at: Millis,
    /// Revoked, if it was.
    pub revoked_at: Option<Millis>,
}

/// Sealed secrets.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Stores a sealed secret (and its audit entry, in one commit).
    async fn put_secret(
        &self,
        name: &str,
        sealed: &SealedSecret,
        mode: SecretWrite,
        actor: &str,
    ) -> Result<SecretWriteResult, StoreError>;

    /// One sealed secret.
    async fn secret(&self, name: &str) -> Result<Option<(SealedSecret, SecretMeta)>, StoreError>;

    /// Every secret's metadata, by name.
    async fn list_secrets(&self) -> Result<Vec<SecretMeta>, StoreError>;

    /// Deletes a secret (audited); `false` if there was none.
    async fn delete_secret(&self, name: &str, actor: &str) -> Result<bool, StoreError>;

    /// Replaces every secret's sealed value in one transaction (a new master
    /// key). Fails, changing nothing, unless the secrets are still at
    /// `expected_version` (the [`SecretStore::secrets_version`] read before they
    /// were opened, so a concurrent set or rotation is never undone) and
    /// `resealed` names exactly the stored secrets.
    async fn rekey_secrets(
        &self,
        resealed: &[(String, SealedSecret)],
        expected_version: &str,
        actor: &str,
    ) -> Result<(), StoreError>;

    /// A value that changes whenever a secret is set, rotated or deleted.
    async fn secrets_version(&self) -> Result<String, StoreError>;
}

/// API tokens (their hashes).
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// Stores a new API token (its hash); `false` if the name is taken.
    async fn create_token(
        &self,
        token: &ApiToken,
        token_hash: &str,
        actor: &str,
    ) -> Result<bool, StoreError>;

    /// Revokes a token by name; `false` if none was active.
    async fn revoke_token(&self, name: &str, actor: &str) -> Result<bool, StoreError>;

    /// The token with this hash, revoked or not.
    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError>;

    /// Every token.
    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
}
