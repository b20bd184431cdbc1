//! The `http` step: builds the request from the step's templates, bound to
//! its connection's origin, with the connection's credential last (no step
//! header can replace it) and the step's idempotency key; the HTTP
//! connector sends it and classifies the answer.

use std::sync::Arc;

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_connectors::http::{HttpRequest, same_origin};
use plumb_core::expr::{Budget, EvalError};
use plumb_core::model::{Connection, HttpAction, Step};
use serde_json::Value;

use super::super::context::{permanent_eval, preview};
use super::super::{Execution, Outcome};

/// One request as the step asks for it, before the connection adds its
/// headers and credential: what a page's journal row keeps, so a resume
/// knows where the next page comes from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PlannedRequest {
    pub(crate) url: url::Url,
    /// The step's own headers (never the connection's: those carry
    /// credentials and are added at send time).
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Option<Value>,
}

impl PlannedRequest {
    /// As kept in a page's journal row.
    pub(crate) fn to_state(&self) -> Value {
        let headers: Vec<Value> = self
            .headers
            .iter()
            .map(|(n, v)| Value::from(vec![n.clone(), v.clone()]))
            .collect();
        serde_json::json!({ "url": self.url.as_str(), "headers": headers, "body": self.body })
    }

    /// Read back from a page's journal row.
    pub(crate) fn from_state(state: &Value) -> Option<Self> {
        let url = url::Url::parse(state.get("url")?.as_str()?).ok()?;
        let mut headers = Vec::new();
        for pair in state.get("headers")?.as_array()? {
            let name = pair.get(0)?.as_str()?;
            let value = pair.get(1)?.as_str()?;
            headers.push((name.to_owned(), value.to_owned()));
        }
        let body = match state.get("body") {
            None | Some(Value::Null) => None,
            Some(b) => Some(b.clone()),
        };
        Some(Self { url, headers, body })
    }

    /// As `.request` in `paginate.next`: `{url, path, query, headers, body}`.
    pub(crate) fn describe(&self) -> Value {
        let query: serde_json::Map<String, Value> = self
            .url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone())))
            .collect();
        serde_json::json!({
            "url": self.url.as_str(),
            "path": self.url.path(),
            "query": query,
            "headers": headers,
            "body": self.body,
        })
    }
}

/// The connection a step calls, or why it cannot be called.
pub(crate) fn http_connection<'p>(
    project: &'p plumb_core::model::Project,
    name: &str,
) -> Result<&'p plumb_core::model::HttpConnection, ActionError> {
    match project.config.connections.get(name) {
        Some(Connection::Http(connection)) => Ok(connection),
        Some(other) => Err(ActionError::Permanent {
            message: format!(
                "the connection `{name}` is a {} connection now, not an http one",
                other.kind()
            ),
            status: None,
        }),
        None => Err(ActionError::Permanent {
            message: format!("the connection `{name}` is no longer defined in plumb.yaml"),
            status: None,
        }),
    }
}

/// Refuses a URL off the connection's origin: a step may only call its
/// connection's host, whatever its expressions or an upstream's answer say.
pub(in crate::exec) fn keep_on_origin(
    url: &url::Url,
    connection_name: &str,
    connection: &plumb_core::model::HttpConnection,
    asked: &str,
) -> Result<(), ActionError> {
    if same_origin(url, &connection.base_url) {
        return Ok(());
    }
    Err(ActionError::Permanent {
        message: format!(
            "{asked} leads to `{}`, outside the connection `{connection_name}` ({}); a step may only call its connection's host",
            url.host_str().unwrap_or("?"),
            connection.base_url.host_str().unwrap_or("?"),
        ),
        status: None,
    })
}

/// The connection's `base_url` followed by `path`.
pub(in crate::exec) fn url_below(
    connection: &plumb_core::model::HttpConnection,
    path: &str,
) -> Result<url::Url, ActionError> {
    let base = connection.base_url.as_str().trim_end_matches('/');
    url::Url::parse(&format!("{base}{path}")).map_err(|e| ActionError::Permanent {
        message: format!("the path `{path}` does not make a valid URL: {e}"),
        status: None,
    })
}

impl Execution<'_> {
    pub(in crate::exec) async fn perform_http(
        &self,
        step: &Step,
        http: &HttpAction,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        let planned = self.plan_http(step, http, context).await?;
        self.send_http(step, http, &planned, key).await
    }

    /// Renders the step's request from its templates.
    pub(in crate::exec) async fn plan_http(
        &self,
        step: &Step,
        http: &HttpAction,
        context: Val,
    ) -> Result<PlannedRequest, ActionError> {
        plan_request(&self.project, http, context, step.timeout).await
    }

    /// Sends one planned request (see [`send_request`]).
    pub(in crate::exec) async fn send_http(
        &self,
        step: &Step,
        http: &HttpAction,
        planned: &PlannedRequest,
        key: String,
    ) -> Result<Outcome, ActionError> {
        let (output, status) =
            send_request(self.engine, &self.project, http, planned, key, step.timeout).await?;
        Ok(Outcome {
            output,
            status_code: Some(status),
        })
    }
}

/// Renders an http request from its templates over `context`, bound to its
/// connection's origin.
pub(crate) async fn plan_request(
    project: &plumb_core::model::Project,
    http: &HttpAction,
    context: Val,
    timeout: std::time::Duration,
) -> Result<PlannedRequest, ActionError> {
    let connection = http_connection(project, &http.connection)?;
    let http_clone = http.clone();
    let rendered = crate::eval::evaluate(timeout, move |budget| {
        render_http(&http_clone, &context, budget)
    })
    .await
    .map_err(permanent_eval)?;
    let mut url = url_below(connection, &rendered.path)?;
    keep_on_origin(
        &url,
        &http.connection,
        connection,
        &format!("the path `{}`", rendered.path),
    )?;
    if !rendered.query.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in &rendered.query {
            pairs.append_pair(k, v);
        }
    }
    Ok(PlannedRequest {
        url,
        headers: rendered.headers,
        body: rendered.body,
    })
}

/// Sends one planned request with the connection's headers and credential
/// and the idempotency key, and checks the answer against `expect`: the
/// output `{status, headers, body}` (secret values redacted) and the status.
pub(crate) async fn send_request(
    engine: &crate::Engine,
    project: &plumb_core::model::Project,
    http: &HttpAction,
    planned: &PlannedRequest,
    key: String,
    timeout: std::time::Duration,
) -> Result<(Value, u16), ActionError> {
    let connection = http_connection(project, &http.connection)?;
    // A step's header replaces the connection's header of the same name;
    // the idempotency key is always plumb's own.
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in connection
        .headers
        .iter()
        .chain(planned.headers.iter())
        .cloned()
    {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        headers.push((name, value));
    }
    // The connection's credential goes last, so no step header can
    // replace it; it is only ever sent to this connection's origin. The
    // same snapshot of the secrets redacts the answer, so a rotation in
    // between cannot let the old value through.
    let secrets = engine.secrets();
    let mut credential_header = None;
    if let Some(auth) = &connection.auth {
        let (name, value) = auth_header(&secrets, &http.connection, auth)?;
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        credential_header = Some(name.clone());
        headers.push((name, value));
    }
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case("idempotency-key"));
    headers.push(("Idempotency-Key".to_owned(), key));
    let response = engine
        .http
        .send(HttpRequest {
            method: http.method.clone(),
            url: planned.url.clone(),
            headers,
            body: planned.body.clone(),
            timeout,
            expect_status: http.expect_status.clone(),
            credential_header,
            scrub: Some(crate::secrets::scrubber(Arc::clone(&secrets))),
        })
        .await?;
    let status = response.status;
    if let Some(contract) = &http.expect_schema {
        // An upstream's answer may hold values only `redact:` knows
        // of: the messages name the rule, never the value.
        let violations = contract.violations_without_values(&response.body);
        let says_json = response
            .headers
            .get("content-type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.contains("json"));
        if !violations.is_empty() && !says_json {
            // Not JSON at all (a proxy's maintenance page answered
            // 200): a glitch in front of the upstream, worth a retry.
            return Err(ActionError::Retryable {
                message: format!(
                    "HTTP {status}, but the body is not JSON, so it cannot match the contract {}",
                    contract.path()
                ),
                status: Some(status),
                retry_after: None,
            });
        }
        if !violations.is_empty() {
            // The upstream changed what it sends: retrying will not
            // help, and passing it on is the failure a contract exists
            // to stop.
            return Err(ActionError::Permanent {
                message: secrets
                    .redactor()
                    .redact(&format!(
                        "HTTP {status}, but the body breaks the contract {}",
                        plumb_core::contract::summary(contract, &violations)
                    ))
                    .into_owned(),
                status: Some(status),
            });
        }
    }
    // The snapshot that supplied the credential also redacts the answer:
    // an upstream echoing a value rotated meanwhile is still caught.
    let mut output = response.into_output();
    secrets.redactor().redact_json(&mut output);
    Ok((output, status))
}

struct RenderedHttp {
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

fn render_http(
    http: &HttpAction,
    context: &Val,
    budget: &Budget,
) -> Result<RenderedHttp, EvalError> {
    let path = match http.path.render(context, budget)? {
        Value::String(s) => s,
        other => {
            return Err(EvalError {
                message: format!("the path must be text, but it is {}", preview(&other, 60)),
            });
        }
    };
    let mut query = Vec::with_capacity(http.query.len());
    for (name, t) in &http.query {
        match t.render(context, budget)? {
            Value::Null => {}
            Value::String(s) => query.push((name.clone(), s)),
            other => query.push((name.clone(), other.to_string())),
        }
    }
    let mut headers = Vec::with_capacity(http.headers.len());
    for (name, t) in &http.headers {
        match t.render(context, budget)? {
            Value::Null => {}
            Value::String(s) => headers.push((name.clone(), s)),
            other => headers.push((name.clone(), other.to_string())),
        }
    }
    let body = match &http.body {
        Some(t) => Some(t.render(context, budget)?),
        None => None,
    };
    Ok(RenderedHttp {
        path,
        query,
        headers,
        body,
    })
}

/// The header that carries a connection's credential.
pub(crate) fn auth_header(
    secrets: &crate::secrets::Secrets,
    connection: &str,
    auth: &plumb_core::model::HttpAuth,
) -> Result<(String, String), ActionError> {
    use base64::Engine as _;
    use plumb_core::model::HttpAuth;
    let Some(value) = secrets.get(auth.secret()) else {
        return Err(ActionError::Permanent {
            message: format!(
                "the connection `{connection}` needs the secret `{}`, which is not available; set it with `plumb secrets set {}`",
                auth.secret(),
                auth.secret()
            ),
            status: None,
        });
    };
    Ok(match auth {
        HttpAuth::Bearer { .. } => (
            "Authorization".to_owned(),
            format!("Bearer {}", value.expose()),
        ),
        HttpAuth::Basic { username, .. } => {
            let raw = format!("{username}:{}", value.expose());
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
            ("Authorization".to_owned(), format!("Basic {encoded}"))
        }
        HttpAuth::Header { name, .. } => (name.clone(), value.expose().to_owned()),
    })
}
