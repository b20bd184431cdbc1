//! `plumb serve` as a user and its callers meet it: webhook answers, the
//! API, dead letters and replay, alerts, cancel, reload, backpressure.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Project, Receiver, get_json, post_json, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

fn project_with(rx: &Receiver, extra: &str) -> Project {
    Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 3, initial: 100ms, max: 1s }}\nserve:\n  body_limit: 1KiB\n{extra}",
        rx.base_url
    ))
}

fn orders_workflow() -> String {
    format!(
        "name: orders\n{HEAD}trigger:\n  webhook: {{ path: orders }}\nsteps:\n  - id: shape\n    jq: '{{id: .trigger.body.id}}'\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/orders, body: '${{{{ .steps.shape }}}}' }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_answer_202_once_durable_and_400_404_413_415_for_bad_requests() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    project.workflow("orders", &orders_workflow());
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/orders");

    let (status, body) = post_json(&hook, &json!({"id": "o-1"})).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let done = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(done["run"]["trigger"]["body"]["id"], "o-1");
    assert_eq!(rx.hits()[0].body["id"], "o-1");

    let client = support::http();
    let bad_json = client
        .post(&hook)
        .header("content-type", "application/json")
        .body("{\"id\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(bad_json.status().as_u16(), 400);
    let text = bad_json.text().await.expect("body");
    assert!(
        text.contains("not valid JSON") && text.contains("line 1"),
        "{text}"
    );

    let text_plain = client
        .post(&hook)
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .expect("send");
    assert_eq!(text_plain.status().as_u16(), 415);

    let big = json!({"id": "x".repeat(2000)});
    let (status, body) = post_json(&hook, &big).await;
    assert_eq!(status, 413, "{body}");

    let (status, body) = post_json(&format!("{base}/hooks/nope"), &json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    let (status, body) = post_json(
        &format!("{base}/api/v1/workflows/orders/runs"),
        &json!({"id": "manual"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let manual = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(manual["run"]["trigger"]["type"], "manual");

    assert_eq!(get_json(&format!("{base}/healthz")).await["status"], "ok");
    assert_eq!(get_json(&format!("{base}/readyz")).await["status"], "ready");
    let metrics = support::metrics(&base).await;
    assert!(
        metrics.contains("plumb_webhook_responses_total{code=\"202\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("plumb_webhook_responses_total{code=\"415\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("plumb_runs_total{workflow=\"orders\",status=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("plumb_step_duration_seconds_bucket"),
        "{metrics}"
    );
    // Nothing but the two good events reached the upstream.
    assert_eq!(rx.hits().len(), 2);
    assert_eq!(server.stop().await, Some(0), "SIGTERM stops it cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_store_cannot_commit_webhooks_get_503_and_those_events_never_run() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    project.workflow("orders", &orders_workflow());
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/orders");
    let (status, _) = post_json(&hook, &json!({"id": "before"})).await;
    assert_eq!(status, 202);

    // Another process takes SQLite's write lock and keeps it for 7 s.
    let db = project.path().join("plumb.db");
    let mut locker = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(7)\nc.execute('COMMIT')\n",
            db.to_str().expect("utf8"),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(locker.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .expect("read");
    assert_eq!(line.trim(), "locked");

    let started = Instant::now();
    let rejected: Vec<(u16, Value, Option<String>)> = futures_join(
        (0..3)
            .map(|i| {
                let hook = hook.clone();
                async move {
                    let r = support::http()
                        .post(&hook)
                        .json(&json!({"id": format!("during-{i}")}))
                        .send()
                        .await
                        .expect("send");
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    (status, r.json().await.unwrap_or(Value::Null), retry_after)
                }
            })
            .collect(),
    )
    .await;
    for (status, body, retry_after) in &rejected {
        assert_eq!(
            *status, 503,
            "never a 2xx for an event that is not durable: {body}"
        );
        assert!(retry_after.is_some(), "503 carries Retry-After");
        assert_eq!(body["error"]["code"], "store_unavailable");
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered within the commit deadline"
    );
    let ready = support::http()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready while the store cannot commit"
    );

    locker.wait().await.expect("locker exits");
    let (status, body) = post_json(&hook, &json!({"id": "after"})).await;
    assert_eq!(
        status, 202,
        "accepted again once the store can commit: {body}"
    );
    wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = rx
        .hits()
        .iter()
        .map(|h| h.body["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        ids.contains(&"before".to_owned()) && ids.contains(&"after".to_owned()),
        "{ids:?}"
    );
    assert!(
        !ids.iter().any(|i| i.starts_with("during")),
        "a rejected event must not run: {ids:?}"
    );
    let runs = get_json(&format!("{base}/api/v1/runs?workflow=orders")).await;
    assert_eq!(
        runs["runs"].as_array().map(Vec::len),
        Some(2),
        "only the accepted events became runs"
    );
    server.kill().await;
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futs: Vec<F>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_a_dead_letter_alerts_its_owner_and_a_replay_reruns_only_what_failed() {
    let rx = Receiver::start().await;
    let project = project_with(
        &rx,
        "alerts:\n  ops:\n    http: { connection: rx, path: /flaky/503/1 }\n",
    );
    project.workflow(
        "batch",
        &format!(
            "name: batch\n{HEAD}trigger:\n  webhook: {{ path: batch }}\nalerts: {{ on_failure: [ops] }}\nsteps:\n  - id: send\n    for_each: '${{{{ [\"ok/a\", \"flaky/422/1\", \"ok/c\"] }}}}'\n    http: {{ connection: rx, method: POST, path: '/${{{{ .item }}}}' }}\n  - id: after\n    http: {{ connection: rx, method: POST, path: /ok/after }}\n"
        ),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let (status, body) = post_json(&format!("{base}/hooks/batch"), &json!({"n": 1})).await;
    assert_eq!(status, 202);
    let run_id = body["run_id"].as_str().expect("id").to_owned();
    let failed = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(failed["run"]["status"], "failed");
    assert_eq!(failed["run"]["failure"]["step"], "send");
    assert_eq!(failed["run"]["failure"]["item"], 1);

    // The dead-letter list, through the CLI (which talks to the server).
    let dlq = project.run(&["dlq", "list", "--json"]).await;
    assert_eq!(dlq.code, Some(0), "{dlq}");
    let letters: Value = serde_json::from_str(&dlq.stdout).expect("json");
    assert_eq!(letters[0]["run_id"], run_id.as_str());
    assert_eq!(letters[0]["step"], "send");
    assert_eq!(letters[0]["input"]["body"]["n"], 1);

    // The alert: first delivery refused (503), retried, delivered, same key.
    let deadline = Instant::now() + Duration::from_secs(15);
    let alert_hits = loop {
        let hits: Vec<_> = rx
            .hits()
            .into_iter()
            .filter(|h| h.path.starts_with("/flaky/503"))
            .collect();
        if hits.len() >= 2 || Instant::now() > deadline {
            break hits;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alert_hits.len(), 2, "refused once, then delivered");
    assert_eq!(alert_hits[0].key, alert_hits[1].key);
    assert!(
        alert_hits[0]
            .key
            .as_deref()
            .unwrap_or("")
            .starts_with("alert:")
    );
    let alert = &alert_hits[1].body;
    assert_eq!(alert["workflow"], "batch");
    assert_eq!(alert["run_id"], run_id.as_str());
    assert_eq!(alert["step"], "send");
    assert!(
        alert["error"].as_str().unwrap_or("").contains("422"),
        "{alert}"
    );
    assert!(
        alert["link"]
            .as_str()
            .unwrap_or("")
            .ends_with(&format!("/api/v1/runs/{run_id}")),
        "{alert}"
    );

    let replay = project.run(&["dlq", "replay", &run_id]).await;
    assert_eq!(replay.code, Some(0), "{replay}");
    let replayed = wait_run(&base, &run_id, Duration::from_secs(10)).await;
    assert_eq!(replayed["run"]["status"], "succeeded", "{replayed}");
    assert_eq!(replayed["run"]["replays"], 1);
    let count = |path: &str| rx.hits().iter().filter(|h| h.path == path).count();
    assert_eq!(count("/ok/a"), 1, "succeeded items are not re-run");
    assert_eq!(count("/ok/c"), 1, "succeeded items are not re-run");
    assert_eq!(count("/flaky/422/1"), 2, "only the failed item is re-run");
    let keys: Vec<_> = rx
        .hits()
        .iter()
        .filter(|h| h.path == "/flaky/422/1")
        .map(|h| h.key.clone())
        .collect();
    assert_eq!(keys[0], keys[1], "with the same idempotency key");
    assert_eq!(
        keys[0].as_deref(),
        Some(format!("{run_id}:send:1").as_str())
    );
    assert_eq!(count("/ok/after"), 1);
    let again = project.run(&["dlq", "replay", &run_id]).await;
    assert_eq!(
        again.code,
        Some(2),
        "a succeeded run cannot be replayed: {again}"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_alert_stays_visible_in_status() {
    let rx = Receiver::start().await;
    let dead = support::free_port();
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http: {{ base_url: {} }}\n  pager:\n    http: {{ base_url: 'http://127.0.0.1:{dead}', timeout: 1s }}\nalerts:\n  pager:\n    http: {{ connection: pager, path: /page }}\n",
        rx.base_url
    ));
    project.workflow(
        "fails",
        &format!("name: fails\n{HEAD}trigger:\n  webhook: {{ path: fails }}\nalerts: {{ on_failure: [pager] }}\nsteps:\n  - id: boom\n    http: {{ connection: rx, path: /status/400 }}\n"),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let (_, body) = post_json(&format!("{base}/hooks/fails"), &json!({})).await;
    wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = project.run(&["status", "--json"]).await;
    let doc: Value = serde_json::from_str(&status.stdout).expect("json");
    let alerts = doc["undelivered_alerts"].as_array().expect("alerts");
    assert_eq!(alerts.len(), 1, "{doc}");
    assert_eq!(alerts[0]["channel"], "pager");
    assert!(alerts[0]["attempts"].as_u64().unwrap_or(0) >= 1);
    assert!(!alerts[0]["last_error"].as_str().unwrap_or("").is_empty());
    let human = project.run(&["status"]).await;
    assert!(human.stdout.contains("alert(s) not delivered"), "{human}");
    assert!(human.stdout.contains("fails"), "{human}");
    let fails = doc["workflows"]
        .as_array()
        .expect("workflows")
        .iter()
        .find(|w| w["name"] == "fails")
        .cloned()
        .expect("fails");
    assert_eq!(fails["dead_letters"], 1);
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_sleeping_run_and_later_steps_never_run() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    project.workflow(
        "slow",
        &format!("name: slow\n{HEAD}trigger:\n  webhook: {{ path: slow }}\nsteps:\n  - id: nap\n    sleep: 30s\n  - id: after\n    http: {{ connection: rx, path: /ok/after }}\n"),
    );
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let (_, body) = post_json(&format!("{base}/hooks/slow"), &json!({})).await;
    let run_id = body["run_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = project
        .run(&["cancel", &run_id, "--reason", "wrong customer"])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let doc = wait_run(&base, &run_id, Duration::from_secs(5)).await;
    assert_eq!(doc["run"]["status"], "cancelled");
    assert_eq!(doc["run"]["failure"]["message"], "wrong customer");
    let again = project.run(&["cancel", &run_id]).await;
    assert_eq!(again.code, Some(2), "{again}");
    // The cancelled run must not be resumed by anyone: stop the server and
    // check nothing ran after a restart either.
    assert_eq!(server.stop().await, Some(0));
    let server = project.serve("127.0.0.1:0").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        rx.hits().is_empty(),
        "a cancelled run's later steps never run"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_valid_files_rejects_invalid_ones_and_runs_keep_their_version() {
    let rx = Receiver::start().await;
    let project = project_with(&rx, "");
    let v1 = format!(
        "name: flow\n{HEAD}trigger:\n  webhook: {{ path: flow }}\nsteps:\n  - id: nap\n    sleep: '${{{{ .trigger.body.nap }}}}'\n  - id: call\n    http: {{ connection: rx, path: /ok/v1 }}\n"
    );
    project.workflow("flow", &v1);
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/flow");
    // A run that starts on v1 and is still sleeping when v2 arrives.
    let (_, early) = post_json(&hook, &json!({"nap": "2s"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    project.workflow("flow", "name: flow\nsteps: [oops");
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = post_json(&hook, &json!({"nap": "0s"})).await;
    assert_eq!(
        status, 202,
        "an invalid reload is rejected; the old version keeps running: {body}"
    );
    let kept = wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(kept["run"]["status"], "succeeded");

    project.workflow("flow", &v1.replace("/ok/v1", "/ok/v2"));
    server.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = post_json(&hook, &json!({"nap": "0s"})).await;
    wait_run(
        &base,
        body["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    let early = wait_run(
        &base,
        early["run_id"].as_str().expect("id"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(early["run"]["status"], "succeeded");
    let paths: Vec<String> = rx.hits().iter().map(|h| h.path.clone()).collect();
    assert_eq!(
        paths.iter().filter(|p| *p == "/ok/v2").count(),
        1,
        "new runs use the reloaded version: {paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| *p == "/ok/v1").count(),
        2,
        "the run started on v1 finished on v1: {paths:?}"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_a_retry_a_dead_letter_and_an_alert_then_stops_cleanly_on_ctrl_c() {
    let mut child = tokio::process::Command::new(support::plumb_bin())
        .arg("demo")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(seen.contains("retrying in")
        && seen.contains("dead-letter list")
        && seen.contains("alert to #ops"))
    {
        assert!(
            Instant::now() < deadline,
            "the demo did not show retry, dead letter and alert:\n{seen}"
        );
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            other => panic!("demo output ended ({other:?}):\n{seen}"),
        }
    }
    while !seen.contains("Ctrl-C (or SIGTERM) stops the demo") {
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            other => panic!("demo output ended ({other:?}):\n{seen}"),
        }
    }
    let dir = seen
        .lines()
        .find_map(|l| l.split("(store: ").nth(1))
        .and_then(|rest| rest.strip_suffix("/plumb.db)"))
        .expect("the demo names its directory")
        .to_owned();
    assert!(std::path::Path::new(&dir).exists());
    // The suggested commands work as printed, in a shell without `plumb`
    // on its PATH.
    let suggested = |needle: &str| {
        seen.lines()
            .map(str::trim)
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no suggested command with {needle}:\n{seen}"))
            .to_owned()
    };
    let shell = |line: String| async move {
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env("PATH", "/usr/bin:/bin")
            .env("NO_COLOR", "1")
            .output()
            .await
            .expect("sh")
    };
    let status = shell(suggested(" status")).await;
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status_text.contains("verdict") && status_text.contains("running at"),
        "{status_text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let api = shell(suggested("/api/v1/status")).await;
    let doc: serde_json::Value =
        serde_json::from_slice(&api.stdout).expect("the API answers the printed curl with JSON");
    assert!(doc["workflows"].is_array(), "{doc}");
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the demo removes its directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_health_and_nothing_else_and_plumb_workers_lists_it() {
    let project = Project::new("connections: {}\n");
    let addr = format!("127.0.0.1:{}", support::free_port());
    let mut child = project
        .cmd(&["worker", "--listen", &addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn plumb worker");
    let (first, _rest) = support::first_line(&mut child).await;
    assert!(
        first.contains("worker started") && first.contains(&format!("health on http://{addr}")),
        "{first}"
    );
    let client = support::http();
    for (path, want) in [("/healthz", 200), ("/readyz", 200), ("/metrics", 200)] {
        let got = client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(got.status().as_u16(), want, "{path}");
    }
    // A worker takes no webhooks and serves no API.
    let hook = client
        .post(format!("http://{addr}/hooks/x"))
        .json(&json!({}))
        .send()
        .await
        .expect("POST");
    assert_eq!(hook.status().as_u16(), 404);
    let api = client
        .get(format!("http://{addr}/api/v1/status"))
        .send()
        .await
        .expect("GET");
    assert_eq!(api.status().as_u16(), 404);

    let listed = project.run(&["workers", "--json"]).await;
    let listed: Value = serde_json::from_str(&listed.stdout).expect("json");
    let pid = u64::from(child.id().expect("running"));
    assert!(
        listed["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["pid"] == pid && w["role"] == "worker" && w["capacity"] == 64),
        "{listed}"
    );
    let human = project.run(&["workers"]).await;
    assert!(human.stdout.contains("1 live process"), "{human}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}
