//! `paginate:` on the http step, with the real binary against a paginated
//! mock API on loopback: the four styles people meet each fetch every
//! record exactly once, `max_pages` fails loudly, and a sync (with a
//! cursor) SIGKILLed at random pages resumes where it was — no page fetched
//! twice except the one in flight, every record delivered once, the cursor
//! committed once with the success.

#![allow(clippy::print_stderr)] // the trial summary is the point of --nocapture

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::{Hit, Project, Receiver, page_of};

/// A workflow that reads every page of `/pages/<style>` and posts all the
/// records to `/ok/sink` in one request.
fn sync_workflow(name: &str, style: &str, query: &str, next: &str, extra: &str) -> String {
    format!(
        r#"name: {name}
owner: qa@example.com
description: reads every page of a paginated API and hands the records on
steps:
  - id: fetch
    http:
      connection: rx
      path: /pages/{style}
      query: {{ {query} }}
      paginate: {{ next: '{next}'{extra} }}
  - id: send
    http:
      connection: rx
      method: POST
      path: /ok/sink
      body: {{ records: '${{{{ [.steps.fetch.pages[].body | (.items // .data)[]] }}}}' }}
"#
    )
}

/// The four styles: (style, step query, `next`).
const STYLES: [(&str, &str, &str); 4] = [
    (
        "number",
        "page: 1",
        "${{ if (.response.body.items | length) < 100 then null else {query: {page: (.page + 1)}} end }}",
    ),
    (
        "cursor",
        "limit: 100",
        "${{ .response.body.next_cursor | if . then {query: {cursor: .}} else null end }}",
    ),
    (
        "offset",
        "offset: 0, limit: 100",
        "${{ (.request.query.offset | tonumber) + 100 | if . >= 250 then null else {query: {offset: .}} end }}",
    ),
    ("link", "page: 1", "${{ .link_next }}"),
];

fn page_hits(hits: &[Hit], style: &str) -> Vec<Hit> {
    let path = format!("/pages/{style}");
    hits.iter().filter(|h| h.path == path).cloned().collect()
}

/// Record ids the sink got, counted once per idempotency key (a receiver
/// that dedupes by key, as the key is for).
fn delivered(hits: &[Hit]) -> BTreeMap<u64, usize> {
    let mut seen_keys = BTreeSet::new();
    let mut ids = BTreeMap::new();
    for hit in hits.iter().filter(|h| h.path == "/ok/sink") {
        if !seen_keys.insert(hit.key.clone().expect("a key")) {
            continue;
        }
        for record in hit.body["records"].as_array().expect("records") {
            *ids.entry(record["id"].as_u64().expect("id")).or_default() += 1;
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pagination_style_fetches_every_record_exactly_once() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    for (style, query, next) in STYLES {
        project.workflow(
            &format!("sync-{style}"),
            &sync_workflow(&format!("sync-{style}"), style, query, next, ""),
        );
    }
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    for (style, _, _) in STYLES {
        rx.clear();
        let out = project.run(&["run", &format!("sync-{style}")]).await;
        assert_eq!(out.code, Some(0), "{style}: {out}");
        let run_id = support::run_id_of(&out.stdout);
        let hits = rx.hits();
        let pages = page_hits(&hits, style);
        let indices: Vec<usize> = pages
            .iter()
            .map(|h| page_of(style, &h.query).expect("a page request").0)
            .collect();
        assert_eq!(indices, vec![0, 1, 2], "{style}: three pages, in order");
        for (i, hit) in pages.iter().enumerate() {
            assert_eq!(
                hit.key.as_deref(),
                Some(format!("{run_id}:fetch:{i}").as_str()),
                "{style}: each page has its own idempotency key"
            );
        }
        let ids = delivered(&hits);
        assert_eq!(ids.len(), 250, "{style}: every record: {ids:?}");
        assert!(
            ids.values().all(|n| *n == 1),
            "{style}: each record once: {ids:?}"
        );
        let shown = project.show(&run_id).await;
        assert_eq!(shown["run"]["status"], "succeeded", "{style}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_max_pages_fails_the_step_naming_the_limit() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "capped",
        &sync_workflow(
            "capped",
            "link",
            "page: 1",
            "${{ .link_next }}",
            ", max_pages: 2",
        ),
    );
    let out = project.run(&["run", "capped"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("more pages than `paginate.max_pages` (2) allows"),
        "{out}"
    );
    let hits = rx.hits();
    assert_eq!(page_hits(&hits, "link").len(), 2, "two pages, then stop");
    assert!(
        hits.iter().all(|h| h.path != "/ok/sink"),
        "nothing is handed on from a sync cut short"
    );
    let run_id = support::run_id_of(&out.stdout);
    let shown = project.show(&run_id).await;
    assert_eq!(shown["run"]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_that_leaves_the_connections_origin_or_repeats_a_page_fails_the_step() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "leaves",
        &sync_workflow(
            "leaves",
            "number",
            "page: 1",
            "${{ \"http://127.0.0.2:9/steal?page=2\" }}",
            "",
        ),
    );
    project.workflow(
        "repeats",
        &sync_workflow(
            "repeats",
            "number",
            "page: 1",
            "${{ {query: {page: 1}} }}",
            "",
        ),
    );
    let out = project.run(&["run", "leaves"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("outside the connection `rx`"), "{out}");
    let out = project.run(&["run", "repeats"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("asked for page 1 again"), "{out}");
    assert_eq!(
        page_hits(&rx.hits(), "number").len(),
        2,
        "one page each: nothing is fetched off origin, nothing twice"
    );
    // A cycle: 1, 2, 1 — caught on the third request, not at max_pages.
    project.workflow(
        "cycles",
        &sync_workflow(
            "cycles",
            "number",
            "page: 1",
            "${{ {query: {page: (if .page == 1 then 2 else 1 end)}} }}",
            "",
        ),
    );
    let out = project.run(&["run", "cycles"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("asked for page 1 again"), "{out}");
    assert!(out.stdout.contains("cycle"), "{out}");
    assert_eq!(
        page_hits(&rx.hits(), "number").len(),
        4,
        "two more pages, then stop"
    );
    // An upstream cannot point the request elsewhere through `next`.
    project.workflow(
        "hosts",
        &sync_workflow(
            "hosts",
            "number",
            "page: 1",
            "${{ {query: {page: 2}, headers: {Host: \"other.example\"}} }}",
            "",
        ),
    );
    let out = project.run(&["run", "hosts"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("`Host` cannot be set"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_at_random_pages_resumes_at_the_page_in_flight() {
    const TRIALS: usize = 10;
    const PAGES: usize = 10;
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    let mut resent_total = 0;
    for trial in 0..TRIALS {
        rx.clear();
        // A page from the second on: the kill lands while that page is in
        // flight (the mock kills plumb before it answers).
        let kill_at = rand::random_range(1..PAGES);
        // A sync with a cursor: each trial starts from a reset cursor, and
        // the killed run must commit it once it finishes.
        let workflow = sync_workflow(
            "sync",
            "cursor",
            &format!("limit: 100, total: 1000, delay_ms: 15, kill_at: {kill_at}, since: '${{{{ .cursor // 0 }}}}'"),
            STYLES[1].2,
            "",
        )
        .replace(
            "steps:\n",
            "cursor: '${{ [.steps.fetch.pages[].body.data[].id] | max + 1 }}'\nsteps:\n",
        );
        project.workflow("sync", &workflow);
        let reset = project.run(&["cursor", "reset", "sync"]).await;
        assert_eq!(reset.code, Some(0), "{reset}");
        let started = project.start(&["run", "sync"]).await;
        let run_id = started.run_id.clone();
        let mut child = started.child;
        rx.set_victim(child.id());
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("the kill lands")
            .expect("wait");
        assert!(!status.success(), "trial {trial}: killed mid-sync");
        let at_kill = page_hits(&rx.hits(), "cursor").len();
        assert_eq!(at_kill, kill_at + 1, "trial {trial}: killed on its page");

        let resumed = project.run(&["run", "--resume", &run_id]).await;
        assert_eq!(resumed.code, Some(0), "trial {trial}: {resumed}");

        let hits = rx.hits();
        let mut fetched: BTreeMap<usize, usize> = BTreeMap::new();
        for hit in page_hits(&hits, "cursor") {
            let index = page_of("cursor", &hit.query).expect("a page").0;
            assert_eq!(
                hit.key.as_deref(),
                Some(format!("{run_id}:fetch:{index}").as_str()),
                "trial {trial}: a page keeps its key across the kill"
            );
            *fetched.entry(index).or_default() += 1;
        }
        assert_eq!(fetched.len(), PAGES, "trial {trial}: every page");
        for (index, n) in &fetched {
            let allowed = if *index == kill_at { 2 } else { 1 };
            assert_eq!(
                *n, allowed,
                "trial {trial}: page {index} fetched {n} times (killed on page {kill_at}): {fetched:?}"
            );
        }
        resent_total += fetched.values().sum::<usize>() - PAGES;
        let ids = delivered(&hits);
        assert_eq!(ids.len(), 1000, "trial {trial}: every record");
        assert!(
            ids.values().all(|n| *n == 1),
            "trial {trial}: each record once by key"
        );
        let shown = project.show(&run_id).await;
        assert_eq!(shown["run"]["status"], "succeeded", "trial {trial}");
        assert_eq!(
            shown["run"]["cursor"]["to"]["value"], 1000,
            "trial {trial}: the cursor moved past the window with the success"
        );
        let steps = shown["steps"].as_array().cloned().unwrap_or_default();
        let fetch = steps
            .iter()
            .find(|s| s["step_id"] == "fetch" && s["item"].is_null());
        assert_eq!(
            fetch.map(|s| s["status"].clone()),
            Some(Value::from("succeeded")),
            "trial {trial}: {steps:?}"
        );
    }
    eprintln!("{TRIALS} trials: {resent_total} in-flight pages re-sent in total");
}

#[tokio::test]
async fn check_names_what_is_wrong_with_a_paginate_block() {
    let project = Project::with_receiver("http://127.0.0.1:9");
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: fetch\n    for_each: '${{ [1] }}'\n    http:\n      connection: rx\n      path: /x\n      paginate: { next: /x?page=2, max_pages: 0 }\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "workflows/bad.yaml:10:7: error: `paginate` cannot be combined with `for_each`",
        "workflows/bad.yaml:10:25: error: `next` must be an expression over the page just received",
        "workflows/bad.yaml:10:47: error: `max_pages` is 0",
    ] {
        assert!(out.stderr.contains(expected), "{expected}\n{out}");
    }
}

/// Outputs no later step reads are dropped from memory as the run goes
/// (a page list is not held through the rest of a sync); every output a
/// later step does read is still there, however far later.
#[tokio::test]
async fn outputs_stay_readable_by_every_later_reader() {
    let project = Project::with_receiver("http://127.0.0.1:9");
    project.workflow(
        "far",
        "name: far\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: a\n    jq: '1'\n  - id: b\n    jq: '2'\n  - id: unread\n    jq: '3'\n  - id: c\n    jq: '.steps.b + 10'\n  - id: d\n    jq: '.steps.a + .steps.c'\n  - id: whole\n    jq: '.steps | keys'\n  - id: check\n    assert:\n      condition: \"${{ .steps.d == 13 and (.steps.whole | index(\\\"unread\\\")) != null }}\"\n      message: \"d=${{ .steps.d }} whole=${{ .steps.whole }}\"\n",
    );
    let out = project.run(&["run", "far"]).await;
    assert_eq!(out.code, Some(0), "{out}");
}
