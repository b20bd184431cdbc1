//! Data contracts: JSON Schemas kept in `schemas/*.json` and referenced by
//! path from a webhook trigger (`schema:`) and an http step
//! (`expect.schema:`). A contract is compiled once, when the project loads
//! (a bad schema is a `plumb check` error with its file and line), and then
//! checks values: every violation with the JSON pointer of the offending
//! value, the rule (the schema keyword) and a message.
//!
//! Schemas are self-contained: a `$ref` inside the file (`#/$defs/…`) works,
//! one to another file or a URL does not (nothing is fetched while a
//! project loads). `pattern` uses a regular expression engine without
//! backtracking, so no value a sender chooses can make a check take
//! exponential time.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::yaml::{FieldPath, Location};

/// The most violations a check reports: enough to fix a payload, never a
/// response the size of the payload.
pub const MAX_VIOLATIONS: usize = 20;

/// The longest a violation's message may be: the validator's messages
/// quote the offending value, which may be a large object.
const MAX_MESSAGE: usize = 200;

/// The largest schema file plumb reads.
pub const MAX_SCHEMA_BYTES: usize = 1024 * 1024;

/// A compiled JSON Schema, named by its path in the project
/// (`schemas/page.json`).
#[derive(Clone)]
pub struct Contract {
    path: Arc<str>,
    /// SHA-256 of the file's text (hex): two contracts are equal when they
    /// come from the same path with the same text, and a deployment records
    /// it (see [`Contract::version`]).
    version: Arc<str>,
    validator: Arc<jsonschema::Validator>,
}

impl PartialEq for Contract {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.version == other.version
    }
}

impl Eq for Contract {}

impl fmt::Debug for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Contract").field(&self.path).finish()
    }
}

/// One way a value breaks a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer to the offending value (`/items/3/price`; empty for
    /// the whole value).
    pub path: String,
    /// The schema keyword that failed (`type`, `required`, `minimum`, …).
    pub rule: String,
    /// What is wrong, in the validator's words (shortened).
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "at {at}: {} ({})", self.message, self.rule)
    }
}

/// Why a schema file could not be compiled, and where in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    /// Where the problem is in the file, when known.
    pub location: Option<Location>,
    /// What is wrong.
    pub message: String,
}

impl Contract {
    /// Compiles the schema in `text` (the file at `path`). Draft 2020-12
    /// unless the schema's `$schema` names another (draft 7, …).
    ///
    /// # Errors
    ///
    /// A [`SchemaError`] when the file is too large, is not JSON, or is not
    /// a valid schema (with the line of the offending keyword when it can
    /// be found), or refers to another document.
    pub fn compile(path: &str, text: &str) -> Result<Self, SchemaError> {
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError {
                location: None,
                message: format!(
                    "the schema is {} bytes; the largest plumb reads is {MAX_SCHEMA_BYTES}",
                    text.len()
                ),
            });
        }
        let schema: Value = serde_json::from_str(text).map_err(|e| SchemaError {
            location: Some(Location {
                line: u32::try_from(e.line()).unwrap_or(u32::MAX),
                column: u32::try_from(e.column()).unwrap_or(u32::MAX),
            }),
            message: format!("not valid JSON: {e}"),
        })?;
        if !schema.is_object() && !schema.is_boolean() {
            return Err(SchemaError {
                location: Some(Location { line: 1, column: 1 }),
                message: "a JSON Schema is an object (or `true`/`false`)".to_owned(),
            });
        }
        let validator = jsonschema::options()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(&schema)
            .map_err(|e| {
                let pointer = e.instance_path().to_string();
                SchemaError {
                    location: locate_pointer(text, &schema, &pointer),
                    message: format!("not a valid JSON Schema: {}", shorten(&e.to_string())),
                }
            })?;
        let version = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(text.as_bytes()))
        };
        Ok(Self {
            path: Arc::from(path),
            version: Arc::from(version),
            validator: Arc::new(validator),
        })
    }

    /// The file the schema came from (`schemas/page.json`).
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// SHA-256 of the schema file's text (hex): what a deployment records,
    /// so an edited contract is audited like an edited workflow.
    #[must_use]
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `value` keeps the contract (cheaper than
    /// [`Contract::violations`] when it does).
    #[must_use]
    pub fn is_valid(&self, value: &Value) -> bool {
        self.validator.is_valid(value)
    }

    /// Every way `value` breaks the contract, up to [`MAX_VIOLATIONS`];
    /// empty when it keeps it. The validator collects all of a
    /// document's violations before the first is read, so a large document
    /// (more than [`FULL_REPORT_NODES`] values) reports its first violation
    /// only: a million-item list of the wrong type must not become a
    /// million errors in memory.
    #[must_use]
    pub fn violations(&self, value: &Value) -> Vec<Violation> {
        self.check(value, violation)
    }

    /// Like [`Contract::violations`], with messages that never quote the
    /// checked document: each names the rule and where in the schema it
    /// is (`/properties/price/type`). For documents whose values may be
    /// confidential beyond the known secrets (an upstream's answer, which
    /// is journaled and alerted on).
    #[must_use]
    pub fn violations_without_values(&self, value: &Value) -> Vec<Violation> {
        self.check(value, |e| {
            let rule = e.kind().keyword().to_owned();
            Violation {
                path: e.instance_path().to_string(),
                message: format!("breaks the schema's {}", e.schema_path()),
                rule,
            }
        })
    }

    fn check(
        &self,
        value: &Value,
        describe: impl Fn(&jsonschema::ValidationError<'_>) -> Violation,
    ) -> Vec<Violation> {
        if self.validator.is_valid(value) {
            return Vec::new();
        }
        if has_at_most(value, FULL_REPORT_NODES) {
            self.validator
                .iter_errors(value)
                .take(MAX_VIOLATIONS)
                .map(|e| describe(&e))
                .collect()
        } else {
            match self.validator.validate(value) {
                Err(e) => vec![describe(&e)],
                Ok(()) => Vec::new(),
            }
        }
    }
}

/// Documents with more values than this report their first violation
/// only (see [`Contract::violations`]).
pub const FULL_REPORT_NODES: usize = 10_000;

/// A violation from the validator's error. Its text quotes the offending
/// value, so a large value is described by the rule instead of printed.
fn violation(e: &jsonschema::ValidationError<'_>) -> Violation {
    let rule = e.kind().keyword().to_owned();
    let message = if has_at_most(e.instance(), 64) {
        shorten(&e.to_string())
    } else {
        format!("the value here breaks the schema's `{rule}`")
    };
    Violation {
        path: e.instance_path().to_string(),
        rule,
        message,
    }
}

/// Whether `value` holds at most `limit` values (itself included),
/// counted without recursion and stopping at the limit.
fn has_at_most(value: &Value, limit: usize) -> bool {
    let mut seen = 0usize;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        seen += 1;
        if seen > limit {
            return false;
        }
        match v {
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    true
}

/// A one-line summary of `violations` for an error message:
/// `schemas/x.json: at /a: … (type); at /b: … (required)`.
#[must_use]
pub fn summary(contract: &Contract, violations: &[Violation]) -> String {
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!("{}: {}", contract.path(), list.join("; "))
}

/// `message` cut to [`MAX_MESSAGE`] characters.
fn shorten(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message.to_owned(),
    }
}

/// Where the JSON pointer `pointer` (into `schema`, the parsed `text`) is
/// written. JSON is YAML, so the YAML reader, which records where every
/// node is, finds it; `None` when it cannot.
fn locate_pointer(text: &str, schema: &Value, pointer: &str) -> Option<Location> {
    let doc = crate::yaml::parse(text).ok()?;
    let mut path = FieldPath::root();
    let mut at = schema;
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Value::Array(items) => {
                let i: usize = token.parse().ok()?;
                at = items.get(i)?;
                path = path.index(i);
            }
            Value::Object(map) => {
                at = map.get(&token)?;
                path = path.key(token);
            }
            _ => return None,
        }
    }
    Some(doc.locate(&path))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const PAGE: &str = r#"{
  "type": "object",
  "required": ["items"],
  "properties": {
    "items": {
      "type": "array",
      "items": {
        "type": "object",
        "required": ["id"],
        "properties": { "id": { "type": "integer" }, "price": { "type": "number" } }
      }
    }
  }
}"#;

    #[test]
    fn violations_name_the_json_pointer_and_the_rule() {
        let c = Contract::compile("schemas/page.json", PAGE).expect("compiles");
        let bad = json!({"items": [{"id": 1}, {"id": 2, "price": "cheap"}, {}]});
        let v = c.violations(&bad);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v.iter()
                .any(|v| v.path == "/items/1/price" && v.rule == "type"),
            "{v:?}"
        );
        assert!(
            v.iter()
                .any(|v| v.path == "/items/2" && v.rule == "required"),
            "{v:?}"
        );
        assert!(c.violations(&json!({"items": []})).is_empty());
        assert!(c.is_valid(&json!({"items": [{"id": 3}]})));
    }

    #[test]
    fn violations_without_values_name_the_schema_rule_and_never_the_value() {
        let c = Contract::compile("schemas/page.json", PAGE).expect("compiles");
        let bad = json!({"items": [{"id": 1, "price": "tok_live_4242"}]});
        let v = c.violations_without_values(&bad);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "/items/0/price");
        assert_eq!(v[0].rule, "type");
        assert!(!v[0].message.contains("tok_live"), "{v:?}");
        assert!(
            v[0].message
                .contains("/properties/items/items/properties/price/type"),
            "{v:?}"
        );
    }

    #[test]
    fn at_most_twenty_violations_each_with_a_short_message() {
        let c = Contract::compile("s.json", r#"{"type":"array","items":{"type":"string"}}"#)
            .expect("compiles");
        let long = json!(
            (0..100)
                .map(|i| json!({ "n": i, "pad": "x".repeat(500) }))
                .collect::<Vec<_>>()
        );
        let v = c.violations(&long);
        assert_eq!(v.len(), MAX_VIOLATIONS);
        assert!(
            v.iter()
                .all(|v| v.message.chars().count() <= MAX_MESSAGE + 1)
        );
    }

    #[test]
    fn a_large_document_reports_its_first_violation_without_printing_itself() {
        let c = Contract::compile("s.json", r#"{"type":"array","items":{"type":"string"}}"#)
            .expect("compiles");
        let huge = Value::Array(vec![json!(0); 500_000]);
        let started = std::time::Instant::now();
        let v = c.violations(&huge);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "/0");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let c = Contract::compile("s.json", r#"{"type":"string"}"#).expect("compiles");
        let big_object = json!({ "a": vec![json!("x".repeat(1000)); 100] });
        let v = c.violations(&big_object);
        assert!(v[0].message.contains("`type`"), "{v:?}");
        assert!(v[0].message.len() < 100, "{v:?}");
    }

    #[test]
    fn a_schema_that_is_not_json_is_refused_with_its_line() {
        let e = Contract::compile("s.json", "{\n  \"type\": \"object\",\n}\n").expect_err("bad");
        assert_eq!(e.location.map(|l| l.line), Some(3), "{e:?}");
        assert!(e.message.contains("not valid JSON"), "{e:?}");
    }

    #[test]
    fn an_invalid_schema_is_refused_at_the_line_of_the_bad_keyword() {
        let text = "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"id\": { \"type\": \"integr\" }\n  }\n}\n";
        let e = Contract::compile("s.json", text).expect_err("bad type name");
        assert!(e.message.contains("not a valid JSON Schema"), "{e:?}");
        assert_eq!(e.location.map(|l| l.line), Some(4), "{e:?}");
    }

    #[test]
    fn draft_7_schemas_are_understood() {
        let c = Contract::compile(
            "s.json",
            r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"object","dependencies":{"a":["b"]}}"#,
        )
        .expect("draft 7");
        assert_eq!(c.violations(&json!({"a": 1}))[0].rule, "required");
    }

    #[test]
    fn a_reference_to_another_document_is_refused_at_load() {
        let e = Contract::compile("s.json", r#"{"$ref":"https://example.com/other.json"}"#)
            .expect_err("remote ref");
        assert!(e.message.contains("not a valid JSON Schema"), "{e:?}");
    }

    #[test]
    fn patterns_do_not_backtrack() {
        let c = Contract::compile("s.json", r#"{"type":"string","pattern":"^(a+)+$"}"#)
            .expect("compiles");
        let started = std::time::Instant::now();
        let v = c.violations(&json!(format!("{}!", "a".repeat(5000))));
        assert_eq!(v.len(), 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
