//! One error type for every handler: a status, a stable code and a message
//! safe to show the caller. Internal details are logged, never returned.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to an HTTP caller.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable, machine-readable code (`store_unavailable`, `not_found`, …).
    pub code: &'static str,
    /// What the caller should know.
    pub message: String,
    /// `Retry-After` seconds, for 503s.
    pub retry_after: Option<u32>,
    /// Whether to ask for a bearer token (`WWW-Authenticate`), for 401s.
    pub www_authenticate: bool,
    /// What a contract violation found, listed beside the message.
    pub violations: Option<Vec<plumb_core::contract::Violation>>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            www_authenticate: false,
            violations: None,
        }
    }

    /// `400 contract_violation`: a document breaks the workflow's data
    /// contract; each violation names the JSON pointer and the rule.
    pub fn contract_violation(
        message: impl Into<String>,
        violations: Vec<plumb_core::contract::Violation>,
    ) -> Self {
        Self {
            violations: Some(violations),
            ..Self::new(StatusCode::BAD_REQUEST, "contract_violation", message)
        }
    }

    /// `404`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `400`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// `503` with `Retry-After`: the store cannot commit now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(2),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            )
        }
    }

    /// `500` for what the caller cannot fix; the detail is logged.
    pub fn internal(detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "Request failed.");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl From<plumb_store::StoreError> for ApiError {
    fn from(e: plumb_store::StoreError) -> Self {
        if e.is_transient() {
            tracing::warn!(error = %e, "The store cannot commit; answering 503.");
            Self::unavailable("the store cannot commit right now; retry later")
        } else if let plumb_store::StoreError::Rejected(why) = e {
            Self::bad_request(why)
        } else {
            Self::internal(&e)
        }
    }
}

impl From<plumb_engine::EngineError> for ApiError {
    fn from(e: plumb_engine::EngineError) -> Self {
        match e {
            plumb_engine::EngineError::Store(s) => s.into(),
            other => Self::internal(&other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(violations) = &self.violations {
            error["violations"] = json!(violations);
        }
        let body = Json(json!({ "error": error }));
        let mut response = (self.status, body).into_response();
        if self.www_authenticate {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
