//! The HTTP connector.
//!
//! Egress is bound to the connection: the engine builds the URL from the
//! connection's `base_url`, this module refuses any request or redirect whose
//! origin (scheme, host, port) differs from it. Responses are read up to
//! [`MAX_RESPONSE_BYTES`] so one huge upstream answer cannot exhaust memory
//! or bloat the journal, and a JSON body nested deeper than
//! [`plumb_core::limits::MAX_DEPTH`] fails the step permanently (the
//! upstream would send the same document again).

use std::time::{Duration, SystemTime};

use reqwest::redirect;
use serde_json::{Map, Value};
use url::Url;

use crate::ActionError;

/// Largest response body kept (10 MiB).
pub const MAX_RESPONSE_BYTES: usize = 10 * 1024 * 1024;

/// How many redirects (all on the connection's own origin) are followed.
const MAX_REDIRECTS: usize = 5;

/// Longest `Retry-After` honoured; a longer ask is clamped so a misbehaving
/// upstream cannot park a run for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Removes secret values from text before it is kept (an error message
/// quoting the upstream's answer). The engine supplies it; this crate does
/// not know what is secret.
pub type Scrub = std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A request, fully built by the engine.
#[derive(Clone)]
pub struct HttpRequest {
    /// Upper-case method.
    pub method: String,
    /// Full URL, already checked to be on the connection's origin.
    pub url: Url,
    /// Headers, the idempotency key included.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Option<Value>,
    /// Timeout for the whole exchange, body included.
    pub timeout: Duration,
    /// Statuses counted as success; `None` means any 2xx.
    pub expect_status: Option<Vec<u16>>,
    /// The header carrying the connection's credential, if any: marked
    /// sensitive so no layer below prints it.
    pub credential_header: Option<String>,
    /// Applied to the upstream's answer before it is quoted in an error,
    /// before truncation, so a secret it echoes is never cut in half.
    pub scrub: Option<Scrub>,
}

impl std::fmt::Debug for HttpRequest {
    // Header values and the body may hold credentials and payloads: only
    // their shape is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url.as_str())
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("body", &self.body.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A response that counted as success.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names; repeated headers joined with `, `.
    pub headers: Map<String, Value>,
    /// JSON when the response says it is JSON and parses; text otherwise;
    /// `null` when empty.
    pub body: Value,
}

impl HttpResponse {
    /// The response as the step's output: `{status, headers, body}`.
    #[must_use]
    pub fn into_output(self) -> Value {
        let mut out = Map::with_capacity(3);
        out.insert("status".into(), Value::from(self.status));
        out.insert("headers".into(), Value::Object(self.headers));
        out.insert("body".into(), self.body);
        Value::Object(out)
    }
}

/// A request that could not even be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the HTTP client: {0}")]
pub struct ClientError(String);

/// A shared HTTP client (connection pooling across steps and runs).
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
}

/// Whether two URLs share scheme, host and port.
#[must_use]
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
}

impl HttpClient {
    /// Builds the client with TLS through rustls + ring.
    ///
    /// # Errors
    ///
    /// Returns [`ClientError`] if the TLS stack cannot be initialised.
    pub fn new() -> Result<Self, ClientError> {
        // Idempotent: a second install (tests, several clients) is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = redirect::Policy::custom(|attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let leaves_origin = attempt
                .previous()
                .first()
                .is_some_and(|first| !same_origin(first, attempt.url()));
            if leaves_origin {
                let target = attempt.url().host_str().unwrap_or("?").to_owned();
                attempt.error(format!(
                    "redirect to `{target}`, outside the connection's host; plumb only calls the host named in the connection's base_url"
                ))
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .user_agent(concat!("plumb/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        Ok(Self { client })
    }

    /// Performs the request once.
    ///
    /// # Errors
    ///
    /// Returns [`ActionError::Retryable`] for 5xx, 429, 408, timeouts and
    /// connection failures, and [`ActionError::Permanent`] for other
    /// unexpected statuses, redirects off the origin, invalid requests and
    /// oversized responses.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, ActionError> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|_| {
            ActionError::Permanent {
                message: format!("invalid HTTP method `{}`", request.method),
                status: None,
            }
        })?;
        let mut builder = self
            .client
            .request(method, request.url.clone())
            .timeout(request.timeout);
        for (name, value) in &request.headers {
            let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                ActionError::Permanent {
                    message: format!("the value of header `{name}` is not valid in HTTP"),
                    status: None,
                }
            })?;
            if request
                .credential_header
                .as_deref()
                .is_some_and(|c| c.eq_ignore_ascii_case(name))
            {
                value.set_sensitive(true);
            }
            builder = builder.header(name.as_str(), value);
        }
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| classify_transport(&e, request.timeout))?;
        let status = response.status().as_u16();
        let reason = response.status().canonical_reason().unwrap_or("");
        let headers = collect_headers(response.headers());
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        let retryable_status = status >= 500 || status == 429 || status == 408;
        let bytes = match read_limited(response, request.timeout).await {
            Ok(b) => b,
            // An overloaded upstream stays retryable whatever its error page
            // weighs.
            Err(ActionError::Permanent { message, .. }) if retryable_status => {
                return Err(ActionError::Retryable {
                    message: format!("HTTP {status} {reason} ({message})"),
                    status: Some(status),
                    retry_after,
                });
            }
            Err(e) => return Err(e),
        };
        let success = match &request.expect_status {
            Some(list) => list.contains(&status),
            None => (200..300).contains(&status),
        };
        if success {
            let body = decode_body(&bytes, is_json).map_err(|e| ActionError::Permanent {
                message: format!("HTTP {status} {reason}, but {e}"),
                status: Some(status),
            })?;
            return Ok(HttpResponse {
                status,
                headers,
                body,
            });
        }
        // An error answer is only quoted: its depth does not matter.
        let body = decode_body(&bytes, is_json)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let message = format!(
            "HTTP {status} {reason}{}",
            body_snippet(&body, request.scrub.as_ref())
        );
        if retryable_status {
            Err(ActionError::Retryable {
                message,
                status: Some(status),
                retry_after,
            })
        } else {
            Err(ActionError::Permanent {
                message,
                status: Some(status),
            })
        }
    }
}

async fn read_limited(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, ActionError> {
    let mut out = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(ActionError::Permanent {
                        message: format!(
                            "the response body is larger than {} MiB; plumb does not keep responses that large",
                            MAX_RESPONSE_BYTES / (1024 * 1024)
                        ),
                        status: Some(response.status().as_u16()),
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(classify_transport(&e, timeout)),
        }
    }
}

fn classify_transport(e: &reqwest::Error, timeout: Duration) -> ActionError {
    if e.is_redirect() {
        return ActionError::Permanent {
            message: error_chain(e),
            status: None,
        };
    }
    if e.is_timeout() {
        return ActionError::Retryable {
            message: format!("timed out after {}", humanize(timeout)),
            status: None,
            retry_after: None,
        };
    }
    if e.is_builder() {
        return ActionError::Permanent {
            message: format!("invalid request: {}", error_chain(e)),
            status: None,
        };
    }
    // Connection refused or reset, DNS failure, TLS handshake, body cut off:
    // the other side may recover.
    ActionError::Retryable {
        message: error_chain(e),
        status: None,
        retry_after: None,
    }
}

/// The error and its causes, so "error sending request" says *why*.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn humanize(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn collect_headers(headers: &reqwest::header::HeaderMap) -> Map<String, Value> {
    let mut out: Map<String, Value> = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                out.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    out
}

/// The body as JSON when it says it is JSON and parses, else as text; a
/// JSON body over the depth limit is an error rather than a silent string.
fn decode_body(bytes: &[u8], is_json: bool) -> Result<Value, plumb_core::limits::LimitError> {
    use plumb_core::limits::{ParseError, parse_json};
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    if is_json {
        match parse_json(bytes, "the response body") {
            Ok(v) => return Ok(v),
            Err(ParseError::Limit(e)) => return Err(e),
            Err(ParseError::Json { .. }) => {}
        }
    }
    Ok(Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn body_snippet(body: &Value, scrub: Option<&Scrub>) -> String {
    let text = match body {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let text = match scrub {
        Some(scrub) => scrub(&text),
        None => text,
    };
    const MAX: usize = 300;
    let trimmed = text.trim();
    if trimmed.len() <= MAX {
        format!(": {trimmed}")
    } else {
        let mut end = MAX;
        while !trimmed.is_char_boundary(end) {
            end -= 1;
        }
        format!(": {}…", &trimmed[..end])
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date, relative to `now`.
#[must_use]
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let u = |s: &str| Url::parse(s).expect("url");
        assert!(same_origin(
            &u("https://api.x.com/v1"),
            &u("https://API.x.com:443/other")
        ));
        assert!(!same_origin(
            &u("https://api.x.com"),
            &u("http://api.x.com")
        ));
        assert!(!same_origin(
            &u("https://api.x.com"),
            &u("https://api.x.com:8443")
        ));
        assert!(!same_origin(
            &u("https://api.x.com"),
            &u("https://evil.com")
        ));
    }
}
