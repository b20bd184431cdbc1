//! The `publish` step on Redis Streams (`PLUMB_TEST_REDIS`), with the real
//! binary: each message is added once per idempotency key, even when
//! plumb is SIGKILLed mid-run and the run resumed; every entry carries its
//! key and JSON body; a password in the URL is a `check` error.

#![allow(clippy::print_stderr)] // a skipped test says why

mod support;

use std::process::Command;

use support::Project;

fn redis_url() -> Option<String> {
    match std::env::var("PLUMB_TEST_REDIS") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "skipped: set PLUMB_TEST_REDIS (e.g. redis://127.0.0.1:6379) to run the publish tests"
            );
            None
        }
    }
}

/// `redis-cli -u URL ARGS…`, its output.
fn redis(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_added_once_through_sigkill_and_resume() {
    const ITEMS: usize = 1000;
    const TRIALS: usize = 10;
    let Some(url) = redis_url() else { return };
    let stream = format!("plumb-test-{}", std::process::id());
    let project = Project::new(&format!(
        "connections:\n  bus:\n    redis: {{ url: '{url}', timeout: 5s }}\n"
    ));
    project.workflow(
        "emit",
        &format!(
            "name: emit\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: items\n    jq: '[range(0; {ITEMS}) | {{n: ., name: \"order \\(.)\"}}]'\n  - id: send\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 4\n    publish:\n      connection: bus\n      to: {stream}\n      body: '${{{{ .item }}}}'\n      headers: {{ kind: order }}\n"
        ),
    );
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    let mut killed = 0;
    let mut runs = Vec::new();
    for trial in 0..TRIALS {
        redis(&url, &["DEL", &stream]);
        let started = project.start(&["run", "emit"]).await;
        let run_id = started.run_id.clone();
        runs.push(run_id.clone());
        let mut child = started.child;
        tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(
            20..400,
        )))
        .await;
        let _ = child.start_kill();
        let status = child.wait().await.expect("wait");
        if !status.success() {
            let resumed = project.run(&["run", "--resume", &run_id]).await;
            // Killed after the run ended but before the process exited:
            // nothing to resume.
            let ended = resumed.stderr.contains("has already ended (succeeded)");
            assert!(resumed.code == Some(0) || ended, "trial {trial}: {resumed}");
            if !ended {
                killed += 1;
            }
        }
        assert_eq!(
            redis(&url, &["XLEN", &stream]),
            ITEMS.to_string(),
            "trial {trial}: one entry per message"
        );
    }
    eprintln!("{TRIALS} trials, {killed} killed mid-run: every message once");
    assert!(killed >= TRIALS / 2, "most kills landed mid-run: {killed}");
    // Every entry carries its body as JSON, its key, and the header.
    let first = redis(&url, &["XRANGE", &stream, "-", "+", "COUNT", "1"]);
    assert!(first.contains("plumb-idempotency-key"), "{first}");
    assert!(first.contains("\"name\":\"order"), "{first}");
    assert!(first.contains("kind"), "{first}");
    redis(&url, &["DEL", &stream]);
    // The keys' records expire in 7 days; a test does not leave them.
    for run_id in &runs {
        redis(
            &url,
            &[
                "EVAL",
                "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end",
                "0",
                &format!("plumb:published:{run_id}:*"),
            ],
        );
    }
}

#[tokio::test]
async fn check_refuses_a_password_in_a_redis_url_and_a_publish_to_an_http_connection() {
    let project = Project::new(
        "connections:\n  bus:\n    redis: { url: 'redis://:hunter2@cache.example:6379/0' }\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("the URL holds a password"), "{out}");
    assert!(!out.stderr.contains("hunter2"), "{out}");
    let project =
        Project::new("connections:\n  api:\n    http: { base_url: 'https://api.example' }\n");
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: p\n    publish: { connection: api, to: s, body: 1 }\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("a publish step sends to a broker connection"),
        "{out}"
    );
}
