//! The failure model with real processes and a real receiver: retries honour
//! Retry-After, 4xx fails at once, for_each fans out and journals each item,
//! timeouts, egress, durable sleep.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Project, Receiver, run_id_of};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

async fn retry_after_is_honoured_for(status: u16) {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "flaky",
        &format!(
            "name: flaky\n{HEAD}steps:\n  - id: push\n    http: {{ connection: rx, method: POST, path: /flaky/{status}/2 }}\n    retry: {{ attempts: 3, initial: 10ms }}\n"
        ),
    );
    let started = Instant::now();
    let out = project.run(&["run", "flaky"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let hits = rx.hits();
    assert_eq!(hits.len(), 3, "two refusals then one success");
    let keys: std::collections::HashSet<_> = hits.iter().map(|h| h.key.clone()).collect();
    assert_eq!(keys.len(), 1, "every attempt carries the same key");
    let span = hits[2].at - hits[0].at;
    assert!(
        span >= Duration::from_millis(1950),
        "Retry-After: 1 twice means ≥ 2 s between first and last attempt, not the 10 ms backoff; got {span:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let run_id = run_id_of(&out.stdout);
    let shown = project.show(&run_id).await;
    assert_eq!(shown["run"]["status"], "succeeded");
    let step = &shown["steps"][0];
    assert_eq!(step["attempt"], 3);
    assert_eq!(step["status_code"], 200);
    let failed = shown["failed_attempts"].as_array().expect("attempts");
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|a| a["status_code"] == status && a["retryable"] == true)
    );
    assert!(out.stdout.contains("retrying in 1.00 s"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_503_with_retry_after_twice_then_200_succeeds_once_after_two_seconds() {
    retry_after_is_honoured_for(503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_with_retry_after_twice_then_200_succeeds_once_after_two_seconds() {
    retry_after_is_honoured_for(429).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_the_run_at_once_naming_step_and_status_and_later_steps_do_not_run() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "order",
        &format!(
            "name: order\n{HEAD}steps:\n  - id: fetch\n    http: {{ connection: rx, path: /ok/fetch }}\n  - id: charge\n    http: {{ connection: rx, method: POST, path: /status/400 }}\n    retry: {{ attempts: 5, initial: 10ms }}\n  - id: notify\n    http: {{ connection: rx, method: POST, path: /ok/notify }}\n"
        ),
    );
    let out = project.run(&["run", "order"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("step charge"), "{out}");
    assert!(out.stdout.contains("HTTP 400"), "{out}");
    assert!(
        out.stdout.contains("field `total` is required"),
        "the upstream's reason is shown: {out}"
    );
    let paths: Vec<String> = rx.hits().iter().map(|h| h.path.clone()).collect();
    assert_eq!(
        paths,
        vec!["/ok/fetch", "/status/400"],
        "one attempt at the 400, nothing after it"
    );
    let shown = project.show(&run_id_of(&out.stdout)).await;
    assert_eq!(shown["run"]["status"], "failed");
    let failure = &shown["run"]["failure"];
    assert_eq!(failure["step"], "charge");
    assert_eq!(failure["status_code"], 400);
    assert_eq!(failure["attempt"], 1);
    let human = project
        .run(&["runs", "show", &run_id_of(&out.stdout)])
        .await;
    assert!(
        human.stdout.contains("notify") && human.stdout.contains("not run"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_runs_items_in_parallel_and_journals_each() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "fan",
        &format!(
            "name: fan\n{HEAD}steps:\n  - id: items\n    jq: '[range(20) | {{n: .}}]'\n  - id: send\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 4\n    http:\n      connection: rx\n      method: POST\n      path: '/ok/item/${{{{ .item.n }}}}'\n      query: {{ delay_ms: 150 }}\n      body: {{ n: '${{{{ .item.n }}}}', index: '${{{{ .index }}}}' }}\n  - id: count\n    assert:\n      condition: '${{{{ .steps.send | length == 20 }}}}'\n"
        ),
    );
    let started = Instant::now();
    let out = project.run(&["run", "fan"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        rx.max_in_flight(),
        4,
        "exactly `concurrency` items in flight at once"
    );
    assert!(
        took < Duration::from_millis(20 * 150 / 2),
        "20 × 150 ms items at concurrency 4 must overlap (took {took:?})"
    );
    let run_id = run_id_of(&out.stdout);
    let hits = rx.hits();
    assert_eq!(hits.len(), 20);
    for hit in &hits {
        let n = hit.body["n"].as_i64().expect("n");
        assert_eq!(hit.body["index"].as_i64(), Some(n));
        assert_eq!(
            hit.key.as_deref(),
            Some(format!("{run_id}:send:{n}").as_str())
        );
    }
    let shown = project.show(&run_id).await;
    let items: Vec<&Value> = shown["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|r| r["step_id"] == "send" && !r["item"].is_null())
        .collect();
    assert_eq!(items.len(), 20, "each item has its own journal row");
    assert!(
        items
            .iter()
            .all(|r| r["status"] == "succeeded" && r["status_code"] == 200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_item_fails_alone_and_the_step_names_it() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "items",
        &format!(
            "name: items\n{HEAD}steps:\n  - id: send\n    for_each: '${{{{ [\"ok/a\", \"status/422\", \"ok/c\", \"status/404\"] }}}}'\n    concurrency: 2\n    http: {{ connection: rx, method: POST, path: '/${{{{ .item }}}}' }}\n"
        ),
    );
    let out = project.run(&["run", "items"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("2 of 4 items failed (items 1, 3)"),
        "{out}"
    );
    let paths: Vec<String> = rx.hits().iter().map(|h| h.path.clone()).collect();
    assert!(
        paths.contains(&"/ok/a".to_owned()) && paths.contains(&"/ok/c".to_owned()),
        "good items still ran: {paths:?}"
    );
    let shown = project.show(&run_id_of(&out.stdout)).await;
    assert_eq!(shown["run"]["failure"]["item"], 1);
    assert_eq!(shown["run"]["failure"]["status_code"], 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_is_retried_then_fails() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "slow",
        &format!(
            "name: slow\n{HEAD}steps:\n  - id: wait\n    http: {{ connection: rx, path: /ok/slow, query: {{ delay_ms: 3000 }} }}\n    timeout: 300ms\n    retry: {{ attempts: 2, initial: 10ms }}\n"
        ),
    );
    let started = Instant::now();
    let out = project.run(&["run", "slow"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout cut the attempts short"
    );
    assert_eq!(rx.hits().len(), 2);
    assert!(out.stdout.contains("timed out after 300ms"), "{out}");
    assert!(out.stdout.contains("gave up after 2 attempts"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_leaves_the_connection_host_is_refused_at_run_time() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "egress",
        &format!(
            "name: egress\n{HEAD}steps:\n  - id: call\n    http: {{ connection: rx, path: '${{{{ .trigger.body.path }}}}' }}\n"
        ),
    );
    let input = project.path().join("input.json");
    std::fs::write(&input, r#"{"path": "@127.0.0.2:9/steal"}"#).expect("input");
    let out = project
        .run(&["run", "egress", "--input", input.to_str().expect("utf8")])
        .await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("outside the connection `rx`"), "{out}");
    assert!(rx.hits().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_sleep_waits_only_the_remainder() {
    let project = Project::new("connections: {}\n");
    project.workflow(
        "nap",
        &format!("name: nap\n{HEAD}steps:\n  - id: nap\n    sleep: 3s\n  - id: after\n    jq: '\"awake\"'\n"),
    );
    let started = Instant::now();
    let started_run = project.start(&["run", "nap"]).await;
    let run_id = started_run.run_id.clone();
    let mut child = started_run.child;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.start_kill().expect("kill");
    child.wait().await.expect("wait");
    let resumed_at = Instant::now();
    let out = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let resume_took = resumed_at.elapsed();
    assert!(
        resume_took < Duration::from_millis(2500),
        "the resume waits the ~1.5 s left, not 3 s again (took {resume_took:?})"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the full 3 s passed in total"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_refused_while_the_run_is_alive_and_after_it_ended() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "long",
        &format!("name: long\n{HEAD}steps:\n  - id: wait\n    http: {{ connection: rx, path: /ok/w, query: {{ delay_ms: 1500 }} }}\n"),
    );
    let started_run = project.start(&["run", "long"]).await;
    let run_id = started_run.run_id.clone();
    let mut child = started_run.child;
    let busy = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(busy.code, Some(1), "{busy}");
    assert!(busy.stderr.contains("another process"), "{busy}");
    assert!(child.wait().await.expect("wait").success());
    let ended = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(ended.code, Some(2), "{ended}");
    assert!(
        ended.stderr.contains("already ended (succeeded)"),
        "{ended}"
    );
    assert_eq!(rx.hits().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_run_resumable_and_releases_it_at_once() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "two",
        &format!(
            "name: two\n{HEAD}steps:\n  - id: first\n    http: {{ connection: rx, path: /ok/first }}\n  - id: slow\n    http: {{ connection: rx, path: /ok/slow, query: {{ delay_ms: 2000 }} }}\n"
        ),
    );
    let mut started_run = project.start(&["run", "two"]).await;
    let run_id = started_run.run_id.clone();
    while rx.hits().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = started_run.child.id().expect("pid").to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = started_run.child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(130), "interrupted runs exit 130");
    let rest = started_run.rest().await;
    assert!(
        rest.contains(&format!("plumb run --resume {run_id}")),
        "tells how to continue: {rest}"
    );
    let shown = project.show(&run_id).await;
    assert_eq!(shown["run"]["status"], "running");
    assert!(
        shown["run"]["lease_owner"].is_null(),
        "the lease is released on the way out"
    );
    let out = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("done before"),
        "the first step is restored, not re-run: {out}"
    );
    let paths: Vec<String> = rx.hits().iter().map(|h| h.path.clone()).collect();
    assert_eq!(
        paths,
        vec!["/ok/first", "/ok/slow", "/ok/slow"],
        "only the interrupted step is re-sent"
    );
    let keys: Vec<Option<String>> = rx.hits().iter().skip(1).map(|h| h.key.clone()).collect();
    assert_eq!(keys[0], keys[1], "with the same idempotency key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jq_step_that_never_ends_fails_once_and_the_process_still_exits() {
    let project = Project::new("connections: {}\n");
    project.workflow(
        "spin",
        &format!("name: spin\n{HEAD}steps:\n  - id: spin\n    jq: 'last(range(1e15))'\n    timeout: 300ms\n    retry: {{ attempts: 3, initial: 10ms }}\n"),
    );
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(20), project.run(&["run", "spin"]))
        .await
        .expect("the process exits even though the jq thread is still spinning");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout
            .contains("did not finish within the step's timeout of 300ms"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a pure step is not retried after a timeout"
    );
    let shown = project.show(&run_id_of(&out.stdout)).await;
    assert_eq!(shown["run"]["failure"]["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_headers_replace_connection_headers_and_if_output_is_readable_at_once() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      headers: {{ X-Tenant: from-connection, Accept: application/json }}\n",
        rx.base_url
    ));
    project.workflow(
        "hdr",
        &format!(
            "name: hdr\n{HEAD}steps:\n  - id: gate\n    if: '${{{{ true }}}}'\n    then:\n      - id: inner\n        jq: '1'\n  - id: call\n    http:\n      connection: rx\n      method: POST\n      path: /echo\n      headers: {{ x-tenant: from-step }}\n      body: {{ branch: '${{{{ .steps.gate.branch }}}}' }}\n"
        ),
    );
    let out = project.run(&["run", "hdr"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let hits = rx.hits();
    assert_eq!(hits.len(), 1);
    assert_eq!(
        hits[0].headers.get("x-tenant").map(String::as_str),
        Some("from-step")
    );
    assert_eq!(
        hits[0].headers.get("accept").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        hits[0].body["branch"], "then",
        "the if step's output is visible on the first pass, not only after a resume"
    );
}
