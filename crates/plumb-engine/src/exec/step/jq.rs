//! The `jq` step: one program, evaluated under the step's timeout on the
//! expression threads; its single result is the output.

use std::time::Duration;

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_core::expr::Program;

use super::super::Outcome;
use super::super::context::permanent_eval;

/// Runs the program on the context.
pub(in crate::exec) async fn perform(
    program: &Program,
    context: Val,
    timeout: Duration,
) -> Result<Outcome, ActionError> {
    let program = program.clone();
    let output = crate::eval::evaluate(timeout, move |budget| program.eval(&context, budget))
        .await
        .map_err(permanent_eval)?;
    Ok(Outcome {
        output,
        status_code: None,
    })
}
