//! Publishes W9's messages to a broker as fast as it confirms them, so the
//! benchmark measures the consumer, not the producer.
//!
//! `bench-broker KIND URL TARGET N [PREFIX]` — KIND is `amqp` (TARGET: a
//! queue, declared durable), `mqtt` (a topic, QoS 1), `nats` (a subject;
//! its JetStream stream `w9_<subject>` is created) or `redis` (a stream).
//! Message i is `{"id": "<PREFIX>-<i>", "name": "name <i>", "email":
//! "User<i>@Example.com"}`. Up to WINDOW publishes are in flight at once;
//! the program returns once the broker has confirmed all N, printing one
//! JSON line `{published, seconds, per_s}`. N = `delete` removes TARGET
//! (the queue, stream or JetStream stream) instead.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;

/// Publishes awaiting their confirmation at once.
const WINDOW: usize = 512;

fn message(prefix: &str, i: usize) -> Vec<u8> {
    serde_json::json!({ "id": format!("{prefix}-{i}"), "name": format!("name {i}"), "email": format!("User{i}@Example.com") })
        .to_string()
        .into_bytes()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, url, target, n, rest @ ..] = args.as_slice() else {
        bail!("usage: bench-broker amqp|mqtt|nats|redis URL TARGET N [PREFIX]");
    };
    if n == "delete" {
        return delete(kind, url, target).await;
    }
    let n: usize = n.parse().context("N")?;
    let prefix = rest.first().cloned().unwrap_or_else(|| "w9".into());
    let started = Instant::now();
    match kind.as_str() {
        "redis" => redis_load(url, target, n, &prefix).await?,
        "amqp" => amqp_load(url, target, n, &prefix).await?,
        "mqtt" => mqtt_load(url, target, n, &prefix).await?,
        "nats" => nats_load(url, target, n, &prefix).await?,
        other => bail!("unknown broker kind {other}"),
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "published": n, "seconds": seconds, "per_s": n as f64 / seconds })
    );
    Ok(())
}

async fn redis_load(url: &str, stream: &str, n: usize, prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for j in i..(i + WINDOW).min(n) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("body")
                .arg(message(prefix, j))
                .ignore();
        }
        let () = pipe.query_async(&mut c).await?;
        i += WINDOW;
    }
    Ok(())
}

async fn amqp_load(url: &str, queue: &str, n: usize, prefix: &str) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        lapin::types::FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &message(prefix, i),
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("{prefix}-{i}").as_str().into()),
            )
            .await?;
        pending.push(confirm);
        while pending.len() >= WINDOW {
            let c = pending.next().await.context("confirm")??;
            anyhow::ensure!(c.is_ack(), "nack");
        }
    }
    while let Some(c) = pending.next().await {
        anyhow::ensure!(c?.is_ack(), "nack");
    }
    Ok(())
}

async fn mqtt_load(url: &str, topic: &str, n: usize, prefix: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url)?;
    let mut options = rumqttc::MqttOptions::new(
        format!("w9-load-{}", std::process::id()),
        (
            parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
            parsed.port().unwrap_or(1883),
        ),
    );
    options.set_keep_alive(30);
    let (client, mut events) = rumqttc::AsyncClient::builder(options)
        .capacity(WINDOW * 2)
        .build();
    let driver = tokio::spawn(async move {
        loop {
            if let Err(e) = events.poll().await {
                return e.to_string();
            }
        }
    });
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let notice = client
            .publish_tracked(
                topic.to_owned(),
                message(prefix, i),
                rumqttc::PublishOptions::new(rumqttc::QoS::AtLeastOnce),
            )
            .await?;
        pending.push(notice.wait_async());
        while pending.len() >= WINDOW {
            pending.next().await.context("puback")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    let _ = client.disconnect().await;
    driver.abort();
    Ok(())
}

async fn nats_load(url: &str, subject: &str, n: usize, prefix: &str) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: format!("w9_{}", subject.replace(['.', '*', '>'], "_")),
        subjects: vec![subject.to_owned()],
        ..Default::default()
    })
    .await?;
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let ack = js
            .publish(subject.to_owned(), message(prefix, i).into())
            .await?;
        pending.push(ack.into_future());
        while pending.len() >= WINDOW {
            pending.next().await.context("ack")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}

async fn delete(kind: &str, url: &str, target: &str) -> anyhow::Result<()> {
    match kind {
        "redis" => {
            let mut c = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            let () = redis::cmd("DEL").arg(target).query_async(&mut c).await?;
        }
        "amqp" => {
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.queue_delete(target.into(), lapin::options::QueueDeleteOptions::default())
                .await?;
        }
        "nats" => {
            let js = async_nats::jetstream::new(async_nats::connect(url).await?);
            js.delete_stream(format!("w9_{}", target.replace(['.', '*', '>'], "_")))
                .await?;
        }
        _ => {}
    }
    Ok(())
}
