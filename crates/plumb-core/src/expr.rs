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
//!
//! # Bounded evaluation
//!
//! A program can loop forever (`last(repeat(1))`) or recurse without end
//! (`def f: [f]; f`). Every evaluation runs under a [`Budget`]: jaq clones
//! the evaluation context's data at every step it takes — each function
//! call, pipe and loop iteration — and plumb's data type counts those
//! clones. At each one it checks whether the budget was cancelled (the
//! step timed out, the run was interrupted) and how much stack the
//! evaluation has used; either ends the evaluation by unwinding out of it
//! (a private panic payload, caught in [`Program::eval`]), so a timed-out
//! expression stops using CPU at once instead of spinning on. `range` is
//! redefined so that even a huge range advances through such steps (the
//! native one counts to 10^18 without taking any).
//!
//! Printing is guarded too: `tojson`, `tostring`, the `@formats` and string
//! interpolation (rewritten to `@text "…"` before compiling) refuse values
//! nested deeper than [`MAX_PRINT_DEPTH`] or too large to print, and error
//! messages keep at most a few kilobytes of the values they show.
//!
//! What this does not bound: the memory one operation may allocate
//! (`"x" * 1e9` builds a gigabyte string); the text `try … catch .` gives
//! for a type error, which jaq prints in full (a value shared 2^40 times
//! prints for ever, and only a crash-counted restart ends it); and values
//! nested so deeply, inside one expression, that dropping them exhausts
//! the evaluating thread's stack. Results are checked against
//! [`crate::limits`] before they leave the evaluation.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, DataT, Vars, data::HasLut};
use jaq_json::Val;
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::limits::{LimitError, MAX_DEPTH, MAX_DOCUMENT_BYTES};

type JaqFilter = jaq_core::Filter<Metered>;

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
def _plumb_native_range($from; $upto; $by): range($from; $upto; $by);
def _plumb_native_tojson: tojson;
def range($from; $upto; $by):
  if ($from | type) == "number" and ($by | type) == "number"
     and $by != 0 and $by == ($by | floor) and $from == ($from | floor)
  then
    ($by * 1024) as $step
    | def chunks($x):
        if ($by > 0 and $x < $upto) or ($by < 0 and $x > $upto) then
          _plumb_native_range($x;
            if $by > 0 then [$x + $step, $upto] | min else [$x + $step, $upto] | max end;
            $by),
          chunks($x + $step)
        else empty end;
      chunks($from)
  elif $by > 0 then $from | while(. < $upto; . + $by)
  elif $by < 0 then $from | while(. > $upto; . + $by)
  else $from | while(. != $upto; . + $by)
  end;
def range($from; $upto): range($from; $upto; 1);
def range($upto): range(0; $upto);
def tojson: _plumb_depth_guard | _plumb_native_tojson;
def tostring: _plumb_depth_guard | "\(.)";
def @text: tostring;
def @json: tojson;
def @html: tostring | escape_html;
def @uri: tostring | encode_uri;
def @base64: tostring | encode_base64;
def @sh: _plumb_depth_guard | [if isarray then .[] end | if . >= "" then "'\(escape_sh)'" else "\(.)" end] | join(" ");
"#;

/// How deeply a value may nest when an expression turns it into text
/// (`tojson`, `tostring`, `@base64`, …): printing recurses once per level,
/// so a value built thousands of levels deep inside an expression must be
/// refused before it is printed.
pub const MAX_PRINT_DEPTH: usize = 10_000;

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
        let guarded = guard_interpolations(source);
        match Self::compile_text(&guarded) {
            Ok(filter) => Ok(Self {
                source: Arc::from(source),
                filter: Arc::new(filter),
            }),
            // Report the problem where the user wrote it: the guarded text
            // differs only by `@text ` before interpolated strings, so the
            // original fails the same way.
            Err(e) if guarded.len() != source.len() => match Self::compile_text(source) {
                Err(original) => Err(original),
                Ok(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn compile_text(source: &str) -> Result<JaqFilter, CompileError> {
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
        let funs = jaq_core::funs::<Metered>()
            .chain(jaq_std::funs::<Metered>())
            .chain(jaq_json::funs::<Metered>())
            .chain(plumb_funs::<Metered>());
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
        Ok(filter)
    }

    /// The program text.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs the program on `input` under `budget` and returns its single
    /// output, checked against [`crate::limits`].
    ///
    /// No output gives `null`. More than one output is an error: a workflow
    /// value is one JSON value, and silently keeping the first would hide
    /// data, so the user is told to collect them with `[ … ]`.
    ///
    /// # Errors
    ///
    /// Returns an [`EvalError`] for a jq runtime error (including `error(…)`),
    /// more than one output, a result over a limit, or an evaluation the
    /// budget stopped (cancelled, or recursing past its stack).
    pub fn eval(&self, input: &Val, budget: &Budget) -> Result<Value, EvalError> {
        quiet_stops();
        let clones = Cell::new(0u64);
        let base = stack_position();
        let meter = Meter {
            lut: &self.filter.lut,
            budget,
            clones: &clones,
            base,
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ctx = Ctx::<Metered>::new(meter, Vars::new([]));
            let mut outputs = self
                .filter
                .id
                .run((ctx, input.clone()))
                .map(jaq_core::unwrap_valr);
            let first = match outputs.next() {
                None => return Ok(Val::Null),
                Some(Ok(v)) => v,
                Some(Err(e)) => return Err(runtime_error(&e)),
            };
            match outputs.next() {
                None => Ok(first),
                Some(Err(e)) => Err(runtime_error(&e)),
                Some(Ok(_)) => Err(EvalError {
                    message: format!(
                        "`{}` produced more than one value; wrap it in [ … ] to collect them into an array",
                        self.source.trim()
                    ),
                }),
            }
        }));
        let output = match run {
            Ok(r) => r?,
            Err(payload) => return Err(stopped(&*payload, budget)),
        };
        let value = checked_val_to_json(&output).map_err(|e| EvalError {
            message: e.to_string(),
        });
        drop_deep(output);
        value
    }
}

/// plumb's own native filters: `_plumb_depth_guard` passes its input on
/// unless it nests deeper than [`MAX_PRINT_DEPTH`] or is too large to print
/// (see [`print_guard`]), so the shadowed printers never recurse that deep
/// nor run for ever.
fn plumb_funs<D: for<'a> DataT<V<'a> = Val>>() -> impl Iterator<Item = jaq_core::native::Fun<D>> {
    let guard: jaq_core::native::Filter<jaq_core::RunPtr<D>> =
        ("_plumb_depth_guard", jaq_core::native::v(0), |cv| {
            let result = match print_guard(&cv.1, MAX_PRINT_DEPTH) {
                Err(why) => Err(jaq_core::Error::str(why)),
                Ok(()) => Ok(cv.1),
            };
            jaq_core::native::bome(result)
        });
    std::iter::once(jaq_core::native::run::<D>(guard))
}

/// The most nodes [`print_guard`] visits: a value shared many times over
/// (`reduce range(40) as $i (0; [., .])` is 40 steps and 2^40 leaves when
/// printed) is refused before it is walked, or printed, for ever.
const MAX_PRINT_NODES: usize = 32 * 1024 * 1024;

/// Why a jq value cannot be printed, if it cannot: it nests deeper than
/// `max`, or it has more than [`MAX_PRINT_NODES`] nodes counting every
/// repetition of a shared part. Found without recursion.
fn print_guard(val: &Val, max: usize) -> Result<(), String> {
    let mut stack: Vec<(&Val, usize)> = vec![(val, 0)];
    let mut visited = 0usize;
    while let Some((v, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_PRINT_NODES {
            return Err(format!(
                "the value has more than {MAX_PRINT_NODES} parts and is too large to print"
            ));
        }
        let children: Box<dyn Iterator<Item = &Val>> = match v {
            Val::Arr(items) => Box::new(items.iter()),
            Val::Obj(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth + 1 > max {
            return Err(format!(
                "the value nests more than {max} levels deep and cannot be printed"
            ));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(())
}

/// Data that evaluations carry: the program's look-up table, plus the
/// meter that counts evaluation steps and enforces the [`Budget`].
pub struct Metered;

impl DataT for Metered {
    type V<'a> = Val;
    type Data<'a> = Meter<'a>;
}

/// jaq clones this at every evaluation step; see the module docs.
pub struct Meter<'a> {
    lut: &'a jaq_core::Lut<Metered>,
    budget: &'a Budget,
    clones: &'a Cell<u64>,
    /// Stack position when the evaluation started.
    base: usize,
}

impl<'a> HasLut<'a, Metered> for Meter<'a> {
    fn lut(&self) -> &'a jaq_core::Lut<Metered> {
        self.lut
    }
}

impl Clone for Meter<'_> {
    fn clone(&self) -> Self {
        let n = self.clones.get().wrapping_add(1);
        self.clones.set(n);
        // An atomic load is cheap, but not free: look every 256 steps.
        if n.is_multiple_of(256) && self.budget.cancelled.load(Ordering::Relaxed) {
            std::panic::panic_any(Stop::Cancelled);
        }
        if self.base.abs_diff(stack_position()) > self.budget.max_stack {
            std::panic::panic_any(Stop::TooDeep);
        }
        Self {
            lut: self.lut,
            budget: self.budget,
            clones: self.clones,
            base: self.base,
        }
    }
}

/// Why the meter ended an evaluation; the panic payload it unwinds with.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Cancelled,
    TooDeep,
}

/// The address of a local: how far down the stack this call is. Only ever
/// compared with another such address on the same thread.
#[inline(never)]
fn stack_position() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

/// The process-wide panic hook stays quiet about the meter's own stops
/// (they are how a timed-out expression ends, not bugs) and reports every
/// other panic as before.
fn quiet_stops() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Stop>() {
                previous(info);
            }
        }));
    });
}

fn stopped(payload: &(dyn std::any::Any + Send), budget: &Budget) -> EvalError {
    let message = match payload.downcast_ref::<Stop>() {
        Some(Stop::Cancelled) => match budget.reason() {
            Some(why) => why,
            None => "the expression was stopped".to_owned(),
        },
        Some(Stop::TooDeep) => format!(
            "the expression recursed too deeply (it used more than {} of stack); look for a function that calls itself without end",
            crate::limits::human_bytes(budget.max_stack)
        ),
        None => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            format!("the expression could not be evaluated (jq evaluator error: {text})")
        }
    };
    EvalError { message }
}

/// What an evaluation may use: it stops when cancelled, or when it has used
/// more than `max_stack` bytes of its thread's stack.
#[derive(Debug)]
pub struct Budget {
    cancelled: AtomicBool,
    reason: std::sync::Mutex<Option<String>>,
    max_stack: usize,
}

impl Budget {
    /// A budget allowing `max_stack` bytes of stack below the point where
    /// the evaluation starts. The caller must run the evaluation on a thread
    /// with at least that much stack to spare.
    #[must_use]
    pub fn new(max_stack: usize) -> Self {
        Self {
            cancelled: AtomicBool::new(false),
            reason: std::sync::Mutex::new(None),
            max_stack,
        }
    }

    /// Stops the evaluation at its next step; `reason` becomes its error.
    pub fn cancel(&self, reason: impl Into<String>) {
        if let Ok(mut r) = self.reason.lock()
            && r.is_none()
        {
            *r = Some(reason.into());
        }
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`Budget::cancel`] was called.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// Converts a jq result to JSON once it is known to be within
/// [`MAX_DEPTH`] and [`MAX_DOCUMENT_BYTES`] (measured without recursion,
/// so a deep result cannot overflow the converter).
fn checked_val_to_json(val: &Val) -> Result<Value, LimitError> {
    let what = "the expression's result";
    let mut stack: Vec<(&Val, usize)> = vec![(val, 0)];
    let mut bytes = 0usize;
    while let Some((v, depth)) = stack.pop() {
        match v {
            Val::Arr(items) => {
                if depth + 1 > MAX_DEPTH {
                    return Err(LimitError::TooDeep { what: what.into() });
                }
                bytes += 2 + items.len();
                stack.extend(items.iter().map(|i| (i, depth + 1)));
            }
            Val::Obj(map) => {
                if depth + 1 > MAX_DEPTH {
                    return Err(LimitError::TooDeep { what: what.into() });
                }
                bytes += 2;
                for (k, item) in map.iter() {
                    stack.push((k, depth + 1));
                    stack.push((item, depth + 1));
                }
            }
            Val::BStr(b) | Val::TStr(b) => bytes += b.len() + 2,
            _ => bytes += 6,
        }
        if bytes > MAX_DOCUMENT_BYTES {
            return Err(LimitError::TooLarge {
                what: what.into(),
                limit: MAX_DOCUMENT_BYTES,
            });
        }
    }
    Ok(val_to_json(val))
}

/// Drops a jq value without recursion: a result nested far past the limit
/// would otherwise overflow the stack while being freed.
fn drop_deep(val: Val) {
    let mut stack = vec![val];
    while let Some(v) = stack.pop() {
        match v {
            Val::Arr(items) => {
                if let Ok(items) = Arc::try_unwrap(items) {
                    stack.extend(items);
                }
            }
            Val::Obj(map) => {
                if let Ok(map) = Arc::try_unwrap(map) {
                    for (k, item) in map {
                        stack.push(k);
                        stack.push(item);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Puts `@text ` before every interpolated string that has no format of its
/// own (`"id \(.x)"` becomes `@text "id \(.x)"`). jaq prints a bare
/// interpolation with a native that cannot be shadowed; `@text` is plumb's
/// guarded printer (see `SHADOWS`), and prints exactly the same. Text that
/// does not lex is returned as it is, for the compiler to report.
fn guard_interpolations(source: &str) -> std::borrow::Cow<'_, str> {
    use jaq_core::load::lex::{StrPart, Tok, Token};

    fn walk(tokens: &[Token<&str>], base: usize, at: &mut Vec<usize>) {
        let mut formatted = false;
        for Token(text, tok) in tokens {
            match tok {
                Tok::Str(parts) => {
                    let interpolates = parts.iter().any(|p| matches!(p, StrPart::Term(_)));
                    if interpolates && !formatted {
                        at.push((text.as_ptr() as usize).saturating_sub(base));
                    }
                    for part in parts {
                        if let StrPart::Term(Token(_, Tok::Block(inner))) = part {
                            walk(inner, base, at);
                        }
                    }
                }
                Tok::Block(inner) => walk(inner, base, at),
                _ => {}
            }
            formatted = matches!(tok, Tok::Fmt);
        }
    }

    let Ok(tokens) = jaq_core::load::Lexer::new(source).lex() else {
        return std::borrow::Cow::Borrowed(source);
    };
    let mut at = Vec::new();
    walk(&tokens, source.as_ptr() as usize, &mut at);
    if at.is_empty() {
        return std::borrow::Cow::Borrowed(source);
    }
    at.sort_unstable();
    let mut out = String::with_capacity(source.len() + at.len() * 6);
    let mut from = 0;
    for offset in at {
        if offset < from || offset > source.len() || !source.is_char_boundary(offset) {
            return std::borrow::Cow::Borrowed(source);
        }
        out.push_str(&source[from..offset]);
        out.push_str("@text ");
        from = offset;
    }
    out.push_str(&source[from..]);
    std::borrow::Cow::Owned(out)
}

/// The most of an error's text kept: jaq prints the values a type error is
/// about in full, and a value built inside an expression can be huge, deep,
/// or shared so often that printing it would never end.
const MAX_ERROR_TEXT: usize = 4096;

/// A writer that takes [`MAX_ERROR_TEXT`] bytes and then refuses, which
/// stops the printing it serves.
struct Capped(String);

impl fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX_ERROR_TEXT.saturating_sub(self.0.len());
        if s.len() <= room {
            self.0.push_str(s);
            return Ok(());
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.0.push_str(&s[..cut]);
        Err(fmt::Error)
    }
}

fn runtime_error(e: &jaq_core::Error<Val>) -> EvalError {
    // jaq's Display for `error("text")` shows the JSON string with quotes;
    // users wrote the text, so show the text.
    let mut capped = Capped(String::new());
    let cut_short = fmt::Write::write_fmt(&mut capped, format_args!("{e}")).is_err();
    let mut text = capped.0;
    if cut_short {
        text.push_str(" …");
    }
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

/// Which step outputs an expression may read, found in its text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepsRead {
    /// Steps named as `.steps.<id>`, `.steps?.<id>` or `.steps["id"]`.
    pub ids: Vec<String>,
    /// Whether it may read *any* step's output: `.steps` used as a whole,
    /// the whole input (`.`, `..`, `.[]`), the name `"steps"` in a string
    /// (`getpath(["steps", …])`), or a filter that walks its input as a
    /// whole (`tojson`, `to_entries`, `paths`, `@base64`, …). Erring on
    /// this side only costs loading outputs that were not needed.
    pub whole: bool,
}

impl StepsRead {
    /// Adds what another expression of the same step reads.
    pub fn merge(&mut self, other: Self) {
        for id in other.ids {
            if !self.ids.contains(&id) {
                self.ids.push(id);
            }
        }
        self.whole |= other.whole;
    }

    /// Whether the output of step `id` may be read.
    #[must_use]
    pub fn reads(&self, id: &str) -> bool {
        self.whole || self.ids.iter().any(|i| i == id)
    }
}

/// Names that may see or pass on their whole input: at the top level of an
/// expression that input is the context, every step's output included.
/// Filters that walk or print it (`tojson`, `paths`, `map`), change it
/// (`setpath`, `del`), search it (`contains`), or give it back as it is
/// (`select`, `objects`, `ltrimstr` on a non-string, `while`); and `steps`
/// itself, as in the object shorthand `{steps}`.
const WHOLE_INPUT_FILTERS: &[&str] = &[
    "tojson",
    "tostring",
    "to_entries",
    "with_entries",
    "paths",
    "leaf_paths",
    "getpath",
    "setpath",
    "delpaths",
    "del",
    "pick",
    "walk",
    "recurse",
    "tostream",
    "map",
    "map_values",
    "values",
    "add",
    "any",
    "all",
    "min",
    "max",
    "min_by",
    "max_by",
    "sort",
    "sort_by",
    "group_by",
    "unique",
    "unique_by",
    "flatten",
    "reverse",
    "join",
    "first",
    "last",
    "nth",
    "contains",
    "inside",
    "indices",
    "index",
    "rindex",
    "select",
    "objects",
    "iterables",
    "arrays",
    "scalars",
    "booleans",
    "nulls",
    "numbers",
    "strings",
    "while",
    "until",
    "repeat",
    "toarray",
    "ltrimstr",
    "rtrimstr",
    "trimstr",
    "format",
    "transpose",
    "combinations",
    "env",
    "input",
    "splits",
    "ascii",
    "implode",
    "debug",
    "stderr",
    "steps",
];

/// What an expression's text says it may read of `.steps` (see
/// [`StepsRead`]). A textual scan, deliberately conservative.
#[must_use]
pub fn steps_read(code: &str) -> StepsRead {
    let mut read = StepsRead::default();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    // `\u0073teps` spells `steps` too.
    if code.contains("\"steps\"")
        || code.contains('@')
        || code.contains("..")
        || code.contains("\\u")
    {
        read.whole = true;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'.' {
            let prev_digit = i > 0 && bytes[i - 1].is_ascii_digit();
            let next = bytes.get(i + 1).copied();
            if prev_digit {
                i += 1;
                continue;
            }
            match next {
                // `.field`: a path; look for `.steps`.
                Some(n) if is_ident(n) => {
                    let end = (i + 1..bytes.len())
                        .find(|&j| !is_ident(bytes[j]))
                        .unwrap_or(bytes.len());
                    if &code[i + 1..end] == "steps" {
                        match named_step(code, end) {
                            Some(id) => {
                                if !read.ids.contains(&id) {
                                    read.ids.push(id);
                                }
                            }
                            None => read.whole = true,
                        }
                    }
                    i = end;
                    continue;
                }
                // `."field"` and `.["field"]`: named by a string, which the
                // check on `"steps"` above covers.
                Some(b'"') => {}
                // `.`, `.[]`, `.[$k]`: the whole input.
                _ => read.whole = true,
            }
            i += 1;
            continue;
        }
        if is_ident(b)
            && (i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b'.' && bytes[i - 1] != b'$')
        {
            let end = (i..bytes.len())
                .find(|&j| !is_ident(bytes[j]))
                .unwrap_or(bytes.len());
            let name = &code[i..end];
            // `error` raises its input (the context) unless given a message.
            let bare_error = name == "error" && !code[end..].trim_start().starts_with('(');
            if bare_error || WHOLE_INPUT_FILTERS.contains(&name) {
                read.whole = true;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    read
}

/// After `.steps` (ending at byte `at`): the step named next, if one is.
fn named_step(code: &str, at: usize) -> Option<String> {
    let rest = code[at..].trim_start();
    let rest = rest.strip_prefix('?').unwrap_or(rest).trim_start();
    if let Some(after) = rest.strip_prefix('.') {
        let id: String = after
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        return (!id.is_empty()).then_some(id);
    }
    let quoted = rest.strip_prefix('[')?.trim_start().strip_prefix('"')?;
    let end = quoted.find('"')?;
    let after = quoted[end + 1..].trim_start();
    after.starts_with(']').then(|| quoted[..end].to_owned())
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

    /// Evaluates every expression against `context` under `budget` and
    /// builds the value.
    ///
    /// # Errors
    ///
    /// Returns the first [`EvalError`] of an expression.
    pub fn render(&self, context: &Val, budget: &Budget) -> Result<Value, EvalError> {
        match self {
            Self::Literal(v) => Ok(v.clone()),
            Self::Expr(p) => p.eval(context, budget),
            Self::Text(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        TextPart::Literal(s) => out.push_str(s),
                        TextPart::Expr(p) => push_as_text(&mut out, &p.eval(context, budget)?),
                    }
                }
                Ok(Value::String(out))
            }
            Self::Array(items) => items
                .iter()
                .map(|t| t.render(context, budget))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Self::Object(entries) => {
                let mut out = Map::with_capacity(entries.len());
                for (k, t) in entries {
                    out.insert(k.clone(), t.render(context, budget)?);
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

    /// Test threads have 2 MiB of stack; leave the harness room.
    fn budget() -> Budget {
        Budget::new(512 * 1024)
    }

    #[test]
    fn program_evaluates_with_jq_semantics() {
        let p = Program::compile("[.items[] | select(.ok) | .name]").expect("compiles");
        let out = p
            .eval(
                &ctx(json!({"items": [{"ok": true, "name": "ada"}, {"ok": false, "name": "bo"}]})),
                &budget(),
            )
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
        let e = p.eval(&Val::Null, &budget()).expect_err("env is refused");
        assert!(e.message.contains("not available"), "{e}");
        let p = Program::compile("$ENV");
        assert!(p.is_err(), "$ENV must not be defined");
        let p = Program::compile("input").expect("shadowed input compiles");
        assert!(p.eval(&Val::Null, &budget()).is_err());
    }

    #[test]
    fn multiple_outputs_are_an_error_with_the_fix() {
        let p = Program::compile(".[]").expect("compiles");
        let e = p
            .eval(&ctx(json!([1, 2])), &budget())
            .expect_err("two outputs");
        assert!(e.message.contains("[ … ]"), "{e}");
        assert_eq!(
            p.eval(&ctx(json!([])), &budget()).expect("no output"),
            Value::Null
        );
    }

    #[test]
    fn error_builtin_message_is_plain_text() {
        let p = Program::compile(r#"error("boom")"#).expect("compiles");
        assert_eq!(
            p.eval(&Val::Null, &budget()).expect_err("errors").message,
            "boom"
        );
    }

    #[test]
    fn whole_expression_template_yields_typed_json() {
        let t = Template::compile(&json!("${{ .a }}")).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"a": {"b": [1]}})), &budget())
                .expect("renders"),
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
            .render(&ctx(json!({"id": "A-1", "n": 3})), &budget())
            .expect("renders");
        assert_eq!(out, json!("/orders/A-1/lines?n=3&x="));
    }

    #[test]
    fn closing_braces_inside_jq_objects_are_handled() {
        let t = Template::compile(&json!("${{ {a: {b: .x}} }}")).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"x": 1})), &budget()).expect("renders"),
            json!({"a": {"b": 1}})
        );
    }

    #[test]
    fn nested_values_keep_literals_and_report_error_paths() {
        let t = Template::compile(&json!({"k": 1, "v": ["${{ .x }}", "lit"]})).expect("compiles");
        assert_eq!(
            t.render(&ctx(json!({"x": true})), &budget())
                .expect("renders"),
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
        assert_eq!(p.eval(&ctx(v.clone()), &budget()).expect("runs"), v);
        let inf = Program::compile("1/0").expect("compiles");
        assert_eq!(inf.eval(&Val::Null, &budget()).expect("runs"), Value::Null);
    }

    #[test]
    fn a_cancelled_budget_stops_an_endless_loop() {
        let endless = [
            "last(repeat(1))",
            "def f: f; f",
            "last(range(1e18))",
            "[range(0; 1e18; 7)] | length",
        ];
        for code in endless {
            let started = std::time::Instant::now();
            let budget = budget();
            let p = Program::compile(code).expect("compiles");
            let e = std::thread::scope(|scope| {
                scope.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    budget.cancel("the step timed out");
                });
                p.eval(&Val::Null, &budget).expect_err("stopped")
            });
            assert_eq!(e.message, "the step timed out", "{code}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{code} stopped promptly"
            );
        }
    }

    #[test]
    fn endless_recursion_stops_at_the_stack_budget() {
        let p = Program::compile("def f: [f]; f").expect("compiles");
        let e = p.eval(&Val::Null, &budget()).expect_err("too deep");
        assert!(e.message.contains("recursed too deeply"), "{e}");
    }

    #[test]
    fn results_over_the_limits_are_errors_not_crashes() {
        let p = Program::compile("reduce range(100000) as $i (null; [.])").expect("compiles");
        let e = p.eval(&Val::Null, &budget()).expect_err("too deep");
        assert!(e.message.contains("more than 64 levels"), "{e}");
        let p = Program::compile("reduce range(64) as $i (null; [.])").expect("compiles");
        assert!(p.eval(&Val::Null, &budget()).is_ok());
        let p = Program::compile(r#""x" * 20000000"#).expect("compiles");
        let e = p.eval(&Val::Null, &budget()).expect_err("too large");
        assert!(e.message.contains("16 MiB"), "{e}");
    }

    #[test]
    fn range_keeps_jq_semantics() {
        let cases = [
            ("[range(5)]", json!([0, 1, 2, 3, 4])),
            ("[range(2; 12; 3)]", json!([2, 5, 8, 11])),
            ("[range(10; 0; -4)]", json!([10, 6, 2])),
            ("[range(0; 1; 0.25)]", json!([0, 0.25, 0.5, 0.75])),
            ("[range(3; 3)]", json!([])),
            ("[range(0; 3000)] | length", json!(3000)),
            ("[range(0; 3000)] | .[2047:2050]", json!([2047, 2048, 2049])),
            ("[limit(3; range(0; 5; 0))]", json!([0, 0, 0])),
            ("[range(1, 2; 4)]", json!([1, 2, 3, 2, 3])),
        ];
        for (code, want) in cases {
            let p = Program::compile(code).expect("compiles");
            assert_eq!(p.eval(&Val::Null, &budget()).expect(code), want, "{code}");
        }
    }

    #[test]
    fn steps_read_finds_named_steps_and_errs_towards_whole() {
        let r = steps_read(r#".steps.a.body + .steps["b-c"] | .steps?.d | .stepsx"#);
        assert_eq!(r.ids, vec!["a", "b-c", "d"]);
        assert!(!r.whole);
        assert!(!steps_read(".trigger.body.items[0].id").whole);
        assert!(!steps_read("[.steps.fetch.body.items[] | {id, n: (.n * 1.5)}]").whole);
        assert!(!steps_read(r#"if .steps.a.ok then .steps.a.id else error("no id") end"#).whole);
        for whole in [
            ".",
            "{ctx: .}",
            ".[]",
            ".steps | keys",
            ".steps[$k]",
            "tojson",
            ".trigger as $t | to_entries",
            r#"getpath(["steps", "x"])"#,
            "[..]",
            "@base64",
            r#"."steps""#,
            "{steps}",
            "map(.each)",
            "[recurse]",
            r#"del(.trigger) | tojson"#,
            r#"delpaths([["trigger"]])"#,
            r#"setpath(["trigger"]; 1)"#,
            r#"contains({steps: {}})"#,
            r#"select(true)"#,
            r#"getpath(["\u0073teps"])"#,
            "error",
        ] {
            assert!(steps_read(whole).whole, "{whole}");
        }
    }

    #[test]
    fn values_too_deep_to_print_are_refused_not_printed() {
        let outcome = std::thread::Builder::new()
            .stack_size(64 * 1024 * 1024)
            .spawn(|| {
                let mut errors = Vec::new();
                for code in [
                    "reduce range(20000) as $i (0; [.]) | tojson",
                    "reduce range(20000) as $i (0; {a: .}) | tostring",
                    "reduce range(20000) as $i (0; [.]) | @base64",
                    "reduce range(20000) as $i (0; [.]) | \"\\(.)\"",
                    "reduce range(40) as $i (0; [., .]) | tojson",
                    "reduce range(40) as $i (0; [., .]) | \"x\\(.)\"",
                ] {
                    let p = Program::compile(code).expect("compiles");
                    let e = p
                        .eval(&Val::Null, &Budget::new(32 * 1024 * 1024))
                        .expect_err("refused");
                    errors.push(e.message);
                }
                let p = Program::compile("[[1], {a: [2]}] | tojson, tostring, @text")
                    .expect("compiles");
                let printed = p.eval(&Val::Null, &Budget::new(1024 * 1024));
                (errors, printed)
            })
            .expect("spawn")
            .join()
            .expect("no panic");
        for e in &outcome.0 {
            assert!(
                e.contains("cannot be printed") || e.contains("too large to print"),
                "{e}"
            );
        }
        assert!(
            outcome.1.is_err(),
            "three outputs are an error, not a crash"
        );
        let p = Program::compile(r#"[[1], {a: [2]}] | [tojson, tostring, @text, @json, @base64]"#)
            .expect("compiles");
        assert_eq!(
            p.eval(&Val::Null, &budget()).expect("prints"),
            json!([
                "[[1],{\"a\":[2]}]",
                "[[1],{\"a\":[2]}]",
                "[[1],{\"a\":[2]}]",
                "[[1],{\"a\":[2]}]",
                "W1sxXSx7ImEiOlsyXX1d"
            ])
        );
    }

    #[test]
    fn interpolation_prints_through_the_guarded_printer_and_reads_the_same() {
        assert_eq!(
            guard_interpolations(r#"{"k\(.a)": "v \("in \(.b)")", x: @json "j\(.c)", y: "plain"}"#),
            r#"{@text "k\(.a)": @text "v \(@text "in \(.b)")", x: @json "j\(.c)", y: "plain"}"#
        );
        let p = Program::compile(r#"{"k\(.a)": "v \("in \(.b)") \(.c)", n: "\(1 + 1)"}"#)
            .expect("compiles");
        let input = json_to_val(&json!({"a": "A", "b": [1, {"z": null}], "c": "s"}));
        assert_eq!(
            p.eval(&input, &budget()).expect("runs"),
            json!({"kA": "v in [1,{\"z\":null}] s", "n": "2"})
        );
        assert_eq!(
            p.source(),
            r#"{"k\(.a)": "v \("in \(.b)") \(.c)", n: "\(1 + 1)"}"#
        );
    }

    #[test]
    fn compile_errors_point_into_the_text_the_user_wrote() {
        let e = Program::compile(r#""a \(.x)" | nope"#).expect_err("undefined");
        assert_eq!(e.offset, 12, "{e:?}");
        assert!(e.message.contains("nope"), "{e:?}");
    }

    #[test]
    fn error_messages_keep_a_bounded_part_of_huge_values() {
        let p = Program::compile("reduce range(40) as $i (0; [., .]) | .foo").expect("compiles");
        let e = p.eval(&Val::Null, &budget()).expect_err("cannot index");
        assert!(
            e.message.starts_with("cannot index [["),
            "{}",
            &e.message[..40]
        );
        assert!(e.message.len() <= MAX_ERROR_TEXT + 8, "{}", e.message.len());
        assert!(e.message.ends_with('…'));
        let p = Program::compile(r#"error("plain words")"#).expect("compiles");
        assert_eq!(
            p.eval(&Val::Null, &budget()).expect_err("raised").message,
            "plain words"
        );
    }
}
