//! JSON as every backend stores it: as text, refused at once when it would
//! not read back (too deep or too large), and decoded with a reason that
//! names the column when it does not.
//!
//! The limits live here, not in a backend, so a document one backend
//! accepts is never refused by the other: `plumb store copy` moves every
//! record it can read.

use serde_json::Value;

use crate::StoreError;

/// Deepest nesting the store writes. serde_json reads back at most 127
/// levels; what enters plumb is held to [`plumb_core::limits::MAX_DEPTH`]
/// (64), plus the few levels plumb wraps around it. This is the last line
/// of defence: a record that would not read back is refused, not stored.
pub(crate) const MAX_STORED_DEPTH: usize = 120;

/// Largest JSON text stored in one column (SQLite refuses rows over 1 GB,
/// PostgreSQL values over 1 GB; what enters plumb is held to far less).
pub(crate) const MAX_STORED_BYTES: usize = 256 * 1024 * 1024;

/// A JSON value as stored, once it is known to read back.
pub(crate) fn to_json_text(v: &Value, what: &str) -> Result<String, StoreError> {
    let m = plumb_core::limits::measure(v, MAX_STORED_DEPTH, MAX_STORED_BYTES);
    if m.depth > MAX_STORED_DEPTH {
        return Err(StoreError::Rejected(format!(
            "{what} nests more than {MAX_STORED_DEPTH} levels deep and would not read back"
        )));
    }
    let text = v.to_string();
    if text.len() > MAX_STORED_BYTES {
        return Err(StoreError::Rejected(format!(
            "{what} is larger than {} as JSON",
            plumb_core::limits::human_bytes(MAX_STORED_BYTES)
        )));
    }
    Ok(text)
}

/// [`to_json_text`] of an optional value.
pub(crate) fn opt_json_text(v: Option<&Value>, what: &str) -> Result<Option<String>, StoreError> {
    v.map(|v| to_json_text(v, what)).transpose()
}

/// Decodes the text of JSON column `column`; the error names the column.
pub(crate) fn from_json_text(text: &str, column: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|error| {
        StoreError::Corrupt(format!(
            "column `{column}` holds JSON that cannot be read: {error}"
        ))
    })
}
