//! Talking to a running `plumb serve` through its API, so the CLI and the
//! server never disagree (and replays wake the server's workers at once).

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde_json::Value;

/// A client for this project's own server, which it reaches over plain
/// HTTP at `listen` (see [`ApiClient::probe`]): it never speaks TLS, so it
/// loads no certificate store (reading the system's roots was ~3.5 ms of
/// every command).
fn plain_http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .https_only(false)
        .tls_certs_only(Vec::new())
}

/// A client for `/api/v1` of a running server.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
}

impl ApiClient {
    /// The base URL of this project's server, if one answers at `listen`,
    /// serves the store with id `store` (another project's server on the
    /// same address is ignored) and proves it with an HMAC of a fresh
    /// challenge under the store's `instance_secret`. No token is sent.
    pub async fn probe(listen: &str, store: &str, instance_secret: &str) -> Option<String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A server bound to all interfaces is reached on loopback.
        let host = listen
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:");
        let base = format!("http://{host}");
        let challenge = plumb_vault::new_api_token();
        let probe = plain_http_client()
            .timeout(Duration::from_millis(500))
            .build()
            .ok()?
            // URL-safe base64 with a `plb_` prefix: nothing to escape.
            .get(format!("{base}/healthz?challenge={}", challenge.as_str()))
            .send()
            .await
            .ok()?;
        let body: Value = probe.json().await.ok()?;
        let ours = body.get("service").and_then(Value::as_str) == Some("plumb")
            && body.get("store").and_then(Value::as_str) == Some(store);
        if !ours {
            return None;
        }
        let proof = body.get("proof").and_then(Value::as_str).unwrap_or("");
        if !plumb_vault::healthz_proof_ok(instance_secret, &challenge, proof) {
            tracing::warn!(
                server = %base,
                "Something at `listen` claims to be this project's server but cannot prove it; not using it."
            );
            return None;
        }
        Some(base)
    }

    /// A client for the server at `base` (found by [`ApiClient::probe`]),
    /// every call carrying `token` as a bearer token.
    pub fn new(base: String, token: &str) -> Option<Self> {
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        auth.set_sensitive(true);
        let headers =
            reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
        let http = plain_http_client()
            .timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()
            .ok()?;
        Some(Self { http, base })
    }

    /// Where the server is.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/<path>`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/{path}", self.base))
            .send()
            .await
            .with_context(|| format!("calling the server at {}", self.base))?;
        Self::decode(response).await
    }

    /// `POST /api/v1/<path>` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}/api/v1/{path}", self.base))
            .json(body)
            .send()
            .await
            .with_context(|| format!("calling the server at {}", self.base))?;
        Self::decode(response).await
    }

    async fn decode(response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            let message = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("no details");
            Err(anyhow!("the server answered {status}: {message}"))
        }
    }
}
