//! Sealed secrets and API tokens on SQLite: every query of
//! [`SecretStore`](crate::SecretStore) and [`TokenStore`](crate::TokenStore).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::audit::append_audit;
use super::{Done, Op, SqliteStore, map_err, parse_col, query_all, unexpected};
use crate::{
    ApiToken, NewAuditEntry, Role, SealedSecret, SecretMeta, SecretStore, SecretWrite,
    SecretWriteResult, StoreError, TokenStore, now_ms,
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
                append_audit(
                    tx,
                    &NewAuditEntry::new(actor, "secret.deleted", name, serde_json::json!({})),
                )?;
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
                append_audit(
                    tx,
                    &NewAuditEntry::new(
                        actor,
                        "token.created",
                        &token.name,
                        serde_json::json!({ "role": token.role.as_str(), "id": token.id }),
                    ),
                )?;
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
                append_audit(
                    tx,
                    &NewAuditEntry::new(actor, "token.revoked", name, serde_json::json!({})),
                )?;
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
        &NewAuditEntry::new(
            actor,
            action,
            name,
            serde_json::json!({ "key_id": sealed.key_id }),
        ),
    )?;
    Ok(result)
}

fn rekey(
    tx: &Transaction<'_>,
    resealed: &[(String, SealedSecret)],
    expected_version: &str,
    actor: &str,
) -> Result<(), StoreError> {
    if secrets_version(tx)? != expected_version {
        return Err(StoreError::Other(
            "a secret was set, rotated or deleted while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    let stored: Vec<String> = query_all(tx, "SELECT name FROM secrets ORDER BY name", [], |r| {
        r.get(0)
    })?;
    let mut given: Vec<&str> = resealed.iter().map(|(n, _)| n.as_str()).collect();
    given.sort_unstable();
    if given != stored.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(StoreError::Other(
            "the secrets changed while rekeying; nothing was changed, run rekey again".into(),
        ));
    }
    let now = now_ms();
    for (name, sealed) in resealed {
        tx.prepare_cached(
            "UPDATE secrets SET nonce = ?2, ciphertext = ?3, key_id = ?4, updated_at = ?5 WHERE name = ?1",
        )
        .and_then(|mut st| st.execute(params![name, sealed.nonce, sealed.ciphertext, sealed.key_id, now]))
        .map_err(map_err)?;
    }
    let key_id = resealed
        .first()
        .map(|(_, s)| s.key_id.clone())
        .unwrap_or_default();
    append_audit(
        tx,
        &NewAuditEntry::new(
            actor,
            "secrets.rekeyed",
            "*",
            serde_json::json!({ "secrets": resealed.len(), "key_id": key_id }),
        ),
    )
}

/// Every seal draws a fresh random nonce, so the nonces change on each
/// set, rotation and rekey, even within one millisecond.
fn secrets_version(conn: &Connection) -> Result<String, StoreError> {
    // Built here in name order: group_concat's order is not guaranteed.
    let rows: Vec<(String, Vec<u8>)> = query_all(
        conn,
        "SELECT name, nonce FROM secrets ORDER BY name",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for (name, nonce) in &rows {
        sha2::Digest::update(&mut h, name.as_bytes());
        sha2::Digest::update(&mut h, [0]);
        sha2::Digest::update(&mut h, nonce);
    }
    Ok(format!(
        "{}:{}",
        rows.len(),
        hex::encode(sha2::Digest::finalize(h))
    ))
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get("id")?,
        name: r.get("name")?,
        role: parse_col(Role::parse(&r.get::<_, String>("role")?))?,
        created_at: r.get("created_at")?,
        revoked_at: r.get("revoked_at")?,
    })
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
            .and_then(|mut st| {
                st.query_row(params![name], |r| {
                    Ok((
                        SealedSecret {
                            nonce: r.get("nonce")?,
                            ciphertext: r.get("ciphertext")?,
                            key_id: r.get("key_id")?,
                        },
                        SecretMeta {
                            name: r.get("name")?,
                            key_id: r.get("key_id")?,
                            created_at: r.get("created_at")?,
                            rotated_at: r.get("rotated_at")?,
                        },
                    ))
                })
                .optional()
            })
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
                |r| {
                    Ok(SecretMeta {
                        name: r.get("name")?,
                        key_id: r.get("key_id")?,
                        created_at: r.get("created_at")?,
                        rotated_at: r.get("rotated_at")?,
                    })
                },
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
            .and_then(|mut st| st.query_row(params![token_hash], token_from_row).optional())
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
                token_from_row,
            )
        })
        .await
    }
}
