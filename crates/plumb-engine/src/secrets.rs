//! The secrets a running engine holds: opened once (and again when they
//! change), used only where a connection's or webhook's auth names them,
//! and the redactor built from all of them.
//!
//! Expressions never see a secret: values are not part of the context
//! document, and every step output is redacted before it enters it, so an
//! upstream that echoes a token cannot hand it to another host.

use std::collections::HashMap;
use std::sync::Arc;

use plumb_core::model::Project;
use plumb_store::{SealedSecret, Store, StoreError};
use plumb_vault::{MasterKey, Redactor, Sealed, SecretValue, VaultError};

/// Why secrets could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key or a sealed value is wrong.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The project uses secrets but no master key is available.
    #[error("the project uses secrets ({names}) but no master key is available: {why}")]
    NoKey {
        /// The secrets used.
        names: String,
        /// Why the key could not be loaded.
        why: String,
    },
    /// The key in use is not the one the stored secrets are sealed with
    /// (a rekey happened since it was loaded, or another key is set).
    #[error(
        "the master key in use (fingerprint {current}) is not the one the stored secrets are sealed with ({stored}); after a rekey, reload (SIGHUP, POST /api/v1/deployments or a restart) or use the current key, so nothing is sealed under a retired key"
    )]
    KeyRetired {
        /// The fingerprint of the key in use.
        current: String,
        /// The fingerprint the stored secrets carry.
        stored: String,
    },
    /// A referenced secret is not in the store.
    #[error(
        "{used_by} names the secret `{name}`, which is not set; set it with `plumb secrets set {name}`"
    )]
    Missing {
        /// The secret.
        name: String,
        /// Who names it.
        used_by: String,
    },
}

/// Opened secrets and the redactor for them.
#[derive(Debug, Default)]
pub struct Secrets {
    values: HashMap<String, SecretValue>,
    redactor: Redactor,
    /// The store's secrets version these were loaded at.
    pub version: String,
}

impl Secrets {
    /// A secret's value.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&SecretValue> {
        self.values.get(name)
    }

    /// Redacts every secret value.
    #[must_use]
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }
}

/// Shortest secret value accepted: a shorter one could not be redacted
/// (it would match everywhere). Third-party credentials are what they are,
/// so this is not a strength policy.
pub const MIN_SECRET_LEN: usize = plumb_vault::MIN_REDACTED_LEN;

/// A scrubber for the HTTP connector that redacts with this snapshot.
#[must_use]
pub fn scrubber(secrets: Arc<Secrets>) -> plumb_connectors::http::Scrub {
    Arc::new(move |text: &str| secrets.redactor().redact(text).into_owned())
}

/// Converts between the vault's and the store's view of a sealed value.
#[must_use]
pub fn to_store(sealed: Sealed) -> SealedSecret {
    SealedSecret {
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        key_id: sealed.key_id,
    }
}

/// The vault's view of a stored sealed value.
#[must_use]
pub fn from_store(sealed: SealedSecret) -> Sealed {
    Sealed {
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        key_id: sealed.key_id,
    }
}

/// Opens every stored secret (so all of them are redacted) and checks that
/// each secret the project uses exists.
///
/// `key` is the master key, or why there is none.
///
/// # Errors
///
/// [`SecretsError`] when a used secret is missing or cannot be opened, or
/// secrets are used without a key.
pub async fn load(
    store: &dyn Store,
    key: Result<&MasterKey, &str>,
    project: &Project,
) -> Result<Arc<Secrets>, SecretsError> {
    let version = store.secrets_version().await?;
    let uses = project.secret_uses();
    let stored = store.list_secrets().await?;
    let key = match key {
        Ok(k) => k,
        Err(why) => {
            if uses.is_empty() {
                if !stored.is_empty() {
                    tracing::warn!(
                        why,
                        "Secrets are stored but no master key is available; none is used by the project."
                    );
                }
                return Ok(Arc::new(Secrets {
                    version,
                    ..Secrets::default()
                }));
            }
            return Err(SecretsError::NoKey {
                names: uses.keys().cloned().collect::<Vec<_>>().join(", "),
                why: why.to_owned(),
            });
        }
    };
    let mut values = HashMap::new();
    for meta in &stored {
        let Some((sealed, _)) = store.secret(&meta.name).await? else {
            continue;
        };
        match key.open(&meta.name, &from_store(sealed)) {
            Ok(v) => {
                values.insert(meta.name.clone(), v);
            }
            Err(e) if !uses.contains_key(&meta.name) => {
                tracing::warn!(secret = %meta.name, error = %e, "An unused secret cannot be opened.");
            }
            Err(e) => return Err(e.into()),
        }
    }
    for (name, users) in &uses {
        if !values.contains_key(name) {
            return Err(SecretsError::Missing {
                name: name.clone(),
                used_by: users.join(", "),
            });
        }
    }
    // Basic auth sends base64("user:password"), which is not the base64 of
    // the password alone: redact that credential as a whole too, so an
    // upstream echoing the Authorization header cannot leak it.
    let mut derived: Vec<(String, SecretValue)> = Vec::new();
    for connection in project.config.connections.values() {
        match connection {
            plumb_core::model::Connection::Http(http) => {
                if let Some(plumb_core::model::HttpAuth::Basic { username, secret }) = &http.auth
                    && let Some(value) = values.get(secret)
                {
                    derived.push((
                        secret.clone(),
                        SecretValue::new(format!("{username}:{}", value.expose())),
                    ));
                }
            }
            // A database URL kept as a secret holds a password of its own: a
            // driver error quoting only the password is caught too.
            plumb_core::model::Connection::Sql(plumb_core::model::SqlConnection {
                url, ..
            })
            | plumb_core::model::Connection::Broker(plumb_core::model::BrokerConnection {
                url,
                ..
            }) => {
                if let plumb_core::model::SqlUrl::Secret(secret) = url
                    && let Some(value) = values.get(secret)
                    && let Ok(url) = url::Url::parse(value.expose())
                    && let Some(password) = url.password()
                {
                    let password = percent_decode(password);
                    if password.len() >= 4 {
                        derived.push((secret.clone(), SecretValue::new(password)));
                    }
                }
            }
        }
    }
    let redactor = Redactor::new(
        values
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(derived.iter().map(|(k, v)| (k.as_str(), v))),
    )?;
    Ok(Arc::new(Secrets {
        values,
        redactor,
        version,
    }))
}

/// A URL component, percent-decoded (a password as the server sees it).
fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("p={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| text.to_owned(), |(_, v)| v.into_owned())
}
