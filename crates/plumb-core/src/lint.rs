//! The hard-coded secrets lint: credentials written into project files
//! instead of being sealed with `plumb secrets set` and referenced by name.
//!
//! Every string value of a parsed file is examined with its place in the
//! document, because whether a string is a credential depends on where it
//! is: any value matching a known key format is one; a literal value in a
//! credential header or a credential-named field is one; userinfo in a URL
//! is one; a long random-looking token in a header, an `auth` block or a
//! URL is almost certainly one. Text inside `${{ … }}` is computed at run
//! time and is not a literal, except for known key formats, which are
//! reported wherever they appear.
//!
//! A finding that is not a credential (a public test key, a fixed resource
//! id) is allowed by its fingerprint in `plumb.yaml`'s `lint.allow`, with a
//! reason; the list is part of the deployed configuration and so audited.

use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::diag::Diagnostic;
use crate::yaml::{Document, FieldPath, Segment};

/// One allowed finding: not a credential, for the stated reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintAllow {
    /// The fingerprint the finding printed.
    pub fingerprint: String,
    /// Why this is not a credential.
    pub reason: String,
}

/// Known credential formats, each with the name a finding uses. Word
/// boundaries and gaps are ASCII-only: the formats are ASCII, and Unicode
/// classes would make the compiled set several times larger in memory.
const FORMATS: &[(&str, &str)] = &[
    (
        "an AWS access key id",
        r"(?-u:\b)(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?-u:\b)",
    ),
    (
        "an AWS secret access key",
        r"(?i-u)aws[ -~]{0,20}(?:secret|key)[ -~]{0,5}[=:][ \t]*[A-Za-z0-9/+]{40}(?-u:\b)",
    ),
    ("a Google API key", r"(?-u:\b)AIza[0-9A-Za-z_\-]{35}"),
    (
        "a GitHub token",
        r"(?-u:\b)(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}(?-u:\b)",
    ),
    (
        "a GitHub fine-grained token",
        r"(?-u:\b)github_pat_[A-Za-z0-9_]{22,}",
    ),
    ("a GitLab token", r"(?-u:\b)glpat-[A-Za-z0-9_\-]{20,}"),
    ("a Slack token", r"(?-u:\b)xox[abposre]-[A-Za-z0-9\-]{10,}"),
    (
        "a Slack webhook URL",
        r"hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/]{20,}",
    ),
    (
        "a Stripe secret key",
        r"(?-u:\b)[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",
    ),
    (
        "a webhook signing secret",
        r"(?-u:\b)whsec_[A-Za-z0-9+/=]{16,}",
    ),
    ("an npm token", r"(?-u:\b)npm_[A-Za-z0-9]{36}(?-u:\b)"),
    (
        "a SendGrid API key",
        r"(?-u:\b)SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}",
    ),
    (
        "an OpenAI or Anthropic API key",
        r"(?-u:\b)sk-(?:proj-|ant-)[A-Za-z0-9_\-]{20,}",
    ),
    (
        "a JSON Web Token",
        r"(?-u:\b)eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{10,}",
    ),
    (
        "a PEM private key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    ),
];

static FORMAT_SET: LazyLock<Option<RegexSet>> =
    LazyLock::new(|| RegexSet::new(FORMATS.iter().map(|(_, p)| *p)).ok());

/// `${{ … }}` templates: computed at run time, not literals.
static TEMPLATE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\$\{\{.*?\}\}").ok());

static UUID: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
        .ok()
});

/// Header names that carry credentials, lower case.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "apikey",
    "x-auth-token",
    "x-access-token",
    "private-token",
    "x-vault-token",
];

/// Parts of a field or header name that say it holds a credential.
const CREDENTIAL_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "access_key",
    "private_key",
    "credential",
];

/// Scans one parsed file and returns a diagnostic per finding not allowed.
#[must_use]
pub fn lint(file: &str, doc: &Document, allow: &[LintAllow]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    walk(&doc.value, &FieldPath::root(), &mut |path, text| {
        if let Some(what) = finding(path, text) {
            let fingerprint = fingerprint(text);
            if allow.iter().any(|a| a.fingerprint == fingerprint) {
                return;
            }
            out.push(
                Diagnostic::at(
                    file,
                    doc.locate_value(path),
                    format!("{what} is written in the file (fingerprint {fingerprint})"),
                )
                .field(path.to_string())
                .help(format!(
                    "never write credentials into project files: seal it with `plumb secrets set NAME` \
                     and name the secret where it is used (e.g. a connection's `auth: {{ bearer: {{ secret: NAME }} }}`); \
                     if it is not a credential, allow it in plumb.yaml with \
                     `lint: {{ allow: [{{ fingerprint: {fingerprint}, reason: \"why it is safe\" }}] }}`"
                )),
            );
        }
    });
    out
}

/// Whether `text` at `path` is a finding (allowed or not): a caller must
/// then not repeat the value in its own messages.
#[must_use]
pub fn is_flagged(path: &FieldPath, text: &str) -> bool {
    finding(path, text).is_some()
}

/// A short, stable name for a flagged value that does not reveal it.
#[must_use]
pub fn fingerprint(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// Calls `f` with every string value and its path (mapping keys are
/// examined through their values' paths).
fn walk(value: &Value, path: &FieldPath, f: &mut dyn FnMut(&FieldPath, &str)) {
    match value {
        Value::String(s) => f(path, s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &path.index(i), f);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                walk(v, &path.key(k.clone()), f);
            }
        }
        _ => {}
    }
}

/// What credential `text` at `path` is, if it is one.
fn finding(path: &FieldPath, text: &str) -> Option<String> {
    if let Some(set) = FORMAT_SET.as_ref()
        && let Some(i) = set.matches(text).iter().next()
    {
        return Some(FORMATS[i].0.to_owned());
    }
    let literal = without_templates(text);
    let segments = path.segments();
    let key = match segments.last() {
        Some(Segment::Key(k)) => k.to_ascii_lowercase(),
        _ => String::new(),
    };
    let parent = match segments.len().checked_sub(2).map(|i| &segments[i]) {
        Some(Segment::Key(k)) => k.to_ascii_lowercase(),
        _ => String::new(),
    };
    let in_auth = segments
        .iter()
        .any(|s| matches!(s, Segment::Key(k) if k == "auth"));
    let in_headers = parent == "headers";
    if let Some(what) = url_userinfo(&literal) {
        return Some(what);
    }
    if in_headers && is_credential_name(&key, true) && credential_literal(&literal) {
        return Some(format!("a literal value of the `{key}` header"));
    }
    // `secret: warehouse_dsn` (or `password: { secret: … }`) names a
    // sealed secret: the field is about credentials, its value is a name.
    let names_a_secret = key == "secret" && looks_like_name(&literal);
    if !in_auth
        && !in_headers
        && !names_a_secret
        && is_credential_name(&key, false)
        && credential_literal(&literal)
    {
        return Some(format!("a literal value of the credential field `{key}`"));
    }
    let url_field = matches!(key.as_str(), "url" | "base_url" | "path" | "public_url")
        || literal.contains("://");
    // `secret: github_app_private_key_2024` names a secret: snake_case
    // names are not random tokens, however many letters they mix.
    if (in_headers || in_auth || url_field) && !names_a_secret && has_random_token(&literal) {
        return Some(if in_auth {
            "a random-looking value in an `auth` field (auth names a secret, it never holds one)"
                .to_owned()
        } else if in_headers {
            format!("a random-looking value in the `{key}` header")
        } else {
            "a random-looking token in a URL".to_owned()
        });
    }
    None
}

/// A lower-case snake_case name (not a long hex string).
fn looks_like_name(text: &str) -> bool {
    let hexish = text.len() >= 32 && text.bytes().all(|b| b.is_ascii_hexdigit());
    !hexish
        && text
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn without_templates(text: &str) -> String {
    match TEMPLATE.as_ref() {
        Some(re) => re.replace_all(text, " ").into_owned(),
        None => text.to_owned(),
    }
}

fn is_credential_name(name: &str, header: bool) -> bool {
    (header && CREDENTIAL_HEADERS.contains(&name))
        || CREDENTIAL_WORDS.iter().any(|w| name.contains(w))
}

/// A literal long enough to be a credential once a scheme word such as
/// `Bearer` is set aside.
fn credential_literal(literal: &str) -> bool {
    let rest: String = literal
        .split_whitespace()
        .filter(|w| {
            !matches!(
                w.to_ascii_lowercase().as_str(),
                "bearer" | "basic" | "token" | "digest" | "apikey" | "key"
            )
        })
        .collect();
    rest.chars().count() >= 6
}

/// A password (or, for HTTP, a user name) written into a URL.
fn url_userinfo(literal: &str) -> Option<String> {
    let start = literal.find("://")?;
    // The scheme starts after the last character that cannot be in one
    // (which may be several bytes long).
    let scheme_start = literal[..start]
        .char_indices()
        .rev()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let candidate = literal[scheme_start..].split_whitespace().next()?;
    let url = url::Url::parse(candidate).ok()?;
    if url.password().is_some_and(|p| !p.is_empty()) {
        return Some(format!("a password in a {} URL", url.scheme()));
    }
    if matches!(url.scheme(), "http" | "https") && !url.username().is_empty() {
        return Some("a user name (often a token) in an HTTP URL".to_owned());
    }
    None
}

/// A token of at least 20 characters that looks random: mixed letters and
/// digits with high per-character entropy, or a long hex string.
///
/// Names are not tokens, however many letters and digits they mix: a value
/// made of short parts joined by `_`, `-` or `.` (`plumb_acc_chaos_0539635c`,
/// `db-prod-01.eu-west-1.rds.amazonaws.com`, `report_2024_11_30.csv`) is a
/// name unless one of its parts is long and random by itself
/// (`token_Xy8f9Kq2Lm3Np4Rs5Tu6` is still a token).
fn has_random_token(literal: &str) -> bool {
    literal
        .split(|c: char| !(c.is_ascii_alphanumeric() || "+=_-.~".contains(c)))
        .filter(|t| t.len() >= 20)
        .any(|t| {
            if UUID.as_ref().is_some_and(|re| re.is_match(t)) {
                return false;
            }
            // Judged by its parts: key material is one long random run,
            // names are short parts joined.
            t.split(['_', '-', '.', '~'])
                .any(|p| p.len() >= 16 && looks_random(p))
        })
}

/// Whether one run of characters looks like random key material.
fn looks_random(token: &str) -> bool {
    let core: Vec<u8> = token.bytes().filter(u8::is_ascii_alphanumeric).collect();
    let digits = core.iter().filter(|b| b.is_ascii_digit()).count();
    let letters = core.len() - digits;
    if digits == 0 || letters == 0 || core.len() < 16 {
        return false;
    }
    let hex = core.iter().all(u8::is_ascii_hexdigit);
    let entropy = shannon(&core);
    if hex {
        core.len() >= 32 && entropy >= 3.0
    } else {
        core.len() >= 20 && entropy >= 3.7
            || core.len() >= 16 && entropy >= 3.6 && mixed_case(&core)
    }
}

/// Upper and lower case letters both: generated keys mix them, names and
/// paths rarely do.
fn mixed_case(bytes: &[u8]) -> bool {
    bytes.iter().any(u8::is_ascii_uppercase) && bytes.iter().any(u8::is_ascii_lowercase)
}

/// Bits per byte.
fn shannon(bytes: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    #[allow(clippy::cast_precision_loss)]
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_url_after_a_multibyte_character_is_read_without_panicking() {
        assert!(url_userinfo("ቛ𖄇://🕴Ѩ=").is_none());
        assert_eq!(
            url_userinfo("𖄇postgres://u:pw@db/x").as_deref(),
            Some("a password in a postgres URL")
        );
    }
    use super::*;

    fn at(path: &[&str], text: &str) -> Option<String> {
        let mut p = FieldPath::root();
        for k in path {
            p = p.key(*k);
        }
        finding(&p, text)
    }

    #[test]
    fn expressions_in_credential_headers_are_not_literals() {
        assert_eq!(
            at(
                &["headers", "Authorization"],
                "Bearer ${{ .steps.login.body.token }}"
            ),
            None
        );
        assert!(at(&["headers", "Authorization"], "Bearer abcdef123456").is_some());
    }

    #[test]
    fn ordinary_values_are_not_findings() {
        assert_eq!(at(&["headers", "Accept"], "application/json"), None);
        assert_eq!(at(&["http", "path"], "/orders/${{ .item.id }}"), None);
        assert_eq!(
            at(
                &["http", "path"],
                "/items/0b3c2a8e-4f1d-4c55-9a7e-2d8f6b1c9e01"
            ),
            None
        );
        assert_eq!(at(&["base_url"], "https://api.example.com/v1"), None);
        assert_eq!(at(&["url"], "postgres://app@127.0.0.1/test"), None);
        assert_eq!(
            at(&["auth", "bearer", "secret"], "crm_token"),
            None,
            "a secret name is not a credential"
        );
        assert_eq!(at(&["description"], "rotate the api token monthly"), None);
    }

    #[test]
    fn userinfo_in_urls_is_found() {
        assert!(at(&["base_url"], "https://user:hunter22@api.example.com").is_some());
        assert!(at(&["url"], "amqp://guest:guest@127.0.0.1:5672/%2f").is_some());
        assert!(at(&["jq"], "\"see https://abc123@github.com/x\"").is_some());
    }

    #[test]
    fn random_tokens_count_only_where_credentials_go() {
        let token = "q8Zr2LmX0vT9sKp4Wn7Yb1Hc6Jd3Fg5";
        assert!(at(&["headers", "X-Custom"], token).is_some());
        assert!(at(&["http", "path"], &format!("/hook/{token}")).is_some());
        assert_eq!(at(&["description"], token), None);
    }

    #[test]
    fn shannon_entropy_of_uniform_bytes_is_their_log2() {
        assert!((shannon(b"abcdefgh") - 3.0).abs() < 1e-9);
        assert!(shannon(b"aaaaaaaa").abs() < 1e-9);
    }
}
