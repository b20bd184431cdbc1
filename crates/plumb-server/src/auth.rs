//! API tokens and roles: every `/api/v1` handler takes an [`Auth`] of the
//! role it needs, so a route cannot exist without its check.
//!
//! `401` without a valid token, `403` with a valid token of too low a role.
//! Failed attempts are audited, at most once a minute per route, reason and
//! token, within per-minute budgets for anonymous callers and token
//! holders, so a scanner cannot flood the audit log.

use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::OnceLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use plumb_store::{NewAuditEntry, Role};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;

/// A role a handler requires.
pub trait RequiredRole: Send + Sync + 'static {
    /// The lowest role allowed.
    const ROLE: Role;
}

/// Reads.
pub struct Viewer;
/// Also replays and cancels.
pub struct Operator;
/// Also manages secrets, tokens and deployments.
pub struct Admin;

impl RequiredRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl RequiredRole for Operator {
    const ROLE: Role = Role::Operator;
}
impl RequiredRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// An authenticated caller with at least role `R`.
pub struct Auth<R> {
    /// The token's name.
    pub name: String,
    /// The token's role.
    pub role: Role,
    _role: PhantomData<R>,
}

impl<R> Auth<R> {
    /// How the caller appears in the audit log.
    #[must_use]
    pub fn actor(&self) -> String {
        format!("api:{}", self.name)
    }
}

fn failures() -> &'static DefaultKeyedRateLimiter<String> {
    static LIMITER: OnceLock<DefaultKeyedRateLimiter<String>> = OnceLock::new();
    LIMITER.get_or_init(|| RateLimiter::keyed(Quota::per_minute(NonZeroU32::MIN)))
}

/// Failed attempts audited per minute across all routes and reasons, for
/// anonymous callers and for callers with a valid token each: a flood of
/// distinct bad requests costs the store little, and anonymous noise
/// cannot use up the budget that records a real token's refusals.
const AUDITED_FAILURES_PER_MINUTE: NonZeroU32 = match NonZeroU32::new(30) {
    Some(n) => n,
    None => NonZeroU32::MIN,
};

fn budget(anonymous: bool) -> &'static governor::DefaultDirectRateLimiter {
    static ANONYMOUS: OnceLock<governor::DefaultDirectRateLimiter> = OnceLock::new();
    static IDENTIFIED: OnceLock<governor::DefaultDirectRateLimiter> = OnceLock::new();
    let slot = if anonymous { &ANONYMOUS } else { &IDENTIFIED };
    slot.get_or_init(|| RateLimiter::direct(Quota::per_minute(AUDITED_FAILURES_PER_MINUTE)))
}

/// Audits a failed authentication, at most once a minute per `kind` (a
/// caller-chosen key from a bounded set: action, route template, reason
/// and token name, never request data), and within the anonymous or
/// identified budget of [`AUDITED_FAILURES_PER_MINUTE`], so a scanner
/// cannot flood the audit log or the store.
pub(crate) fn audit_failure(state: &AppState, kind: String, entry: NewAuditEntry) {
    let anonymous = entry.actor.ends_with(":anonymous");
    if failures().check_key(&kind).is_err() || budget(anonymous).check().is_err() {
        return;
    }
    // In the background: a refusal is answered at once even when the store
    // is busy, and the budget above bounds how many such writes exist.
    let store = std::sync::Arc::clone(state.engine.store());
    tokio::spawn(async move {
        if let Err(e) = store.append_audit(&entry).await {
            tracing::warn!(error = %e, "Could not audit a failed authentication.");
        }
    });
}

async fn refuse(
    state: &AppState,
    parts: &Parts,
    status: StatusCode,
    reason: &str,
    who: &str,
) -> ApiError {
    let route = parts.uri.path().to_owned();
    let template = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map_or("?", axum::extract::MatchedPath::as_str);
    audit_failure(
        state,
        format!("auth.failed|{template}|{reason}|{who}"),
        NewAuditEntry::new(
            who,
            "auth.failed",
            &route,
            json!({ "reason": reason, "method": parts.method.as_str() }),
        ),
    );
    let (code, message) = if status == StatusCode::FORBIDDEN {
        (
            "forbidden",
            format!("this token's role is too low for this route ({reason})"),
        )
    } else {
        (
            "unauthorized",
            format!(
                "a valid API token is required ({reason}): send `Authorization: Bearer <token>`; create one with `plumb tokens create`"
            ),
        )
    };
    let mut e = ApiError::new(status, code, message);
    if status == StatusCode::UNAUTHORIZED {
        e.www_authenticate = true;
    }
    e
}

impl<R: RequiredRole> FromRequestParts<AppState> for Auth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Err(refuse(
                state,
                parts,
                StatusCode::UNAUTHORIZED,
                "no token",
                "api:anonymous",
            )
            .await);
        };
        let found = state
            .engine
            .store()
            .token_by_hash(&plumb_vault::token_hash(token))
            .await?;
        let Some(found) = found.filter(|t| t.revoked_at.is_none()) else {
            return Err(refuse(
                state,
                parts,
                StatusCode::UNAUTHORIZED,
                "unknown or revoked token",
                "api:anonymous",
            )
            .await);
        };
        if found.role < R::ROLE {
            let reason = format!("needs {}, has {}", R::ROLE.as_str(), found.role.as_str());
            return Err(refuse(
                state,
                parts,
                StatusCode::FORBIDDEN,
                &reason,
                &format!("api:{}", found.name),
            )
            .await);
        }
        Ok(Self {
            name: found.name,
            role: found.role,
            _role: PhantomData,
        })
    }
}
