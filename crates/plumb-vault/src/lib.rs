//! plumb's secrets: the master key, sealing and opening secret values, and
//! redaction of secret values from anything plumb writes or shows.
//!
//! Values are sealed with XChaCha20-Poly1305 (RustCrypto) under a 32-byte
//! master key, with a fresh random 24-byte nonce per seal and the secret's
//! name as associated data: a sealed value copied under another name does
//! not open. The master key lives outside the store (an environment
//! variable or a key file readable by its owner only); the store holds only
//! sealed values and a fingerprint of the key that sealed them, so opening
//! with the wrong key is reported as such instead of as corruption.
//!
//! In memory, values live in [`SecretValue`], which zeroes itself on drop
//! and prints `[redacted]`. This crate knows nothing of stores, workflows or
//! the network.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// The environment variable holding the master key (base64 of 32 bytes).
pub const MASTER_KEY_ENV: &str = "PLUMB_MASTER_KEY";

/// What can go wrong with keys and sealed values.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key text is not base64 of 32 bytes.
    #[error(
        "the master key in {source_name} is not valid: {reason}; it must be 32 random bytes, base64-encoded (as `plumb init` writes it)"
    )]
    BadKey {
        /// Where the key came from.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file can be read by others.
    #[error(
        "the master key file {path} can be read by group or others (mode {mode:o}); fix it with `chmod 600 {path}`"
    )]
    KeyFileExposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// No key configured.
    #[error(
        "no master key: set {MASTER_KEY_ENV}, or create the key file {path} with `plumb init` (the first `plumb secrets set` also creates it)"
    )]
    NoKey {
        /// The key file looked for.
        path: String,
    },
    /// The key file could not be read or written.
    #[error("cannot use the master key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The key file belongs to another user.
    #[error(
        "the master key file {path} is owned by uid {owner}, not by the user plumb runs as (uid {me}); fix it with `chown {me} {path}` if that file is really yours"
    )]
    KeyFileOwner {
        /// The file.
        path: String,
        /// Its owner.
        owner: u32,
        /// The effective uid plumb runs as.
        me: u32,
    },
    /// The redaction matcher could not be built (only for an absurd
    /// number or size of secrets); nothing runs without redaction.
    #[error("cannot build the redaction of secret values: {0}")]
    Redactor(String),
    /// A value sealed under another key.
    #[error(
        "the secret `{name}` was sealed with another master key (fingerprint {sealed_with}, this key is {current}); use the key it was sealed with, or set the secret again"
    )]
    WrongKey {
        /// The secret.
        name: String,
        /// Fingerprint of the key that sealed it.
        sealed_with: String,
        /// Fingerprint of the key in use.
        current: String,
    },
    /// Authentication failed: the sealed value or its name was altered.
    #[error(
        "the secret `{name}` does not open: its sealed value was altered or belongs to another name"
    )]
    Tampered {
        /// The secret.
        name: String,
    },
    /// The sealed value holds bytes that are not UTF-8 text.
    #[error("the secret `{name}` is not text")]
    NotText {
        /// The secret.
        name: String,
    },
}

/// The 32-byte master key. Zeroed on drop; never printed.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MasterKey([redacted], fingerprint {})",
            self.fingerprint()
        )
    }
}

impl MasterKey {
    /// A new random key from the operating system's generator.
    #[must_use]
    pub fn generate() -> Self {
        let key = Key::generate();
        let mut bytes = Zeroizing::new([0_u8; 32]);
        bytes.copy_from_slice(key.as_slice());
        Self(bytes)
    }

    /// Parses base64 text (surrounding whitespace ignored).
    ///
    /// # Errors
    ///
    /// [`VaultError::BadKey`] unless the text decodes to exactly 32 bytes.
    pub fn from_base64(text: &str, source_name: &str) -> Result<Self, VaultError> {
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| VaultError::BadKey {
                    source_name: source_name.to_owned(),
                    reason: e.to_string(),
                })?,
        );
        if decoded.len() != 32 {
            return Err(VaultError::BadKey {
                source_name: source_name.to_owned(),
                reason: format!("it decodes to {} bytes, not 32", decoded.len()),
            });
        }
        let mut bytes = Zeroizing::new([0_u8; 32]);
        bytes.copy_from_slice(&decoded);
        Ok(Self(bytes))
    }

    /// The key as base64 text (for writing the key file).
    #[must_use]
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_slice()))
    }

    /// A short public identifier of the key: the first 16 hex digits of
    /// SHA-256 over a fixed label and the key. Safe to store and show.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"plumb master key fingerprint v1\0");
        h.update(self.0.as_slice());
        hex::encode(&h.finalize()[..8])
    }

    /// The key from `PLUMB_MASTER_KEY` if set, else from `file`.
    ///
    /// The file must be readable by its owner only: plumb refuses a key file
    /// that group or others can read.
    ///
    /// # Errors
    ///
    /// [`VaultError::NoKey`] when neither is there, and the errors of a bad
    /// or exposed key.
    pub fn load(env_value: Option<&str>, file: &Path) -> Result<Self, VaultError> {
        if let Some(text) = env_value.filter(|t| !t.trim().is_empty()) {
            return Self::from_base64(text, MASTER_KEY_ENV);
        }
        let path = file.display().to_string();
        let text = read_private(file)?;
        Self::from_base64(&text, &path)
    }

    /// Writes a new random key to `file` with mode 0600, refusing to replace
    /// an existing file.
    ///
    /// # Errors
    ///
    /// [`VaultError::KeyFile`] if the file exists or cannot be written.
    pub fn create_file(file: &Path) -> Result<Self, VaultError> {
        let path = file.display().to_string();
        let io = |e: std::io::Error| VaultError::KeyFile {
            path: path.clone(),
            reason: e.to_string(),
        };
        if let Some(parent) = file.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let key = Self::generate();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(file).map_err(io)?;
        let mut text = key.to_base64();
        text.push('\n');
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(key)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&Key::from(*self.0))
    }

    /// Seals `value` under `name`.
    #[must_use]
    pub fn seal(&self, name: &str, value: &SecretValue) -> Sealed {
        let nonce = XNonce::generate();
        // Encryption cannot fail for in-memory buffers of this size; an
        // empty ciphertext would fail to open and be reported, never used.
        let ciphertext = self
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: value.expose().as_bytes(),
                    aad: aad(name).as_bytes(),
                },
            )
            .unwrap_or_default();
        Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
            key_id: self.fingerprint(),
        }
    }

    /// Opens a value sealed under `name`.
    ///
    /// # Errors
    ///
    /// [`VaultError::WrongKey`] when another key sealed it,
    /// [`VaultError::Tampered`] when it does not authenticate.
    pub fn open(&self, name: &str, sealed: &Sealed) -> Result<SecretValue, VaultError> {
        let current = self.fingerprint();
        if sealed.key_id != current {
            return Err(VaultError::WrongKey {
                name: name.to_owned(),
                sealed_with: sealed.key_id.clone(),
                current,
            });
        }
        let Ok(nonce) = XNonce::try_from(sealed.nonce.as_slice()) else {
            return Err(VaultError::Tampered {
                name: name.to_owned(),
            });
        };
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &sealed.ciphertext,
                        aad: aad(name).as_bytes(),
                    },
                )
                .map_err(|_| VaultError::Tampered {
                    name: name.to_owned(),
                })?,
        );
        let text = String::from_utf8(plain.to_vec()).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            VaultError::NotText {
                name: name.to_owned(),
            }
        })?;
        Ok(SecretValue::new(text))
    }
}

/// A new random API token (`plb_` and 32 random bytes, base64url): shown
/// once, stored only as its [`token_hash`].
#[must_use]
pub fn new_api_token() -> Zeroizing<String> {
    let bytes = Key::generate();
    Zeroizing::new(format!(
        "plb_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_slice())
    ))
}

/// The MAC behind a `/healthz` challenge proof.
fn healthz_mac(instance_secret: &str, challenge: &str) -> hmac::Hmac<sha2::Sha256> {
    use hmac::{KeyInit, Mac};
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(instance_secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"plumb healthz v1\0");
    mac.update(challenge.as_bytes());
    mac
}

/// A server's answer to a `/healthz` challenge: HMAC-SHA256 of the
/// challenge under the store's instance secret, hex.
#[must_use]
pub fn healthz_proof(instance_secret: &str, challenge: &str) -> String {
    use hmac::Mac;
    hex::encode(
        healthz_mac(instance_secret, challenge)
            .finalize()
            .into_bytes(),
    )
}

/// Whether `proof` answers `challenge` for this instance secret (constant
/// time).
#[must_use]
pub fn healthz_proof_ok(instance_secret: &str, challenge: &str, proof: &str) -> bool {
    use hmac::Mac;
    hex::decode(proof).is_ok_and(|given| {
        healthz_mac(instance_secret, challenge)
            .verify_slice(&given)
            .is_ok()
    })
}

/// The stored form of an API token: SHA-256, hex. Tokens have 256 bits of
/// entropy, so a fast hash is enough: there is nothing to brute-force.
#[must_use]
pub fn token_hash(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"plumb api token v1\0");
    h.update(token.as_bytes());
    hex::encode(h.finalize())
}

fn aad(name: &str) -> String {
    format!("plumb secret v1\0{name}")
}

/// Reads the key file, refusing one that is not safe to trust: a symbolic
/// link, something other than a regular file, a file owned by a user other
/// than plumb's (or root), or one group or others can read.
/// The checks and the read use one open descriptor, so the file cannot be
/// swapped between them.
///
/// # Errors
///
/// [`VaultError::NoKey`] when there is no file, [`VaultError::KeyFileExposed`],
/// [`VaultError::KeyFileOwner`] or [`VaultError::KeyFile`].
pub fn read_private(file: &Path) -> Result<Zeroizing<String>, VaultError> {
    use std::io::Read;
    let path = file.display().to_string();
    let io = |e: std::io::Error| VaultError::KeyFile {
        path: path.clone(),
        reason: e.to_string(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No symlink at the last component, and never block (a FIFO).
        options.custom_flags(
            (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK)
                .bits()
                .cast_signed(),
        );
    }
    let mut handle = match options.open(file) {
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VaultError::NoKey { path });
        }
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(VaultError::KeyFile {
                path: path.clone(),
                reason: "it is a symbolic link; point to the key file itself".into(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = handle.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(VaultError::KeyFile {
                path,
                reason: "it is not a regular file".into(),
            });
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(VaultError::KeyFileExposed { path, mode });
        }
        // Root's own files are trusted; any other owner could replace the key.
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(VaultError::KeyFileOwner {
                path,
                owner: meta.uid(),
                me,
            });
        }
    }
    let mut text = Zeroizing::new(String::new());
    handle.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

/// A sealed secret as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The 24-byte nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
    /// Fingerprint of the key that sealed it.
    pub key_id: String,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

/// A secret value in memory: zeroed on drop, printed as `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a value.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value itself, for the one place that must send it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces every known secret value — and its base64 (standard and
/// URL-safe, padded or not) and URL-encoded forms — with `[redacted:NAME]`.
///
/// Values shorter than [`MIN_REDACTED_LEN`] characters are not searched for:
/// replacing every `a` in every log line would destroy the log and protect
/// nothing.
#[derive(Clone, Default)]
pub struct Redactor {
    matcher: Option<aho_corasick::AhoCorasick>,
    replacements: Vec<String>,
}

/// Shortest value redaction looks for.
pub const MIN_REDACTED_LEN: usize = 4;

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} patterns)", self.replacements.len())
    }
}

impl Redactor {
    /// A redactor for these named values.
    ///
    /// # Errors
    ///
    /// [`VaultError::Redactor`] if the matcher cannot be built.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = (&'a str, &'a SecretValue)>,
    ) -> Result<Self, VaultError> {
        let mut patterns: Vec<Zeroizing<String>> = Vec::new();
        let mut replacements = Vec::new();
        for (name, value) in secrets {
            let v = value.expose();
            if v.chars().count() < MIN_REDACTED_LEN {
                continue;
            }
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            let mut forms: Vec<Zeroizing<String>> = vec![Zeroizing::new(v.to_owned())];
            for engine in engines {
                forms.push(Zeroizing::new(engine.encode(v.as_bytes())));
            }
            forms.push(Zeroizing::new(url_encode(v)));
            forms.push(Zeroizing::new(url_encode(v).replace("%20", "+")));
            // A value with quotes, backslashes or control characters is
            // escaped when a JSON document or a Debug string holding it is
            // printed (an upstream's error body, a log field).
            if let Ok(quoted) = serde_json::to_string(v)
                && let Some(inner) = quoted.get(1..quoted.len() - 1)
            {
                forms.push(Zeroizing::new(inner.to_owned()));
            }
            forms.push(Zeroizing::new(v.escape_debug().to_string()));
            for form in forms {
                if !patterns.iter().any(|p| p.as_str() == form.as_str()) {
                    patterns.push(form);
                    replacements.push(format!("[redacted:{name}]"));
                }
            }
        }
        if patterns.is_empty() {
            return Ok(Self::default());
        }
        // Fail closed: without a matcher nothing would be redacted.
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|p| p.as_bytes()))
            .map_err(|e| VaultError::Redactor(e.to_string()))?;
        Ok(Self {
            matcher: Some(matcher),
            replacements,
        })
    }

    /// Whether there is anything to redact.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// The text with every secret form replaced.
    #[must_use]
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match &self.matcher {
            Some(m) if m.is_match(text) => Cow::Owned(m.replace_all(text, &self.replacements)),
            _ => Cow::Borrowed(text),
        }
    }

    /// Redacts every string (and object key) inside a JSON value, in place.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            serde_json::Value::Object(map) => {
                let entries: Vec<(String, serde_json::Value)> =
                    std::mem::take(map).into_iter().collect();
                for (k, mut v) in entries {
                    self.redact_json(&mut v);
                    map.insert(self.redact(&k).into_owned(), v);
                }
            }
            _ => {}
        }
    }
}

/// Percent-encodes everything outside the unreserved set (RFC 3986).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_and_key() {
        let key = MasterKey::generate();
        let sealed = key.seal("crm_token", &SecretValue::new("s3cr3t-value".into()));
        assert_eq!(
            key.open("crm_token", &sealed).expect("opens").expose(),
            "s3cr3t-value"
        );
        assert!(matches!(
            key.open("other", &sealed),
            Err(VaultError::Tampered { .. })
        ));
        let other = MasterKey::generate();
        assert!(matches!(
            other.open("crm_token", &sealed),
            Err(VaultError::WrongKey { .. })
        ));
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            key.open("crm_token", &flipped),
            Err(VaultError::Tampered { .. })
        ));
        // Two seals of the same value differ (fresh nonce).
        let again = key.seal("crm_token", &SecretValue::new("s3cr3t-value".into()));
        assert_ne!(again.ciphertext, sealed.ciphertext);
    }

    #[test]
    fn values_never_print() {
        let v = SecretValue::new("hunter2hunter2".into());
        assert_eq!(format!("{v} {v:?}"), "[redacted] [redacted]");
        let key = MasterKey::generate();
        assert!(!format!("{key:?}").contains(key.to_base64().as_str()));
    }

    #[test]
    fn key_files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/master.key");
        let key = MasterKey::create_file(&path).expect("create");
        assert!(
            MasterKey::create_file(&path).is_err(),
            "never replaces a key"
        );
        let loaded = MasterKey::load(None, &path).expect("load");
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = MasterKey::load(None, &path).expect_err("exposed");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        let from_env =
            MasterKey::load(Some(&key.to_base64()), &dir.path().join("missing")).expect("env");
        assert_eq!(from_env.fingerprint(), key.fingerprint());
        assert!(matches!(
            MasterKey::load(None, &dir.path().join("missing")),
            Err(VaultError::NoKey { .. })
        ));
        assert!(matches!(
            MasterKey::load(Some("bm90IDMyIGJ5dGVz"), &path),
            Err(VaultError::BadKey { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_or_foreign_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.key");
        MasterKey::create_file(&real).expect("create");
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = MasterKey::load(None, &link).expect_err("a symlink is refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // Handing the file to another user needs root; elsewhere the
        // ownership check cannot be exercised.
        if std::os::unix::fs::chown(&real, Some(65_534), None).is_ok() {
            let err = MasterKey::load(None, &real).expect_err("a foreign file is refused");
            assert!(
                matches!(err, VaultError::KeyFileOwner { owner: 65_534, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn redaction_covers_plain_base64_and_url_encoded_forms() {
        let v = SecretValue::new("tok+en/with=chars 42".into());
        let r = Redactor::new([("api", &v)]).expect("redactor");
        let b64 = base64::engine::general_purpose::STANDARD.encode(v.expose());
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.expose());
        let text = format!(
            "a {} b {b64} c {b64url} d {} e {}",
            v.expose(),
            url_encode(v.expose()),
            url_encode(v.expose()).replace("%20", "+")
        );
        let out = r.redact(&text);
        assert!(
            !out.contains(v.expose()) && !out.contains(&b64) && !out.contains(&b64url),
            "{out}"
        );
        assert_eq!(out.matches("[redacted:api]").count(), 5, "{out}");
        let mut doc = serde_json::json!({"headers": {"authorization": format!("Bearer {}", v.expose())}, "list": [b64]});
        r.redact_json(&mut doc);
        assert_eq!(doc["headers"]["authorization"], "Bearer [redacted:api]");
        assert_eq!(doc["list"][0], "[redacted:api]");
    }

    #[test]
    fn values_escaped_inside_printed_json_are_redacted() {
        let v = SecretValue::new("pa\"ss\\wo\nrd-42".into());
        let r = Redactor::new([("pw", &v)]).expect("redactor");
        let body = serde_json::json!({"error": format!("bad credentials {}", v.expose())});
        let printed = body.to_string();
        let out = r.redact(&printed);
        assert!(out.contains("[redacted:pw]"), "{out}");
        assert!(!out.contains("wo\\nrd"), "{out}");
        let debug = format!("{:?}", v.expose());
        assert_eq!(r.redact(&debug), "\"[redacted:pw]\"");
    }

    #[test]
    fn a_healthz_proof_holds_only_for_its_secret_and_challenge() {
        let proof = healthz_proof("instance-secret", "challenge-1");
        assert!(healthz_proof_ok("instance-secret", "challenge-1", &proof));
        assert!(!healthz_proof_ok("other-secret", "challenge-1", &proof));
        assert!(!healthz_proof_ok("instance-secret", "challenge-2", &proof));
        assert!(!healthz_proof_ok(
            "instance-secret",
            "challenge-1",
            "not hex"
        ));
        assert!(!healthz_proof_ok("instance-secret", "challenge-1", ""));
    }

    #[test]
    fn tiny_values_are_not_redacted_everywhere() {
        let v = SecretValue::new("ab".into());
        let r = Redactor::new([("tiny", &v)]).expect("redactor");
        assert_eq!(r.redact("about a cab"), "about a cab");
    }

    proptest::proptest! {
        #[test]
        fn redacted_text_never_contains_the_value(value in "[ -~]{4,40}", prefix in ".{0,20}", suffix in ".{0,20}") {
            let v = SecretValue::new(value.clone());
            let r = Redactor::new([("s", &v)]).expect("redactor");
            let out = r.redact(&format!("{prefix}{value}{suffix}")).into_owned();
            // Between the markers, no piece of the text still holds the value.
            let leaked = out.split("[redacted:s]").any(|piece| piece.contains(value.as_str()));
            proptest::prop_assert!(!leaked, "{} leaked in {}", value, out);
        }
    }
}
