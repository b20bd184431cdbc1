//! The `sql` step: its parameters evaluated, its connection's URL put
//! together from secrets (never shown), one statement run on the
//! connection's pool. The connector classifies what went wrong.

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_connectors::sql::Target;
use plumb_core::model::{Connection, SqlAction, SqlUrl, Step};

use super::super::context::permanent_eval;
use super::super::{Execution, Outcome};

impl Execution<'_> {
    pub(in crate::exec) async fn perform_sql(
        &self,
        step: &Step,
        sql: &SqlAction,
        context: Val,
    ) -> Result<Outcome, ActionError> {
        let Some(Connection::Sql(connection)) =
            self.project.config.connections.get(&sql.connection)
        else {
            return Err(ActionError::Permanent {
                message: format!(
                    "the connection `{}` is no longer a database connection in plumb.yaml",
                    sql.connection
                ),
                status: None,
            });
        };
        let templates = sql.params.clone();
        let params = crate::eval::evaluate(step.timeout, move |budget| {
            templates
                .iter()
                .map(|t| t.render(&context, budget))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(permanent_eval)?;
        let secrets = self.engine.secrets();
        let missing = |name: &str| ActionError::Permanent {
            message: format!(
                "the connection `{}` needs the secret `{name}`, which is not available; set it with `plumb secrets set {name}`",
                sql.connection
            ),
            status: None,
        };
        let mut url = match &connection.url {
            SqlUrl::Literal(url) => url.clone(),
            SqlUrl::Secret(name) => {
                let value = secrets.get(name).ok_or_else(|| missing(name))?;
                url::Url::parse(value.expose()).map_err(|_| ActionError::Permanent {
                    message: format!(
                        "the secret `{name}` of connection `{}` is not a PostgreSQL URL",
                        sql.connection
                    ),
                    status: None,
                })?
            }
        };
        if let Some(name) = &connection.password {
            let value = secrets.get(name).ok_or_else(|| missing(name))?;
            if url.set_password(Some(value.expose())).is_err() {
                return Err(ActionError::Permanent {
                    message: format!(
                        "the URL of connection `{}` cannot carry a password",
                        sql.connection
                    ),
                    status: None,
                });
            }
        }
        let output = self
            .engine
            .sql
            .execute(
                &Target {
                    connection: &sql.connection,
                    url: url.as_str(),
                    pool: connection.pool,
                    timeout: step.timeout,
                },
                &sql.query,
                &params,
            )
            .await?;
        Ok(Outcome {
            output,
            status_code: None,
        })
    }
}
