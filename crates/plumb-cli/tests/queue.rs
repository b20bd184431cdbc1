//! Queue triggers with the real brokers and the real binary (SPEC G1, G5):
//! RabbitMQ (`PLUMB_TEST_AMQP`), Mosquitto (`PLUMB_TEST_MQTT`), NATS
//! JetStream (`PLUMB_TEST_NATS`) and Redis Streams (`PLUMB_TEST_REDIS`).
//!
//! For each broker: 5,000 messages are published while `plumb serve` is
//! SIGKILLed and restarted 5 times; every message's run POSTs it to a
//! counting receiver, which must see every message with exactly one
//! idempotency key (re-sends of an interrupted step carry the same key),
//! and the broker must hold nothing unacknowledged at the end. Then the
//! store is locked: messages published meanwhile are not acknowledged (a
//! SIGKILL while it is locked leaves them all with the broker) and all
//! run once it is free. A message that is not JSON is a failed run (a
//! dead letter) with its raw payload.

#![allow(clippy::print_stderr)] // a skipped test says why

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Project, Receiver, Server, get_json};

/// Messages of the crash phase.
const MESSAGES: usize = 5000;
/// SIGKILLs during it.
const KILLS: usize = 5;
/// Messages published while the store is locked.
const BLOCKED: usize = 50;

fn env_url(var: &str, example: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: set {var} (e.g. {example}) to run this broker's queue test");
            None
        }
    }
}

/// A broker under test: how plumb reaches it, how the test publishes to it
/// and what it still holds.
enum Broker {
    Redis { url: String, stream: String },
    Amqp { url: String, queue: String },
    Mqtt { url: String, topic: String },
    Nats { url: String, subject: String },
}

/// A connected publisher (the connection and event loop it holds keep it
/// open).
enum Producer {
    Redis(redis::aio::MultiplexedConnection, String),
    Amqp {
        _connection: lapin::Connection,
        channel: lapin::Channel,
        queue: String,
    },
    Mqtt {
        client: rumqttc::AsyncClient,
        _events: tokio::task::JoinHandle<()>,
        topic: String,
    },
    Nats(async_nats::jetstream::Context, String),
}

impl Broker {
    fn kind(&self) -> &'static str {
        match self {
            Self::Redis { .. } => "redis",
            Self::Amqp { .. } => "amqp",
            Self::Mqtt { .. } => "mqtt",
            Self::Nats { .. } => "nats",
        }
    }

    fn url(&self) -> &str {
        match self {
            Self::Redis { url, .. }
            | Self::Amqp { url, .. }
            | Self::Mqtt { url, .. }
            | Self::Nats { url, .. } => url,
        }
    }

    /// The trigger's source field.
    fn source(&self) -> String {
        match self {
            Self::Redis { stream, .. } => format!("stream: {stream}"),
            Self::Amqp { queue, .. } => format!("queue: {queue}, declare: true"),
            Self::Mqtt { topic, .. } => format!("topic: {topic}"),
            Self::Nats { subject, .. } => format!("subject: {subject}, declare: true"),
        }
    }

    /// Declares what must exist before anything is published (an AMQP
    /// queue, a JetStream stream), emptied.
    async fn prepare(&self) {
        match self {
            Self::Redis { url, stream } => {
                let mut c = redis_conn(url).await;
                let _: () = redis::cmd("DEL")
                    .arg(stream)
                    .query_async(&mut c)
                    .await
                    .expect("DEL");
            }
            Self::Amqp { url, queue } => {
                let (_c, ch) = amqp(url).await;
                let _ = ch
                    .queue_delete(
                        queue.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
                ch.queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions::durable(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("declare");
            }
            Self::Mqtt { .. } => {}
            Self::Nats { url, subject } => {
                let js = nats(url).await;
                let _ = js.delete_stream(stream_of(subject)).await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: stream_of(subject),
                    subjects: vec![subject.clone()],
                    ..Default::default()
                })
                .await
                .expect("create stream");
            }
        }
    }

    async fn producer(&self) -> Producer {
        match self {
            Self::Redis { url, stream } => Producer::Redis(redis_conn(url).await, stream.clone()),
            Self::Amqp { url, queue } => {
                let (c, ch) = amqp(url).await;
                ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await
                    .expect("confirm mode");
                Producer::Amqp {
                    _connection: c,
                    channel: ch,
                    queue: queue.clone(),
                }
            }
            Self::Mqtt { url, topic } => {
                let (client, task) =
                    mqtt_client(url, &format!("plumb-test-pub-{}", std::process::id()), true).await;
                Producer::Mqtt {
                    client,
                    _events: task,
                    topic: topic.clone(),
                }
            }
            Self::Nats { url, subject } => Producer::Nats(nats(url).await, subject.clone()),
        }
    }

    /// Messages the broker still holds for plumb's consumer (taken and not
    /// acknowledged, or not yet taken), where the broker can say.
    async fn outstanding(&self, group: &str) -> Option<u64> {
        match self {
            Self::Redis { url, stream } => {
                let mut c = redis_conn(url).await;
                let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(stream)
                    .query_async(&mut c)
                    .await
                    .ok()?;
                let g = groups.iter().find(|g| {
                    matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes())
                })?;
                let int = |v: Option<&redis::Value>| match v {
                    Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                    _ => 0,
                };
                Some(int(g.get("pending")) + int(g.get("lag")))
            }
            Self::Amqp { url, queue } => {
                let (_c, ch) = amqp(url).await;
                let q = ch
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .ok()?;
                Some(u64::from(q.message_count()))
            }
            Self::Mqtt { .. } => None,
            Self::Nats { url, subject } => {
                let js = nats(url).await;
                let stream = js.get_stream(stream_of(subject)).await.ok()?;
                let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                    stream.get_consumer(group).await.ok()?;
                let info = consumer.info().await.ok()?;
                Some(u64::try_from(info.num_ack_pending).unwrap_or(0) + info.num_pending)
            }
        }
    }

    async fn cleanup(&self) {
        match self {
            Self::Redis { url, stream } => {
                let mut c = redis_conn(url).await;
                let _: Result<(), _> = redis::cmd("DEL").arg(stream).query_async(&mut c).await;
            }
            Self::Amqp { url, queue } => {
                let (_c, ch) = amqp(url).await;
                let _ = ch
                    .queue_delete(
                        queue.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
            Self::Mqtt { url, topic } => {
                // End the persistent session plumb's consumer left (its
                // client id is the group and 8 hex digits of the topic's
                // SHA-256).
                let group = format!("plumb-q-{}", std::process::id());
                let id = format!("{group}-{}", &sha256_hex(topic)[..8]);
                let (client, task) = mqtt_client(url, &id, true).await;
                let _ = client.disconnect().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                task.abort();
            }
            Self::Nats { url, subject } => {
                let js = nats(url).await;
                let _ = js.delete_stream(stream_of(subject)).await;
            }
        }
    }
}

impl Producer {
    /// Publishes one message and waits for the broker to have it.
    async fn send(&self, body: &[u8]) {
        match self {
            Self::Redis(c, stream) => {
                let mut c = c.clone();
                let _: String = redis::cmd("XADD")
                    .arg(stream)
                    .arg("*")
                    .arg("body")
                    .arg(body)
                    .query_async(&mut c)
                    .await
                    .expect("XADD");
            }
            Self::Amqp { channel, queue, .. } => {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        lapin::options::BasicPublishOptions::default(),
                        body,
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                assert!(confirm.is_ack());
            }
            Self::Mqtt { client, topic, .. } => {
                let notice = client
                    .publish_tracked(
                        topic.clone(),
                        body.to_vec(),
                        rumqttc::PublishOptions::new(rumqttc::QoS::AtLeastOnce),
                    )
                    .await
                    .expect("publish");
                notice.wait_async().await.expect("PUBACK");
            }
            Self::Nats(js, subject) => {
                js.publish(subject.clone(), bytes::Bytes::copy_from_slice(body))
                    .await
                    .expect("publish")
                    .await
                    .expect("stream ack");
            }
        }
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn stream_of(subject: &str) -> String {
    subject.replace(['.', '*', '>'], "_")
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

async fn amqp(url: &str) -> (lapin::Connection, lapin::Channel) {
    let c = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = c.create_channel().await.expect("channel");
    (c, ch)
}

async fn nats(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.expect("nats"))
}

async fn mqtt_client(
    url: &str,
    id: &str,
    clean: bool,
) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    let parsed = url::Url::parse(url).expect("mqtt url");
    let mut options = rumqttc::MqttOptions::new(
        id,
        (
            parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
            parsed.port().unwrap_or(1883),
        ),
    );
    options.set_clean_start(clean);
    let (client, mut events) = rumqttc::AsyncClient::builder(options)
        .capacity(1024)
        .build();
    let task = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    (client, task)
}

/// The project: the broker connection (its URL a secret), a queue-triggered
/// workflow that POSTs each message's body to the receiver.
async fn project_for(broker: &Broker, rx: &Receiver) -> Project {
    let project = Project::new(&format!(
        "connections:\n  bus:\n    {}: {{ url: {{ secret: bus_url }}, timeout: 5s }}\n  sink:\n    http: {{ base_url: '{}' }}\nserve:\n  workers: 8\n  lease: 5s\n",
        broker.kind(),
        rx.base_url
    ));
    let group = format!("plumb-q-{}", std::process::id());
    project.workflow(
        "consume",
        &format!(
            "name: consume\nowner: qa@example.com\ndescription: d\ntrigger:\n  queue: {{ connection: bus, {}, group: {group}, prefetch: 64 }}\nsteps:\n  - id: deliver\n    http: {{ connection: sink, method: POST, path: /ok/q, body: '${{{{ .trigger.message.body }}}}' }}\n",
            broker.source()
        ),
    );
    let set = project.set_secret("bus_url", broker.url()).await;
    assert_eq!(set.code, Some(0), "{set}");
    let check = project.run(&["check"]).await;
    assert_eq!(check.code, Some(0), "{check}");
    project
}

/// Waits until the consumer reports itself connected in the API.
async fn wait_connected(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) =
            support::try_get_json(&format!("{}/api/v1/status", server.base_url)).await
            && status["connections"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["state"] == "connected"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "the consumer never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// For each message number seen by the receiver, the idempotency keys it
/// came with.
fn keys_by_message(rx: &Receiver) -> HashMap<u64, BTreeSet<String>> {
    let mut by: HashMap<u64, BTreeSet<String>> = HashMap::new();
    for hit in rx.hits() {
        if let Some(n) = hit.body["n"].as_u64() {
            by.entry(n)
                .or_default()
                .insert(hit.key.clone().unwrap_or_default());
        }
    }
    by
}

async fn wait_for(rx: &Receiver, from: u64, to: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let by = keys_by_message(rx);
        let missing = (from..to).filter(|n| !by.contains_key(n)).count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of messages {from}..{to} never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn every_message_runs_once_through_kills_and_a_locked_store(broker: Broker) {
    let rx = Receiver::start().await;
    broker.prepare().await;
    let project = project_for(&broker, &rx).await;
    let group = format!("plumb-q-{}", std::process::id());
    let mut server = project.serve("127.0.0.1:0").await;
    wait_connected(&server).await;

    // Phase 1: 5,000 messages while plumb is killed and restarted 5 times.
    let producer = broker.producer().await;
    // Mosquitto's defaults queue at most 1,000 messages for a client and
    // drop the rest (`max_queued_messages`): MQTT is published slowly
    // enough that a restart of plumb never lets 1,000 pile up.
    let pause = match broker {
        Broker::Mqtt { .. } => Duration::from_millis(120),
        _ => Duration::from_millis(40),
    };
    let publishing = tokio::spawn(async move {
        for n in 0..MESSAGES {
            producer
                .send(
                    json!({ "n": n, "name": format!("order {n}") })
                        .to_string()
                        .as_bytes(),
                )
                .await;
            if n % 100 == 99 {
                tokio::time::sleep(pause).await;
            }
        }
        producer
    });
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rand::random_range(700..1600))).await;
        server.kill().await;
        server = project.serve("127.0.0.1:0").await;
    }
    let producer = publishing.await.expect("publisher");
    wait_for(&rx, 0, MESSAGES as u64, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by = keys_by_message(&rx);
    let doubled: Vec<_> = by
        .iter()
        .filter(|(_, keys)| keys.len() != 1)
        .take(5)
        .collect();
    assert!(
        doubled.is_empty(),
        "messages that ran twice (two keys): {doubled:?}"
    );
    assert_eq!(by.len(), MESSAGES, "every message ran");
    if let Some(left) = broker.outstanding(&group).await {
        assert_eq!(left, 0, "nothing is left unacknowledged");
    }

    // Phase 2: the store is locked; messages are not acknowledged.
    let db = project.path().join("plumb.db");
    let mut locker = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\nc.execute('COMMIT')\n",
            db.to_str().expect("utf8"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(locker.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .expect("read");
    assert_eq!(line.trim(), "locked");
    let base = MESSAGES as u64;
    for n in base..base + BLOCKED as u64 {
        producer
            .send(json!({ "n": n }).to_string().as_bytes())
            .await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Killed while the store is locked: whatever it took is still the
    // broker's, since nothing was acknowledged.
    server.kill().await;
    drop(locker.stdin.take());
    let _ = locker.wait().await;
    let ran = keys_by_message(&rx).keys().filter(|n| **n >= base).count();
    assert_eq!(ran, 0, "no message ran while the store was locked");
    if let Some(left) = broker.outstanding(&group).await {
        assert_eq!(left, BLOCKED as u64, "the broker kept every message");
    }
    let server = project.serve("127.0.0.1:0").await;
    wait_for(&rx, base, base + BLOCKED as u64, Duration::from_secs(60)).await;

    // Phase 3: a message that is not JSON is a dead letter with its payload.
    producer.send(b"not json at all").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let list = get_json(&format!(
            "{}/api/v1/runs?workflow=consume&status=failed",
            server.base_url
        ))
        .await;
        if let Some(run) = list["runs"].as_array().and_then(|r| r.first()).cloned() {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter for the non-JSON message: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id = failed["id"].as_str().expect("id");
    let shown = get_json(&format!("{}/api/v1/runs/{id}", server.base_url)).await;
    assert_eq!(
        shown["run"]["trigger"]["message"]["raw"], "not json at all",
        "{shown}"
    );
    assert!(
        shown["run"]["failure"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{shown}"
    );
    let by = keys_by_message(&rx);
    assert!(by.values().all(|k| k.len() == 1), "still once each");
    server.kill().await;
    if let Some(left) = broker.outstanding(&group).await {
        assert_eq!(left, 0, "the dead letter was settled with the broker too");
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_every_message_runs_once_through_kills_and_a_locked_store() {
    let Some(url) = env_url("PLUMB_TEST_REDIS", "redis://127.0.0.1:6379") else {
        return;
    };
    let stream = format!("plumb-test-q-{}", std::process::id());
    every_message_runs_once_through_kills_and_a_locked_store(Broker::Redis { url, stream }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_every_message_runs_once_through_kills_and_a_locked_store() {
    let Some(url) = env_url("PLUMB_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f") else {
        return;
    };
    let queue = format!("plumb-test-q-{}", std::process::id());
    every_message_runs_once_through_kills_and_a_locked_store(Broker::Amqp { url, queue }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_every_message_runs_once_through_kills_and_a_locked_store() {
    let Some(url) = env_url("PLUMB_TEST_MQTT", "mqtt://127.0.0.1:1883") else {
        return;
    };
    let topic = format!("plumb-test/{}/orders", std::process::id());
    every_message_runs_once_through_kills_and_a_locked_store(Broker::Mqtt { url, topic }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_every_message_runs_once_through_kills_and_a_locked_store() {
    let Some(url) = env_url("PLUMB_TEST_NATS", "nats://127.0.0.1:4222") else {
        return;
    };
    let subject = format!("plumb-test.{}.orders", std::process::id());
    every_message_runs_once_through_kills_and_a_locked_store(Broker::Nats { url, subject }).await;
}

#[tokio::test]
async fn check_names_the_field_a_queue_trigger_needs_for_its_broker() {
    let project = Project::new(
        "connections:\n  rabbit:\n    amqp: { url: 'amqp://app@rabbit.example:5672/%2f' }\n  cache:\n    redis: { url: 'redis://127.0.0.1:6379' }\n  api:\n    http: { base_url: 'https://api.example' }\n",
    );
    project.workflow(
        "wrong-field",
        "name: wrong-field\nowner: qa@example.com\ndescription: d\ntrigger:\n  queue: { connection: rabbit, topic: orders }\nsteps:\n  - id: a\n    jq: '.'\n",
    );
    project.workflow(
        "no-source",
        "name: no-source\nowner: qa@example.com\ndescription: d\ntrigger:\n  queue: { connection: cache, prefetch: 5000 }\nsteps:\n  - id: a\n    jq: '.'\n",
    );
    project.workflow(
        "not-a-broker",
        "name: not-a-broker\nowner: qa@example.com\ndescription: d\ntrigger:\n  queue: { connection: api, queue: orders, record_key: '${{ .trigger.message.body.id }}' }\nsteps:\n  - id: a\n    jq: '.'\n",
    );
    let out = project.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "`topic` does not apply to amqp connections",
        "name what to read with `queue:`",
        "`stream` is missing",
        "`prefetch` must be between 1 and 1000",
        "a queue trigger reads from a broker connection",
    ] {
        assert!(out.stderr.contains(expected), "{expected:?} in {out}");
    }
}

#[tokio::test]
async fn check_refuses_a_password_in_a_broker_url_without_echoing_it() {
    for (kind, url) in [
        ("amqp", "amqp://app:hunter2@rabbit.example:5672/%2f"),
        ("mqtt", "mqtt://app:hunter2@mqtt.example:1883"),
        ("nats", "nats://app:hunter2@nats.example:4222"),
    ] {
        let project = Project::new(&format!(
            "connections:\n  bus:\n    {kind}: {{ url: '{url}' }}\n"
        ));
        let out = project.run(&["check"]).await;
        assert_eq!(out.code, Some(1), "{kind}: {out}");
        assert!(
            out.stderr.contains("the URL holds a password"),
            "{kind}: {out}"
        );
        assert!(!out.stderr.contains("hunter2"), "{kind}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_shows_as_reconnecting_with_its_error_and_no_password() {
    // Nothing listens on this port.
    let port = support::free_port();
    let project = Project::new(
        "connections:\n  rabbit:\n    amqp: { url: { secret: rabbit_url }, timeout: 2s }\n",
    );
    project.workflow(
        "orders",
        "name: orders\nowner: qa@example.com\ndescription: d\ntrigger:\n  queue: { connection: rabbit, queue: orders }\nsteps:\n  - id: a\n    jq: '.'\n",
    );
    let set = project
        .set_secret(
            "rabbit_url",
            &format!("amqp://app:hunter2-canary@127.0.0.1:{port}/%2f"),
        )
        .await;
    assert_eq!(set.code, Some(0), "{set}");
    let server = project.serve("127.0.0.1:0").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let connection = loop {
        let status = get_json(&format!("{}/api/v1/status", server.base_url)).await;
        if let Some(c) = status["connections"]
            .as_array()
            .and_then(|c| c.first())
            .filter(|c| c["state"] == "reconnecting")
        {
            break c.clone();
        }
        assert!(
            Instant::now() < deadline,
            "never reported reconnecting: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(connection["connection"], "rabbit");
    assert_eq!(connection["workflow"], "orders");
    assert!(connection["since"].as_i64().is_some(), "{connection}");
    let error = connection["last_error"].as_str().expect("last error");
    assert!(error.contains("rabbit"), "{error}");
    assert!(
        !error.contains("hunter2"),
        "the password never shows: {error}"
    );
    let metrics = loop {
        let m = support::metrics(&server.base_url).await;
        if m.contains("plumb_broker_connected") {
            break m;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "no connection gauge: {m}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("plumb_broker_connected{")
                && l.contains("connection=\"rabbit\"")
                && l.ends_with(" 0")),
        "{metrics}"
    );
    // `plumb status` read from the store shows it from the heartbeat.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = project
        .cmd(&["status", "--json"])
        .env_remove("PLUMB_TOKEN")
        .output()
        .await
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "{text}");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert!(
        doc["connections"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["connection"] == "rabbit" && c["state"] == "reconnecting")),
        "{doc}"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_entry_with_a_field_name_that_is_not_utf8_does_not_stall_the_stream() {
    let Some(url) = env_url("PLUMB_TEST_REDIS", "redis://127.0.0.1:6379") else {
        return;
    };
    let stream = format!("plumb-test-q-odd-{}", std::process::id());
    let broker = Broker::Redis {
        url: url.clone(),
        stream: stream.clone(),
    };
    broker.prepare().await;
    let rx = Receiver::start().await;
    let project = project_for(&broker, &rx).await;
    let mut c = redis_conn(&url).await;
    // Before plumb starts: the group reads them from the start.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&b"\xff\xfeodd"[..])
        .arg("x")
        .arg("body")
        .arg(r#"{"n": 1}"#)
        .query_async(&mut c)
        .await
        .expect("XADD odd");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("body")
        .arg(r#"{"n": 2}"#)
        .query_async(&mut c)
        .await
        .expect("XADD");
    let server = project.serve("127.0.0.1:0").await;
    wait_for(&rx, 1, 3, Duration::from_secs(30)).await;
    let odd = rx
        .hits()
        .into_iter()
        .find(|h| h.body["n"] == 1)
        .expect("n=1");
    assert!(odd.key.is_some());
    server.kill().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_stream_created_again_is_not_mistaken_for_messages_already_seen() {
    let Some(url) = env_url("PLUMB_TEST_NATS", "nats://127.0.0.1:4222") else {
        return;
    };
    let subject = format!("plumb-test.{}.again", std::process::id());
    let broker = Broker::Nats {
        url: url.clone(),
        subject: subject.clone(),
    };
    broker.prepare().await;
    let rx = Receiver::start().await;
    let project = project_for(&broker, &rx).await;
    let server = project.serve("127.0.0.1:0").await;
    wait_connected(&server).await;
    broker.producer().await.send(br#"{"n": 1}"#).await;
    wait_for(&rx, 1, 2, Duration::from_secs(30)).await;
    // The same stream name, numbering from 1 again: its first message has
    // the sequence the first one had.
    broker.prepare().await;
    broker.producer().await.send(br#"{"n": 2}"#).await;
    wait_for(&rx, 2, 3, Duration::from_secs(60)).await;
    server.kill().await;
    broker.cleanup().await;
}
