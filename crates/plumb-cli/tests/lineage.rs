//! Record lineage with the real binary: a webhook run about order `ord-7`
//! retries a step, dead-letters on another, is hit by a duplicate delivery,
//! is replayed and succeeds; `plumb trace ord-7` and
//! `GET /api/v1/trace/ord-7` list all of it in order, and a step's own
//! `record_key` indexes each `for_each` item under its record.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Project, Receiver};

/// The event names of a trace, in order.
fn events(trace: &Value) -> Vec<String> {
    trace["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    let step = e["step_id"]
                        .as_str()
                        .map(|s| format!(" {s}"))
                        .unwrap_or_default();
                    format!("{}{step}", e["event"].as_str().unwrap_or("?"))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_status(base: &str, run_id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let doc = support::get_json(&format!("{base}/api/v1/runs/{run_id}")).await;
        let status = doc["run"]["status"].as_str().unwrap_or("?").to_owned();
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} is {status}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_follows_a_record_through_retry_dead_letter_dedupe_hit_and_replay() {
    let receiver = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let project = Project::new(&format!(
        "listen: {listen}\nconnections:\n  shop:\n    http: {{ base_url: '{}' }}\ndefaults:\n  retry: {{ attempts: 2, initial: 100ms, max: 1s }}\n",
        receiver.base_url
    ));
    project.workflow(
        "orders",
        "name: orders\nowner: qa@example.com\ndescription: d\ntrigger:\n  webhook:\n    path: orders\n    dedupe: '${{ .trigger.body.event_id }}'\n    record_key: '${{ .trigger.body.order_id }}'\nsteps:\n  - id: lines\n    for_each: '${{ .trigger.body.lines }}'\n    record_key: '${{ .item.sku }}'\n    jq: '.item.qty'\n  - id: send\n    http: { connection: shop, method: POST, path: /flaky/503/1 }\n  - id: confirm\n    http: { connection: shop, method: POST, path: /flaky/503/2 }\n",
    );
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    let server = project.serve(&listen).await;
    let base = format!("http://{listen}");
    let event = json!({"event_id": "e-1", "order_id": "ord-7", "lines": [{"sku": "sku-1", "qty": 2}, {"sku": "sku-2", "qty": 1}]});
    let (status, body) = support::post_json(&format!("{base}/hooks/orders"), &event).await;
    assert_eq!(status, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    // `confirm` fails twice: a dead letter.
    wait_for_status(&base, &run_id, "failed").await;
    // The sender delivers the same event again: no second run.
    let (status, again) = support::post_json(&format!("{base}/hooks/orders"), &event).await;
    assert_eq!(status, 200, "{again}");
    let replay = project.run(&["dlq", "replay", &run_id]).await;
    assert_eq!(replay.code, Some(0), "{replay}");
    wait_for_status(&base, &run_id, "succeeded").await;

    let out = project.run(&["trace", "ord-7", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let trace: Value = serde_json::from_str(&out.stdout).expect("json");
    let seen = events(&trace);
    let expected = [
        "accepted",
        "retry send",
        "succeeded send",
        "retry confirm",
        "failed confirm",
        "dead_letter",
        "dedupe_hit",
        "replayed",
        "succeeded confirm",
        "succeeded",
    ];
    let mut at = 0;
    for want in expected {
        let Some(i) = seen[at..].iter().position(|e| e == want) else {
            panic!("`{want}` missing after position {at} in {seen:?}");
        };
        at += i + 1;
    }
    let send = trace["events"]
        .as_array()
        .and_then(|es| {
            es.iter()
                .find(|e| e["event"] == "succeeded" && e["step_id"] == "send")
        })
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(send["effect"], "HTTP 200", "{send}");
    assert_eq!(send["idempotency_key"], format!("{run_id}:send"), "{send}");
    assert!(
        trace["events"]
            .as_array()
            .is_some_and(|es| es.iter().all(|e| e["run_id"] == run_id.as_str()))
    );

    // The same through the API, and the human form.
    let api = support::get_json(&format!("{base}/api/v1/trace/ord-7")).await;
    assert_eq!(events(&api), seen);
    let human = project.run(&["trace", "ord-7"]).await;
    assert!(human.stdout.contains("dead_letter"), "{human}");
    assert!(human.stdout.contains("replayed"), "{human}");

    // A step's own key: each item under its record.
    let item = project.run(&["trace", "sku-2", "--json"]).await;
    let item: Value = serde_json::from_str(&item.stdout).expect("json");
    let first = &item["events"][0];
    assert_eq!(
        (first["step_id"].as_str(), first["item"].as_u64()),
        (Some("lines"), Some(1)),
        "{item}"
    );
    let none = project.run(&["trace", "ord-8", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&none.stdout).expect("json")["events"],
        json!([])
    );
    server.kill().await;
}

#[tokio::test]
async fn a_record_key_must_be_an_expression_and_only_on_webhook_poll_or_steps() {
    let project = Project::new("");
    project.workflow(
        "bad",
        "name: bad\nowner: qa@example.com\ndescription: d\ntrigger:\n  schedule: { cron: '0 * * * *', record_key: '${{ .x }}' }\nsteps:\n  - id: a\n    record_key: fixed\n    jq: '1'\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("a schedule trigger has no record to name"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("`record_key` must be exactly one `${{ … }}` expression"),
        "{out}"
    );
}
