//! SPEC G1, G2, G4 with real processes under load: webhooks at
//! concurrency 32 while the server is SIGKILLed and restarted; leases
//! expiring under a stalled worker; schedules across restarts.

#![allow(clippy::print_stderr)] // the summaries are the point of --nocapture

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Project, Receiver, Senders, get_json, post_json, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

const EVENTS: usize = 2000;
const CONCURRENCY: usize = 32;
const KILLS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_under_sigkill_and_restart_run_every_acknowledged_event_exactly_once_by_key() {
    let rx = Receiver::start().await;
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let project = Project::new(&format!(
        "listen: {listen}\nconnections:\n  rx:\n    http: {{ base_url: {} }}\ndefaults:\n  retry: {{ attempts: 5, initial: 50ms, max: 500ms }}\nserve:\n  workers: 32\n",
        rx.base_url
    ));
    project.workflow(
        "ingest",
        &format!(
            "name: ingest\n{HEAD}trigger:\n  webhook: {{ path: ingest }}\nsteps:\n  - id: shape\n    jq: '{{event: .trigger.body.event, n: .trigger.body.n}}'\n  - id: deliver\n    http: {{ connection: rx, method: POST, path: /ok/deliver, body: '${{{{ .steps.shape }}}}' }}\n"
        ),
    );
    let hook = format!("http://{listen}/hooks/ingest");
    let mut server = Some(project.serve(&listen).await);

    // Senders: each event is retried until a 202 (as a real sender would);
    // the ack maps the event to its run.
    let senders = Senders::start(&hook, EVENTS, CONCURRENCY);

    // The killer: SIGKILL at spread-out points of the load, restart at once.
    for k in 0..KILLS {
        let target = EVENTS * (k + 1) / (KILLS + 1);
        senders.wait_acked(target, Duration::from_secs(120)).await;
        if let Some(s) = server.take() {
            s.kill().await;
        }
        server = Some(project.serve(&listen).await);
    }
    let refused = senders.refused.load(Ordering::SeqCst);
    let acked = senders.finish().await;
    assert_eq!(
        acked.len(),
        EVENTS,
        "every event was eventually acknowledged"
    );

    // Drain: wait until nothing is queued or running.
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = get_json(&format!("{base}/api/v1/status")).await;
        let w = &status["workflows"][0];
        if w["queued"] == 0 && w["running"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "runs still pending: {w}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (missing, resent, unacked_runs) = support::deliveries(&rx, &acked, "deliver");
    assert!(
        missing.is_empty(),
        "acknowledged events without effect: {missing:?}"
    );
    let failed = get_json(&format!("{base}/api/v1/runs?status=failed")).await;
    assert_eq!(
        failed["runs"].as_array().map(Vec::len),
        Some(0),
        "no run failed: {failed}"
    );
    eprintln!(
        "{EVENTS} events at c={CONCURRENCY}, {KILLS} SIGKILLs: every acked event delivered; {} requests ({resent} in-flight re-sends with the same key); {refused} refused/aborted sends retried by the sender; {unacked_runs} runs whose 202 was lost in a kill (the sender retried those events)",
        rx.hits().len(),
    );
    if let Some(s) = server.take() {
        s.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_workers_run_is_finished_by_another_after_its_lease_expires() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http: {{ base_url: {} }}\nserve:\n  lease: 3s\n",
        rx.base_url
    ));
    project.workflow(
        "three",
        &format!(
            "name: three\n{HEAD}trigger:\n  webhook: {{ path: three }}\nsteps:\n  - id: first\n    http: {{ connection: rx, path: /ok/first }}\n  - id: second\n    http: {{ connection: rx, path: /ok/second, query: {{ delay_ms: 1500 }} }}\n  - id: third\n    http: {{ connection: rx, path: /ok/third }}\n"
        ),
    );
    let a = project.serve("127.0.0.1:0").await;
    let base = a.base_url.clone();
    let (_, body) = post_json(&format!("{base}/hooks/three"), &json!({})).await;
    let run_id = body["run_id"].as_str().expect("id").to_owned();
    while !rx.hits().iter().any(|h| h.path == "/ok/second") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Worker A stalls mid-step: alive (so not "certainly dead"), but silent.
    a.signal("STOP");
    let stalled_at = Instant::now();
    let mut b = project.worker().await;
    let store_db = project.path().join("plumb.db");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = project.run(&["runs", "show", &run_id, "--json"]).await;
        let doc: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        if doc["run"]["status"] == "succeeded" {
            assert_eq!(doc["run"]["claims"], 2, "a second claim finished it");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not finished by worker B: {doc} ({})",
            store_db.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stalled_at.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "B waited for the 3 s lease to expire (took {took:?})"
    );
    // A wakes up: its late outcome for `second` is fenced off, so it neither
    // overwrites B's journal nor sends `third` again.
    a.signal("CONT");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let count = |p: &str| rx.hits().iter().filter(|h| h.path == p).count();
    assert_eq!(count("/ok/first"), 1);
    assert_eq!(
        count("/ok/second"),
        2,
        "the step in flight at the stall was re-sent once"
    );
    assert_eq!(count("/ok/third"), 1, "nothing after it ran twice");
    let keys: HashSet<_> = rx
        .hits()
        .iter()
        .filter(|h| h.path == "/ok/second")
        .map(|h| h.key.clone())
        .collect();
    assert_eq!(keys.len(), 1, "with the same key");
    let _ = b.start_kill();
    a.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_slot_never_fires_twice_across_restarts_or_two_schedulers() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http: {{ base_url: {} }}\n",
        rx.base_url
    ));
    project.workflow(
        "tick",
        &format!(
            "name: tick\n{HEAD}trigger:\n  schedule: {{ cron: '* * * * * *', timezone: Europe/Berlin, catch_up: latest }}\nsteps:\n  - id: mark\n    http: {{ connection: rx, method: POST, path: /ok/tick, body: {{ slot: '${{{{ .trigger.slot }}}}' }} }}\n"
        ),
    );
    // Two schedulers on one store, firing every second.
    let a = project.serve("127.0.0.1:0").await;
    let b = project.serve("127.0.0.1:0").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    a.kill().await;
    // Downtime for the remaining one too: several slots are missed.
    b.kill().await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let c = project.serve("127.0.0.1:0").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let base = c.base_url.clone();
    c.kill().await;
    let _ = base;

    let slots: Vec<i64> = rx
        .hits()
        .iter()
        .filter_map(|h| h.body["slot"].as_i64())
        .collect();
    let unique: HashSet<i64> = slots.iter().copied().collect();
    let keys: HashSet<_> = rx.hits().iter().map(|h| h.key.clone()).collect();
    assert_eq!(keys.len(), unique.len(), "one run per slot: {slots:?}");
    assert!(
        unique.len() >= 5,
        "slots fired before and after the restart: {slots:?}"
    );
    // catch_up: latest fires one run for the whole downtime, not one per
    // missed second: the gap between consecutive fired slots shows it.
    let mut sorted: Vec<i64> = unique.into_iter().collect();
    sorted.sort_unstable();
    let gaps: Vec<i64> = sorted.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().any(|g| *g >= 2000),
        "a gap for the downtime: {gaps:?}"
    );
    assert!(
        gaps.iter().all(|g| *g % 1000 == 0),
        "slots are whole seconds: {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_interrupted_by_a_crash_resume_on_the_next_start() {
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http: {{ base_url: {} }}\n",
        rx.base_url
    ));
    project.workflow(
        "two",
        &format!(
            "name: two\n{HEAD}trigger:\n  webhook: {{ path: two }}\nsteps:\n  - id: first\n    http: {{ connection: rx, path: /ok/first }}\n  - id: nap\n    sleep: 2s\n  - id: second\n    http: {{ connection: rx, path: /ok/second }}\n"
        ),
    );
    let a = project.serve("127.0.0.1:0").await;
    let (_, body) = post_json(&format!("{}/hooks/two", a.base_url), &json!({})).await;
    let run_id = body["run_id"].as_str().expect("id").to_owned();
    while rx.hits().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill().await;
    let started = Instant::now();
    let b = project.serve("127.0.0.1:0").await;
    let done = wait_run(&b.base_url, &run_id, Duration::from_secs(10)).await;
    assert_eq!(done["run"]["status"], "succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "taken over at once (the old process is certainly dead), not after the 30 s lease"
    );
    let paths: Vec<String> = rx.hits().iter().map(|h| h.path.clone()).collect();
    assert_eq!(
        paths,
        vec!["/ok/first", "/ok/second"],
        "the first step is not redone"
    );
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_ended_runs_and_survives_a_sigkill_mid_purge_on_sqlite() {
    support::retention_purges_old_runs_through_a_sigkill("").await;
}
