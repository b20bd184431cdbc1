//! Diagnostics: what `plumb check` (and every command that loads a project)
//! reports about the files on disk.
//!
//! A diagnostic always says where (file, line, column), which field, what is
//! wrong and — whenever we know it — how to fix it. Loading collects every
//! diagnostic it can rather than stopping at the first, so one `plumb check`
//! shows the whole list.

use std::fmt;

use serde::Serialize;

use crate::yaml::Location;

/// One problem found in a project file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file, relative to the project directory (e.g. `workflows/orders.yaml`).
    pub file: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<u32>,
    /// 1-based column, when known.
    pub column: Option<u32>,
    /// The field in the user's terms, e.g. `steps[2].http.path`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic at a location in `file`.
    #[must_use]
    pub fn at(file: impl Into<String>, location: Location, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: Some(location.line),
            column: Some(location.column),
            field: None,
            message: message.into(),
            help: None,
        }
    }

    /// A diagnostic about a whole file (it is missing, unreadable, …).
    #[must_use]
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
            column: None,
            field: None,
            message: message.into(),
            help: None,
        }
    }

    /// Names the field the diagnostic is about.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        if !field.is_empty() {
            self.field = Some(field);
        }
        self
    }

    /// Says how to fix the problem.
    #[must_use]
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let Some(field) = &self.field {
            write!(f, "\n  field: {field}")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a project, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether no problem was found.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds one problem.
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    /// Sorts by file, then line, then column, so output is stable.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| {
            (a.file.as_str(), a.line, a.column).cmp(&(b.file.as_str(), b.line, b.column))
        });
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_column_field_and_fix() {
        let d = Diagnostic::at(
            "workflows/a.yaml",
            Location { line: 3, column: 5 },
            "unknown connection `crmm`",
        )
        .field("steps[0].http.connection")
        .help("define it under `connections:` in plumb.yaml");
        assert_eq!(
            d.to_string(),
            "workflows/a.yaml:3:5: unknown connection `crmm`\n  field: steps[0].http.connection\n  help: define it under `connections:` in plumb.yaml"
        );
    }
}
