//! plumb's model: project and workflow files, their validation, and the jq
//! expression language.
//!
//! This crate owns the meaning of the files users write: it turns YAML text
//! into a validated [`model::Project`] (or a list of [`diag::Diagnostic`]s
//! naming file, line, field and fix), and it compiles and evaluates `${{ … }}`
//! expressions. It performs no I/O and knows nothing of stores, networks or
//! the command line: callers hand it file contents and get values back.

pub mod contract;
pub mod diag;
pub mod expr;
pub mod limits;
pub mod lint;
pub mod load;
pub mod model;
pub mod spec;
pub mod store_url;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics};
pub use load::{
    PartialProject, SourceFile, load_config, load_config_lenient, load_project,
    load_project_checking_secrets, load_project_partial, load_workflow,
};
pub use model::{Project, ProjectConfig, Workflow};
