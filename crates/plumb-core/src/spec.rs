//! The files as written: serde shapes of `plumb.yaml` and `workflows/*.yaml`.
//!
//! These types mirror the YAML one to one and reject unknown fields, so a
//! typo is an error rather than a silently ignored setting. Lists whose
//! elements should be reported independently (steps, connections) are kept
//! as raw JSON here and deserialized one element at a time by
//! [`crate::load`], so one bad step does not hide the problems of the next.
//! The shapes of each connection, trigger and step kind live with that
//! kind's checks, one file each under `load/`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// A duration written with a unit: `500ms`, `10s`, `5m`, `1h 30m`, `1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, such as `500ms`, `10s`, `5m` or `1h`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v.trim()).map(Dur).map_err(|e| {
                    E::custom(format!(
                        "invalid duration `{v}` ({e}); write it with a unit, such as `500ms`, `10s`, `5m` or `1h`"
                    ))
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "the duration `{v}` has no unit; write `{v}s` for seconds or `{v}ms` for milliseconds"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "the duration `{v}` has no unit; write it as e.g. `10s`"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "the duration `{v}` has no unit; write it as e.g. `1500ms`"
                )))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `plumb.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    /// Where runs are stored: `sqlite://plumb.db` (the default).
    pub store: Option<String>,
    /// Address `plumb serve` listens on.
    pub listen: Option<String>,
    /// Named connections; each value is a [`ConnectionSpec`].
    #[serde(default)]
    pub connections: Map<String, Value>,
    /// Project-wide defaults.
    #[serde(default)]
    pub defaults: DefaultsSpec,
    /// Alert channels by name; each value is an [`AlertChannelSpec`].
    #[serde(default)]
    pub alerts: Map<String, Value>,
    /// Settings of `plumb serve`.
    #[serde(default)]
    pub serve: ServeSpec,
    /// Settings of the hard-coded secrets lint.
    #[serde(default)]
    pub lint: LintSpec,
}

/// `lint:` in `plumb.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LintSpec {
    /// Findings that are not credentials.
    #[serde(default)]
    pub allow: Vec<LintAllowSpec>,
}

/// One entry of `lint.allow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LintAllowSpec {
    /// The fingerprint a finding printed.
    pub fingerprint: String,
    /// Why the value is not a credential.
    pub reason: String,
}

/// `serve:` in `plumb.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    /// Runs executed at once by one process.
    pub workers: Option<u32>,
    /// Largest webhook body accepted (`1MiB`, `256KiB`, bytes).
    pub body_limit: Option<Value>,
    /// How long a run's lease lasts without a heartbeat.
    pub lease: Option<Dur>,
    /// The URL people reach this server at, for links in alerts.
    pub public_url: Option<String>,
    /// Executions of one run that may stop without ending it (a crash, a
    /// panic, a journal the store refuses) before the run fails for good.
    pub max_crashes: Option<u32>,
}

/// `defaults:` in `plumb.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    /// Retry policy for every step unless overridden.
    pub retry: Option<RetrySpec>,
    /// Per-step timeout unless overridden.
    pub timeout: Option<Dur>,
    /// How long runs and their payloads are kept, unless a workflow says.
    pub retention: Option<RetentionSpec>,
}

/// `retention:` (a workflow's, or `defaults.retention`); each field
/// overrides the level above.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// Ended runs older than this are deleted with their journal.
    pub runs: Option<Dur>,
    /// Trigger payloads and step outputs of ended runs older than this are
    /// blanked (status, timings, errors and keys stay).
    pub payloads: Option<Dur>,
}

/// A retry policy; every field is optional and overrides the level above.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total attempts, the first one included (1 = no retry).
    pub attempts: Option<u32>,
    /// How the delay grows between attempts.
    pub backoff: Option<Backoff>,
    /// Delay before the second attempt.
    pub initial: Option<Dur>,
    /// Longest delay between attempts.
    pub max: Option<Dur>,
    /// Randomise delays so many runs do not retry in lockstep.
    pub jitter: Option<bool>,
}

/// How retry delays grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Doubles after each attempt, up to `max`.
    Exponential,
    /// Always `initial`.
    Fixed,
}

/// `{ secret: NAME }`: a reference to a sealed secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// The secret's name (`plumb secrets set NAME`).
    pub secret: String,
}

/// A workflow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// Unique name, used on the command line and in URLs. Required; read
    /// as optional so that every missing field is reported at once.
    pub name: Option<String>,
    /// Who is paged when it breaks. Required.
    pub owner: Option<String>,
    /// What it does, for the people who inherit it. Required.
    pub description: Option<String>,
    /// What starts a run; `manual` when omitted.
    pub trigger: Option<Value>,
    /// The steps, each a [`StepSpec`]. Required.
    pub steps: Option<Vec<Value>>,
    /// Retry policy for this workflow's steps.
    pub retry: Option<RetrySpec>,
    /// Per-step timeout for this workflow's steps.
    pub timeout: Option<Dur>,
    /// Runs of this workflow executing at once, across all workers.
    pub concurrency: Option<u32>,
    /// The incremental-sync cursor committed with each success.
    pub cursor: Option<Value>,
    /// Who hears about failures.
    pub alerts: Option<WorkflowAlertsSpec>,
    /// Fields masked before payloads are journaled (`.trigger.body.ssn`).
    #[serde(default)]
    pub redact: Vec<String>,
    /// How long this workflow's runs and payloads are kept.
    pub retention: Option<RetentionSpec>,
}

/// `alerts:` in a workflow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowAlertsSpec {
    /// Channels (from `plumb.yaml`) alerted when a run fails for good.
    #[serde(default)]
    pub on_failure: Vec<String>,
}

/// Slots missed while no scheduler ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Fire once, for the most recent missed slot.
    #[default]
    Latest,
    /// Fire every missed slot, oldest first (at most 1000).
    All,
    /// Fire none; wait for the next slot.
    None,
}
