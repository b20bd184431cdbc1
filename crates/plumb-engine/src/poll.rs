//! Poll triggers: every `every`, one process (whichever holds the poll's
//! lease in the store) performs the request — page after page with
//! `paginate` — picks out the items, drops those whose key was seen within
//! `remember`, and commits one run per new item (or one for all with
//! `batch`), their keys and the advanced cursor in **one** transaction. A
//! crash before that commit loses nothing (the next poll sees the same
//! items: none was remembered); a crash after it doubles nothing (their
//! keys are remembered with their runs).
//!
//! Bounds: the pages of one poll hold at most
//! [`plumb_core::limits::MAX_PAGES_BYTES`] together; one poll commits at
//! most [`MAX_NEW_ITEMS`] new items (the rest are not remembered and the
//! cursor does not move, so the next poll takes them).
//!
//! A request that fails is retried with the project's default retry
//! policy; after the last attempt the poll is a visible failure: counted
//! (`plumb_poll_failures_total`), shown by `plumb status` (last error,
//! failures in a row) and, for the first failure of a streak, alerted to
//! the workflow's `on_failure` channels.

use std::sync::Arc;
use std::time::Duration;

use jaq_json::Val;
use plumb_connectors::ActionError;
use plumb_core::expr::{Template, json_to_val};
use plumb_core::model::{PollTrigger, Trigger, TriggerDedupe, Workflow};
use plumb_store::{Millis, NewAlert, PollClaim, PollCommit, PollCommitted, now_ms};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Engine;
use crate::exec::{PlannedRequest, link_next, next_request, plan_request, preview, send_request};

/// How long a poll's lease lasts without renewal.
const LEASE_MS: i64 = 60_000;
/// How often a process checks whether a poll is due when it is not.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The most items one poll may look at (seen or new).
const MAX_ITEMS: usize = 100_000;
/// The most new items (runs, or items of a batch run) one poll commits.
const MAX_NEW_ITEMS: usize = 10_000;
/// A request's timeout when its connection sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `workflow` until `shutdown`.
pub(crate) async fn run_one(
    engine: Arc<Engine>,
    workflow: Arc<Workflow>,
    wake_workers: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let Trigger::Poll(poll) = &workflow.trigger else {
        return;
    };
    // The process's own id: a holder that is certainly dead (killed on
    // this host) is recognised by it and its poll taken over at once.
    let owner = engine.owner.as_str().to_owned();
    loop {
        let wait = match due_in(&engine, &workflow.name, &owner).await {
            Some(wait) if !wait.is_zero() => wait.min(CHECK_EVERY),
            _ => {
                match engine
                    .store
                    .claim_poll(&workflow.name, &owner, LEASE_MS)
                    .await
                {
                    Ok(Some(claim)) => {
                        poll_once(
                            &engine,
                            &workflow,
                            poll,
                            &owner,
                            claim,
                            &wake_workers,
                            &shutdown,
                        )
                        .await;
                        Duration::ZERO
                    }
                    Ok(None) => CHECK_EVERY,
                    Err(e) => {
                        tracing::warn!(workflow = %workflow.name, error = %e, "Could not claim the poll; retrying.");
                        CHECK_EVERY
                    }
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long until the poll is due (`None` when the store cannot say: try
/// to claim). A poll held by a process that is certainly dead (SIGKILLed on
/// this host) is given back first, so a restart polls at once instead of
/// waiting out the dead process's lease.
async fn due_in(engine: &Engine, workflow: &str, owner: &str) -> Option<Duration> {
    let states = engine.store.poll_states().await.ok()?;
    let state = states.into_iter().find(|s| s.workflow == workflow)?;
    if let Some(holder) = &state.owner
        && holder != owner
        && crate::owner::is_certainly_dead(holder)
    {
        tracing::info!(workflow, holder = %holder, "The process holding this poll is gone; taking it over.");
        let _ = engine.store.renew_poll(workflow, holder, -LEASE_MS).await;
    }
    let left = state.next_poll_at - now_ms();
    Some(Duration::from_millis(u64::try_from(left).unwrap_or(0)))
}

/// One poll, from the claim to its commit (or its recorded failure).
async fn poll_once(
    engine: &Engine,
    workflow: &Workflow,
    poll: &PollTrigger,
    owner: &str,
    claim: PollClaim,
    wake_workers: &Notify,
    shutdown: &CancellationToken,
) {
    let started = now_ms();
    let next_poll_at = started + millis(poll.every);
    // The lease is renewed while the poll works; losing it stops the poll
    // (its commit would be refused anyway).
    let renew = async {
        loop {
            tokio::time::sleep(Duration::from_millis(
                u64::try_from(LEASE_MS / 3).unwrap_or(20_000),
            ))
            .await;
            match engine
                .store
                .renew_poll(&workflow.name, owner, LEASE_MS)
                .await
            {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(workflow = %workflow.name, error = %e, "Could not renew the poll's lease.")
                }
            }
        }
    };
    let outcome = tokio::select! {
        () = shutdown.cancelled() => {
            // Given back, still due: the next process to start polls at once.
            let _ = engine.store.renew_poll(&workflow.name, owner, -LEASE_MS).await;
            return;
        }
        () = renew => Err("this process lost the poll's lease (the store did not answer in time)".to_owned()),
        r = gather(engine, workflow, poll, &claim, next_poll_at, owner) => r,
    };
    let result = match outcome {
        Ok(commit) => {
            let committed = engine.store.commit_poll(&commit).await;
            if matches!(committed, Ok(PollCommitted::Committed)) && workflow.record_key.is_some() {
                for run in &commit.runs {
                    engine.index_acceptance(workflow, run.trigger.clone(), &run.id, "accepted");
                }
            }
            committed.map(|c| (c, commit.runs.len()))
        }
        Err(message) => {
            record_failure(engine, workflow, owner, &claim, next_poll_at, &message).await;
            return;
        }
    };
    match result {
        Ok((PollCommitted::Committed, new)) => {
            metrics::counter!("plumb_polls_total", "workflow" => workflow.name.clone())
                .increment(1);
            metrics::counter!("plumb_poll_items_total", "workflow" => workflow.name.clone())
                .increment(new as u64);
            if new > 0 {
                tracing::info!(workflow = %workflow.name, new, "Poll found new items.");
                wake_workers.notify_waiters();
            }
        }
        Ok((PollCommitted::CursorMoved, _)) => {
            tracing::info!(workflow = %workflow.name, "The cursor was changed during the poll; polling again from the new one.");
        }
        Err(e) => {
            let message = format!(
                "the poll's items could not be committed (the next poll sees them again): {e}"
            );
            record_failure(engine, workflow, owner, &claim, next_poll_at, &message).await;
        }
    }
}

/// A failed poll: counted, logged, recorded for status (releasing the
/// lease), and alerted on the first failure of a streak.
async fn record_failure(
    engine: &Engine,
    workflow: &Workflow,
    owner: &str,
    claim: &PollClaim,
    next_poll_at: Millis,
    message: &str,
) {
    let message = engine.redact(message);
    metrics::counter!("plumb_poll_failures_total", "workflow" => workflow.name.clone())
        .increment(1);
    tracing::warn!(workflow = %workflow.name, error = %message, "The poll failed.");
    let alerts = if claim.failures == 0 {
        failure_alerts(engine, workflow, &message)
    } else {
        Vec::new()
    };
    if let Err(e) = engine
        .store
        .fail_poll(&workflow.name, owner, &message, next_poll_at, &alerts)
        .await
    {
        tracing::warn!(workflow = %workflow.name, error = %e, "Could not record the failed poll.");
    }
}

/// The request(s), the items, their keys, the new ones' runs and the
/// cursor: everything the commit needs, or why the poll failed.
async fn gather(
    engine: &Engine,
    workflow: &Workflow,
    poll: &PollTrigger,
    claim: &PollClaim,
    next_poll_at: Millis,
    owner: &str,
) -> Result<PollCommit, String> {
    let project = engine.project();
    let timeout = poll.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let tick = now_ms();
    let base = context(&[("cursor", claim.cursor.clone())]);
    let first = plan_request(&project, &poll.http, base, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut pages: Vec<Value> = Vec::new();
    let mut bytes = 0_usize;
    let mut request = Some(first.clone());
    while let Some(current) = request {
        let key = format!("poll:{}:{tick}:{}", workflow.name, pages.len());
        let page = send_with_retries(engine, &project, poll, &current, key, timeout)
            .await
            .map_err(|e| {
                if pages.is_empty() {
                    e
                } else {
                    format!("page {}: {e}", pages.len() + 1)
                }
            })?;
        request = match &poll.http.paginate {
            None => None,
            Some(paginate) => {
                let number = u32::try_from(pages.len() + 1).unwrap_or(u32::MAX);
                let doc = context(&[
                    ("cursor", claim.cursor.clone()),
                    ("response", page.clone()),
                    ("request", current.describe()),
                    ("page", Value::from(number)),
                    (
                        "link_next",
                        link_next(&page, &current.url).map_or(Value::Null, Value::String),
                    ),
                ]);
                let answer = evaluate(&paginate.next, doc, timeout)
                    .await
                    .map_err(|e| format!("`paginate.next` failed on page {number}: {e}"))?;
                let connection = crate::exec::http_connection(&project, &poll.http.connection)
                    .map_err(|e| e.to_string())?;
                let next =
                    next_request(&poll.http.connection, connection, &first, &current, answer)
                        .map_err(|e| e.to_string())?;
                match next {
                    Some(next) if next == current => {
                        return Err(format!(
                            "`paginate.next` asked for page {number} again: make it return null on the last page"
                        ));
                    }
                    Some(_) if number >= paginate.max_pages => {
                        return Err(format!(
                            "there are more pages than `paginate.max_pages` ({}) allows: plumb stops rather than poll part of the data",
                            paginate.max_pages
                        ));
                    }
                    other => other,
                }
            }
        };
        bytes = bytes.saturating_add(crate::exec::json_size(&page));
        if bytes > plumb_core::limits::MAX_PAGES_BYTES {
            return Err(format!(
                "the pages of this poll hold more than {} MiB of JSON together: narrow the request (a cursor, a smaller window)",
                plumb_core::limits::MAX_PAGES_BYTES / (1024 * 1024)
            ));
        }
        pages.push(page);
    }
    let response = pages.first().cloned().unwrap_or(Value::Null);
    let pages = Value::Array(pages);
    let doc = context(&[
        ("cursor", claim.cursor.clone()),
        ("response", response.clone()),
        ("pages", pages.clone()),
    ]);
    let items = match evaluate(&poll.items, doc, timeout).await {
        Ok(Value::Array(items)) => items,
        Ok(Value::Null) => Vec::new(),
        Ok(other) => {
            return Err(format!(
                "`items` must yield a list, but it yielded {}",
                preview(&other, 80)
            ));
        }
        Err(e) => return Err(format!("`items` failed: {e}")),
    };
    if items.len() > MAX_ITEMS {
        return Err(format!(
            "`items` yielded {} items, more than the {MAX_ITEMS} one poll may look at: narrow the request (a cursor, a smaller page size or window)",
            items.len()
        ));
    }
    // Each item's key; an item seen twice in one poll counts once.
    let mut keyed: Vec<(String, Value)> = Vec::with_capacity(items.len());
    let mut in_this_poll = std::collections::HashSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let key = evaluate(&poll.key, json_to_val(&item), timeout)
            .await
            .map_err(|e| format!("`key` failed on item {index}: {e}"))?;
        let Some(hash) = TriggerDedupe::key_text(&key) else {
            return Err(format!(
                "item {index} has no key (`key` yielded {}): an item without one cannot be told from the next poll's; fix `key`",
                preview(&key, 60)
            ));
        };
        if in_this_poll.insert(hash.clone()) {
            keyed.push((hash, item));
        }
    }
    let hashes: Vec<String> = keyed.iter().map(|(k, _)| k.clone()).collect();
    let seen = engine
        .store
        .seen_keys(&workflow.name, &hashes)
        .await
        .map_err(|e| e.to_string())?;
    let all_items: Vec<Value> = keyed.iter().map(|(_, item)| item.clone()).collect();
    let mut fresh: Vec<(String, Value)> = keyed
        .into_iter()
        .zip(seen)
        .filter(|(_, seen)| !seen)
        .map(|(k, _)| k)
        .collect();
    // A bounded commit: the rest are not remembered, so the next poll finds
    // them; the cursor then stays, so they stay in its window.
    let truncated = fresh.len() > MAX_NEW_ITEMS;
    if truncated {
        tracing::warn!(workflow = %workflow.name, new = fresh.len(), kept = MAX_NEW_ITEMS, "More new items than one poll commits; the rest come with the next poll.");
        fresh.truncate(MAX_NEW_ITEMS);
    }
    let cursor = match &poll.cursor {
        None => None,
        Some(_) if truncated => None,
        Some(template) => {
            let doc = context(&[
                ("cursor", claim.cursor.clone()),
                ("response", response),
                ("pages", pages),
                ("items", Value::Array(all_items)),
                (
                    "new_items",
                    Value::Array(fresh.iter().map(|(_, item)| item.clone()).collect()),
                ),
            ]);
            match evaluate(template, doc, timeout).await {
                Ok(Value::Null) => None,
                Ok(value)
                    if crate::exec::json_size(&value) > plumb_store::cursors::MAX_CURSOR_BYTES =>
                {
                    return Err(format!(
                        "`cursor` yielded {} bytes of JSON, more than a cursor may hold ({} KiB): make it a watermark (a time, an id, a token), not a list",
                        crate::exec::json_size(&value),
                        plumb_store::cursors::MAX_CURSOR_BYTES / 1024
                    ));
                }
                Ok(value) => Some((claim.cursor_version, value)),
                Err(e) => return Err(format!("`cursor` failed: {e}")),
            }
        }
    };
    let polled_at = now_ms();
    let mut runs = Vec::new();
    let mut seen = Vec::with_capacity(fresh.len());
    if poll.batch {
        // One run's trigger is one document: bounded like every document.
        let mut size = 0_usize;
        let fits = fresh
            .iter()
            .take_while(|(_, item)| {
                size = size.saturating_add(crate::exec::json_size(item) + 1);
                size <= plumb_core::limits::MAX_DOCUMENT_BYTES / 2
            })
            .count()
            .max(1);
        if fits < fresh.len() {
            tracing::warn!(workflow = %workflow.name, new = fresh.len(), kept = fits, "The new items are too large for one batch run; the rest come with the next poll.");
            fresh.truncate(fits);
            if poll.cursor.is_some() {
                return Err("the new items are too large for one batch run and the cursor would skip the rest: narrow the request".to_owned());
            }
        }
        if !fresh.is_empty() {
            let items: Vec<Value> = fresh.iter().map(|(_, item)| item.clone()).collect();
            let trigger =
                json!({ "type": "poll", "polled_at": polled_at, "items": items, "body": {} });
            runs.push(
                engine
                    .new_run(workflow, trigger, None)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            seen.extend(fresh.into_iter().map(|(key, _)| (key, 0)));
        }
    } else {
        for (index, (key, item)) in fresh.into_iter().enumerate() {
            let trigger =
                json!({ "type": "poll", "polled_at": polled_at, "item": item, "body": {} });
            runs.push(
                engine
                    .new_run(workflow, trigger, None)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            seen.push((key, index));
        }
    }
    Ok(PollCommit {
        workflow: workflow.name.clone(),
        owner: owner.to_owned(),
        runs,
        seen,
        seen_until: polled_at + millis(poll.remember),
        cursor,
        next_poll_at,
    })
}

/// One request, retried like a step with the project's default policy.
async fn send_with_retries(
    engine: &Engine,
    project: &plumb_core::model::Project,
    poll: &PollTrigger,
    request: &PlannedRequest,
    key: String,
    timeout: Duration,
) -> Result<Value, String> {
    let policy = &project.config.defaults.retry;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = tokio::time::timeout(
            timeout,
            send_request(engine, project, &poll.http, request, key.clone(), timeout),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ActionError::Retryable {
                message: format!(
                    "the request timed out after {}",
                    crate::exec::humanize(timeout)
                ),
                status: None,
                retry_after: None,
            })
        });
        match sent {
            Ok((output, _)) => return Ok(output),
            Err(e) if e.is_retryable() && attempt < policy.attempts => {
                let delay = e
                    .retry_after()
                    .unwrap_or_else(|| crate::retry::delay_after(policy, attempt));
                tokio::time::sleep(delay).await;
            }
            Err(e) if e.is_retryable() => {
                return Err(format!("{e} (gave up after {attempt} attempts)"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A document of the given fields, for the poll's expressions.
fn context(fields: &[(&str, Value)]) -> Val {
    let mut doc = jaq_json::Map::default();
    for (name, value) in fields {
        doc.insert(Val::from((*name).to_owned()), json_to_val(value));
    }
    Val::obj(doc)
}

async fn evaluate(template: &Template, context: Val, timeout: Duration) -> Result<Value, String> {
    crate::exec::eval_template(template.clone(), context, timeout)
        .await
        .map_err(|e| e.to_string())
}

fn failure_alerts(engine: &Engine, workflow: &Workflow, message: &str) -> Vec<NewAlert> {
    workflow
        .alerts_on_failure
        .iter()
        .map(|channel| NewAlert {
            id: uuid::Uuid::now_v7().to_string(),
            channel: channel.clone(),
            payload: json!({
                "event": "poll_failed",
                "workflow": workflow.name,
                "owner": workflow.owner,
                "error": message,
                "failed_at": now_ms(),
                "link": format!("{}/api/v1/status", engine.public_base()),
            }),
        })
        .collect()
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}
