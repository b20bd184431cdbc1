//! Nothing a sender, a workflow or a neighbour process does can stall the
//! engine (issue #8, part A): every boundary has a depth and size limit
//! with a clear answer, a run that cannot be executed fails on its own,
//! runaway expressions stop using CPU, and live processes in another PID
//! namespace are never taken for dead.

#![allow(clippy::print_stderr)] // progress of the long tests, for --nocapture

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Project, Receiver, get_json, nested_json, post_json, post_raw, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

fn project_with(rx: &Receiver, extra: &str) -> Project {
    Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 1s }}\n{extra}",
        rx.base_url
    ))
}

/// `hook` → POST the body's `id` to the receiver.
fn forward_workflow() -> String {
    format!(
        "name: forward\n{HEAD}trigger:\n  webhook: {{ path: forward }}\nsteps:\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/forward, body: '${{{{ {{id: .trigger.body.id?}} }}}}' }}\n"
    )
}

/// Sends a normal event and waits until the receiver has it.
async fn a_normal_event_is_delivered(base: &str, rx: &Receiver, id: &str, within: Duration) {
    let (status, body) = post_json(&format!("{base}/hooks/forward"), &json!({"id": id})).await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + within;
    while !rx.hits().iter().any(|h| h.body["id"] == id) {
        assert!(
            Instant::now() < deadline,
            "event {id} not delivered within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_bodies_get_a_clear_answer_and_every_workflow_keeps_running() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "serve:\n  body_limit: 64KiB\n");
    project.workflow("forward", &forward_workflow());
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/forward");

    for depth in [65, 127, 128, 5000] {
        let (status, body) = post_raw(
            &hook,
            "application/json",
            format!("{{\"id\": {}}}", nested_json(depth)).into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "depth {depth}: {body}");
        assert_eq!(body["error"]["code"], "too_deep", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("more than 64 levels"),
            "the answer names the limit: {message}"
        );
        a_normal_event_is_delivered(
            &base,
            &rx,
            &format!("after-{depth}"),
            Duration::from_secs(5),
        )
        .await;
    }
    // The limit itself is accepted, and the run reads back and runs.
    let (status, body) = post_raw(
        &hook,
        "application/json",
        format!("{{\"id\": {}}}", nested_json(63)).into_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    // Form data: the same limit applies to a JSON `payload` field.
    let form = format!("payload={}", urlencode(&nested_json(200)));
    let (status, body) = post_raw(
        &hook,
        "application/x-www-form-urlencoded",
        form.into_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "too_deep");
    // Manual runs through the API: the same limit, the same answer.
    let (status, body) = post_raw(
        &format!("{base}/api/v1/workflows/forward/runs"),
        "application/json",
        nested_json(300).into_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "too_deep");
    // Listings still work.
    let runs = get_json(&format!("{base}/api/v1/runs?limit=100")).await;
    assert!(
        runs["runs"].as_array().is_some_and(|r| r.len() >= 5),
        "{runs}"
    );
    let listed = project.run(&["runs", "list"]).await;
    assert_eq!(listed.code, Some(0), "{listed}");
    // And from the command line, a deep input is refused the same way.
    let input = project.path().join("deep.json");
    std::fs::write(&input, nested_json(128)).expect("write input");
    let out = project
        .run(&[
            "run",
            "forward",
            "--input",
            input.to_str().expect("utf-8 path"),
        ])
        .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("more than 64 levels"), "{out}");
    server.kill().await;
}

fn urlencode(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_responses_and_results_fail_their_step_permanently_naming_the_limit() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    project.workflow(
        "deep_response",
        &format!(
            "name: deep_response\n{HEAD}steps:\n  - id: fetch\n    http: {{ connection: rx, path: /deep/200 }}\n"
        ),
    );
    project.workflow(
        "deep_result",
        &format!(
            "name: deep_result\n{HEAD}steps:\n  - id: build\n    jq: 'reduce range(400) as $i (0; [.])'\n"
        ),
    );
    project.workflow(
        "shallow_response",
        &format!(
            "name: shallow_response\n{HEAD}steps:\n  - id: fetch\n    http: {{ connection: rx, path: /deep/60 }}\n"
        ),
    );
    let out = project.run(&["run", "deep_response"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("more than 64 levels"), "{out}");
    let shown = project.show(&support::run_id_of(&out.stdout)).await;
    assert_eq!(
        shown["run"]["failure"]["attempt"], 1,
        "permanent: not retried: {shown}"
    );
    assert_eq!(
        rx.hits().iter().filter(|h| h.path == "/deep/200").count(),
        1
    );
    let out = project.run(&["run", "deep_result"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.contains("more than 64 levels"), "{out}");
    let out = project.run(&["run", "shallow_response"]).await;
    assert_eq!(out.code, Some(0), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_flight_before_a_deep_result_ends_in_a_terminal_state() {
    let rx = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let project = project_with(&rx, &format!("listen: {listen}\n"));
    project.workflow("forward", &forward_workflow());
    project.workflow(
        "deep",
        &format!(
            "name: deep\n{HEAD}trigger:\n  webhook: {{ path: deep }}\nsteps:\n  - id: slow\n    http: {{ connection: rx, path: '/ok/slow?delay_ms=1500' }}\n  - id: build\n    jq: 'reduce range(400) as $i (0; [.])'\n"
        ),
    );
    let server = project.serve(&listen).await;
    let base = server.base_url.clone();
    let (status, body) = post_json(&format!("{base}/hooks/deep"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rx.hits().iter().any(|h| h.path == "/ok/slow") {
        assert!(Instant::now() < deadline, "the slow step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().await;
    let server = project.serve(&listen).await;
    let done = wait_run(&base, &run_id, Duration::from_secs(20)).await;
    assert_eq!(done["run"]["status"], "failed", "{done}");
    let error = done["run"]["failure"]["message"].as_str().unwrap_or("");
    assert!(error.contains("more than 64 levels"), "{error}");
    a_normal_event_is_delivered(&base, &rx, "after-deep", Duration::from_secs(5)).await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_crashes_its_worker_again_and_again_fails_on_its_own() {
    let rx = Receiver::start().await;
    let alerts = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let project = Project::new(&format!(
        "listen: {listen}\nconnections:\n  rx:\n    http: {{ base_url: {}, timeout: 10s }}\n  chat:\n    http: {{ base_url: {} }}\nalerts:\n  ops:\n    http: {{ connection: chat, path: /ok/alert }}\nserve:\n  max_crashes: 2\n",
        rx.base_url, alerts.base_url
    ));
    project.workflow("forward", &forward_workflow());
    project.workflow(
        "crasher",
        &format!(
            "name: crasher\n{HEAD}alerts: {{ on_failure: [ops] }}\ntrigger:\n  webhook: {{ path: crasher }}\nsteps:\n  - id: boom\n    http: {{ connection: rx, method: POST, path: /kill }}\n"
        ),
    );
    let mut server = project.serve(&listen).await;
    let base = server.base_url.clone();
    rx.set_victim(server.child.id());
    let (status, body) = post_json(&format!("{base}/hooks/crasher"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    // Every time the run executes, its step kills the server; restart it,
    // as a supervisor would, until the run has ended.
    let mut restarts = 0;
    let started = Instant::now();
    let status = loop {
        let exited = tokio::time::timeout(Duration::from_millis(300), server.child.wait()).await;
        if exited.is_ok() {
            restarts += 1;
            assert!(restarts <= 6, "the run crash-loops the service");
            server = project.serve(&listen).await;
            rx.set_victim(server.child.id());
            continue;
        }
        let Some(doc) = support::try_get_json(&format!("{base}/api/v1/runs/{run_id}")).await else {
            continue;
        };
        let status = doc["run"]["status"].as_str().unwrap_or("").to_owned();
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break doc;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still {status} after {restarts} restarts"
        );
    };
    assert_eq!(status["run"]["status"], "failed", "{status}");
    assert_eq!(
        restarts, 2,
        "it crashed its worker max_crashes times, then failed"
    );
    let message = status["run"]["failure"]["message"].as_str().unwrap_or("");
    assert!(message.contains("crashed its worker 2 times"), "{message}");
    assert!(message.contains("gone"), "with the last error: {message}");
    let dlq = get_json(&format!("{base}/api/v1/dlq")).await;
    assert!(
        dlq.to_string().contains(&run_id),
        "it is a dead letter: {dlq}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alerts
        .hits()
        .iter()
        .any(|h| h.body["run_id"] == run_id.as_str())
    {
        assert!(Instant::now() < deadline, "no alert was delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rx.set_victim(None);
    a_normal_event_is_delivered(&base, &rx, "after-crashes", Duration::from_secs(5)).await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_runaway_expressions_stop_using_cpu_while_events_keep_flowing() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    project.workflow("forward", &forward_workflow());
    project.workflow(
        "runaway",
        &format!(
            "name: runaway\n{HEAD}trigger:\n  webhook: {{ path: runaway }}\nsteps:\n  - id: spin\n    jq: 'last(repeat(1))'\n    timeout: 1s\n"
        ),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let pid = server.child.id().expect("pid");
    let mut runaways = Vec::new();
    for _ in 0..6 {
        let (status, body) = post_json(&format!("{base}/hooks/runaway"), &json!({})).await;
        assert_eq!(status, 202, "{body}");
        runaways.push(body["run_id"].as_str().expect("run id").to_owned());
    }
    // While they spin, normal events still flow.
    a_normal_event_is_delivered(&base, &rx, "during", Duration::from_secs(10)).await;
    for id in &runaways {
        let done = wait_run(&base, id, Duration::from_secs(20)).await;
        assert_eq!(done["run"]["status"], "failed", "{done}");
        let error = done["run"]["failure"]["message"].as_str().unwrap_or("");
        assert!(error.contains("did not finish"), "{error}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = support::cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = support::cpu_time(pid) - before;
    eprintln!("CPU used over 2 s after the runaways timed out: {used:?}");
    assert!(
        used < Duration::from_secs(1),
        "the server kept using {used:?} of CPU in 2 s (more than half a core)"
    );
    a_normal_event_is_delivered(&base, &rx, "after", Duration::from_secs(5)).await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_at_once_on_a_new_store_all_open_it() {
    let project = Project::new("connections: {}\n");
    let mut children = Vec::new();
    for _ in 0..10 {
        let mut cmd = project.cmd(&["runs", "list", "--json"]);
        children.push(tokio::spawn(async move { cmd.output().await }));
    }
    for child in children {
        let out = child.await.expect("join").expect("run plumb");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_in_another_pid_namespace_is_never_taken_for_dead() {
    let unshare_works = std::process::Command::new("unshare")
        .args(["-pf", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare_works {
        eprintln!("skipped: `unshare -pf --mount-proc` is not permitted here (needs root)");
        return;
    }
    let rx = Receiver::start().await;
    let project = project_with(&rx, "serve:\n  workers: 4\n");
    project.workflow(
        "slow",
        &format!(
            "name: slow\n{HEAD}trigger:\n  webhook: {{ path: slow }}\nsteps:\n  - id: call\n    http: {{ connection: rx, path: '/ok/slow?delay_ms=6000' }}\n"
        ),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    // The worker runs in its own PID namespace: its pid means another
    // process (or none) in the server's /proc.
    let mut worker = tokio::process::Command::new("unshare")
        .args([
            "-pf",
            "--mount-proc",
            "--kill-child",
            support::plumb_bin(),
            "--project",
        ])
        .arg(project.path())
        .arg("worker")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the worker");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::new();
    for n in 0..12 {
        let (status, body) = post_json(&format!("{base}/hooks/slow"), &json!({"n": n})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["run_id"].as_str().expect("run id").to_owned());
    }
    // The worker must hold some of them, or this proves nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = get_json(&format!("{base}/api/v1/runs?status=running&limit=100")).await;
        let held_by_worker = running["runs"].as_array().is_some_and(|runs| {
            runs.iter().any(|r| {
                r["lease_owner"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("worker:"))
            })
        });
        if held_by_worker {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker in its own PID namespace never claimed a run: {running}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each step takes 6 s: longer than the server's dead-owner sweep (a
    // few seconds), shorter than the lease (30 s).
    for id in &ids {
        let done = wait_run(&base, id, Duration::from_secs(40)).await;
        assert_eq!(done["run"]["status"], "succeeded", "{done}");
    }
    assert_each_key_sent_once(&rx, ids.len());
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_each_outputs_are_kept_once_and_later_steps_still_read_them_after_a_crash() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "fan",
        &format!(
            "name: fan\n{HEAD}steps:\n  - id: list\n    jq: '[range(30) | {{n: .}}]'\n  - id: each\n    for_each: '${{{{ .steps.list }}}}'\n    concurrency: 4\n    http: {{ connection: rx, method: POST, path: /ok/item, body: '${{{{ .item }}}}' }}\n  - id: nap\n    sleep: 2s\n  - id: unrelated\n    jq: '.trigger.body.x'\n  - id: count\n    jq: '[.steps.each[] | select(.status == 200)] | length'\n"
        ),
    );
    let started = project.start(&["run", "fan"]).await;
    let run_id = started.run_id.clone();
    let mut child = started.child;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().len() < 30 {
        assert!(Instant::now() < deadline, "items not sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Killed during the sleep: every item is journaled, the aggregate is
    // nowhere in memory any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.start_kill().expect("kill");
    child.wait().await.expect("wait");
    let out = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(rx.hits().len(), 30, "no item was sent again");
    let shown = project.show(&run_id).await;
    let steps = shown["steps"].as_array().expect("steps");
    let output_of = |id: &str| {
        steps
            .iter()
            .find(|s| s["step_id"] == id && s["item"].is_null())
            .map(|s| s["output"].clone())
            .expect("the step's row")
    };
    assert_eq!(
        output_of("count"),
        json!(30),
        "assembled from the item rows"
    );
    assert_eq!(
        output_of("each"),
        serde_json::Value::Null,
        "the step's own row holds no copy of the item outputs"
    );
}

/// A random request body: the shape, the content type and the bytes.
#[derive(Debug, Clone)]
struct Fuzzed {
    content_type: &'static str,
    body: Vec<u8>,
}

fn fuzzed_body() -> impl proptest::strategy::Strategy<Value = Fuzzed> {
    use proptest::prelude::*;
    let content_type = prop_oneof![
        Just("application/json"),
        Just("application/vnd.sender+json"),
        Just("application/x-www-form-urlencoded"),
        Just("text/plain"),
        Just(""),
    ];
    // Depths near the limits get most of the cases: plumb's (64), and the
    // JSON reader's (127: one level more in the trigger document and it
    // would not read back).
    let depth = prop_oneof![0usize..300, 60usize..70, 120usize..132];
    let nested = (depth, any::<bool>(), "[\\[\\]{}\":,\\\\a-z0-9 ]{0,20}").prop_map(
        |(depth, objects, noise)| {
            let open = if objects { "{\"k\":" } else { "[" };
            let close = if objects { "}" } else { "]" };
            format!("{}\"{noise}\"{}", open.repeat(depth), close.repeat(depth)).into_bytes()
        },
    );
    let form = (0usize..200, "[a-z%&=+]{0,30}")
        .prop_map(|(depth, rest)| format!("payload={}&{rest}", "%5B".repeat(depth)).into_bytes());
    let bytes = prop_oneof![
        nested,
        form,
        proptest::collection::vec(any::<u8>(), 0..2000),
        (0usize..80_000).prop_map(|n| format!("{{\"id\": \"{}\"}}", "x".repeat(n)).into_bytes()),
    ];
    (content_type, bytes).prop_map(|(content_type, body)| Fuzzed { content_type, body })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_webhook_bodies_get_an_answer_and_never_stall_the_engine() {
    use proptest::strategy::{Strategy, ValueTree};
    let rx = Receiver::start().await;
    let project = project_with(&rx, "serve:\n  body_limit: 64KiB\n");
    project.workflow("forward", &forward_workflow());
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/forward");
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = fuzzed_body();
    let mut accepted = Vec::new();
    for case in 0..150 {
        let fuzzed = strategy.new_tree(&mut runner).expect("a case").current();
        let (status, body) = post_raw(&hook, fuzzed.content_type, fuzzed.body.clone()).await;
        assert!(
            matches!(status, 202 | 400 | 413 | 415),
            "case {case}: {fuzzed:?} got {status} {body}"
        );
        assert!(
            body["error"]["code"].is_string() || body["run_id"].is_string(),
            "case {case}: every answer is JSON with a code or a run: {body}"
        );
        if status == 202 {
            accepted.push(body["run_id"].as_str().expect("run id").to_owned());
        }
    }
    for id in &accepted {
        let done = wait_run(&base, id, Duration::from_secs(20)).await;
        assert_eq!(done["run"]["status"], "succeeded", "{done}");
    }
    eprintln!(
        "{} of 150 random bodies were accepted and ran",
        accepted.len()
    );
    a_normal_event_is_delivered(&base, &rx, "after-fuzz", Duration::from_secs(5)).await;
    let runs = get_json(&format!("{base}/api/v1/runs?limit=500")).await;
    assert!(runs["runs"].is_array(), "{runs}");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_that_panics_releases_its_run_and_the_run_ends() {
    let project = Project::new("connections: {}\nserve:\n  max_crashes: 2\n");
    project.workflow(
        "boom",
        &format!("name: boom\n{HEAD}trigger:\n  webhook: {{ path: boom }}\nsteps:\n  - id: a\n    jq: '1'\n"),
    );
    // Every attempt panics inside the engine, as a bug would.
    let mut server = project
        .serve_with_env("127.0.0.1:0", &[("PLUMB_FAILPOINT", "step.attempt=panic")])
        .await;
    let base = server.base_url.clone();
    let (status, body) = post_json(&format!("{base}/hooks/boom"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(30)).await;
    assert_eq!(done["run"]["status"], "failed", "{done}");
    let message = done["run"]["failure"]["message"].as_str().unwrap_or("");
    assert!(message.contains("crashed its worker 2 times"), "{message}");
    assert!(
        message.contains("panicked"),
        "with the panic as its last error: {message}"
    );
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "the panic was caught: the server is still up"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_clock_is_an_hour_ahead_takes_no_live_lease() {
    if !support::faketime_works() {
        eprintln!("skipped: `faketime` is not installed (apt-get install faketime)");
        return;
    }
    let rx = Receiver::start().await;
    let project = project_with(&rx, "serve:\n  workers: 4\n  lease: 6s\n");
    project.workflow(
        "slow",
        &format!("name: slow\n{HEAD}trigger:\n  webhook: {{ path: slow }}\nsteps:\n  - id: call\n    http: {{ connection: rx, path: '/ok/slow?delay_ms=4000' }}\n"),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    // A worker whose wall clock is an hour ahead: every lease the server
    // writes has expired by its clock the moment it is written.
    let mut worker = support::plumb_at(project.path(), "+1h", &["worker"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the worker");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::new();
    for n in 0..12 {
        let (status, body) = post_json(&format!("{base}/hooks/slow"), &json!({"n": n})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["run_id"].as_str().expect("run id").to_owned());
    }
    let mut by_the_worker = 0;
    for id in &ids {
        let done = wait_run(&base, id, Duration::from_secs(60)).await;
        assert_eq!(done["run"]["status"], "succeeded", "{done}");
        // The worker's clock stamps the runs it claims an hour late.
        let late = done["run"]["started_at"].as_i64().unwrap_or(0)
            - done["run"]["created_at"].as_i64().unwrap_or(0);
        if late > 30 * 60 * 1000 {
            by_the_worker += 1;
        }
    }
    assert!(
        by_the_worker > 0,
        "the worker with the skewed clock ran none of the runs"
    );
    assert_each_key_sent_once(&rx, ids.len());
    let _ = worker.start_kill();
    let _ = worker.wait().await;
    server.kill().await;
}

/// Every idempotency key the receiver saw arrived exactly once, and there
/// are `runs` of them.
fn assert_each_key_sent_once(rx: &Receiver, runs: usize) {
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for hit in rx.hits() {
        *per_key.entry(hit.key.unwrap_or_default()).or_default() += 1;
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys sent more than once: {twice:?}");
    assert_eq!(per_key.len(), runs);
}
