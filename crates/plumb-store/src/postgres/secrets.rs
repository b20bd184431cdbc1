//! Sealed secrets and API tokens on PostgreSQL: every query of
//! [`SecretStore`](crate::SecretStore) and [`TokenStore`](crate::TokenStore).
//!
//! A rekey must never undo a secret set or rotated while it ran, and a set
//! must never store a value under a key a rekey just retired. Both are
//! decided under table locks: every secret write holds `ROW EXCLUSIVE`
//! (taken before its checks), a rekey `SHARE ROW EXCLUSIVE`, and the two
//! conflict. So a rekey checks the version it was given with no write in
//! flight, and a write that waited for a rekey checks the key after it.

use async_trait::async_trait;
use sqlx::postgres::PgConnection;

use super::audit::append_audit;
use super::{PgStore, fetch_all, fetch_optional, map_err};
use crate::rows;
use crate::writes::{check_rekey, entries, secrets_version_of};
use crate::{
    ApiToken, SealedSecret, SecretMeta, SecretStore, SecretWrite, SecretWriteResult, StoreError,
    TokenStore, now_ms,
};

/// The secrets' version (see [`secrets_version_of`]) and their names.
async fn secrets_version(conn: &mut PgConnection) -> Result<(String, Vec<String>), StoreError> {
    let found: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, nonce FROM secrets ORDER BY name")
            .fetch_all(conn)
            .await
            .map_err(map_err)?;
    let names = found.iter().map(|(n, _)| n.clone()).collect();
    Ok((secrets_version_of(&found), names))
}

async fn put_secret(
    conn: &mut PgConnection,
    name: &str,
    sealed: &SealedSecret,
    mode: SecretWrite,
    actor: &str,
) -> Result<SecretWriteResult, StoreError> {
    // A mode that conflicts with itself: two writers sealing with
    // different master keys must not both pass the key check below.
    sqlx::query("LOCK TABLE secrets IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    // Checked in the writing transaction, after any rekey in flight has
    // committed, so a value is never left under a retired key.
    let other_key: Option<String> =
        sqlx::query_scalar("SELECT key_id FROM secrets WHERE name <> $1 AND key_id <> $2 LIMIT 1")
            .bind(name)
            .bind(&sealed.key_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
    if let Some(stored) = other_key {
        return Ok(SecretWriteResult::KeyMismatch { stored });
    }
    // A concurrent set of the same name waits for this one and then
    // finds the name taken (and the other way round).
    let (sql, result, missed, action) = match mode {
        SecretWrite::Create => (
            "INSERT INTO secrets (name, nonce, ciphertext, key_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (name) DO NOTHING",
            SecretWriteResult::Created,
            SecretWriteResult::AlreadyExists,
            "secret.set",
        ),
        SecretWrite::Rotate => (
            "UPDATE secrets SET nonce = $2, ciphertext = $3, key_id = $4, rotated_at = $5, \
             updated_at = $5 WHERE name = $1",
            SecretWriteResult::Rotated,
            SecretWriteResult::NotFound,
            "secret.rotated",
        ),
    };
    let rows = sqlx::query(sql)
        .bind(name)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(&sealed.key_id)
        .bind(now_ms())
        .execute(&mut *conn)
        .await
        .map_err(map_err)?
        .rows_affected();
    if rows == 0 {
        return Ok(missed);
    }
    append_audit(
        conn,
        &entries::secret_written(actor, action, name, &sealed.key_id),
    )
    .await?;
    Ok(result)
}

async fn rekey(
    conn: &mut PgConnection,
    resealed: &[(String, SealedSecret)],
    expected_version: &str,
    actor: &str,
) -> Result<(), StoreError> {
    sqlx::query("LOCK TABLE secrets IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    let (version, stored) = secrets_version(conn).await?;
    check_rekey(&version, expected_version, &stored, resealed)?;
    let now = now_ms();
    for (name, sealed) in resealed {
        sqlx::query(
            "UPDATE secrets SET nonce = $2, ciphertext = $3, key_id = $4, updated_at = $5 \
             WHERE name = $1",
        )
        .bind(name)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(&sealed.key_id)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    append_audit(conn, &entries::secrets_rekeyed(actor, resealed)).await
}

#[async_trait]
impl SecretStore for PgStore {
    async fn put_secret(
        &self,
        name: &str,
        sealed: &SealedSecret,
        mode: SecretWrite,
        actor: &str,
    ) -> Result<SecretWriteResult, StoreError> {
        let mut tx = self.begin().await?;
        let result = put_secret(&mut tx, name, sealed, mode, actor).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(result)
    }

    async fn secret(&self, name: &str) -> Result<Option<(SealedSecret, SecretMeta)>, StoreError> {
        let query = sqlx::query(
            "SELECT name, nonce, ciphertext, key_id, created_at, rotated_at FROM secrets \
             WHERE name = $1",
        )
        .bind(name);
        fetch_optional(query, &self.pool, rows::secret).await
    }

    async fn list_secrets(&self) -> Result<Vec<SecretMeta>, StoreError> {
        let query =
            sqlx::query("SELECT name, key_id, created_at, rotated_at FROM secrets ORDER BY name");
        fetch_all(query, &self.pool, rows::secret_meta).await
    }

    async fn delete_secret(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if rows == 1 {
            append_audit(&mut tx, &entries::secret_deleted(actor, name)).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(rows == 1)
    }

    async fn rekey_secrets(
        &self,
        resealed: &[(String, SealedSecret)],
        expected_version: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        rekey(&mut tx, resealed, expected_version, actor).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn secrets_version(&self) -> Result<String, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        Ok(secrets_version(&mut conn).await?.0)
    }
}

#[async_trait]
impl TokenStore for PgStore {
    async fn create_token(
        &self,
        token: &ApiToken,
        token_hash: &str,
        actor: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(token.role.as_str())
        .bind(token_hash)
        .bind(token.created_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if rows == 1 {
            append_audit(&mut tx, &entries::token_created(actor, token)).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(rows == 1)
    }

    async fn revoke_token(&self, name: &str, actor: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
        )
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if rows == 1 {
            append_audit(&mut tx, &entries::token_revoked(actor, name)).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(rows == 1)
    }

    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let query = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens WHERE token_hash = $1",
        )
        .bind(token_hash);
        fetch_optional(query, &self.pool, rows::token).await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let query = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens \
             ORDER BY created_at, name",
        );
        fetch_all(query, &self.pool, rows::token).await
    }
}
