//! Trigger dedupe with the real binary: a second delivery of one event is
//! answered `200 {"duplicate_of"}` and runs nothing, also when deliveries
//! race each other and the server is SIGKILLed and restarted under them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Project, Receiver, free_port, post_json, wait_run};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

fn project(rx: &Receiver) -> Project {
    let project = Project::new(&format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      timeout: 10s\ndefaults:\n  retry: {{ attempts: 5, initial: 100ms, max: 1s }}\n",
        rx.base_url
    ));
    project.workflow(
        "events",
        &format!(
            "name: events\n{HEAD}trigger:\n  webhook:\n    path: events\n    dedupe: {{ key: '${{{{ .trigger.body.event_id }}}}', window: 7d }}\nsteps:\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/events, body: '${{{{ .trigger.body }}}}' }}\n"
        ),
    );
    project
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_delivery_of_an_event_is_answered_duplicate_of_and_runs_nothing() {
    let rx = Receiver::start().await;
    let project = project(&rx);
    let server = project.serve("127.0.0.1:0").await;
    let base = server.base_url.clone();
    let hook = format!("{base}/hooks/events");

    let (status, first) = post_json(&hook, &json!({"event_id": "e-1", "n": 1})).await;
    assert_eq!(status, 202, "{first}");
    let run_id = first["run_id"].as_str().expect("run id").to_owned();
    let (status, again) = post_json(&hook, &json!({"event_id": "e-1", "n": 2})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"duplicate_of": run_id}));
    // Another event, and one without a key (it cannot be deduplicated, so
    // it runs: a possible duplicate beats a lost event).
    let (status, other) = post_json(&hook, &json!({"event_id": "e-2"})).await;
    assert_eq!(status, 202, "{other}");
    let (status, keyless) = post_json(&hook, &json!({"n": 3})).await;
    assert_eq!(status, 202, "{keyless}");
    wait_run(&base, &run_id, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.hits().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<_> = rx.hits().iter().map(|h| h.body["n"].clone()).collect();
    assert_eq!(rx.hits().len(), 3, "{ids:?}");
    assert!(!ids.contains(&json!(2)), "the duplicate never ran: {ids:?}");
    assert_eq!(server.stop().await, Some(0));
}

/// Sends `event` until it gets a final answer (202 or 200), through
/// refusals and a server that is down; returns the run it names.
async fn deliver(hook: &str, event: u32) -> (u16, String) {
    let client = support::http();
    let body = json!({"event_id": format!("evt-{event}"), "n": event});
    loop {
        let sent = client
            .post(hook)
            .timeout(Duration::from_secs(5))
            .json(&body)
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status().as_u16();
            let answer: serde_json::Value = response.json().await.unwrap_or_default();
            match status {
                202 => return (202, answer["run_id"].as_str().unwrap_or("").to_owned()),
                200 => {
                    return (
                        200,
                        answer["duplicate_of"].as_str().unwrap_or("").to_owned(),
                    );
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_deliveries_through_sigkills_start_exactly_one_run_per_event() {
    const EVENTS: u32 = 1000;
    let rx = Receiver::start().await;
    let project = project(&rx);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = project.serve(&listen).await;
    let hook = format!("{}/hooks/events", server.base_url);

    // Every event twice (2,000 deliveries of 1,000 events), 32 senders at
    // once.
    let mut deliveries = Vec::new();
    for event in 0..EVENTS {
        deliveries.push(event);
        deliveries.push(event);
    }
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(deliveries));
    let answers = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut senders = Vec::new();
    for _ in 0..32 {
        let (queue, answers, hook) = (queue.clone(), answers.clone(), hook.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let Some(event) = queue.lock().await.pop() else {
                    return;
                };
                let answer = deliver(&hook, event).await;
                answers.lock().await.push((event, answer));
            }
        }));
    }
    // Five SIGKILLs of the server while they send (spread over the
    // sending), each followed by a restart on the same address.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill().await;
        server = project.serve(&listen).await;
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    let answers = answers.lock().await.clone();
    assert_eq!(answers.len(), 2 * EVENTS as usize);
    let duplicates = answers.iter().filter(|(_, (code, _))| *code == 200).count();
    assert!(
        duplicates >= EVENTS as usize,
        "each event's second delivery (at least) is answered duplicate_of: {duplicates}"
    );

    // Every answer for one event names the same run, and each event was
    // accepted at least once (202) or found to be a duplicate of an
    // acceptance whose answer was lost with a killed server.
    let mut named: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (event, (_, run)) in &answers {
        assert!(!run.is_empty(), "event {event} got an answer naming no run");
        named.entry(*event).or_default().insert(run.clone());
    }
    for (event, runs) in &named {
        assert_eq!(
            runs.len(),
            1,
            "event {event} was answered with two runs: {runs:?}"
        );
    }

    // The runs that executed: one per event, the one the answers named.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: BTreeSet<String> = rx.hits().iter().filter_map(|h| h.key.clone()).collect();
        if seen.len() >= EVENTS as usize || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ran: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for hit in rx.hits() {
        let run = hit
            .key
            .as_deref()
            .and_then(|k| k.split(':').next())
            .unwrap_or("")
            .to_owned();
        let event = hit.body["event_id"].as_str().unwrap_or("").to_owned();
        ran.entry(event).or_default().insert(run);
    }
    assert_eq!(ran.len(), EVENTS as usize, "every event ran");
    for (event, runs) in &ran {
        assert_eq!(runs.len(), 1, "{event} ran as two runs: {runs:?}");
        let n: u32 = event
            .trim_start_matches("evt-")
            .parse()
            .expect("event number");
        assert_eq!(
            runs.iter().next(),
            named[&n].iter().next(),
            "{event} ran as the run its answers named"
        );
    }
    server.kill().await;
}
