//! `connections.<name>.http`: an HTTP API, the only origin its steps may
//! call (egress is bound to `base_url`'s scheme, host and port), with
//! credentials only through sealed secrets.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::ConnectionKind;
use crate::load::{Checker, is_header_name};
use crate::model::{Connection, HttpAuth, HttpConnection};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

pub(super) const KIND: ConnectionKind = ConnectionKind {
    name: "http",
    check,
};

/// `connections.<name>.http`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConnectionSpec {
    /// Scheme, host and optional path prefix every request goes to.
    pub base_url: String,
    /// Headers sent with every request (no credentials: those come from secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request timeout for this connection.
    pub timeout: Option<Dur>,
    /// Credentials, from secrets only.
    pub auth: Option<HttpAuthSpec>,
}

/// `auth:` of an http connection: exactly one kind, always naming a secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthSpec {
    /// `Authorization: Bearer <secret>`.
    pub bearer: Option<SecretRef>,
    /// `Authorization: Basic base64(username:<secret>)`.
    pub basic: Option<BasicAuthSpec>,
    /// A custom header carrying the secret (e.g. `X-Api-Key`).
    pub header: Option<HeaderAuthSpec>,
}

/// `auth.basic`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthSpec {
    /// The user name (not a secret).
    pub username: String,
    /// The password.
    pub password: SecretRef,
}

/// `auth.header`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAuthSpec {
    /// Header name.
    pub name: String,
    /// The secret sent as its value.
    pub secret: String,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Connection> {
    let http: HttpConnectionSpec = cx.deserialize(raw, path)?;
    let url_path = path.key("base_url");
    let base_url = match Url::parse(&http.base_url) {
        Ok(u) => u,
        Err(e) => {
            cx.error_at_value(
                &url_path,
                format!("invalid base_url `{}`: {e}", http.base_url),
            )
            .help = Some("write a full URL such as `https://api.example.com/v1`".into());
            return None;
        }
    };
    if !matches!(base_url.scheme(), "http" | "https") || base_url.host_str().is_none() {
        cx.error_at_value(
            &url_path,
            format!(
                "base_url `{}` is not an http(s) URL with a host",
                http.base_url
            ),
        )
        .help = Some("write a full URL such as `https://api.example.com/v1`".into());
        return None;
    }
    // Userinfo in the URL is reported by the secrets lint, with the fix.
    if base_url.query().is_some() || base_url.fragment().is_some() {
        cx.error_at_value(&url_path, "base_url has a query or fragment")
            .help = Some("put query parameters in each step's `query:` instead".into());
    }
    for name in http.headers.keys() {
        let header_path = path.key("headers").key(name.clone());
        if !is_header_name(name) {
            cx.error(&header_path, format!("invalid header name `{name}`"))
                .help = Some("header names are letters, digits and `-`".into());
        }
        if name.eq_ignore_ascii_case("idempotency-key") {
            cx.error(&header_path, "`Idempotency-Key` is set by plumb").help = Some(
                "remove it: every request carries `<run_id>:<step_id>[:<item>]`, the same on every retry".into(),
            );
        }
    }
    let timeout = http.timeout.map(|d| d.0);
    if let Some(t) = timeout {
        cx.check_timeout(t, &path.key("timeout"));
    }
    let auth = match &http.auth {
        Some(a) => cx.http_auth(a, &path.key("auth")),
        None => None,
    };
    Some(Connection::Http(HttpConnection {
        base_url,
        headers: http.headers.into_iter().collect(),
        timeout,
        auth,
    }))
}

impl Checker<'_> {
    fn http_auth(&mut self, spec: &HttpAuthSpec, path: &FieldPath) -> Option<HttpAuth> {
        let count = usize::from(spec.bearer.is_some())
            + usize::from(spec.basic.is_some())
            + usize::from(spec.header.is_some());
        if count != 1 {
            self.error(path, "`auth` needs exactly one kind").help = Some(
                "write one of `bearer: { secret: NAME }`, `basic: { username: …, password: { secret: NAME } }` or `header: { name: X-Api-Key, secret: NAME }`".into(),
            );
            return None;
        }
        if let Some(b) = &spec.bearer {
            self.secret_name(&b.secret, &path.key("bearer").key("secret"));
            return Some(HttpAuth::Bearer {
                secret: b.secret.clone(),
            });
        }
        if let Some(b) = &spec.basic {
            self.secret_name(
                &b.password.secret,
                &path.key("basic").key("password").key("secret"),
            );
            return Some(HttpAuth::Basic {
                username: b.username.clone(),
                secret: b.password.secret.clone(),
            });
        }
        let h = spec.header.as_ref()?;
        self.secret_name(&h.secret, &path.key("header").key("secret"));
        if !is_header_name(&h.name) {
            self.error_at_value(
                &path.key("header").key("name"),
                format!("invalid header name `{}`", h.name),
            )
            .help = Some("header names are letters, digits and `-`".into());
        }
        Some(HttpAuth::Header {
            name: h.name.clone(),
            secret: h.secret.clone(),
        })
    }
}
