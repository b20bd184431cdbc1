//! The `if` step: the condition is evaluated once and the branch taken is
//! committed before the branch runs, so a resumed run follows the same
//! branch whatever the condition would say now.

use plumb_core::model::{IfBranch, Step};
use plumb_store::now_ms;
use serde_json::{Value, json};

use super::super::{Execution, Halt};

impl Execution<'_> {
    /// Decides, commits the decision, and runs the branch.
    pub(in crate::exec) async fn run_if(
        &mut self,
        step: &Step,
        branch: &IfBranch,
    ) -> Result<(), Halt> {
        let started = now_ms();
        let condition = self
            .eval_own(step, &branch.condition, started, |v| match v {
                Value::Bool(b) => Ok(b),
                other => Err(format!("the condition yielded {other}, not true or false")),
            })
            .await?;
        let output = json!({
            "branch": if condition { "then" } else { "else" },
            "condition": condition,
        });
        let summary = format!("took `{}`", if condition { "then" } else { "else" });
        self.commit_success(step, None, 1, started, &output, None, Some(summary))
            .await?;
        self.set_output(&step.id, &output);
        self.run_steps(taken(branch, condition)).await
    }

    /// Continues a run whose `if` decision is in the journal.
    pub(in crate::exec) async fn resume_if(
        &mut self,
        branch: &IfBranch,
        output: &Value,
    ) -> Result<(), Halt> {
        let took_then = output.get("branch").and_then(Value::as_str) == Some("then");
        self.run_steps(taken(branch, took_then)).await
    }
}

fn taken(branch: &IfBranch, condition: bool) -> &[Step] {
    if condition {
        &branch.then
    } else {
        &branch.otherwise
    }
}
