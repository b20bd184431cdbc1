//! YAML source → JSON value, with a source location for every node.
//!
//! Workflow files are YAML, but everything downstream (typed deserialization,
//! expressions, the journal) speaks JSON. We load the file with `saphyr`
//! (YAML 1.2 core schema: `on`/`yes` stay strings, `012` is an integer) into a
//! [`serde_json::Value`] and, in the same walk, record where each node came from.
//! Validation then reports any problem by its [`FieldPath`] and this module
//! turns the path back into `line:column`, so errors point at the exact field
//! even for checks that run long after parsing (unknown step references,
//! expression syntax, egress rules).

use std::collections::HashMap;
use std::fmt;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Number, Value};

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// Line, starting at 1.
    pub line: u32,
    /// Column, starting at 1.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One step in a [`FieldPath`]: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A key of a mapping.
    Key(String),
    /// An index into a sequence.
    Index(usize),
}

/// Where a value sits inside a document, e.g. `steps[2].http.path`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The document root.
    #[must_use]
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a mapping key.
    #[must_use]
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.into()));
        Self(segments)
    }

    /// This path extended by a sequence index.
    #[must_use]
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Self(segments)
    }

    /// The segments, outermost first.
    #[must_use]
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// The path without its last segment, or `None` at the root.
    #[must_use]
    pub fn parent(&self) -> Option<Self> {
        if self.0.is_empty() {
            None
        } else {
            Some(Self(self.0[..self.0.len() - 1].to_vec()))
        }
    }

    /// Builds a path from segments.
    #[must_use]
    pub fn from_segments(segments: Vec<Segment>) -> Self {
        Self(segments)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
struct NodeLocation {
    /// Where the key naming this node starts, for mapping values.
    key: Option<Location>,
    /// Where the node itself starts.
    value: Location,
}

/// A parsed YAML document: its JSON value and the location of every node.
#[derive(Clone, Debug)]
pub struct Document {
    /// The document as JSON.
    pub value: Value,
    locations: HashMap<FieldPath, NodeLocation>,
}

impl Document {
    /// Where the field at `path` is written: the start of its key for mapping
    /// entries, of the value otherwise. A path that does not exist in the
    /// source (a missing field, a default) resolves to its nearest ancestor.
    #[must_use]
    pub fn locate(&self, path: &FieldPath) -> Location {
        let mut current = Some(path.clone());
        while let Some(p) = current {
            if let Some(loc) = self.locations.get(&p) {
                return loc.key.unwrap_or(loc.value);
            }
            current = p.parent();
        }
        Location { line: 1, column: 1 }
    }

    /// Where the value at `path` starts (rather than its key), with the same
    /// fallback as [`Document::locate`].
    #[must_use]
    pub fn locate_value(&self, path: &FieldPath) -> Location {
        match self.locations.get(path) {
            Some(loc) => loc.value,
            None => self.locate(path),
        }
    }
}

/// A file that is not valid YAML, or not a single document.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    /// Where the problem is.
    pub location: Location,
    /// What is wrong.
    pub message: String,
}

/// Parses one YAML document into JSON with locations.
///
/// # Errors
///
/// Returns a [`YamlError`] for malformed YAML, duplicate keys, non-scalar or
/// non-string mapping keys, and files holding more than one document.
pub fn parse(source: &str) -> Result<Document, YamlError> {
    check_depth(source)?;
    let docs = MarkedYaml::load_from_str(source).map_err(|e| YamlError {
        location: Location {
            line: saturating_u32(e.marker().line()),
            column: saturating_u32(e.marker().col() + 1),
        },
        message: e.info().to_owned(),
    })?;
    let mut locations = HashMap::new();
    let value = match docs.len() {
        0 => Value::Null,
        1 => convert(&docs[0], FieldPath::root(), None, &mut locations)?,
        _ => {
            return Err(YamlError {
                location: location_of(&docs[1]),
                message: "this file holds more than one YAML document (a `---` separator); \
                          put each workflow in its own file"
                    .to_owned(),
            });
        }
    };
    Ok(Document { value, locations })
}

/// Deepest nesting of mappings and lists a project file may have. Far more
/// than any workflow needs; loading a tree (and dropping it) recurses once
/// per level, so a file nested thousands deep must be refused before it is
/// loaded, not overflow the stack of the server reloading it.
pub const MAX_YAML_DEPTH: usize = 64;

/// The most values a file may hold once its aliases are expanded: a few
/// lines of anchors and aliases can otherwise stand for billions of values
/// ("billion laughs"), all built in memory by the loader.
pub const MAX_YAML_VALUES: u64 = 1_000_000;

/// The most text a file's scalars may hold once its aliases are expanded
/// (64 MiB): each copy of an aliased text is built anew.
pub const MAX_YAML_TEXT: u64 = 64 * 1024 * 1024;

/// Walks the parser's events (no tree, no recursion) and refuses a file
/// nested deeper than [`MAX_YAML_DEPTH`] or holding more than
/// [`MAX_YAML_VALUES`] values or [`MAX_YAML_TEXT`] of text, counting what
/// every alias expands to (its anchor's values, height and text). Syntax errors are left to the loader,
/// which reports them with more context.
fn check_depth(source: &str) -> Result<(), YamlError> {
    use saphyr_parser::{Event, Parser};

    /// An open mapping or list.
    struct Open {
        anchor: usize,
        /// Values and text counted before it started.
        values_before: u64,
        text_before: u64,
        /// Its own depth, and the deepest reached inside it.
        depth: usize,
        deepest: usize,
    }

    let at = |line: usize, col: usize, message: String| YamlError {
        location: Location {
            line: saturating_u32(line),
            column: saturating_u32(col + 1),
        },
        message,
    };
    let too_deep = |line: usize, col: usize| {
        at(
            line,
            col,
            format!(
                "mappings and lists nest more than {MAX_YAML_DEPTH} levels deep here; plumb reads files up to {MAX_YAML_DEPTH} levels"
            ),
        )
    };
    let mut open: Vec<Open> = Vec::new();
    // Per anchor: how many values it stands for, how many levels, and how
    // much text.
    let mut anchors: HashMap<usize, (u64, usize, u64)> = HashMap::new();
    let mut values = 0u64;
    let mut text = 0u64;
    for next in Parser::new_from_str(source) {
        let (event, span) = match next {
            Ok(next) => next,
            // The scanner has a nesting limit of its own for flow lists
            // (`[[[…`): say so in the same words.
            Err(e) if e.info().contains("recursion") => {
                return Err(too_deep(e.marker().line(), e.marker().col()));
            }
            Err(_) => return Ok(()),
        };
        let (line, col) = (span.start.line(), span.start.col());
        let reached = match event {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                values += 1;
                let depth = open.len() + 1;
                open.push(Open {
                    anchor,
                    values_before: values - 1,
                    text_before: text,
                    depth,
                    deepest: depth,
                });
                depth
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(done) = open.pop() {
                    if done.anchor != 0 {
                        let height = done.deepest + 1 - done.depth;
                        anchors.insert(
                            done.anchor,
                            (values - done.values_before, height, text - done.text_before),
                        );
                    }
                    if let Some(parent) = open.last_mut() {
                        parent.deepest = parent.deepest.max(done.deepest);
                    }
                }
                0
            }
            Event::Scalar(value, _, anchor, _) => {
                values += 1;
                let len = u64::try_from(value.len()).unwrap_or(u64::MAX);
                text = text.saturating_add(len);
                if anchor != 0 {
                    anchors.insert(anchor, (1, 0, len));
                }
                0
            }
            Event::Alias(anchor) => {
                let (size, height, len) = anchors.get(&anchor).copied().unwrap_or((1, 0, 0));
                values = values.saturating_add(size);
                text = text.saturating_add(len);
                open.len() + height
            }
            _ => 0,
        };
        if reached > MAX_YAML_DEPTH {
            return Err(too_deep(line, col));
        }
        if let Some(top) = open.last_mut() {
            top.deepest = top.deepest.max(reached);
        }
        if text > MAX_YAML_TEXT {
            return Err(at(
                line,
                col,
                format!(
                    "the file holds more than {} MiB of text once its aliases (`*name`) are expanded; plumb reads files up to that much",
                    MAX_YAML_TEXT / (1024 * 1024)
                ),
            ));
        }
        if values > MAX_YAML_VALUES {
            return Err(at(
                line,
                col,
                format!(
                    "the file stands for more than {MAX_YAML_VALUES} values once its aliases (`*name`) are expanded; plumb reads files up to that many"
                ),
            ));
        }
    }
    Ok(())
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn location_of(node: &MarkedYaml<'_>) -> Location {
    Location {
        line: saturating_u32(node.span.start.line()),
        column: saturating_u32(node.span.start.col() + 1),
    }
}

fn convert(
    node: &MarkedYaml<'_>,
    path: FieldPath,
    key: Option<Location>,
    locations: &mut HashMap<FieldPath, NodeLocation>,
) -> Result<Value, YamlError> {
    let here = location_of(node);
    locations.insert(path.clone(), NodeLocation { key, value: here });
    Ok(match &node.data {
        YamlData::Value(scalar) => scalar_to_json(scalar),
        YamlData::Representation(text, _, _) => Value::String(text.to_string()),
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(convert(item, path.index(i), None, locations)?);
            }
            Value::Array(out)
        }
        YamlData::Mapping(entries) => {
            let mut out = Map::with_capacity(entries.len());
            for (k, v) in entries {
                let name = key_to_string(k)?;
                let key_location = location_of(k);
                let value = convert(v, path.key(name.clone()), Some(key_location), locations)?;
                if out.insert(name.clone(), value).is_some() {
                    return Err(YamlError {
                        location: key_location,
                        message: format!("the key `{name}` appears twice in this mapping"),
                    });
                }
            }
            Value::Object(out)
        }
        YamlData::Tagged(tag, inner) => {
            let value = convert(inner, path.clone(), key, locations)?;
            if tag.suffix == "str" {
                match value {
                    Value::String(_) => value,
                    Value::Null => Value::String(String::new()),
                    other => Value::String(other.to_string()),
                }
            } else {
                value
            }
        }
        YamlData::Alias(_) | YamlData::BadValue => {
            return Err(YamlError {
                location: here,
                message: "this value could not be read (an unresolved alias?)".to_owned(),
            });
        }
    })
}

fn scalar_to_json(scalar: &Scalar<'_>) -> Value {
    match scalar {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number(Number::from(*i)),
        Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner())
            .map(Value::Number)
            // YAML has .inf and .nan; JSON does not. Keep the text rather than
            // silently turning it into something else.
            .unwrap_or_else(|| Value::String(f.into_inner().to_string())),
        Scalar::String(s) => Value::String(s.to_string()),
    }
}

fn key_to_string(node: &MarkedYaml<'_>) -> Result<String, YamlError> {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Ok(s.to_string()),
        YamlData::Value(Scalar::Integer(i)) => Ok(i.to_string()),
        YamlData::Value(Scalar::Boolean(b)) => Ok(b.to_string()),
        YamlData::Value(Scalar::FloatingPoint(f)) => Ok(f.into_inner().to_string()),
        YamlData::Value(Scalar::Null) => Ok("null".to_owned()),
        YamlData::Representation(text, _, _) => Ok(text.to_string()),
        _ => Err(YamlError {
            location: location_of(node),
            message: "mapping keys must be plain strings, not lists or mappings".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_stay_integers_and_yaml_1_1_booleans_stay_strings() {
        let doc = parse("a: 012\nb: on\nc: 1.5\nd: ~\ne: '7'\n").expect("valid yaml");
        assert_eq!(doc.value["a"], Value::from(12));
        assert!(doc.value["a"].is_i64());
        assert_eq!(doc.value["b"], Value::from("on"));
        assert_eq!(doc.value["c"], Value::from(1.5));
        assert_eq!(doc.value["d"], Value::Null);
        assert_eq!(doc.value["e"], Value::from("7"));
    }

    #[test]
    fn locate_points_at_the_key_of_a_nested_field() {
        let src = "name: x\nsteps:\n  - id: a\n    jq: .x\n  - id: b\n    http:\n      path: /p\n";
        let doc = parse(src).expect("valid yaml");
        let path = FieldPath::root()
            .key("steps")
            .index(1)
            .key("http")
            .key("path");
        assert_eq!(doc.locate(&path), Location { line: 7, column: 7 });
        assert_eq!(
            doc.locate_value(&path),
            Location {
                line: 7,
                column: 13
            }
        );
        assert_eq!(path.to_string(), "steps[1].http.path");
    }

    #[test]
    fn a_missing_field_resolves_to_its_nearest_ancestor() {
        let doc = parse("steps:\n  - id: a\n").expect("valid yaml");
        let path = FieldPath::root().key("steps").index(0).key("http");
        assert_eq!(doc.locate(&path), Location { line: 2, column: 5 });
    }

    #[test]
    fn duplicate_keys_are_rejected_with_their_line() {
        let err = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate key");
        assert_eq!(err.location.line, 3);
        assert!(
            err.message.contains("duplicate") || err.message.contains("twice"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let err = parse("a: [1, 2\nb: 3\n").expect_err("unclosed flow sequence");
        assert!(err.location.line >= 1);
        assert!(!err.message.is_empty());
    }

    #[test]
    fn two_documents_in_one_file_are_rejected() {
        let err = parse("a: 1\n---\nb: 2\n").expect_err("two documents");
        assert!(err.message.contains("more than one"), "{err}");
    }

    #[test]
    fn aliases_count_towards_the_size_and_depth_limits() {
        // Nine levels of ten aliases each: 10^9 values from a dozen lines.
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = parse(&laughs).expect_err("too many values");
        assert!(err.message.contains("aliases"), "{err}");

        // Few values, each a long text: 10^3, then 10^4, copies of 10 KiB.
        let mut long = format!("t: &a0 {}\n", "x".repeat(10 * 1024));
        for i in 1..4 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            long.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        parse(&long).expect("about 11 MiB of text is fine");
        long.push_str(&format!("a4: [{}]\n", ["*a3"; 10].join(", ")));
        let err = parse(&long).expect_err("too much text");
        assert!(err.message.contains("MiB of text"), "{err}");

        // An anchor 40 levels deep, used 40 levels deep: 80 levels.
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let text = format!(
            "a: &d {}\nb: {}*d{}\n",
            deep(40),
            "[".repeat(40),
            "]".repeat(40)
        );
        let err = parse(&text).expect_err("too deep through the alias");
        assert!(err.message.contains("levels deep"), "{err}");
        let text = format!(
            "a: &d {}\nb: {}*d{}\n",
            deep(20),
            "[".repeat(20),
            "]".repeat(20)
        );
        parse(&text).expect("42 levels are fine");
    }

    #[test]
    fn anchors_and_aliases_expand() {
        let doc = parse("base: &b {x: 1}\nuse: *b\n").expect("valid yaml");
        assert_eq!(doc.value["use"]["x"], Value::from(1));
    }
}
