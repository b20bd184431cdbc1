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

impl Execution<'_> {
    pub(in crate::exec) async fn perform_http(
        &self,
        step: &Step,
        http: &HttpAction,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        let config = &self.project.config;
        let Some(Connection::Http(connection)) = config.connections.get(&http.connection) else {
            return Err(ActionError::Permanent {
                message: format!(
                    "the connection `{}` is no longer defined in plumb.yaml",
                    http.connection
                ),
                status: None,
            });
        };
        let http_clone = http.clone();
        let rendered = crate::eval::evaluate(step.timeout, move |budget| {
            render_http(&http_clone, &context, budget)
        })
        .await
        .map_err(permanent_eval)?;
        let base = connection.base_url.as_str().trim_end_matches('/');
        let mut url = url::Url::parse(&format!("{base}{}", rendered.path)).map_err(|e| {
            ActionError::Permanent {
                message: format!(
                    "the path `{}` does not make a valid URL: {e}",
                    rendered.path
                ),
                status: None,
            }
        })?;
        if !same_origin(&url, &connection.base_url) {
            return Err(ActionError::Permanent {
                message: format!(
                    "the path `{}` leads to `{}`, outside the connection `{}` ({}); a step may only call its connection's host",
                    rendered.path,
                    url.host_str().unwrap_or("?"),
                    http.connection,
                    connection.base_url.host_str().unwrap_or("?"),
                ),
                status: None,
            });
        }
        if !rendered.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in &rendered.query {
                pairs.append_pair(k, v);
            }
        }
        // A step's header replaces the connection's header of the same name;
        // the idempotency key is always plumb's own.
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, value) in connection.headers.iter().cloned().chain(rendered.headers) {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            headers.push((name, value));
        }
        // The connection's credential goes last, so no step header can
        // replace it; it is only ever sent to this connection's origin. The
        // same snapshot of the secrets redacts the answer, so a rotation in
        // between cannot let the old value through.
        let secrets = self.engine.secrets();
        let mut credential_header = None;
        if let Some(auth) = &connection.auth {
            let (name, value) = auth_header(&secrets, &http.connection, auth)?;
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            credential_header = Some(name.clone());
            headers.push((name, value));
        }
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("idempotency-key"));
        headers.push(("Idempotency-Key".to_owned(), key));
        let response = self
            .engine
            .http
            .send(HttpRequest {
                method: http.method.clone(),
                url,
                headers,
                body: rendered.body,
                timeout: step.timeout,
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
        Ok(Outcome {
            output,
            status_code: Some(status),
        })
    }
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
