//! The audit log: [`AuditStore`], and its hash chain — the canonical
//! encoding of an entry, its hash, and the verification of a whole chain.
//!
//! An entry's hash is SHA-256 over the previous entry's hash and the
//! canonical encoding of the entry: a JSON array
//! `[seq, at, actor, action, subject, details]` in which every object has
//! its keys sorted, with no whitespace. Anyone can recompute it with standard
//! tools. The first entry's previous hash is 64 zeros.
//!
//! Editing an entry changes its hash; deleting, inserting or reordering
//! entries breaks the sequence or the link to the previous hash. Removing
//! the newest entries (truncation) leaves a valid shorter chain: to detect
//! that, compare the head hash with one recorded elsewhere (SECURITY.md).

use std::fmt;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{Millis, StoreError};

/// The previous hash of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAuditEntry {
    /// Who: `cli:<user>`, `api:<token name>`, `serve`, …
    pub actor: String,
    /// What: `secret.set`, `workflow.deployed`, `run.replayed`, …
    pub action: String,
    /// On what: a secret's name, a run id, a workflow name, …
    pub subject: String,
    /// More, never a secret value.
    pub details: Value,
}

impl NewAuditEntry {
    /// An entry with details.
    #[must_use]
    pub fn new(actor: &str, action: &str, subject: &str, details: Value) -> Self {
        Self {
            actor: actor.to_owned(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            details,
        }
    }
}

/// A stored entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// When.
    pub at: Millis,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub subject: String,
    /// More.
    pub details: Value,
    /// The previous entry's hash.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

/// The canonical text of a JSON value: sorted keys, no whitespace.
#[must_use]
pub fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    if let Some(v) = map.get(k) {
                        write(v, out);
                    }
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// The hash of an entry, given the previous entry's hash.
#[must_use]
pub fn entry_hash(
    prev_hash: &str,
    seq: i64,
    at: Millis,
    actor: &str,
    action: &str,
    subject: &str,
    details: &Value,
) -> String {
    let body = canonical_json(&serde_json::json!([
        seq, at, actor, action, subject, details
    ]));
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// The first thing wrong with a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum AuditProblem {
    /// The entry's content does not match its hash: it was edited.
    Edited {
        /// The entry.
        seq: i64,
    },
    /// An entry is missing before this one (deleted).
    Missing {
        /// The sequence number expected here.
        expected: i64,
        /// The one found.
        found: i64,
    },
    /// The entry does not follow the one before it: entries were inserted or
    /// reordered (or one before it was rewritten with its hash).
    BrokenLink {
        /// The entry.
        seq: i64,
    },
    /// The log ends before the recorded head: entries at the end were
    /// deleted (or the head was moved).
    Truncated {
        /// The head's sequence number.
        head: i64,
        /// The last entry present.
        last: i64,
    },
    /// There are entries but no head record: it was deleted.
    HeadMissing,
    /// An entry does not have the hash recorded for it elsewhere (the
    /// head, or an anchor kept outside the store): the chain up to it was
    /// rewritten.
    Rewritten {
        /// The entry.
        seq: i64,
    },
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Edited { seq } => write!(
                f,
                "entry {seq} was edited: its content does not match its hash"
            ),
            Self::Missing { expected, found } => write!(
                f,
                "entry {expected} is missing (the next entry is {found}): entries were deleted"
            ),
            Self::BrokenLink { seq } => write!(
                f,
                "entry {seq} does not follow the entry before it: entries were inserted, reordered or rewritten"
            ),
            Self::Truncated { head, last } => write!(
                f,
                "entry {} is missing (the log ends at {last} but its head is {head}): entries at the end were deleted",
                last + 1
            ),
            Self::HeadMissing => write!(
                f,
                "the chain's head record is missing (deleted), so entries at the end may have been deleted too"
            ),
            Self::Rewritten { seq } => write!(
                f,
                "entry {seq} does not have the hash recorded for it: the chain up to it was rewritten"
            ),
        }
    }
}

/// Checks a chain given in sequence order; returns how many entries it
/// holds.
///
/// # Errors
///
/// The first [`AuditProblem`] found.
pub fn verify_chain(entries: &[AuditEntry]) -> Result<usize, AuditProblem> {
    let mut prev = GENESIS.to_owned();
    for (expected, e) in (1_i64..).zip(entries) {
        if e.seq != expected {
            return Err(if e.seq > expected {
                AuditProblem::Missing {
                    expected,
                    found: e.seq,
                }
            } else {
                AuditProblem::BrokenLink { seq: e.seq }
            });
        }
        if e.prev_hash != prev {
            return Err(AuditProblem::BrokenLink { seq: e.seq });
        }
        let recomputed = entry_hash(
            &prev, e.seq, e.at, &e.actor, &e.action, &e.subject, &e.details,
        );
        if recomputed != e.hash {
            return Err(AuditProblem::Edited { seq: e.seq });
        }
        prev.clone_from(&e.hash);
    }
    Ok(entries.len())
}

/// Checks the chain, then that it reaches the recorded `head` and passes
/// through every `anchor` (`(seq, hash)` pairs kept outside the store,
/// e.g. from an earlier `plumb audit verify --json`).
///
/// # Errors
///
/// The first [`AuditProblem`] found.
pub fn verify_log(
    entries: &[AuditEntry],
    head: Option<(i64, &str)>,
    anchors: &[(i64, String)],
) -> Result<usize, AuditProblem> {
    let n = verify_chain(entries)?;
    let last = entries.last().map_or(0, |e| e.seq);
    if head.is_none() && !entries.is_empty() {
        return Err(AuditProblem::HeadMissing);
    }
    if let Some((head_seq, head_hash)) = head {
        if head_seq > last {
            return Err(AuditProblem::Truncated {
                head: head_seq,
                last,
            });
        }
        // verify_chain proved seq == position + 1.
        let at = usize::try_from(head_seq - 1)
            .ok()
            .and_then(|i| entries.get(i));
        if at.is_none_or(|e| e.hash != head_hash) {
            return Err(AuditProblem::Rewritten { seq: head_seq });
        }
    }
    for (seq, hash) in anchors {
        if *seq > last {
            return Err(AuditProblem::Truncated { head: *seq, last });
        }
        let at = usize::try_from(seq - 1).ok().and_then(|i| entries.get(i));
        if at.is_none_or(|e| &e.hash != hash) {
            return Err(AuditProblem::Rewritten { seq: *seq });
        }
    }
    Ok(n)
}

/// The audit log and its chain head.
///
/// # Errors
///
/// Every method returns a [`StoreError`] when the database cannot be read or
/// written.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends an audit entry.
    async fn append_audit(&self, entry: &NewAuditEntry) -> Result<(), StoreError>;

    /// Audit entries after `after_seq`, in order.
    async fn audit_entries(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// This store's instance secret (see [`AuditStore::audit_head`]'s table
    /// neighbour `instance`): proves a server serves this store.
    async fn instance_secret(&self) -> Result<String, StoreError>;

    /// The audit chain's head (sequence number and hash of the last entry
    /// appended), kept apart from the entries so removing entries at the
    /// end is detectable.
    async fn audit_head(&self) -> Result<Option<(i64, String)>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        let mut prev = GENESIS.to_owned();
        for seq in 1..=n {
            let details = json!({"b": seq, "a": [1, {"z": 1, "y": 2}]});
            let hash = entry_hash(
                &prev,
                seq,
                1000 + seq,
                "cli:ops",
                "secret.set",
                "s",
                &details,
            );
            out.push(AuditEntry {
                seq,
                at: 1000 + seq,
                actor: "cli:ops".into(),
                action: "secret.set".into(),
                subject: "s".into(),
                details,
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        out
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        assert_eq!(
            canonical_json(&json!({"b": 1, "a": {"d": [2, {"f": 0, "e": 1}], "c": "x"}})),
            r#"{"a":{"c":"x","d":[2,{"e":1,"f":0}]},"b":1}"#
        );
    }

    #[test]
    fn an_intact_chain_verifies_and_each_tampering_is_named() {
        let good = chain(5);
        assert_eq!(verify_chain(&good), Ok(5));

        let mut edited = good.clone();
        edited[2].subject = "other".into();
        assert_eq!(verify_chain(&edited), Err(AuditProblem::Edited { seq: 3 }));

        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(
            verify_chain(&deleted),
            Err(AuditProblem::Missing {
                expected: 2,
                found: 3
            })
        );

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        reordered[1].seq = 2;
        reordered[2].seq = 3;
        assert_eq!(
            verify_chain(&reordered),
            Err(AuditProblem::BrokenLink { seq: 2 })
        );

        let mut inserted = good.clone();
        let mut fake = good[1].clone();
        fake.subject = "forged".into();
        fake.hash = entry_hash(
            &fake.prev_hash,
            2,
            fake.at,
            &fake.actor,
            &fake.action,
            &fake.subject,
            &fake.details,
        );
        inserted.insert(1, fake);
        for (i, e) in inserted.iter_mut().enumerate() {
            e.seq = i64::try_from(i).expect("small") + 1;
        }
        assert!(matches!(
            verify_chain(&inserted),
            Err(AuditProblem::BrokenLink { .. } | AuditProblem::Edited { .. })
        ));
    }
}
