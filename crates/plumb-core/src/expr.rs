//! Expressions: jq programs (via the jaq crates) and `${{ … }}` templates.
//!
//! Every expression is compiled once, when the project is loaded; a syntax
//! error is a `plumb check` error with its location. At run time a compiled
//! [`Program`] is evaluated against the context document (SPEC §2
//! "Expressions"): `.trigger`, `.steps`, `.item`/`.index`, `.run`, `.cursor`.
//!
//! A [`Template`] is any JSON value from a workflow file in which strings may
//! hold `${{ jq }}`. A string that is exactly one `${{ … }}` yields the typed
//! JSON result; otherwise results are interpolated as text (strings as they
//! are, `null` as nothing, anything else as compact JSON).
//!
//! Programs must be deterministic in what they can reach: `env`, `input`,
//! `halt` and friends are removed, so an expression cannot read the process
//! environment (where the master key may live) or stop the process.

use std::fmt;
use std::sync::{Arc, OnceLock};

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde::Deserialize;
use serde_json::{Map, Number, Value};

type JaqFilter = jaq_core::Filter<data::JustLut<Val>>;

/// Definitions that shadow the filters a workflow must not reach: they read
/// the process environment or stdin, write to stderr, or stop the process.
/// jq resolves names lexically, so the standard library's own definitions
/// keep working while user programs only ever see these.
const SHADOWS: &str = r#"
def env: error("env is not available in plumb expressions; pass values through the trigger or a connection");
def input: error("input is not available in plumb expressions");
def inputs: error("inputs is not available in plumb expressions");
def halt: error("halt is not available in plumb expressions");
def halt_error: error("halt_error is not available in plumb expressions; use error(msg)");
def halt_error($code): error("halt_error is not available in plumb expressions; use error(msg)");
def debug: .;
def debug(msg): .;
def stderr: .;
def input_filename: null;
def halt($code): error("halt is not available in plumb expressions");
def debug_empty: empty;
def stderr_empty: empty;
"#;

fn prelude() -> &'static [jaq_core::load::parse::Def<&'static str>] {
    static PRELUDE: OnceLock<Vec<jaq_core::load::parse::Def<&'static str>>> = OnceLock::new();
    PRELUDE.get_or_init(|| {
        let shadows = jaq_core::load::parse(SHADOWS, |p| p.defs()).unwrap_or_default();
        jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs())
            .chain(shadows)
            .collect()
    })
}

/// A jq program that failed to compile.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CompileError {
    /// What is wrong, in jq terms.
    pub message: String,
    /// Byte offset in the program where the problem was found.
    pub offset: usize,
}

/// A jq program that failed while running.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EvalError {
    /// What went wrong.
    pub message: String,
}

/// A compiled jq program.
#[derive(Clone)]
pub struct Program {
    source: Arc<str>,
    filter: Arc<JaqFilter>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Program").field(&self.source).finish()
    }
}

impl Program {
    /// Compiles a jq program.
    ///
    /// # Errors
    ///
    /// Returns a [`CompileError`] naming the first problem (lexing, parsing,
    /// or an undefined filter or variable) and where it is.
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        let arena = Arena::default();
        let loader = Loader::new(prelude().iter().cloned());
        let modules = loader
            .load(
                &arena,
                File {
                    code: source,
                    path: (),
                },
            )
            .map_err(|errors| load_error(source, errors))?;
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let first = errors.into_iter().flat_map(|(_, errs)| errs).next();
                match first {
                    Some((name, undefined)) => {
                        let what = match undefined {
                            jaq_core::compile::Undefined::Filter(arity) => {
                                format!("undefined filter `{name}/{arity}`")
                            }
                            other => format!("undefined {} `{name}`", other.as_str()),
                        };
                        CompileError {
                            message: what,
                            offset: offset_in(source, name),
                        }
                    }
                    None => CompileError {
                        message: "the program could not be compiled".to_owned(),
                        offset: 0,
                    },
                }
            })?;
        Ok(Self {
            source: Arc::from(source),
            filter: Arc::new(filter),
        })
    }

    /// The program text.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs the program on `input` and returns its single output.
    ///
    /// No output gives `null`. More than one output is an error: a workflow
    /// value is one JSON value, and silently keeping the first would hide
    /// data, so the user is told to collect them with `[ … ]`.
    ///
    /// # Errors
    ///
    /// Returns an [`EvalError`] for a jq runtime error (including `error(…)`)
    /// or more than one output.
    pub fn eval(&self, input: &Val) -> Result<Value, EvalError> {
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut outputs = self
            .filter
            .id
            .run((ctx, input.clone()))
            .map(jaq_core::unwrap_valr);
        let first = match outputs.next() {
            None => return Ok(Value::Null),
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(runtime_error(&e)),
        };
        match outputs.next() {
            None => Ok(val_to_json(&first)),
            Some(Err(e)) => Err(runtime_error(&e)),
            Some(Ok(_)) => Err(EvalError {
                message: format!(
                    "`{}` produced more than one value; wrap it in [ … ] to collect them into an array",
                    self.source.trim()
                ),
            }),
        }
    }
}

fn runtime_error(e: &jaq_core::Error<Val>) -> EvalError {
    // jaq's Display for `error("text")` shows the JSON string with quotes;
    // users wrote the text, so show the text.
    let text = e.to_string();
    let message = match serde_json::from_str::<String>(&text) {
        Ok(s) => s,
        Err(_) => text,
    };
    EvalError { message }
}

fn offset_in(source: &str, rest: &str) -> usize {
    // jaq reports positions as the unparsed remainder of the input, which is
    // a suffix of `source` when the problem is in the user's program.
    if source.ends_with(rest) {
        source.len() - rest.len()
    } else {
        source.find(rest).unwrap_or(0)
    }
}

fn load_error(source: &str, errors: jaq_core::load::Errors<&str, ()>) -> CompileError {
    use jaq_core::load::Error;
    for (_, error) in errors {
        match error {
            Error::Lex(errs) => {
                if let Some((expect, rest)) = errs.into_iter().next() {
                    return CompileError {
                        message: format!("expected {}", expect.as_str()),
                        offset: offset_in(source, rest),
                    };
                }
            }
            Error::Parse(errs) => {
                if let Some((expect, rest)) = errs.into_iter().next() {
                    let found = rest.split_whitespace().next().unwrap_or("");
                    let message = if found.is_empty() {
                        format!("expected {} but the expression ended", expect.as_str())
                    } else {
                        format!("expected {} before `{found}`", expect.as_str())
                    };
                    return CompileError {
                        message,
                        offset: offset_in(source, rest),
                    };
                }
            }
            Error::Io(errs) => {
                if let Some((path, why)) = errs.into_iter().next() {
                    return CompileError {
                        message: format!("cannot import `{path}`: {why}"),
                        offset: offset_in(source, path),
                    };
                }
            }
        }
    }
    CompileError {
        message: "the program could not be parsed".to_owned(),
        offset: 0,
    }
}

/// Converts JSON into a jq value.
#[must_use]
pub fn json_to_val(value: &Value) -> Val {
    // `&Value` is a serde Deserializer and jaq's Val implements Deserialize;
    // every JSON value is a valid Val, so the error arm cannot be reached.
    Val::deserialize(value).unwrap_or(Val::Null)
}

/// Converts a jq value into JSON. Non-finite numbers become `null` (JSON has
/// no NaN or infinity); byte strings become text (lossily, if not UTF-8).
#[must_use]
pub fn val_to_json(val: &Val) -> Value {
    match val {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => num_to_json(n),
        Val::BStr(b) | Val::TStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(items) => Value::Array(items.iter().map(val_to_json).collect()),
        Val::Obj(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                let key = match k {
                    Val::BStr(b) | Val::TStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => val_to_json(other).to_string(),
                };
                out.insert(key, val_to_json(v));
            }
            Value::Object(out)
        }
    }
}

fn num_to_json(n: &jaq_json::Num) -> Value {
    use jaq_json::Num;
    match n {
        Num::Int(i) => Value::Number(Number::from(*i as i64)),
        Num::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        // Big integers and decimals are exact in jaq; keep them exact when
        // they fit serde_json's number, else fall back to the float.
        other => {
            let text = Val::Num(other.clone()).to_string();
            serde_json::from_str::<Number>(&text)
                .ok()
                .or_else(|| text.parse::<f64>().ok().and_then(Number::from_f64))
                .map_or(Value::Null, Value::Number)
        }
    }
}

/// One piece of an interpolated string.
#[derive(Clone, Debug)]
pub enum TextPart {
    /// Text copied as is.
    Literal(String),
    /// A `${{ … }}` whose result is inserted as text.
    Expr(Program),
}

/// A JSON value from a workflow file whose strings may hold `${{ … }}`.
#[derive(Clone, Debug)]
pub enum Template {
    /// No expression anywhere inside: used as is.
    Literal(Value),
    /// A string that is exactly one `${{ … }}`: yields typed JSON.
    Expr(Program),
    /// A string mixing text and expressions: yields a string.
    Text(Vec<TextPart>),
    /// An array with at least one expression inside.
    Array(Vec<Template>),
    /// An object with at least one expression inside.
    Object(Vec<(String, Template)>),
}

/// An expression inside a template that does not compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    /// Where inside the template value, as keys and indices from its root.
    pub path: Vec<crate::yaml::Segment>,
    /// The text of the `${{ … }}` that failed.
    pub expression: String,
    /// The compile error.
    pub error: CompileError,
}

impl Template {
    /// Compiles every `${{ … }}` in `value`.
    ///
    /// # Errors
    ///
    /// Returns every expression that does not compile, with its position
    /// inside `value`.
    pub fn compile(value: &Value) -> Result<Self, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let template = compile_value(value, &mut Vec::new(), &mut errors);
        if errors.is_empty() {
            Ok(template)
        } else {
            Err(errors)
        }
    }

    /// Whether the template holds no expression.
    #[must_use]
    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }

    /// Evaluates every expression against `context` and builds the value.
    ///
    /// # Errors
    ///
    /// Returns the first [`EvalError`] of an expression.
    pub fn render(&self, context: &Val) -> Result<Value, EvalError> {
        match self {
            Self::Literal(v) => Ok(v.clone()),
            Self::Expr(p) => p.eval(context),
            Self::Text(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        TextPart::Literal(s) => out.push_str(s),
                        TextPart::Expr(p) => push_as_text(&mut out, &p.eval(context)?),
                    }
                }
                Ok(Value::String(out))
            }
            Self::Array(items) => items
                .iter()
                .map(|t| t.render(context))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Self::Object(entries) => {
                let mut out = Map::with_capacity(entries.len());
                for (k, t) in entries {
                    out.insert(k.clone(), t.render(context)?);
                }
                Ok(Value::Object(out))
            }
        }
    }

    /// Every program inside the template, for static checks.
    pub fn programs(&self) -> Vec<&Program> {
        let mut out = Vec::new();
        self.collect_programs(&mut out);
        out
    }

    fn collect_programs<'a>(&'a self, out: &mut Vec<&'a Program>) {
        match self {
            Self::Literal(_) => {}
            Self::Expr(p) => out.push(p),
            Self::Text(parts) => out.extend(parts.iter().filter_map(|p| match p {
                TextPart::Expr(p) => Some(p),
                TextPart::Literal(_) => None,
            })),
            Self::Array(items) => items.iter().for_each(|t| t.collect_programs(out)),
            Self::Object(entries) => entries.iter().for_each(|(_, t)| t.collect_programs(out)),
        }
    }
}

fn push_as_text(out: &mut String, value: &Value) {
    match value {
        Value::Null => {}
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

fn compile_value(
    value: &Value,
    path: &mut Vec<crate::yaml::Segment>,
    errors: &mut Vec<TemplateError>,
) -> Template {
    use crate::yaml::Segment;
    match value {
        Value::String(s) => compile_string(s, path, errors),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(Segment::Index(i));
                out.push(compile_value(item, path, errors));
                path.pop();
            }
            if out.iter().all(Template::is_literal) {
                Template::Literal(value.clone())
            } else {
                Template::Array(out)
            }
        }
        Value::Object(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                path.push(Segment::Key(k.clone()));
                out.push((k.clone(), compile_value(v, path, errors)));
                path.pop();
            }
            if out.iter().all(|(_, t)| t.is_literal()) {
                Template::Literal(value.clone())
            } else {
                Template::Object(out)
            }
        }
        other => Template::Literal(other.clone()),
    }
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

fn compile_string(
    s: &str,
    path: &[crate::yaml::Segment],
    errors: &mut Vec<TemplateError>,
) -> Template {
    if !s.contains(OPEN) {
        return Template::Literal(Value::String(s.to_owned()));
    }
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            parts.push(TextPart::Literal(rest[..start].to_owned()));
        }
        let after = &rest[start + OPEN.len()..];
        match split_expression(after) {
            Ok((program, consumed)) => {
                parts.push(TextPart::Expr(program));
                rest = &after[consumed..];
            }
            Err((expression, error)) => {
                errors.push(TemplateError {
                    path: path.to_vec(),
                    expression,
                    error,
                });
                return Template::Literal(Value::String(s.to_owned()));
            }
        }
    }
    if !rest.is_empty() {
        parts.push(TextPart::Literal(rest.to_owned()));
    }
    match parts.as_slice() {
        [TextPart::Expr(p)] => Template::Expr(p.clone()),
        _ => Template::Text(parts),
    }
}

/// Finds the `}}` that closes an expression. jq code may itself contain `}}`
/// (`{a: {b: 1}}`), so each candidate is tried in order and the first whose
/// inside compiles wins; if none does, the longest candidate's error is the
/// one worth showing.
fn split_expression(after: &str) -> Result<(Program, usize), (String, CompileError)> {
    let mut search_from = 0;
    let mut last_error = None;
    while let Some(i) = after[search_from..].find(CLOSE) {
        let end = search_from + i;
        let code = &after[..end];
        match Program::compile(code) {
            Ok(program) => return Ok((program, end + CLOSE.len())),
            Err(e) => {
                // Show the expression without its padding, with the offset
                // moved to match.
                let lead = code.len() - code.trim_start().len();
                let error = CompileError {
                    offset: e.offset.saturating_sub(lead),
                    ..e
                };
                last_error = Some((code.trim().to_owned(), error));
            }
        }
        search_from = end + 1;
    }
    Err(last_error.unwrap_or_else(|| {
        (
            after.trim().to_owned(),
            CompileError {
                message: "`${{` is never closed with `}}`".to_owned(),
                offset: after.len(),
            },
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Value) -> Val {
        json_to_val(&v)
    }

    #[test]
    fn program_evaluates_with_jq_semantics() {
        let p = Program::compile("[.items[] | select(.ok) | .name]").expect("compiles");
        let out = p
            .eval(&ctx(
                json!({"items": [{"ok": true, "name": "ada"}, {"ok": false, "name": "bo"}]}),
            ))
            .expect("runs");
        assert_eq!(out, json!(["ada"]));
    }

    #[test]
    fn syntax_error_reports_what_and_where() {
        let e = Program::compile(".a +").expect_err("incomplete");
        assert!(e.message.contains("expected"), "{e}");
        assert_eq!(e.offset, 4);
        let e = Program::compile(".a | nosuchfilter(1)").expect_err("undefined");
        assert!(e.message.contains("nosuchfilter/1"), "{e}");
        assert_eq!(e.offset, 5);
    }

    #[test]
    fn env_and_input_are_not_reachable() {
        let p = Program::compile("env").expect("shadowed env compiles");
        let e = p.eval(&Val::Null).expect_err("env is refused");
        assert!(e.message.contains("not available"), "{e}");
        let p = Program::compile("$ENV");
        assert!(p.is_err(), "$ENV must not be defined");
        let p = Program::compile("input").expect("shadowed input compiles");
        assert!(p.eval(&Val::Null).is_err());
    }

    #[test]
    fn multiple_outputs_are_an_error_with_the_fix() {
        let p = Program::compile(".[]").expect("compiles");
        let e = p.eval(&ctx(json!([1, 2]))).expect_err("two outputs");
        assert!(e.message.contains("[ … ]"), "{e}");
        assert_eq!(p.eval(&ctx(json!([]))).expect("no output"), Value::Null);
    }

    #[test]
    fn error_builtin_message_is_plain_text() {
        let p = Program::compile(r#"error("boom")"#).expect("compiles");
        assert_eq!(p.eval(&Val::Null).expect_err("errors").message, "boom");
    }

    #[test]
    fn whole_expression_template_yields_typed_json() {
        let t = Template::compile(&json!("${{ .a }}")).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"a": {"b": [1]}}))).expect("renders"),
            json!({"b": [1]})
        );
    }

    #[test]
    fn mixed_template_interpolates_text() {
        let t = Template::compile(&json!(
            "/orders/${{ .id }}/lines?n=${{ .n }}&x=${{ .missing }}"
        ))
        .expect("compiles");
        let out = t
            .render(&ctx(json!({"id": "A-1", "n": 3})))
            .expect("renders");
        assert_eq!(out, json!("/orders/A-1/lines?n=3&x="));
    }

    #[test]
    fn closing_braces_inside_jq_objects_are_handled() {
        let t = Template::compile(&json!("${{ {a: {b: .x}} }}")).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"x": 1}))).expect("renders"),
            json!({"a": {"b": 1}})
        );
    }

    #[test]
    fn nested_values_keep_literals_and_report_error_paths() {
        let t = Template::compile(&json!({"k": 1, "v": ["${{ .x }}", "lit"]})).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"x": true}))).expect("renders"),
            json!({"k": 1, "v": [true, "lit"]})
        );
        let errs = Template::compile(&json!({"a": {"b": "${{ .x + }}"}})).expect_err("bad jq");
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].path,
            vec![
                crate::yaml::Segment::Key("a".into()),
                crate::yaml::Segment::Key("b".into())
            ]
        );
        let errs = Template::compile(&json!("${{ .x ")).expect_err("unclosed");
        assert!(errs[0].error.message.contains("never closed"));
        let errs = Template::compile(&json!("/x/${{ .a == “b” }}")).expect_err("smart quotes");
        assert_eq!(errs[0].expression, ".a == “b”");
        assert_eq!(
            errs[0].error.offset, 6,
            "the offset points at `“` in the trimmed text"
        );
    }

    #[test]
    fn numbers_round_trip_exactly() {
        let p = Program::compile(".").expect("compiles");
        let v = json!({"i": 12345678901_i64, "f": 1.5, "neg": -3});
        assert_eq!(p.eval(&ctx(v.clone())).expect("runs"), v);
        let inf = Program::compile("1/0").expect("compiles");
        assert_eq!(inf.eval(&Val::Null).expect("runs"), Value::Null);
    }
}
