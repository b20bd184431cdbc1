//! Webhook sender authentication: a generic HMAC-SHA256 signature, a bearer
//! secret, or a known sender's published signing scheme.
//!
//! Everything here is a pure function of the secret, the request headers,
//! the raw body and the current time, so each scheme is tested against
//! signatures made by the sender's own SDK. MACs are compared with
//! [`Mac::verify_slice`] (constant time); a bearer secret is compared via
//! the constant-time equality of two SHA-256 digests, so neither its bytes
//! nor its length leak through timing.

use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use plumb_core::model::{WebhookAuth, WebhookPreset};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How long a signed timestamp stays acceptable for the presets that sign
/// one; each sender documents five minutes.
const PRESET_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a request was not accepted as coming from the sender. Shown to the
/// caller: it says what is wrong without revealing anything about the
/// secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    /// A header the scheme needs is absent.
    #[error("the `{0}` header is missing")]
    MissingHeader(String),
    /// A header is present but not in the scheme's format.
    #[error("the `{header}` header is malformed: {why}")]
    Malformed {
        /// The header.
        header: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The signed timestamp is too far from now.
    #[error("the signed timestamp is {age_s} s away from now (tolerance {tolerance_s} s)")]
    Stale {
        /// Distance from now, seconds.
        age_s: u64,
        /// Accepted distance, seconds.
        tolerance_s: u64,
    },
    /// No signature matched.
    #[error("the signature does not match")]
    BadSignature,
    /// The bearer secret is wrong.
    #[error("the bearer secret does not match")]
    BadBearer,
    /// The configured secret cannot be used as this scheme's key.
    #[error("the configured secret is not a valid key for this scheme: {0}")]
    BadSecret(&'static str),
}

impl Rejection {
    /// A stable name for the kind of rejection (for rate limits and
    /// metrics; carries no request data).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::Malformed { .. } => "malformed",
            Self::Stale { .. } => "stale",
            Self::BadSignature => "bad_signature",
            Self::BadBearer => "bad_bearer",
            Self::BadSecret(_) => "bad_secret",
        }
    }
}

/// Checks a request against a trigger's `auth`, with `secret` the value of
/// the secret it names and `now` in Unix seconds.
///
/// # Errors
///
/// The first reason the request is not authentic.
pub fn verify(
    auth: &WebhookAuth,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), Rejection> {
    match auth {
        WebhookAuth::Bearer { .. } => bearer(secret, headers),
        WebhookAuth::Hmac {
            header,
            prefix,
            timestamp_header,
            tolerance,
            ..
        } => generic(
            secret,
            headers,
            body,
            now,
            header,
            prefix,
            timestamp_header.as_deref(),
            *tolerance,
        ),
        WebhookAuth::Preset { preset, .. } => match preset {
            WebhookPreset::Github => github(secret, headers, body),
            WebhookPreset::Stripe => stripe(secret, headers, body, now),
            WebhookPreset::Slack => slack(secret, headers, body, now),
            WebhookPreset::Shopify => shopify(secret, headers, body),
            WebhookPreset::StandardWebhooks => standard_webhooks(secret, headers, body, now),
        },
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, Rejection> {
    let value = headers
        .get(name)
        .ok_or_else(|| Rejection::MissingHeader(name.to_owned()))?;
    value
        .to_str()
        .map(str::trim)
        .map_err(|_| Rejection::Malformed {
            header: name.to_owned(),
            why: "not visible ASCII",
        })
}

/// A MAC keyed with `key` over the concatenation of `parts`.
fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether any candidate signature is the MAC of `parts`.
fn any_matches(key: &[u8], parts: &[&[u8]], candidates: &[Vec<u8>]) -> Result<(), Rejection> {
    let expected = mac(key, parts);
    // Each candidate is checked in constant time; which one matched is not
    // secret.
    if candidates
        .iter()
        .any(|c| expected.clone().verify_slice(c).is_ok())
    {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

fn fresh(
    timestamp: &str,
    header_name: &str,
    now: i64,
    tolerance: Duration,
) -> Result<(), Rejection> {
    let ts: i64 = timestamp.parse().map_err(|_| Rejection::Malformed {
        header: header_name.to_owned(),
        why: "the timestamp is not a whole number of Unix seconds",
    })?;
    let age = now.abs_diff(ts);
    if age > tolerance.as_secs() {
        return Err(Rejection::Stale {
            age_s: age,
            tolerance_s: tolerance.as_secs(),
        });
    }
    Ok(())
}

fn bearer(secret: &str, headers: &HeaderMap) -> Result<(), Rejection> {
    let value = header(headers, "authorization")?;
    let presented = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(Rejection::Malformed {
            header: "authorization".into(),
            why: "expected `Bearer <secret>`",
        })?;
    let a = Sha256::digest(presented.trim().as_bytes());
    let b = Sha256::digest(secret.as_bytes());
    if bool::from(a.as_slice().ct_eq(b.as_slice())) {
        Ok(())
    } else {
        Err(Rejection::BadBearer)
    }
}

/// Decodes a signature written as hex or, failing that, base64.
fn decode_signature(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok().or_else(|| BASE64.decode(text).ok())
}

#[allow(clippy::too_many_arguments)]
fn generic(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    header_name: &str,
    prefix: &str,
    timestamp_header: Option<&str>,
    tolerance: Duration,
) -> Result<(), Rejection> {
    let value = header(headers, header_name)?;
    let encoded = value.strip_prefix(prefix).ok_or(Rejection::Malformed {
        header: header_name.to_owned(),
        why: "it does not start with the configured prefix",
    })?;
    let signature = decode_signature(encoded.trim()).ok_or(Rejection::Malformed {
        header: header_name.to_owned(),
        why: "the signature is neither hex nor base64",
    })?;
    match timestamp_header {
        None => any_matches(secret.as_bytes(), &[body], &[signature]),
        Some(ts_header) => {
            let ts = header(headers, ts_header)?;
            fresh(ts, ts_header, now, tolerance)?;
            any_matches(
                secret.as_bytes(),
                &[ts.as_bytes(), b".", body],
                &[signature],
            )
        }
    }
}

/// GitHub: `X-Hub-Signature-256: sha256=<hex>` over the body. GitHub signs
/// no timestamp, so replays are not detectable from the signature alone.
fn github(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
    const NAME: &str = "x-hub-signature-256";
    let value = header(headers, NAME)?;
    let signature = value
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(Rejection::Malformed {
            header: NAME.into(),
            why: "expected `sha256=<hex>`",
        })?;
    any_matches(secret.as_bytes(), &[body], &[signature])
}

/// Stripe: `Stripe-Signature: t=<ts>,v1=<hex>[,v1=<hex>…]` over
/// `{t}.{body}`, keyed with the whole `whsec_…` secret. Several `v1`
/// entries appear while a secret is being rolled.
fn stripe(secret: &str, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Rejection> {
    const NAME: &str = "stripe-signature";
    let value = header(headers, NAME)?;
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for item in value.split(',') {
        match item.trim().split_once('=') {
            Some(("t", t)) => timestamp = Some(t),
            Some(("v1", sig)) => {
                if let Ok(bytes) = hex::decode(sig) {
                    candidates.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(Rejection::Malformed {
        header: NAME.into(),
        why: "no `t=` timestamp",
    })?;
    if candidates.is_empty() {
        return Err(Rejection::Malformed {
            header: NAME.into(),
            why: "no `v1=` signature",
        });
    }
    fresh(timestamp, NAME, now, PRESET_TOLERANCE)?;
    any_matches(
        secret.as_bytes(),
        &[timestamp.as_bytes(), b".", body],
        &candidates,
    )
}

/// Slack: `X-Slack-Signature: v0=<hex>` over `v0:{ts}:{body}` with
/// `X-Slack-Request-Timestamp`.
fn slack(secret: &str, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Rejection> {
    const SIG: &str = "x-slack-signature";
    const TS: &str = "x-slack-request-timestamp";
    let timestamp = header(headers, TS)?;
    let signature = header(headers, SIG)?
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(Rejection::Malformed {
            header: SIG.into(),
            why: "expected `v0=<hex>`",
        })?;
    fresh(timestamp, TS, now, PRESET_TOLERANCE)?;
    any_matches(
        secret.as_bytes(),
        &[b"v0:", timestamp.as_bytes(), b":", body],
        &[signature],
    )
}

/// Shopify: `X-Shopify-Hmac-Sha256: <base64>` over the body. Like GitHub,
/// no signed timestamp.
fn shopify(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
    const NAME: &str = "x-shopify-hmac-sha256";
    let signature = BASE64
        .decode(header(headers, NAME)?)
        .map_err(|_| Rejection::Malformed {
            header: NAME.into(),
            why: "expected base64",
        })?;
    any_matches(secret.as_bytes(), &[body], &[signature])
}

/// Standard Webhooks: `webhook-signature: v1,<base64> [v1,<base64>…]` over
/// `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64 bytes
/// after `whsec_`.
fn standard_webhooks(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), Rejection> {
    const ID: &str = "webhook-id";
    const TS: &str = "webhook-timestamp";
    const SIG: &str = "webhook-signature";
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| Rejection::BadSecret("expected `whsec_<base64>`"))?;
    let id = header(headers, ID)?;
    let timestamp = header(headers, TS)?;
    let candidates: Vec<Vec<u8>> = header(headers, SIG)?
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .collect();
    if candidates.is_empty() {
        return Err(Rejection::Malformed {
            header: SIG.into(),
            why: "no `v1,<base64>` signature",
        });
    }
    fresh(timestamp, TS, now, PRESET_TOLERANCE)?;
    any_matches(
        &key,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
        &candidates,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    fn hex_mac(key: &[u8], parts: &[&[u8]]) -> String {
        hex::encode(mac(key, parts).finalize().into_bytes())
    }

    fn generic_auth(timestamp_header: Option<&str>) -> WebhookAuth {
        WebhookAuth::Hmac {
            secret: "s".into(),
            header: "x-signature".into(),
            prefix: "sha256=".into(),
            timestamp_header: timestamp_header.map(str::to_owned),
            tolerance: Duration::from_secs(300),
        }
    }

    #[test]
    fn generic_hmac_accepts_the_right_signature_and_refuses_a_changed_body() {
        let body = br#"{"id":1}"#;
        let sig = format!("sha256={}", hex_mac(b"k3y", &[body]));
        let h = headers(&[("x-signature", &sig)]);
        assert_eq!(verify(&generic_auth(None), "k3y", &h, body, 0), Ok(()));
        assert_eq!(
            verify(&generic_auth(None), "k3y", &h, br#"{"id":2}"#, 0),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify(&generic_auth(None), "other", &h, body, 0),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verify(&generic_auth(None), "k3y", &HeaderMap::new(), body, 0),
            Err(Rejection::MissingHeader("x-signature".into()))
        );
    }

    #[test]
    fn generic_hmac_with_a_timestamp_refuses_stale_and_future_requests() {
        let body = b"{}";
        let ts = "1764000000";
        let sig = format!("sha256={}", hex_mac(b"k", &[ts.as_bytes(), b".", body]));
        let h = headers(&[("x-signature", &sig), ("x-timestamp", ts)]);
        let auth = generic_auth(Some("x-timestamp"));
        assert_eq!(verify(&auth, "k", &h, body, 1_764_000_299), Ok(()));
        assert!(matches!(
            verify(&auth, "k", &h, body, 1_764_000_301),
            Err(Rejection::Stale { age_s: 301, .. })
        ));
        assert!(matches!(
            verify(&auth, "k", &h, body, 1_763_999_000),
            Err(Rejection::Stale { .. })
        ));
        // The timestamp is signed: moving it forward breaks the signature.
        let moved = headers(&[("x-signature", &sig), ("x-timestamp", "1764000100")]);
        assert_eq!(
            verify(&auth, "k", &moved, body, 1_764_000_100),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn bearer_compares_the_whole_secret() {
        let auth = WebhookAuth::Bearer { secret: "s".into() };
        let ok = headers(&[("authorization", "Bearer tok-123")]);
        assert_eq!(verify(&auth, "tok-123", &ok, b"", 0), Ok(()));
        let prefix = headers(&[("authorization", "Bearer tok-12")]);
        assert_eq!(
            verify(&auth, "tok-123", &prefix, b"", 0),
            Err(Rejection::BadBearer)
        );
        let basic = headers(&[("authorization", "Basic dG9rLTEyMw==")]);
        assert!(matches!(
            verify(&auth, "tok-123", &basic, b"", 0),
            Err(Rejection::Malformed { .. })
        ));
    }

    #[test]
    fn a_standard_webhooks_secret_that_is_not_base64_is_reported() {
        let auth = WebhookAuth::Preset {
            preset: WebhookPreset::StandardWebhooks,
            secret: "s".into(),
        };
        assert_eq!(
            verify(&auth, "whsec_***", &HeaderMap::new(), b"", 0),
            Err(Rejection::BadSecret("expected `whsec_<base64>`"))
        );
    }
}
