//! `trigger.webhook`: `POST /hooks/<path>`, and how senders prove who they
//! are (`auth`: a generic HMAC-SHA256 signature, a sender's preset, or a
//! bearer secret), checked over the raw body before anything is parsed.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::TriggerKind;
use crate::load::{Checker, is_header_name};
use crate::model::{Trigger, TriggerDedupe, WebhookAuth, WebhookPreset};
use crate::spec::{Dur, SecretRef};
use crate::yaml::FieldPath;

pub(super) const KIND: TriggerKind = TriggerKind {
    name: "webhook",
    check,
};

/// `trigger.webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// Served at `POST /hooks/<path>`.
    pub path: String,
    /// How senders prove who they are.
    pub auth: Option<WebhookAuthSpec>,
    /// The data contract a body must keep (`schemas/order.json`).
    pub schema: Option<String>,
    /// `dedupe: "${{ key }}"`, `dedupe: { key, window }`, or `false` to
    /// turn a preset's default off.
    pub dedupe: Option<Value>,
}

/// `dedupe: { key, window }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSpec {
    /// The key, a `${{ }}` over `.trigger`.
    pub key: String,
    /// How long a key counts (default 24h).
    pub window: Option<Dur>,
}

/// How long a dedupe key counts unless `window` says otherwise.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The longest window a dedupe key may have.
const MAX_DEDUPE_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// `trigger.webhook.auth`: exactly one of `hmac_sha256`, `bearer`, `preset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookAuthSpec {
    /// A generic HMAC-SHA256 signature header.
    pub hmac_sha256: Option<HmacSpec>,
    /// `Authorization: Bearer <secret>`.
    pub bearer: Option<SecretRef>,
    /// A known sender's scheme: `github`, `stripe`, `slack`, `shopify`,
    /// `standard_webhooks`.
    pub preset: Option<String>,
    /// The signing secret, with `preset`.
    pub secret: Option<String>,
}

/// `hmac_sha256:` settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacSpec {
    /// The signing secret.
    pub secret: String,
    /// The header holding the signature.
    pub header: String,
    /// Text before the hex signature (e.g. `sha256=`).
    pub prefix: Option<String>,
    /// Header holding a Unix timestamp that is signed too (`{ts}.{body}`).
    pub timestamp_header: Option<String>,
    /// How old a timestamp may be.
    pub tolerance: Option<Dur>,
}

fn check(cx: &mut Checker<'_>, raw: &Value, path: &FieldPath) -> Option<Trigger> {
    let w: WebhookSpec = cx.deserialize(raw, path)?;
    let hook = w.path.trim_start_matches('/').to_owned();
    if hook.is_empty()
        || !hook
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    {
        cx.error_at_value(&path.key("path"), format!("invalid webhook path `{}`", w.path))
            .help = Some("use letters, digits, `-`, `_`, `.` and `/`, e.g. `orders` (served at POST /hooks/orders)".into());
    }
    let auth = match &w.auth {
        Some(a) => cx.webhook_auth(a, &path.key("auth")),
        None => None,
    };
    let schema = match &w.schema {
        Some(reference) => Some(cx.contract(reference, &path.key("schema"))?),
        None => None,
    };
    let dedupe = cx
        .trigger_dedupe(w.dedupe.as_ref(), auth.as_ref(), &path.key("dedupe"))
        .map(Box::new);
    Some(Trigger::Webhook {
        path: hook,
        auth,
        schema,
        dedupe,
    })
}

/// The delivery id a sender preset puts on every delivery (the same on its
/// retries), as a dedupe key; Slack sends none.
fn preset_delivery_id(preset: WebhookPreset) -> Option<&'static str> {
    match preset {
        WebhookPreset::Github => Some("${{ .trigger.headers[\"x-github-delivery\"] }}"),
        WebhookPreset::Stripe => Some("${{ .trigger.body.id }}"),
        WebhookPreset::Shopify => Some("${{ .trigger.headers[\"x-shopify-webhook-id\"] }}"),
        WebhookPreset::StandardWebhooks => Some("${{ .trigger.headers[\"webhook-id\"] }}"),
        WebhookPreset::Slack => None,
    }
}

impl Checker<'_> {
    /// `dedupe:` of a webhook or queue trigger, or a webhook preset's
    /// delivery id when not given.
    pub(super) fn trigger_dedupe(
        &mut self,
        raw: Option<&Value>,
        auth: Option<&WebhookAuth>,
        path: &FieldPath,
    ) -> Option<TriggerDedupe> {
        let (source, window) = match raw {
            None => match auth {
                Some(WebhookAuth::Preset { preset, .. }) => (
                    preset_delivery_id(*preset)?.to_owned(),
                    DEFAULT_DEDUPE_WINDOW,
                ),
                _ => return None,
            },
            Some(Value::Bool(false)) => return None,
            Some(Value::String(key)) => (key.clone(), DEFAULT_DEDUPE_WINDOW),
            Some(other @ Value::Object(_)) => {
                let spec: DedupeSpec = self.deserialize(other, path)?;
                let window = spec.window.map_or(DEFAULT_DEDUPE_WINDOW, |d| d.0);
                if window < Duration::from_secs(1) || window > MAX_DEDUPE_WINDOW {
                    self.error_at_value(
                        &path.key("window"),
                        "the dedupe window must be between 1s and 366d",
                    )
                    .help = Some("a sender retries for hours or days: 24h to 7d is usual".into());
                }
                (spec.key, window)
            }
            Some(_) => {
                self.error_at_value(path, "`dedupe` is a key, `{ key, window }` or `false`")
                    .help = Some(
                    "e.g. `dedupe: '${{ .trigger.body.event_id }}'` (a 24h window), or `dedupe: { key: '${{ .trigger.body.id }}', window: 7d }`".into(),
                );
                return None;
            }
        };
        let key_path = if matches!(raw, Some(Value::Object(_))) {
            path.key("key")
        } else {
            path.clone()
        };
        if !source.contains("${{") {
            self.error_at_value(&key_path, "the dedupe key must be an expression over `.trigger`")
                .help = Some(
                "a constant key would let one event through per window: write e.g. `${{ .trigger.body.id }}`".into(),
            );
            return None;
        }
        let key = self.template(&Value::String(source.clone()), &key_path)?;
        if !matches!(key, crate::expr::Template::Expr(_)) {
            // Text around an expression turns a missing field into the same
            // key for every event ("evt-"): each would be a duplicate of the
            // first.
            self.error_at_value(&key_path, "the dedupe key must be exactly one `${{ … }}` expression")
                .help = Some(
                "build a composite key inside it, e.g. `${{ [.trigger.body.type, .trigger.body.id] }}`; an event whose key is null starts a run without deduplication".into(),
            );
            return None;
        }
        Some(TriggerDedupe {
            source,
            key,
            window,
        })
    }

    /// A signed timestamp's accepted age: 5 minutes unless set, at most an
    /// hour (longer would make replay protection meaningless).
    fn hmac_tolerance(&mut self, given: Option<Duration>, path: &FieldPath) -> Duration {
        const MAX: Duration = Duration::from_secs(3600);
        match given {
            None => Duration::from_secs(300),
            Some(d) if d > MAX || d < Duration::from_secs(1) => {
                self.error_at_value(path, "the tolerance must be between 1s and 1h")
                    .help = Some(
                    "a signed timestamp older than this is refused as a replay; senders use 5m"
                        .into(),
                );
                d
            }
            Some(d) => d,
        }
    }

    fn webhook_auth(&mut self, spec: &WebhookAuthSpec, path: &FieldPath) -> Option<WebhookAuth> {
        let count = usize::from(spec.hmac_sha256.is_some())
            + usize::from(spec.bearer.is_some())
            + usize::from(spec.preset.is_some());
        if count != 1 {
            self.error(path, "webhook `auth` needs exactly one kind").help = Some(
                "write one of `preset: github` (with `secret: NAME`), `hmac_sha256: { secret, header, … }` or `bearer: { secret: NAME }`".into(),
            );
            return None;
        }
        if let Some(h) = &spec.hmac_sha256 {
            self.secret_name(&h.secret, &path.key("hmac_sha256").key("secret"));
            if !is_header_name(&h.header) {
                self.error_at_value(
                    &path.key("hmac_sha256").key("header"),
                    format!("invalid header name `{}`", h.header),
                )
                .help = Some("header names are letters, digits and `-`".into());
            }
            return Some(WebhookAuth::Hmac {
                secret: h.secret.clone(),
                header: h.header.to_ascii_lowercase(),
                prefix: h.prefix.clone().unwrap_or_default(),
                timestamp_header: h.timestamp_header.as_ref().map(|t| t.to_ascii_lowercase()),
                tolerance: self.hmac_tolerance(
                    h.tolerance.map(|d| d.0),
                    &path.key("hmac_sha256").key("tolerance"),
                ),
            });
        }
        if let Some(b) = &spec.bearer {
            self.secret_name(&b.secret, &path.key("bearer").key("secret"));
            return Some(WebhookAuth::Bearer {
                secret: b.secret.clone(),
            });
        }
        let name = spec.preset.as_deref()?;
        let Some(preset) = WebhookPreset::parse(name) else {
            self.error_at_value(
                &path.key("preset"),
                format!("unknown webhook preset `{name}`"),
            )
            .help = Some("use github, stripe, slack, shopify or standard_webhooks".into());
            return None;
        };
        let Some(secret) = &spec.secret else {
            self.error(path, format!("the `{name}` preset needs `secret: NAME`"))
                .help = Some(
                "name the secret holding the sender's signing secret (`plumb secrets set NAME`)"
                    .into(),
            );
            return None;
        };
        self.secret_name(secret, &path.key("secret"));
        Some(WebhookAuth::Preset {
            preset,
            secret: secret.clone(),
        })
    }
}
