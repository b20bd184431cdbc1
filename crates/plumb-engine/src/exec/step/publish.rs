//! The `publish` step: its destination, body and headers evaluated, its
//! connection's URL put together from secrets (never shown), one message
//! sent with the step's idempotency key. The connector classifies what
//! went wrong.

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_connectors::broker::Message;
use plumb_core::model::{Connection, PublishAction, Step};
use serde_json::Value;

use super::super::context::permanent_eval;
use super::super::{Execution, Outcome};

impl Execution<'_> {
    pub(in crate::exec) async fn perform_publish(
        &self,
        step: &Step,
        publish: &PublishAction,
        context: Val,
        key: String,
    ) -> Result<Outcome, ActionError> {
        let Some(Connection::Broker(connection)) =
            self.project.config.connections.get(&publish.connection)
        else {
            return Err(ActionError::Permanent {
                message: format!(
                    "the connection `{}` is no longer a broker connection in plumb.yaml",
                    publish.connection
                ),
                status: None,
            });
        };
        let action = publish.clone();
        let (to, body, headers) = crate::eval::evaluate(step.timeout, move |budget| {
            let to = action.to.render(&context, budget)?;
            let body = action.body.render(&context, budget)?;
            let headers = action
                .headers
                .iter()
                .map(|(name, t)| Ok((name.clone(), text(t.render(&context, budget)?))))
                .collect::<Result<Vec<_>, plumb_core::expr::EvalError>>()?;
            Ok((to, body, headers))
        })
        .await
        .map_err(permanent_eval)?;
        let to = match to {
            Value::String(s)
                if !s.is_empty() && s.len() <= 512 && !s.chars().any(char::is_control) =>
            {
                s
            }
            other => {
                return Err(ActionError::Permanent {
                    message: format!(
                        "`to` must name a {} (text, 1 to 512 bytes), but it is {}",
                        connection.kind.source_field(),
                        super::super::preview(&other, 60)
                    ),
                    status: None,
                });
            }
        };
        let url = super::sql::connection_url(
            self.engine,
            &publish.connection,
            &connection.url,
            connection.password.as_deref(),
        )?;
        let body = body.to_string();
        let message = Message {
            connection: &publish.connection,
            url: &url,
            timeout: step.timeout,
            to: &to,
            exchange: publish.exchange.as_deref(),
            body: &body,
            headers: &headers,
            key: &key,
        };
        let output = self
            .engine
            .brokers
            .publish(connection.kind, &message)
            .await?;
        Ok(Outcome {
            output,
            status_code: None,
        })
    }
}

/// A header's value as text: a string as it is, anything else as JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}
