//! What a new user trips on in the first hour (issue #8, part B), each
//! tested the way they would meet it: a broken file next to working ones,
//! a server running without a token at hand, status in a cron job, form
//! webhooks, abbreviated run ids, logs in a file.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Project, Receiver, post_json, post_raw, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

fn ok_workflow(name: &str) -> String {
    format!("name: {name}\n{HEAD}steps:\n  - id: a\n    jq: '1'\n")
}

#[tokio::test]
async fn a_broken_workflow_does_not_block_running_another_or_setting_secrets() {
    let project = Project::new("connections: {}\n");
    project.workflow("good", &ok_workflow("good"));
    project.workflow(
        "broken",
        "name: broken\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: x\n    jq: '.a +'\n",
    );
    let out = project.run(&["run", "good"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("workflows/broken.yaml"),
        "it says which other file has problems: {out}"
    );
    let out = project.run(&["run", "broken"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("invalid jq program"), "{out}");

    // plumb.yaml itself names a secret that is not set: exactly what
    // `secrets set` fixes, so it must work.
    std::fs::write(
        project.path().join("plumb.yaml"),
        "connections:\n  crm:\n    http: { base_url: 'https://api.example', auth: { bearer: { secret: crm_token } } }\n  oops:\n    htp: {}\n",
    )
    .expect("write plumb.yaml");
    let out = project.set_secret("crm_token", "value-123456").await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("plumb.yaml has"),
        "a warning, not a refusal: {out}"
    );
    let out = project.run(&["secrets", "list", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("crm_token"), "{out}");
    let out = project.run(&["runs", "list"]).await;
    assert_eq!(out.code, Some(0), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_ends_with_a_verdict_and_exits_1_when_something_needs_a_person() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow("good", &ok_workflow("good"));
    let out = project.run(&["run", "good"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = project.run(&["status"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let last = out.stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("verdict") && last.contains("all healthy"),
        "{out}"
    );

    project.workflow(
        "bad",
        &format!("name: bad\n{HEAD}steps:\n  - id: a\n    http: {{ connection: rx, path: /status/400 }}\n"),
    );
    let out = project.run(&["run", "bad"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    project.workflow("broken", "name: broken\nsteps: 3\n");
    let out = project.run(&["status"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("good"),
        "healthy workflows are still shown: {out}"
    );
    let last = out.stdout.lines().last().unwrap_or("");
    assert!(last.contains("2 problems"), "{last}");
    assert!(last.contains("bad has 1 dead letter"), "{last}");
    assert!(
        last.contains("workflows/broken.yaml has problems"),
        "{last}"
    );
    let json = project.run(&["status", "--json"]).await;
    assert_eq!(json.code, Some(1), "{json}");
    let doc: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(doc["verdict"]["healthy"], false);
    let kinds: Vec<&str> = doc["verdict"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(kinds, vec!["dead_letters", "broken_file"], "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_cli_still_knows_the_server_is_running() {
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "listen: {listen}\nconnections:\n  rx:\n    http: {{ base_url: {} }}\ndefaults:\n  retry: {{ attempts: 1 }}\n",
        rx.base_url
    ));
    project.workflow(
        "bad",
        &format!("name: bad\n{HEAD}trigger:\n  webhook: {{ path: bad }}\nsteps:\n  - id: a\n    http: {{ connection: rx, path: /status/400 }}\n"),
    );
    let server = project.serve(&listen).await;
    let (status, body) = post_json(&format!("http://{listen}/hooks/bad"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    wait_run(&server.base_url, &run_id, Duration::from_secs(10)).await;
    let out = project.run(&["status"]).await;
    assert!(
        out.stdout.contains("running at") && !out.stdout.contains("not running"),
        "{out}"
    );
    assert!(
        out.stdout.contains("PLUMB_TOKEN"),
        "how to use the API: {out}"
    );
    // A replay written to the store directly: the running server picks it
    // up; nothing claims no server is running.
    let out = project.run(&["dlq", "replay", &run_id[..13]]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("picks it up"), "{out}");
    assert!(!out.stdout.contains("no server is running"), "{out}");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_gauge_follows_a_replay_that_succeeds() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    // Fails on its first delivery of each key, then succeeds.
    project.workflow(
        "flaky",
        &format!("name: flaky\n{HEAD}trigger:\n  webhook: {{ path: flaky }}\nretry: {{ attempts: 1 }}\nsteps:\n  - id: a\n    http: {{ connection: rx, path: /flaky/400/1 }}\n"),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let (_, body) = post_json(&format!("{base}/hooks/flaky"), &json!({})).await;
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "failed");
    let gauge = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("plumb_dead_letters{workflow=\"flaky\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let metrics = || support::metrics(&base);
    let deadline = Instant::now() + Duration::from_secs(12);
    while gauge(&metrics().await) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the gauge never showed the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = post_json(&format!("{base}/api/v1/dlq/{run_id}/replay"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    let deadline = Instant::now() + Duration::from_secs(12);
    while gauge(&metrics().await) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the gauge stayed at its old value"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_encoded_webhooks_are_accepted_and_unknown_routes_answer_json() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "gh",
        &format!("name: gh\n{HEAD}trigger:\n  webhook: {{ path: gh }}\nsteps:\n  - id: a\n    jq: '.trigger.body.payload.action'\n"),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    // GitHub's default content type: the JSON in a `payload` field.
    let (status, body) = post_raw(
        &format!("{base}/hooks/gh"),
        "application/x-www-form-urlencoded",
        b"payload=%7B%22action%22%3A%22opened%22%2C%22number%22%3A7%7D".to_vec(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(done["run"]["trigger"]["body"]["payload"]["number"], 7);
    // Slack's slash commands: plain fields.
    let (status, body) = post_raw(
        &format!("{base}/hooks/gh"),
        "application/x-www-form-urlencoded",
        b"command=%2Fdeploy&text=api+v2".to_vec(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let response = support::http()
        .get(format!("{base}/no/such/route"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 404);
    let doc: Value = response.json().await.expect("a JSON error");
    assert_eq!(doc["error"]["code"], "not_found", "{doc}");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ids_can_be_abbreviated_and_runs_show_tells_replays_apart() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "flaky",
        &format!("name: flaky\n{HEAD}retry: {{ attempts: 2, initial: 10ms }}\nsteps:\n  - id: a\n    http: {{ connection: rx, path: /flaky/503/2 }}\n"),
    );
    let out = project.run(&["run", "flaky"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    let run_id = support::run_id_of(&out.stdout);
    let short = &run_id[..12];
    let shown = project.run(&["runs", "show", short]).await;
    assert_eq!(shown.code, Some(0), "{shown}");
    assert!(shown.stdout.contains(&run_id), "{shown}");
    let out = project.run(&["dlq", "replay", short]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = project.run(&["run", "--resume", short]).await;
    assert_eq!(
        out.code,
        Some(0),
        "the replay succeeds on the third delivery: {out}"
    );
    let shown = project.run(&["runs", "show", short]).await;
    assert!(shown.stdout.contains("replayed  1 time"), "{shown}");
    assert!(shown.stdout.contains("attempt 1: HTTP 503"), "{shown}");
    assert!(shown.stdout.contains("attempt 2: HTTP 503"), "{shown}");
    let json = project.show(&run_id).await;
    let attempts = json["failed_attempts"].as_array().expect("attempts").len();
    assert_eq!(
        shown.stdout.matches(" attempt ").count(),
        attempts,
        "every attempt --json has is shown: {shown}"
    );
    // A prefix shared by two runs is refused, naming them.
    let out = project.run(&["run", "flaky"]).await;
    let second = support::run_id_of(&out.stdout);
    let common: String = run_id
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let out = project.run(&["runs", "show", &common]).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("more than one run"), "{out}");
    let out = project.run(&["runs", "show", "zzz"]).await;
    assert_eq!(out.code, Some(2), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_shows_no_step_in_flight() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "slow",
        &format!("name: slow\n{HEAD}steps:\n  - id: a\n    http: {{ connection: rx, path: '/ok/a?delay_ms=5000' }}\n"),
    );
    let started = project.start(&["run", "slow"]).await;
    let run_id = started.run_id.clone();
    let mut child = started.child;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().expect("kill");
    child.wait().await.expect("wait");
    let out = project.run(&["cancel", &run_id]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let shown = project.run(&["runs", "show", &run_id]).await;
    assert!(shown.stdout.contains("cancelled"), "{shown}");
    assert!(!shown.stdout.contains("in flight"), "{shown}");
    assert!(
        shown.stdout.contains("stopped (the run was cancelled)"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_says_what_plumb_is_and_logs_off_a_terminal_are_plain_text() {
    let out = tokio::process::Command::new(support::plumb_bin())
        .arg("--help")
        .output()
        .await
        .expect("help");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("");
    assert!(first.contains("integrations you can trust"), "{first}");
    assert!(!first.contains("wiring"), "{first}");

    // A failed run's log line in a server's log file: no colour codes,
    // and it names the workflow.
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow(
        "bad",
        &format!("name: bad\n{HEAD}trigger:\n  webhook: {{ path: bad }}\nsteps:\n  - id: a\n    http: {{ connection: rx, path: /status/400 }}\n"),
    );
    let token = project.admin_token().await;
    let log = project.path().join("serve.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut child = project
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut first_line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut first_line)
        .await
        .expect("first line");
    let base = first_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("address")
        .to_owned();
    let (status, body) = post_json(&format!("{base}/hooks/bad"), &json!({})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let doc = support::http()
            .get(format!("{base}/api/v1/runs/{run_id}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("get")
            .json::<Value>()
            .await
            .expect("json");
        if doc["run"]["status"] == "failed" {
            break;
        }
        assert!(Instant::now() < deadline, "{doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        !text.contains('\u{1b}'),
        "no escape codes in a log file:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("Run failed"))
        .unwrap_or_else(|| panic!("no failed-run line:\n{text}"));
    assert!(
        line.contains("workflow=\"bad\"") || line.contains("workflow=bad"),
        "{line}"
    );
}

#[tokio::test]
async fn an_invalid_input_file_states_the_position_once() {
    let project = Project::new("connections: {}\n");
    project.workflow("w", &ok_workflow("w"));
    let input = project.path().join("input.json");
    std::fs::write(&input, "{\"a\": 1,\n \"b\": }").expect("write input");
    let out = project
        .run(&["run", "w", "--input", input.to_str().expect("utf-8")])
        .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert_eq!(out.stderr.matches("line").count(), 1, "{out}");
    assert!(out.stderr.contains("line 2, column 7"), "{out}");
}

#[tokio::test]
async fn piping_a_listing_into_a_reader_that_stops_early_ends_quietly() {
    let project = Project::new("connections: {}\n");
    project.workflow("good", &ok_workflow("good"));
    for _ in 0..3 {
        let out = project.run(&["run", "good"]).await;
        assert_eq!(out.code, Some(0), "{out}");
    }
    // `plumb runs list | head -0`: the reader is gone before the first line.
    let mut child = project
        .cmd(&["runs", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn plumb runs list");
    drop(child.stdout.take());
    let out = child.wait_with_output().await.expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "a closed pipe is not a crash: {stderr}"
    );
}
