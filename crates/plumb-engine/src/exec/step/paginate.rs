//! `paginate:` on an http step: page after page, each journaled as it
//! arrives (journal rule 7), until `next` says stop. A run killed on page
//! 37 resumes at page 37: the committed pages are skipped, the next request
//! is derived from the last of them, and only the page that was in flight
//! is sent again, with its own idempotency key. Reaching `max_pages` fails
//! the step: a sync is never cut short silently.

use plumb_connectors::ActionError;
use std::collections::HashMap;

use plumb_core::limits::MAX_PAGES_BYTES;
use plumb_core::model::{HttpAction, Paginate, Step};
use plumb_store::{StepRecord, now_ms};
use serde_json::Value;

use super::super::context::{eval_bounded, preview};
use super::super::{Execution, Halt, Lazy};
use super::http::{PlannedRequest, http_connection, keep_on_origin, url_below};
use crate::journal::{self, Prior};

impl Execution<'_> {
    pub(in crate::exec) async fn run_paginated(
        &mut self,
        step: &Step,
        http: &HttpAction,
        prior: Option<&StepRecord>,
    ) -> Result<(), Halt> {
        let Some(paginate) = &http.paginate else {
            return Ok(());
        };
        let started = prior.map_or_else(now_ms, |r| r.started_at);
        if prior.is_none() {
            // The step shows as running while its pages arrive.
            self.write_step(&self.running(step, None, 1, None, started))
                .await?;
        }
        let base = self.context_base();
        let (done, last) = journal::last_page(&step.id, &self.journal);
        // The step's own request: `next` objects merge into it. Once the
        // first page is journaled it is read back from there, not rendered
        // again (a template reading the clock would render another one).
        let journaled_first = self
            .journal
            .get(&(step.id.clone(), Some(0)))
            .filter(|_| done > 0)
            .and_then(|r| r.state.as_ref())
            .and_then(PlannedRequest::from_state);
        let first = match journaled_first {
            Some(first) => first,
            None => match self
                .plan_http(step, http, base.for_step(step, None, 1))
                .await
            {
                Ok(first) => first,
                Err(e) => return Err(self.fail_pages(step, started, None, &e.to_string()).await),
            },
        };
        // Every request sent so far, so a `next` that cycles (A, B, A) is
        // caught at once rather than at `max_pages`.
        let mut fetched: HashMap<u64, u32> = (0..done)
            .filter_map(|i| self.journal.get(&(step.id.clone(), Some(i))))
            .filter_map(|r| r.state.as_ref().and_then(PlannedRequest::from_state))
            .zip(1..)
            .map(|(r, n)| (fingerprint(&r), n))
            .collect();
        let mut request = match last {
            None => Some(first.clone()),
            Some(record) => {
                let Some(previous) = record.state.as_ref().and_then(PlannedRequest::from_state)
                else {
                    let message = format!(
                        "the journaled request of page {done} of step `{}` cannot be read",
                        step.id
                    );
                    return Err(self.fail_pages(step, started, None, &message).await);
                };
                let response = record.output.clone().unwrap_or(Value::Null);
                self.next_page(
                    step, http, paginate, &first, &previous, &response, done, started, &fetched,
                )
                .await?
            }
        };
        let mut pages = done;
        let mut last_status = last.and_then(|r| r.status_code);
        // What the pages hold together, bounded like every document.
        let mut bytes: usize = (0..done)
            .filter_map(|i| self.journal.get(&(step.id.clone(), Some(i))))
            .map(|r| r.output.as_ref().map_or(0, json_size))
            .sum();
        if bytes > MAX_PAGES_BYTES {
            return Err(self
                .fail_pages(step, started, None, &too_many_bytes(pages))
                .await);
        }
        while let Some(current) = request {
            if self.stop.is_cancelled() {
                return Err(Halt::Stopped);
            }
            let index = pages;
            let prior_page = self.journal.get(&(step.id.clone(), Some(index)));
            if let Prior::Failed(record) = Prior::of(prior_page) {
                let message = record.error.clone().unwrap_or_default();
                return Err(self.fail_pages(step, started, Some(index), &message).await);
            }
            let outcome = match self
                .attempts(
                    step,
                    Some((index, &jaq_json::Val::Null)),
                    base.clone(),
                    prior_page,
                    Some(&current),
                )
                .await
            {
                Ok(outcome) => outcome,
                Err(Halt::Failed(f)) => {
                    return Err(self
                        .fail_pages(step, started, Some(index), &f.message)
                        .await);
                }
                Err(other) => return Err(other),
            };
            pages += 1;
            last_status = outcome.status_code;
            bytes = bytes.saturating_add(json_size(&outcome.output));
            if bytes > MAX_PAGES_BYTES {
                return Err(self
                    .fail_pages(step, started, None, &too_many_bytes(pages))
                    .await);
            }
            fetched.insert(fingerprint(&current), pages);
            request = self
                .next_page(
                    step,
                    http,
                    paginate,
                    &first,
                    &current,
                    &outcome.output,
                    pages,
                    started,
                    &fetched,
                )
                .await?;
        }
        // The step's own row holds no copy of the pages: a later step that
        // reads them gets them assembled from the page rows.
        let summary = format!("{pages} pages");
        self.commit_success(
            step,
            None,
            1,
            started,
            &Value::Null,
            last_status,
            Some(summary),
        )
        .await?;
        self.lazy.insert(step.id.clone(), Lazy::Pages);
        Ok(())
    }

    /// Evaluates `next` over the page just received (`pages` fetched so
    /// far) and turns its answer into the next request, `None` to stop.
    #[allow(clippy::too_many_arguments)]
    async fn next_page(
        &self,
        step: &Step,
        http: &HttpAction,
        paginate: &Paginate,
        first: &PlannedRequest,
        current: &PlannedRequest,
        response: &Value,
        pages: u32,
        started: i64,
        fetched: &HashMap<u64, u32>,
    ) -> Result<Option<PlannedRequest>, Halt> {
        let link_next = link_next(response, &current.url);
        let context =
            self.context_base()
                .for_page(step, response, &current.describe(), pages, link_next);
        let evaluated = tokio::select! {
            () = self.stop.cancelled() => return Err(Halt::Stopped),
            r = eval_bounded(paginate.next.clone(), context, step.timeout) => r,
        };
        let answer = match evaluated {
            Ok(answer) => answer,
            Err(e) => {
                let message = format!("`paginate.next` failed on page {pages}: {e}");
                return Err(self.fail_pages(step, started, None, &message).await);
            }
        };
        let next = http_connection(&self.project, &http.connection).and_then(|connection| {
            next_request(&http.connection, connection, first, current, answer)
        });
        let message = match next {
            Ok(None) => return Ok(None),
            Ok(Some(next)) if next == *current => format!(
                "`paginate.next` asked for page {pages} again ({}): plumb stops rather than fetch the same page forever; make `next` return null on the last page",
                next.url
            ),
            Ok(Some(next)) if fetched.contains_key(&fingerprint(&next)) => format!(
                "`paginate.next` on page {pages} asked for page {} again ({}): the pages go round in a cycle; plumb stops rather than fetch them forever",
                fetched.get(&fingerprint(&next)).copied().unwrap_or(0),
                next.url
            ),
            Ok(Some(_)) if pages >= paginate.max_pages => format!(
                "there are more pages than `paginate.max_pages` ({}) allows: plumb stops rather than sync part of the data; raise `max_pages` or narrow the request",
                paginate.max_pages
            ),
            Ok(Some(next)) => return Ok(Some(next)),
            Err(e) => format!("`paginate.next` on page {pages}: {e}"),
        };
        Err(self.fail_pages(step, started, None, &message).await)
    }

    /// Fails the paginated step (its own row) and ends the run; `page` is
    /// the index of the page that failed, if one did.
    async fn fail_pages(
        &self,
        step: &Step,
        started: i64,
        page: Option<u32>,
        message: &str,
    ) -> Halt {
        let message = match page {
            Some(index) => format!("page {}: {message}", index + 1),
            None => message.to_owned(),
        };
        let status_code = page
            .and_then(|i| self.journal.get(&(step.id.clone(), Some(i))))
            .and_then(|r| r.status_code);
        self.fail_step(step, None, 1, started, &message, status_code)
            .await
    }
}

/// A request's identity, to recognise one sent before.
pub(crate) fn fingerprint(request: &PlannedRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    request.to_state().to_string().hash(&mut hasher);
    hasher.finish()
}

fn too_many_bytes(pages: u32) -> String {
    format!(
        "the {pages} pages fetched so far hold more than {} MiB of JSON together, the most one step may: narrow the request (a smaller window, fewer fields) or split the sync",
        MAX_PAGES_BYTES / (1024 * 1024)
    )
}

/// The size of a value as JSON text.
pub(crate) fn json_size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

/// The `rel="next"` target of a page's `Link` header (RFC 8288), resolved
/// against the URL that fetched it.
pub(crate) fn link_next(response: &Value, fetched: &url::Url) -> Option<String> {
    let header = response.get("headers")?.get("link")?.as_str()?;
    let links = http_link::parse_link_header(header, fetched).ok()?;
    links
        .into_iter()
        .find(|l| l.rel == "next")
        .map(|l| l.target.to_string())
}

/// Turns `next`'s answer into the next request: `null` (or `""`) stops; a
/// URL (absolute, or relative to the page just fetched) replaces the URL;
/// an object `{path, query, headers, body}` is merged into the step's own
/// request (a `null` query or header value removes it). Every URL stays on
/// the connection's origin.
pub(crate) fn next_request(
    connection_name: &str,
    connection: &plumb_core::model::HttpConnection,
    first: &PlannedRequest,
    current: &PlannedRequest,
    answer: Value,
) -> Result<Option<PlannedRequest>, ActionError> {
    let refuse = |message: String| ActionError::Permanent {
        message,
        status: None,
    };
    match answer {
        Value::Null | Value::Bool(false) => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(link) => {
            let url = current
                .url
                .join(&link)
                .map_err(|e| refuse(format!("`{link}` is not a URL: {e}")))?;
            keep_on_origin(&url, connection_name, connection, &format!("`{link}`"))?;
            Ok(Some(PlannedRequest {
                url,
                headers: first.headers.clone(),
                body: first.body.clone(),
            }))
        }
        Value::Object(parts) => {
            let mut next = first.clone();
            for (name, value) in parts {
                match (name.as_str(), value) {
                    ("path", Value::String(path)) => {
                        if !path.starts_with('/') || path.starts_with("//") {
                            return Err(refuse(format!(
                                "the path `{path}` must start with a single `/`: it is appended to the connection's base_url"
                            )));
                        }
                        let mut url = url_below(connection, &path)?;
                        keep_on_origin(
                            &url,
                            connection_name,
                            connection,
                            &format!("the path `{path}`"),
                        )?;
                        url.set_query(next.url.query());
                        next.url = url;
                    }
                    ("query", Value::Object(query)) => {
                        let mut pairs: Vec<(String, String)> =
                            next.url.query_pairs().into_owned().collect();
                        for (key, value) in query {
                            pairs.retain(|(k, _)| *k != key);
                            if let Some(text) = text_of(value) {
                                pairs.push((key, text));
                            }
                        }
                        next.url.set_query(None);
                        if !pairs.is_empty() {
                            next.url.query_pairs_mut().extend_pairs(pairs);
                        }
                    }
                    ("headers", Value::Object(headers)) => {
                        for (key, value) in headers {
                            if !plumb_core::load::is_header_name(&key)
                                || key.eq_ignore_ascii_case("idempotency-key")
                                || plumb_core::load::FORBIDDEN_HEADERS
                                    .iter()
                                    .any(|f| key.eq_ignore_ascii_case(f))
                            {
                                return Err(refuse(format!(
                                    "`{key}` cannot be set as a header by `next`"
                                )));
                            }
                            next.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                            if let Some(text) = text_of(value) {
                                next.headers.push((key, text));
                            }
                        }
                    }
                    ("body", body) => next.body = Some(body),
                    (name @ ("path" | "query" | "headers"), other) => {
                        return Err(refuse(format!(
                            "`{name}` must be {}, but it is {}",
                            if name == "path" { "text" } else { "an object" },
                            preview(&other, 60)
                        )));
                    }
                    (other, _) => {
                        return Err(refuse(format!(
                            "`{other}` is not part of a request; `next` may set path, query, headers and body"
                        )));
                    }
                }
            }
            Ok(Some(next))
        }
        other => Err(refuse(format!(
            "`next` must yield null (stop), a URL, or {{path, query, headers, body}}, but it yielded {}",
            preview(&other, 60)
        ))),
    }
}

/// A query or header value as text; `null` removes it.
fn text_of(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn connection() -> plumb_core::model::HttpConnection {
        plumb_core::model::HttpConnection {
            base_url: url::Url::parse("https://api.example/v1").expect("url"),
            headers: Vec::new(),
            timeout: None,
            auth: None,
        }
    }

    fn first() -> PlannedRequest {
        PlannedRequest {
            url: url::Url::parse("https://api.example/v1/items?limit=100&since=2026").expect("url"),
            headers: vec![("Accept".into(), "application/json".into())],
            body: None,
        }
    }

    fn next(answer: Value) -> Result<Option<PlannedRequest>, ActionError> {
        let first = first();
        next_request("api", &connection(), &first, &first, answer)
    }

    #[test]
    fn null_false_and_empty_text_stop() {
        for stop in [json!(null), json!(false), json!("")] {
            assert_eq!(next(stop.clone()).expect("stop"), None, "{stop}");
        }
    }

    #[test]
    fn a_relative_url_resolves_against_the_page_just_fetched() {
        let r = next(json!("?cursor=abc")).expect("ok").expect("a page");
        assert_eq!(r.url.as_str(), "https://api.example/v1/items?cursor=abc");
        let r = next(json!("/v1/items?page=2"))
            .expect("ok")
            .expect("a page");
        assert_eq!(r.url.as_str(), "https://api.example/v1/items?page=2");
        assert_eq!(r.headers, first().headers, "the step's headers go along");
    }

    #[test]
    fn a_url_on_another_origin_is_refused() {
        for off in [
            "https://evil.example/steal",
            "//evil.example/x",
            "http://api.example/v1/items",
        ] {
            let e = next(json!(off)).expect_err(off);
            assert!(
                e.to_string().contains("outside the connection `api`"),
                "{e}"
            );
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn an_object_merges_into_the_steps_own_request() {
        let r = next(json!({"query": {"offset": 200, "since": null}}))
            .expect("ok")
            .expect("a page");
        assert_eq!(
            r.url.as_str(),
            "https://api.example/v1/items?limit=100&offset=200"
        );
        let r =
            next(json!({"path": "/items/more", "headers": {"X-Cursor": "c2"}, "body": {"a": 1}}))
                .expect("ok")
                .expect("a page");
        assert_eq!(
            r.url.as_str(),
            "https://api.example/v1/items/more?limit=100&since=2026"
        );
        assert!(r.headers.contains(&("X-Cursor".into(), "c2".into())));
        assert_eq!(r.body, Some(json!({"a": 1})));
    }

    #[test]
    fn what_is_not_a_request_is_refused_with_the_reason() {
        let e = next(json!(42)).expect_err("number");
        assert!(e.to_string().contains("but it yielded 42"), "{e}");
        let e = next(json!({"method": "DELETE"})).expect_err("method");
        assert!(
            e.to_string().contains("`method` is not part of a request"),
            "{e}"
        );
        let e = next(json!({"headers": {"Idempotency-Key": "x"}})).expect_err("key");
        assert!(e.to_string().contains("Idempotency-Key"), "{e}");
        for header in ["Host", "Transfer-Encoding", "content-length", "Connection"] {
            let e = next(json!({"headers": {header: "x"}})).expect_err(header);
            assert!(e.to_string().contains(header), "{e}");
        }
        let e = next(json!({"path": "https://evil.example/"})).expect_err("path");
        assert!(e.to_string().contains("single `/`"), "{e}");
    }

    #[test]
    fn link_next_reads_rfc_8288_headers_relative_to_the_page() {
        let fetched = url::Url::parse("https://api.example/v1/items?page=1").expect("url");
        let response = json!({"headers": {"link": "<https://api.example/v1/items?page=3>; rel=\"last\", </v1/items?page=2>; rel=\"next\""}});
        assert_eq!(
            link_next(&response, &fetched).as_deref(),
            Some("https://api.example/v1/items?page=2")
        );
        let last =
            json!({"headers": {"link": "<https://api.example/v1/items?page=1>; rel=\"first\""}});
        assert_eq!(link_next(&last, &fetched), None);
        assert_eq!(link_next(&json!({"headers": {}}), &fetched), None);
    }

    #[test]
    fn a_planned_request_survives_the_journal() {
        let r = PlannedRequest {
            body: Some(json!({"cursor": "x"})),
            ..first()
        };
        assert_eq!(PlannedRequest::from_state(&r.to_state()), Some(r));
    }
}
