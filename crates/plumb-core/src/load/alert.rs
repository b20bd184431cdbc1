//! `alerts:` in `plumb.yaml`: where failure alerts go. One kind today, a
//! JSON body through an http connection.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::Checker;
use crate::model::{AlertChannel, Connection};
use crate::yaml::FieldPath;

/// One alert channel: exactly one kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertChannelSpec {
    /// POST a JSON alert through an http connection.
    pub http: Option<HttpAlertSpec>,
}

/// `alerts.<name>.http`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAlertSpec {
    /// The http connection to send through.
    pub connection: String,
    /// Method; `POST` when omitted.
    pub method: Option<String>,
    /// Path below the connection's base_url.
    pub path: String,
}

impl Checker<'_> {
    pub(super) fn alert_channel(
        &mut self,
        raw: &Value,
        path: &FieldPath,
        connections: &BTreeMap<String, Connection>,
    ) -> Option<AlertChannel> {
        let spec: AlertChannelSpec = self.deserialize(raw, path)?;
        let Some(http) = spec.http else {
            self.error(path, "the alert channel has no kind").help = Some(
                "write `http: { connection: <name>, path: /hooks/… }` under the channel's name"
                    .into(),
            );
            return None;
        };
        let http_path = path.key("http");
        if !connections.contains_key(&http.connection) {
            self.error_at_value(
                &http_path.key("connection"),
                format!("unknown connection `{}`", http.connection),
            )
            .help =
                Some("alerts are sent through a connection defined under `connections:`".into());
        }
        if !http.path.starts_with('/') || http.path.starts_with("//") {
            self.error_at_value(
                &http_path.key("path"),
                "the path must start with a single `/`",
            )
            .help = Some("it is appended to the connection's base_url".into());
        }
        let method = http
            .method
            .as_deref()
            .unwrap_or("POST")
            .to_ascii_uppercase();
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            self.error_at_value(
                &http_path.key("method"),
                format!("alerts cannot be sent with `{method}`"),
            )
            .help = Some("use POST, PUT or PATCH: the alert is a JSON body".into());
        }
        Some(AlertChannel::Http {
            connection: http.connection,
            method,
            path: http.path,
        })
    }
}
