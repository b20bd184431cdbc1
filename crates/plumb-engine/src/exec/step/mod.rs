//! Executing each kind of step: one module per kind, as in
//! `plumb_core::load::step`. Kinds that make attempts (`http`, `jq`,
//! `assert`) are dispatched by [`Execution::perform`]; `if`, `sleep` and
//! `for_each` shape the walk itself and are dispatched by `run_step`. What
//! is journaled when is the same for every kind: see [`crate::journal`].

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_core::model::{Action, Step};

use super::{Execution, Outcome};

mod assert;
mod branch;
mod for_each;
mod http;
mod jq;
mod paginate;
mod publish;
mod sleep;
pub(crate) mod sql;

pub(crate) use http::auth_header;
pub(crate) use http::{PlannedRequest, http_connection, plan_request, send_request};
pub(crate) use paginate::{json_size, link_next, next_request};

impl Execution<'_> {
    /// Performs one attempt: of a page, when `page` is its request, or
    /// else of the step itself.
    pub(super) async fn perform_for(
        &self,
        step: &Step,
        page: Option<&PlannedRequest>,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        match (page, &step.action) {
            (Some(request), Action::Http(http)) => self.send_http(step, http, request, key).await,
            _ => self.perform(step, context, key).await,
        }
    }

    /// Performs one attempt of a step that makes attempts.
    pub(super) async fn perform(
        &self,
        step: &Step,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        match &step.action {
            Action::Http(http) => self.perform_http(step, http, context, key).await,
            Action::Sql(sql) => self.perform_sql(step, sql, context, key).await,
            Action::Publish(p) => self.perform_publish(step, p, context, key).await,
            Action::Jq(program) => jq::perform(program, context, step.timeout).await,
            Action::Assert { condition, message } => {
                assert::perform(condition, message.as_ref(), context, step.timeout).await
            }
            Action::If(_) | Action::Sleep(_) => Err(ActionError::Permanent {
                message: format!(
                    "a `{}` step cannot be repeated by for_each",
                    step.action.kind()
                ),
                status: None,
            }),
        }
    }
}
