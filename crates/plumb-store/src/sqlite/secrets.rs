//! Sealed secrets and API tokens on SQLite: every query of
//! [`SecretStore`](crate::SecretStore) and [`TokenStore`](crate::TokenStore).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::audit::append_audit;
use super::{Done, Op, SqliteStore, map_err, query_all, unexpected};
use crate::rows;
use crate::writes::{check_rekey, entries, secrets_version_of};
use crate::{
    ApiToken, SealedSecret, SecretMeta, SecretStore, SecretWrite, SecretWriteResult, StoreError,
    TokenStore, now_ms,
};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    PutSecret {
        name: String,
        sealed: SealedSecret,
        mode: SecretWrite,
        actor: String,
    },
    DeleteSecret {
        name: String,
        actor: String,
    },
    Rekey {
        resealed: Vec<(String, SealedSecret)>,
        expected_version: String,
        actor: String,
    },
    CreateToken {
        token: ApiToken,
        hash: String,
        actor: String,
    },
    RevokeToken {
        name: String,
        actor: String,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Secrets(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::PutSecret {
            name,
            sealed,
            mode,
            actor,
        } => put_secret(tx, name, sealed, *mode, actor).map(Done::Secret),
        Write::DeleteSecret { name, actor } => {
            let rows = tx
                .prepare_cached("DELETE FROM secrets WHERE name = ?1")
                .and_then(|mut st| st.execute(params![name]))
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(tx, &entries::secret_deleted(actor, name))?;
            }
            Ok(Done::Flag(rows == 1))
        }
        Write::Rekey {
            resealed,
            expected_version,
            actor,
        } => rekey(tx, resealed, expected_version, actor).map(|()| Done::Unit),
        Write::CreateToken { token, hash, actor } => {
            let rows = tx
                .prepare_cached(
                    "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        token.id,
                        token.name,
                        token.role.as_str(),
                        hash,
                        token.created_at
                    ])
                })
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(tx, &entries::token_created(actor, token))?;
            }
            Ok(Done::Flag(rows == 1))
        }
        Write::RevokeToken { name, actor } => {
            let rows = tx
                .prepare_cached(
                    "UPDATE api_tokens SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                )
                .and_then(|mut st| st.execute(params![name, now_ms()]))
                .map_err(map_err)?;
            if rows == 1 {
                append_audit(tx, &entries::token_revoked(actor, name))?;
            }
            Ok(Done::Flag(rows == 1))
        }
    }
}

fn put_secret(
    tx: &Transaction<'_>,
    name: &str,
    sealed: &SealedSecret,
    mode: SecretWrite,
    actor: &str,
) -> Result<SecretWriteResult, StoreError> {
    let exists: bool = tx
        .prepare_cached("SELECT 1 FROM secrets WHERE name = ?1")
        .and_then(|mut st| st.exists(params![name]))
        .map_err(map_err)?;
    // Checked in the writing transaction, so a rekey that commits while
    // the value is being typed cannot leave it under a retired key.
    let other_key: Option<String> = tx
        .prepare_cached("SELECT key_id FROM secrets WHERE name <> ?1 AND key_id <> ?2 LIMIT 1")
        .and_then(|mut st| {
            st.query_row(params![name, sealed.key_id], |r| r.get(0))
                .optional()
        })
        .map_err(map_err)?;
    if let Some(stored) = other_key {
        return Ok(SecretWriteResult::KeyMismatch { stored });
    }
    let now = now_ms();
    let (sql, result, action) = match (mode, exists) {
        (SecretWrite::Create, true) => return Ok(SecretWriteResult::AlreadyExists),
        (SecretWrite::Rotate, false) => return Ok(SecretWriteResult::NotFound),
        (SecretWrite::Create, false) => (
            "INSERT INTO secrets (name, nonce, ciphertext, key_id, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            SecretWriteResult::Created,
            "secret.set",
        ),
        (SecretWrite::Rotate, true) => (
            "UPDATE secrets SET nonce = ?2, ciphertext = ?3, key_id = ?4, rotated_at = ?5, \
             updated_at = ?5 WHERE name = ?1",
            SecretWriteResult::Rotated,
            "secret.rotated",
        ),
    };
    tx.prepare_cached(sql)
        .and_then(|mut st| {
            st.execute(params![
                name,
                sealed.nonce,
                sealed.ciphertext,
                sealed.key_id,
                now
            ])
        })
        .map_err(map_err)?;
    append_audit(
        tx,
        &entries::secret_written(actor, action, name, &sealed.key_id),
    )?;
    Ok(result)
}

fn rekey(
    tx: &Transaction<'_>,
    resealed: &[(String, SealedSecret)],
    expected_version: &str,
    actor: &str,
) -> Result<(), StoreError> {
    let stored: Vec<String> = query_all(tx, "SELECT name FROM secrets ORDER BY name", [], |r| {
        r.get(0)
    })?;
    check_rekey(&secrets_version(tx)?, expected_version, &stored, resealed)?;
    let now = now_ms();
    for (name, sealed) in resealed {
        tx.prepare_cached(
            "UPDATE secrets SET nonce = ?2, ciphertext = ?3, key_id = ?4, updated_at = ?5 WHERE name = ?1",
        )
        .and_then(|mut st| st.execute(params![name, sealed.nonce, sealed.ciphertext, sealed.key_id, now]))
        .map_err(map_err)?;
    }
    append_audit(tx, &entries::secrets_rekeyed(actor, resealed))
}

/// The secrets' version (see [`secrets_version_of`]).
fn secrets_version(conn: &Connection) -> Result<String, StoreError> {
    let rows: Vec<(String, Vec<u8>)> = query_all(
        conn,
        "SELECT name, nonce FROM secrets ORDER BY name",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(secrets_version_of(&rows))
}

#[async_trait]
impl SecretStore for SqliteStore {
    async fn put_secret(
        &self,
        name: &str,
        sealed: &SealedSecret,
        mode: SecretWrite,
        actor: &str,
    ) -> Result<SecretWriteResult, StoreError> {
        match self
            .write(Write::PutSecret {
                name: name.to_owned(),
                sealed: sealed.clone(),
                mode,
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Secret(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn secret(&self, name: &str) -> Result<Option<(SealedSecret, SecretMeta)>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT name, nonce, ciphertext, key_id, created_at, rotated_at FROM secrets WHERE name = ?1",
            )
            .and_then(|mut st| st.query_row(params![name], |r| rows::secret(r)).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn list_secrets(&self) -> Result<Vec<SecretMeta>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT name, key_id, created_at, rotated_at FROM secrets ORDER BY name",
                [],
                |r| rows::secret_meta(r),
            )
        })
        .await
    }

    async fn delete_secret(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        match self
            .write(Write::DeleteSecret {
                name: name.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn rekey_secrets(
        &self,
        resealed: &[(String, SealedSecret)],
        expected_version: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.write(Write::Rekey {
            resealed: resealed.to_vec(),
            expected_version: expected_version.to_owned(),
            actor: actor.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn secrets_version(&self) -> Result<String, StoreError> {
        self.read(secrets_version).await
    }
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn create_token(
        &self,
        token: &ApiToken,
        token_hash: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::CreateToken {
                token: token.clone(),
                hash: token_hash.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn revoke_token(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        match self
            .write(Write::RevokeToken {
                name: name.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Flag(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }

    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let token_hash = token_hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens WHERE token_hash = ?1",
            )
            .and_then(|mut st| st.query_row(params![token_hash], |r| rows::token(r)).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at, name",
                [],
                |r| rows::token(r),
            )
        })
        .await
    }
}
