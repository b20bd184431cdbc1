//! Limits on every document that enters plumb (SPEC §2 "Limits").
//!
//! A webhook body, a manual input, an HTTP response body and a step output
//! are all bounded in nesting depth and in size. Each boundary checks before
//! it keeps anything, so:
//!
//! * a sender over a limit gets `400` (too deep) or `413` (too large) and no
//!   run is created;
//! * a response or an expression result over a limit fails its step
//!   permanently, naming the limit — retrying would produce the same
//!   document;
//! * everything the store holds was checked on the way in, so every record
//!   reads back. The wrappers plumb adds around a payload (`{"body": …}`,
//!   the `for_each` item list) stay far inside the JSON reader's own limit
//!   of 127 levels.
//!
//! The walks here are iterative: a document nested 100 000 levels deep is
//! measured without recursion, so it cannot overflow the stack that checks
//! it.

use serde_json::Value;

/// How deeply a document may nest arrays and objects. `[]` and `{}` are one
/// level; a scalar is zero.
pub const MAX_DEPTH: usize = 64;

/// Largest step output or manual input kept, measured as compact JSON
/// (16 MiB). Webhook bodies have their own, smaller limit
/// (`serve.body_limit`, 1 MiB by default).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// The most JSON all pages of one paginated request may hold together (an
/// http step's `{pages}` or one poll): pages are read back into memory
/// together, so an upstream that never stops answering is stopped here.
pub const MAX_PAGES_BYTES: usize = 64 * 1024 * 1024;

/// A document over a limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Nested deeper than [`MAX_DEPTH`].
    #[error(
        "{what} nests arrays and objects more than {MAX_DEPTH} levels deep; plumb keeps documents up to {MAX_DEPTH} levels"
    )]
    TooDeep {
        /// What was measured ("the body", "the output of step `x`").
        what: String,
    },
    /// Larger than the limit, as compact JSON.
    #[error(
        "{what} is larger than {} as JSON; plumb keeps documents up to that size",
        human_bytes(*limit)
    )]
    TooLarge {
        /// What was measured.
        what: String,
        /// The limit in bytes.
        limit: usize,
    },
}

/// `16 MiB`, `1 KiB`, `512 bytes`.
#[must_use]
pub fn human_bytes(n: usize) -> String {
    if n >= 1024 * 1024 && n.is_multiple_of(1024 * 1024) {
        format!("{} MiB", n / (1024 * 1024))
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// Checks the nesting of JSON *text* before it is parsed: a single pass over
/// the bytes that counts brackets outside strings. Malformed text is left to
/// the parser to report; this only answers "too deep or not".
///
/// # Errors
///
/// [`LimitError::TooDeep`] when brackets nest deeper than `max_depth`.
pub fn check_json_text(text: &[u8], max_depth: usize, what: &str) -> Result<(), LimitError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(LimitError::TooDeep {
                        what: what.to_owned(),
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses JSON text whose depth is checked first, so that a deep document
/// gets the limit's message rather than the parser's.
///
/// # Errors
///
/// [`ParseError::Limit`] over [`MAX_DEPTH`], [`ParseError::Json`] for text
/// that is not JSON.
pub fn parse_json(text: &[u8], what: &str) -> Result<Value, ParseError> {
    check_json_text(text, MAX_DEPTH, what).map_err(ParseError::Limit)?;
    serde_json::from_slice(text).map_err(|e| ParseError::Json {
        message: json_error_text(&e),
        line: e.line(),
        column: e.column(),
    })
}

/// Why JSON text could not become a document.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Over a limit.
    #[error(transparent)]
    Limit(LimitError),
    /// Not JSON.
    #[error("not valid JSON: {message} at line {line}, column {column}")]
    Json {
        /// What the parser said, without its position.
        message: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
}

/// serde_json's message without the " at line L column C" it appends, so the
/// position is said once, in our words.
fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Checks a parsed document against [`MAX_DEPTH`] and `max_bytes`.
///
/// # Errors
///
/// The first limit the document breaks.
pub fn check_value(value: &Value, max_bytes: usize, what: &str) -> Result<(), LimitError> {
    let measured = measure(value, MAX_DEPTH, max_bytes);
    if measured.depth > MAX_DEPTH {
        return Err(LimitError::TooDeep {
            what: what.to_owned(),
        });
    }
    if measured.bytes > max_bytes {
        return Err(LimitError::TooLarge {
            what: what.to_owned(),
            limit: max_bytes,
        });
    }
    Ok(())
}

/// What [`measure`] found: the nesting depth and an estimate of the size as
/// compact JSON (exact for everything but numbers and escapes). Both stop
/// growing once past their limit: the walk ends early.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Deepest nesting seen (capped just past the limit).
    pub depth: usize,
    /// Approximate compact JSON size in bytes (capped just past the limit).
    pub bytes: usize,
}

/// Measures a document without recursion, stopping as soon as it is over
/// `max_depth` or `max_bytes`.
#[must_use]
pub fn measure(value: &Value, max_depth: usize, max_bytes: usize) -> Measured {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    let mut m = Measured::default();
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::Null | Value::Bool(_) => m.bytes += 5,
            Value::Number(_) => m.bytes += 8,
            Value::String(s) => m.bytes += s.len() + 2,
            Value::Array(items) => {
                let d = depth + 1;
                m.depth = m.depth.max(d);
                m.bytes += 2 + items.len();
                stack.extend(items.iter().map(|i| (i, d)));
            }
            Value::Object(map) => {
                let d = depth + 1;
                m.depth = m.depth.max(d);
                m.bytes += 2;
                for (k, item) in map {
                    m.bytes += k.len() + 4;
                    stack.push((item, d));
                }
            }
        }
        if m.depth > max_depth || m.bytes > max_bytes {
            break;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> String {
        "[".repeat(depth) + &"]".repeat(depth)
    }

    #[test]
    fn text_depth_counts_brackets_outside_strings() {
        assert!(check_json_text(nested(64).as_bytes(), 64, "x").is_ok());
        assert!(check_json_text(nested(65).as_bytes(), 64, "x").is_err());
        // Brackets inside strings, escaped quotes included, do not count.
        let tricky = format!(r#"{{"a": "{}\" [[[", "b": [1]}}"#, "[".repeat(100));
        assert!(check_json_text(tricky.as_bytes(), 2, "x").is_ok());
    }

    #[test]
    fn a_document_far_past_the_readers_limit_gets_our_message() {
        let text = nested(5000);
        let err = parse_json(text.as_bytes(), "the body").expect_err("too deep");
        assert_eq!(
            err.to_string(),
            "the body nests arrays and objects more than 64 levels deep; plumb keeps documents up to 64 levels"
        );
    }

    #[test]
    fn invalid_json_states_its_position_once() {
        let err = parse_json(b"{\"a\": }", "the body").expect_err("invalid");
        let text = err.to_string();
        assert_eq!(text.matches("line").count(), 1, "{text}");
        assert!(text.contains("line 1, column 7"), "{text}");
    }

    #[test]
    fn values_are_measured_without_recursion() {
        let mut deep = json!(null);
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        assert!(matches!(
            check_value(&deep, MAX_DOCUMENT_BYTES, "x"),
            Err(LimitError::TooDeep { .. })
        ));
        // serde_json drops nested values recursively; take it apart first.
        let mut stack = vec![deep];
        while let Some(v) = stack.pop() {
            if let Value::Array(items) = v {
                stack.extend(items);
            }
        }
        let big = json!({"s": "x".repeat(100)});
        assert!(matches!(
            check_value(&big, 64, "x"),
            Err(LimitError::TooLarge { limit: 64, .. })
        ));
        assert!(check_value(&big, 1024, "x").is_ok());
    }
}
