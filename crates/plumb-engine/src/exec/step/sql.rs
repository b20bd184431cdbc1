//! The `sql` step: its parameters evaluated, its connection's URL put
//! together from secrets (never shown), one statement run on the
//! connection's pool. The connector classifies what went wrong.

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_connectors::sql::{Effect, Target};
use plumb_core::model::{Connection, SqlAction, SqlUrl, Step};

use super::super::context::permanent_eval;
use super::super::{Execution, Outcome};

/// The most elements one `batch` runs in its transaction.
const MAX_BATCH: usize = 100_000;

impl Execution<'_> {
    pub(in crate::exec) async fn perform_sql(
        &self,
        step: &Step,
        sql: &SqlAction,
        context: Val,
        key: String,
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
        let batch = sql.batch.clone();
        // One list of parameters per statement: the step's own, or one per
        // element of `batch` (evaluated over that element).
        let statements = crate::eval::evaluate(step.timeout, move |budget| {
            let Some(batch) = batch else {
                let one = templates
                    .iter()
                    .map(|t| t.render(&context, budget))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(vec![one]);
            };
            let elements = match batch.render(&context, budget)? {
                serde_json::Value::Array(elements) => elements,
                other => {
                    return Err(plumb_core::expr::EvalError {
                        message: format!(
                            "`batch` must yield a list, but it yielded {}",
                            super::super::preview(&other, 60)
                        ),
                    });
                }
            };
            if elements.len() > MAX_BATCH {
                return Err(plumb_core::expr::EvalError {
                    message: format!(
                        "`batch` yielded {} elements; one transaction takes at most {MAX_BATCH}: split it with for_each over chunks",
                        elements.len()
                    ),
                });
            }
            elements
                .iter()
                .map(|element| {
                    let element = plumb_core::expr::json_to_val(element);
                    templates
                        .iter()
                        .map(|t| t.render(&element, budget))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(permanent_eval)?;
        let url = connection_url(
            self.engine,
            &sql.connection,
            &connection.url,
            connection.password.as_deref(),
        )?;
        let target = Target {
            connection: &sql.connection,
            driver: connection.driver,
            url: &url,
            pool: connection.pool,
            timeout: step.timeout,
            effect: connection.effects_table.as_deref().map(|table| Effect {
                table,
                key: &key,
                run_id: &self.run.id,
                step_id: &step.id,
            }),
        };
        let output = if sql.batch.is_some() {
            self.engine
                .sql
                .execute_batch(&target, &sql.query, statements)
                .await?
        } else {
            let params = statements.into_iter().next().unwrap_or_default();
            self.engine.sql.execute(&target, &sql.query, params).await?
        };
        Ok(Outcome {
            output,
            status_code: None,
        })
    }
}

/// The URL of connection `name` (a database or a broker), its password put
/// in from the secrets (never shown); for SQLite, the file's path.
pub(crate) fn connection_url(
    engine: &crate::Engine,
    name: &str,
    url: &SqlUrl,
    password: Option<&str>,
) -> Result<String, ActionError> {
    let secrets = engine.secrets();
    let missing = |secret: &str| ActionError::Permanent {
        message: format!(
            "the connection `{name}` needs the secret `{secret}`, which is not available; set it with `plumb secrets set {secret}`"
        ),
        status: None,
    };
    let mut url = match url {
        // Made absolute when the project loaded.
        SqlUrl::File(file) => return Ok(file.display().to_string()),
        SqlUrl::Literal(url) => url.clone(),
        SqlUrl::Secret(secret) => {
            let value = secrets.get(secret).ok_or_else(|| missing(secret))?;
            url::Url::parse(value.expose()).map_err(|_| ActionError::Permanent {
                message: format!(
                    "the secret `{secret}` of connection `{name}` is not a database URL"
                ),
                status: None,
            })?
        }
    };
    if let Some(secret) = password {
        let value = secrets.get(secret).ok_or_else(|| missing(secret))?;
        if url.set_password(Some(value.expose())).is_err() {
            return Err(ActionError::Permanent {
                message: format!("the URL of connection `{name}` cannot carry a password"),
                status: None,
            });
        }
    }
    Ok(url.into())
}
