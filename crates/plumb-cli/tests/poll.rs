//! Poll triggers with the real binary against a feed on loopback: new
//! items appear while `plumb serve` is SIGKILLed and restarted, and every
//! item runs exactly once; a batch poll with a cursor reads only what is
//! new; a failing feed is a visible failure (status, metrics), not silence.

#![allow(clippy::print_stderr)] // the trial summary is the point of --nocapture

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::{Project, Receiver, get_json};

const ONE_RUN_PER_ITEM: &str = r#"name: poller
owner: qa@example.com
description: one run per new item of the feed
trigger:
  poll:
    every: 1s
    http: { connection: rx, path: /feed }
    items: '${{ .response.body.items }}'
    key: '${{ .id }}'
steps:
  - id: deliver
    http:
      connection: rx
      method: POST
      path: /ok/deliver
      body: '${{ .trigger.item }}'
"#;

/// Every run of `workflow` the server has, by the item id it carries.
async fn runs_by_item(base: &str, workflow: &str) -> (BTreeMap<u64, usize>, usize) {
    let runs = get_json(&format!(
        "{base}/api/v1/runs?workflow={workflow}&limit=1000"
    ))
    .await;
    let mut by_item = BTreeMap::new();
    let mut unfinished = 0;
    for run in runs["runs"].as_array().into_iter().flatten() {
        if let Some(id) = run["trigger"]["item"]["id"].as_u64() {
            *by_item.entry(id).or_default() += 1;
        }
        if run["status"] != "succeeded" {
            unfinished += 1;
        }
    }
    (by_item, unfinished)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_appear_while_plumb_is_killed_and_restarted_each_run_once() {
    const RESTARTS: usize = 5;
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow("poller", ONE_RUN_PER_ITEM);
    let mut items = 0;
    for round in 0..=RESTARTS {
        let server = project.serve("127.0.0.1:0").await;
        // Items appear while it runs, and it is killed at a random moment:
        // mid-request, mid-commit or idle.
        items += 15;
        rx.set_feed(items);
        tokio::time::sleep(Duration::from_millis(rand::random_range(200..1_800))).await;
        if round < RESTARTS {
            server.kill().await;
            // …and more appear while it is down.
            items += 10;
            rx.set_feed(items);
            continue;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (by_item, unfinished) = runs_by_item(&server.base_url, "poller").await;
            if by_item.len() == items && unfinished == 0 {
                assert!(
                    by_item.values().all(|n| *n == 1),
                    "an item started two runs: {by_item:?}"
                );
                assert_eq!(
                    by_item.keys().copied().collect::<Vec<_>>(),
                    (0..items as u64).collect::<Vec<_>>()
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {items} items ran ({unfinished} unfinished): {by_item:?}",
                by_item.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let delivered: std::collections::BTreeSet<String> = rx
            .hits()
            .iter()
            .filter(|h| h.path == "/ok/deliver")
            .filter_map(|h| h.key.clone())
            .collect();
        assert_eq!(delivered.len(), items, "one delivery key per item");
        let metrics = support::metrics(&server.base_url).await;
        assert!(metrics.contains("plumb_polls_total"), "{metrics}");
        server.kill().await;
    }
    eprintln!("{items} items over {RESTARTS} SIGKILLs: each ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_poll_with_a_cursor_reads_only_what_is_new_and_a_failing_feed_shows() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 2s }}\nalerts:\n  ops:\n    http: {{ connection: rx, path: /ok/alert }}\n",
        rx.base_url
    ));
    project.workflow(
        "batcher",
        r#"name: batcher
owner: qa@example.com
description: all new items of a poll in one run, from where the last poll stopped
alerts: { on_failure: [ops] }
trigger:
  poll:
    every: 1s
    http: { connection: rx, path: /feed, query: { since: '${{ .cursor // 0 }}' } }
    items: '${{ .response.body.items }}'
    key: '${{ .id }}'
    cursor: '${{ [.items[].id] | max | if . == null then null else . + 1 end }}'
    batch: true
steps:
  - id: deliver
    http: { connection: rx, method: POST, path: /ok/batch, body: { ids: '${{ [.trigger.items[].id] }}' } }
"#,
    );
    rx.set_feed(30);
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let batches = || {
        rx.hits()
            .iter()
            .filter(|h| h.path == "/ok/batch")
            .map(|h| h.body["ids"].as_array().map_or(0, Vec::len))
            .collect::<Vec<_>>()
    };
    let wait_for = |n: usize| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while batches().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "batches: {:?}",
                batches()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(1).await;
    rx.set_feed(45);
    wait_for(2).await;
    assert_eq!(batches(), [30, 15], "one run per poll that found items");
    let sinces: Vec<String> = rx
        .hits()
        .iter()
        .filter(|h| h.path == "/feed")
        .filter_map(|h| h.query.get("since").cloned())
        .collect();
    assert!(
        sinces.contains(&"30".to_owned()),
        "the cursor feeds the request: {sinces:?}"
    );
    let cursor = project.run(&["cursor", "show", "batcher", "--json"]).await;
    let cursor: Value = serde_json::from_str(&cursor.stdout).expect("json");
    assert_eq!(cursor["value"], 45);

    // The feed goes down: the poll fails visibly, and recovers.
    rx.set_feed_down(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let poll = loop {
        let status = get_json(&format!("{base}/api/v1/status")).await;
        let poll = status["workflows"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["name"] == "batcher"))
            .map(|w| w["poll"].clone())
            .unwrap_or_default();
        if poll["failures"].as_u64().unwrap_or(0) >= 1 {
            break poll;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        poll["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{poll}"
    );
    assert!(
        support::metrics(&base)
            .await
            .contains("plumb_poll_failures_total")
    );
    let text = project.run(&["status"]).await;
    assert!(text.stdout.contains("last error"), "{text}");
    // Alerted once for the streak, however many polls fail in it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let failures = get_json(&format!("{base}/api/v1/status")).await["workflows"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["name"] == "batcher"))
            .map(|w| w["poll"]["failures"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        let alerted = rx.hits().iter().any(|h| h.path == "/ok/alert");
        if failures >= 2 && alerted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a second failed poll ({failures}) and an alert ({alerted})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alerts: Vec<Value> = rx
        .hits()
        .iter()
        .filter(|h| h.path == "/ok/alert")
        .map(|h| h.body.clone())
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["event"], "poll_failed");
    assert_eq!(alerts[0]["workflow"], "batcher");
    rx.set_feed_down(false);
    rx.set_feed(50);
    wait_for(3).await;
    assert_eq!(batches(), [30, 15, 5]);
    server.kill().await;
}

#[tokio::test]
async fn check_names_what_is_wrong_with_a_poll_trigger() {
    let project = Project::with_receiver("http://127.0.0.1:9");
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\ntrigger:\n  poll:\n    every: 0s\n    http: { connection: rxx, path: /feed }\n    items: '${{ .response.body }}'\n    key: id\nsteps:\n  - id: a\n    jq: '1'\n",
    );
    project.workflow(
        "both",
        "name: both\nowner: qa@example.com\ndescription: d\ncursor: '${{ 1 }}'\ntrigger:\n  poll:\n    every: 1m\n    remember: 10s\n    http: { connection: rx, path: /feed }\n    items: '${{ .response.body }}'\n    key: '${{ .id }}'\n    cursor: '${{ 2 }}'\nsteps:\n  - id: a\n    jq: '1'\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "`every` must be between 1s and 366d",
        "unknown connection `rxx`",
        "`key` must be an expression",
        "`remember` is shorter than `every`",
        "the workflow has a `cursor` and its poll trigger has one too",
    ] {
        assert!(out.stderr.contains(expected), "{expected}\n{out}");
    }
}

/// A process SIGKILLed in the middle of a poll holds its lease; the process
/// started after it recognises the holder is gone and polls at once,
/// instead of waiting out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_killed_mid_request_is_taken_over_at_once_after_a_restart() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "slowpoll",
        &ONE_RUN_PER_ITEM
            .replace("name: poller", "name: slowpoll")
            .replace("path: /feed }", "path: /feed, query: { delay_ms: 1500 } }"),
    );
    rx.set_feed(5);
    let server = project.serve("127.0.0.1:0").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rx.hits().iter().any(|h| h.path == "/feed") {
        assert!(tokio::time::Instant::now() < deadline, "a poll started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill().await;
    rx.set_feed(10);
    let restarted = tokio::time::Instant::now();
    let server = project.serve("127.0.0.1:0").await;
    loop {
        let (by_item, unfinished) = runs_by_item(&server.base_url, "slowpoll").await;
        if by_item.len() == 10 && unfinished == 0 {
            assert!(by_item.values().all(|n| *n == 1), "{by_item:?}");
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "the restarted process polled within seconds, not after the dead one's lease: {by_item:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill().await;
}

/// A poll's request may paginate: `items` reads every page (`.pages`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paginated_poll_reads_items_from_every_page() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "pages",
        r#"name: pages
owner: qa@example.com
description: every page of the API on each poll, all new items in one run
trigger:
  poll:
    every: 1s
    http:
      connection: rx
      path: /pages/cursor
      query: { limit: 100, total: 250 }
      paginate:
        next: '${{ .response.body.next_cursor | if . then {query: {cursor: .}} else null end }}'
    items: '${{ [.pages[].body.data[]] }}'
    key: '${{ .id }}'
    batch: true
steps:
  - id: deliver
    http: { connection: rx, method: POST, path: /ok/batch, body: { ids: '${{ [.trigger.items[].id] }}' } }
"#,
    );
    let server = project.serve("127.0.0.1:0").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let batch = loop {
        if let Some(hit) = rx.hits().iter().find(|h| h.path == "/ok/batch") {
            break hit.body["ids"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no batch run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(batch.as_array().map(Vec::len), Some(250), "{batch}");
    // Later polls find nothing new: still one batch.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        rx.hits().iter().filter(|h| h.path == "/ok/batch").count(),
        1
    );
    assert!(
        rx.hits()
            .iter()
            .filter(|h| h.path == "/pages/cursor")
            .count()
            >= 6,
        "each poll fetched all three pages"
    );
    server.kill().await;
}
