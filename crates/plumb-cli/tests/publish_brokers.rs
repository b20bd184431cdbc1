//! The `publish` step on RabbitMQ (`PLUMB_TEST_AMQP`), MQTT
//! (`PLUMB_TEST_MQTT`) and NATS JetStream (`PLUMB_TEST_NATS`), with the real
//! binary and brokers: every message of a `for_each` arrives, each with its
//! idempotency key (as a header / user property, and as the AMQP
//! `message_id` / the JetStream `Nats-Msg-Id`); a step re-sent after a crash
//! between its effect and its journal (the `step.effect` failpoint) carries
//! the same key, and JetStream's duplicate window drops the re-send.

#![allow(clippy::print_stderr)] // a skipped test says why

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use support::Project;

const ITEMS: usize = 200;

fn env_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: set {var} to run this broker's publish test");
            None
        }
    }
}

/// A project with the broker connection (URL kept as a secret) and two
/// workflows: `emit` publishes ITEMS messages to `to`, `once` publishes
/// one message `{"n": "once"}`.
async fn project(kind: &str, url: &str, to: &str) -> Project {
    let project = Project::new(&format!(
        "connections:\n  bus:\n    {kind}: {{ url: {{ secret: bus_url }}, timeout: 5s }}\n"
    ));
    project.workflow(
        "emit",
        &format!(
            "name: emit\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: items\n    jq: '[range(0; {ITEMS}) | {{n: .}}]'\n  - id: send\n    for_each: '${{{{ .steps.items }}}}'\n    concurrency: 4\n    publish: {{ connection: bus, to: '{to}', body: '${{{{ .item }}}}', headers: {{ kind: order }} }}\n"
        ),
    );
    project.workflow(
        "once",
        &format!(
            "name: once\nowner: qa@example.com\ndescription: d\nsteps:\n  - id: send\n    publish: {{ connection: bus, to: '{to}', body: {{ n: once }} }}\n"
        ),
    );
    let set = project.set_secret("bus_url", url).await;
    assert_eq!(set.code, Some(0), "{set}");
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    project
}

/// Runs `once` with the process aborted right after the publish and
/// before its outcome is journaled, then resumes it: the message is sent
/// twice with one key. Returns the run id.
async fn publish_twice_with_one_key(project: &Project) -> String {
    let started = project
        .cmd(&["run", "once"])
        .env("PLUMB_FAILPOINT", "step.effect")
        .output()
        .await
        .expect("plumb run");
    assert!(!started.status.success(), "the failpoint aborted it");
    let stdout = String::from_utf8_lossy(&started.stdout);
    let stderr = String::from_utf8_lossy(&started.stderr);
    let run_id = support::run_id_of(&format!("{stdout}{stderr}"));
    let resumed = project.run(&["run", "--resume", &run_id]).await;
    assert_eq!(resumed.code, Some(0), "{resumed}");
    run_id
}

/// Checks ITEMS messages `{n}` arrived, each n under exactly one key that
/// names its run and item.
fn every_item_once_by_key(received: &[(serde_json::Value, String)], run_id: &str) {
    let mut keys: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (body, key) in received {
        if let Some(n) = body["n"].as_u64() {
            keys.entry(n).or_default().insert(key.clone());
        }
    }
    assert_eq!(keys.len(), ITEMS, "every message arrived");
    for (n, k) in &keys {
        assert_eq!(k.len(), 1, "message {n}: one key, {k:?}");
        let key = k.iter().next().expect("one");
        assert_eq!(
            key,
            &format!("{run_id}:send:{n}"),
            "the key names run, step and item"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_messages_carry_their_key_and_a_resend_keeps_it() {
    let Some(url) = env_url("PLUMB_TEST_AMQP") else {
        return;
    };
    let queue = format!("plumb-test-pub-{}", std::process::id());
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("declare");
    let project = project("amqp", &url, &queue).await;
    let out = project.run(&["run", "emit"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&format!("{}{}", out.stdout, out.stderr));
    let once_id = publish_twice_with_one_key(&project).await;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut received = Vec::new();
    let mut once = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        let body: serde_json::Value = serde_json::from_slice(&d.data).expect("JSON body");
        let header = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("plumb-idempotency-key").cloned())
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .expect("the key header");
        let message_id = d.properties.message_id().as_ref().map(ToString::to_string);
        assert_eq!(
            message_id.as_deref(),
            Some(header.as_str()),
            "message_id is the key"
        );
        assert_eq!(d.properties.delivery_mode(), &Some(2), "persistent");
        if body["n"] == "once" {
            once.push(header);
        } else {
            received.push((body, header));
        }
    }
    every_item_once_by_key(&received, &run_id);
    assert_eq!(once.len(), 2, "at least once: the re-send arrived too");
    assert!(
        once.iter().all(|k| k == &format!("{once_id}:send")),
        "with one key: {once:?}"
    );
    let _ = ch
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_carry_their_key_and_a_resend_keeps_it() {
    let Some(url) = env_url("PLUMB_TEST_MQTT") else {
        return;
    };
    let topic = format!("plumb-test/{}/published", std::process::id());
    let parsed = url::Url::parse(&url).expect("url");
    let options = rumqttc::MqttOptions::new(
        format!("plumb-test-sub-{}", std::process::id()),
        (
            parsed.host_str().expect("host").to_owned(),
            parsed.port().unwrap_or(1883),
        ),
    );
    let (client, mut events) = rumqttc::AsyncClient::builder(options)
        .capacity(1024)
        .build();
    client
        .subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = tx.send(rumqttc::Publish::new(
                        "",
                        rumqttc::QoS::AtMostOnce,
                        "",
                        None,
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    // Subscribed before anything is published.
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("suback");
    assert!(first.is_some());
    let project = project("mqtt", &url, &topic).await;
    let out = project.run(&["run", "emit"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&format!("{}{}", out.stdout, out.stderr));
    let once_id = publish_twice_with_one_key(&project).await;
    let mut received = Vec::new();
    let mut once = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        let body: serde_json::Value = serde_json::from_slice(&p.payload).expect("JSON body");
        let key = p
            .properties
            .as_ref()
            .and_then(|props| {
                props
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == "plumb-idempotency-key")
                    .map(|(_, v)| v.clone())
            })
            .expect("the key user property");
        if body["n"] == "once" {
            once.push(key);
        } else {
            received.push((body, key));
        }
    }
    listener.abort();
    every_item_once_by_key(&received, &run_id);
    assert_eq!(once.len(), 2, "at least once: the re-send arrived too");
    assert!(
        once.iter().all(|k| k == &format!("{once_id}:send")),
        "with one key: {once:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_messages_carry_their_key_and_jetstream_drops_the_resend() {
    let Some(url) = env_url("PLUMB_TEST_NATS") else {
        return;
    };
    let subject = format!("plumb-test.{}.published", std::process::id());
    let stream_name = subject.replace('.', "_");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let _ = js.delete_stream(&stream_name).await;
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("stream");
    let project = project("nats", &url, &subject).await;
    let out = project.run(&["run", "emit"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let run_id = support::run_id_of(&format!("{}{}", out.stdout, out.stderr));
    let once_id = publish_twice_with_one_key(&project).await;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    let mut received = Vec::new();
    let mut once = Vec::new();
    while let Some(Ok(m)) = messages.next().await {
        let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON body");
        let headers = m.headers.clone().expect("headers");
        let key = headers
            .get("plumb-idempotency-key")
            .expect("key header")
            .to_string();
        let msg_id = headers.get("Nats-Msg-Id").expect("Nats-Msg-Id").to_string();
        assert_eq!(msg_id, key, "the server dedupes by the key");
        if body["n"] == "once" {
            once.push(key);
        } else {
            received.push((body, key));
        }
    }
    every_item_once_by_key(&received, &run_id);
    assert_eq!(
        once,
        vec![format!("{once_id}:send")],
        "the re-send was dropped by the server"
    );
    let shown = project.run(&["runs", "show", &once_id, "--json"]).await;
    assert!(
        shown.stdout.contains("\"already_published\": true")
            || shown.stdout.contains("\"already_published\":true"),
        "{shown}"
    );
    let _ = js.delete_stream(&stream_name).await;
}
