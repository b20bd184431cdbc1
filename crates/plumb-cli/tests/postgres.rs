//! The store on PostgreSQL with real processes (issue 9): one `plumb serve`
//! and several `plumb worker`s share one database while processes are
//! SIGKILLed and restarted and a worker is stopped past its lease.
//!
//! Needs `PLUMB_TEST_POSTGRES` (a database URL whose user may create
//! databases); each test creates its own database and drops it. Without
//! the variable the tests print why and pass.

#![allow(clippy::print_stderr)] // the summaries are the point of --nocapture

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;
use support::{Project, Receiver, Senders, get_json, post_json};

const HEAD: &str = "owner: qa@example.com\ndescription: test workflow\n";

/// A database of its own for one test, dropped at the end.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Option<Self> {
        let Ok(admin) = std::env::var("PLUMB_TEST_POSTGRES") else {
            eprintln!("skipped: set PLUMB_TEST_POSTGRES to a PostgreSQL URL to run this test");
            return None;
        };
        let name = format!("plumb_cli_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to PLUMB_TEST_POSTGRES");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin).expect("PLUMB_TEST_POSTGRES is a URL");
        url.set_path(&name);
        Some(Self {
            admin,
            name,
            url: url.to_string(),
        })
    }

    async fn drop(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}

/// One of the cluster's processes, restartable.
enum Proc {
    Serve(support::Server),
    Worker(tokio::process::Child),
}

impl Proc {
    fn pid(&self) -> u32 {
        let id = match self {
            Self::Serve(s) => s.child.id(),
            Self::Worker(c) => c.id(),
        };
        id.expect("running")
    }

    async fn kill(self) {
        match self {
            Self::Serve(s) => s.kill().await,
            Self::Worker(mut c) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}

fn signal(pid: u32, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill -{name} {pid}");
}

const EVENTS: usize = 5000;
const CONCURRENCY: usize = 16;
const KILLS: usize = 20;
const WORKERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_and_three_workers_on_postgres_deliver_every_event_once_by_key_through_twenty_sigkills()
 {
    let Some(db) = Database::create().await else {
        return;
    };
    let rx = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let project = Project::new(&format!(
        "store: {}\nlisten: {listen}\nconnections:\n  rx:\n    http: {{ base_url: {} }}\ndefaults:\n  retry: {{ attempts: 8, initial: 50ms, max: 500ms }}\nserve:\n  workers: 16\n  lease: 2s\n",
        db.url, rx.base_url
    ));
    project.workflow(
        "ingest",
        &format!(
            "name: ingest\n{HEAD}trigger:\n  webhook: {{ path: ingest }}\nsteps:\n  - id: shape\n    jq: '{{event: .trigger.body.event, n: .trigger.body.n}}'\n  - id: parts\n    jq: '[range(3) | {{part: .}}]'\n  - id: each\n    for_each: '${{{{ .steps.parts }}}}'\n    concurrency: 3\n    http: {{ connection: rx, method: POST, path: /ok/part, body: '${{{{ .item }}}}' }}\n  - id: deliver\n    http: {{ connection: rx, method: POST, path: /ok/deliver, body: '${{{{ .steps.shape }}}}' }}\n"
        ),
    );
    project.workflow(
        "tick",
        &format!(
            "name: tick\n{HEAD}trigger:\n  schedule: {{ cron: '* * * * * *', catch_up: latest }}\nsteps:\n  - id: mark\n    http: {{ connection: rx, method: POST, path: /ok/tick, body: {{ slot: '${{{{ .trigger.slot }}}}' }} }}\n"
        ),
    );
    let hook = format!("http://{listen}/hooks/ingest");
    let mut procs: Vec<Option<Proc>> = vec![Some(Proc::Serve(project.serve(&listen).await))];
    for _ in 0..WORKERS {
        procs.push(Some(Proc::Worker(project.worker().await)));
    }

    let senders = Senders::start(&hook, EVENTS, CONCURRENCY);

    // The killer: a random process is SIGKILLed and restarted at spread-out
    // points of the load. Halfway, one worker is stopped for longer than
    // its lease (another finishes its runs) and then woken: its stale
    // writes must be refused.
    let mut kills_of = [0usize; WORKERS + 1];
    for k in 0..KILLS {
        senders
            .wait_acked(EVENTS * (k + 1) / (KILLS + 2), Duration::from_secs(120))
            .await;
        let i = rand::random_range(0..procs.len());
        if let Some(p) = procs[i].take() {
            p.kill().await;
        }
        kills_of[i] += 1;
        procs[i] = Some(if i == 0 {
            Proc::Serve(project.serve(&listen).await)
        } else {
            Proc::Worker(project.worker().await)
        });
        if k == KILLS / 2 {
            let stalled = procs[WORKERS].as_ref().expect("running").pid();
            signal(stalled, "STOP");
            tokio::time::sleep(Duration::from_secs(5)).await;
            signal(stalled, "CONT");
        }
    }
    let refused = senders.refused.load(std::sync::atomic::Ordering::SeqCst);
    let acked = senders.finish().await;
    assert_eq!(acked.len(), EVENTS, "every event was acknowledged");

    // Drain: nothing queued or running anywhere.
    let base = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = get_json(&format!("{base}/api/v1/status")).await;
        let pending: u64 = status["workflows"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter(|w| w["name"] == "ingest")
                    .map(|w| w["queued"].as_u64().unwrap_or(0) + w["running"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(u64::MAX);
        if pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "runs still pending: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (missing, resent, unacked) = support::deliveries(&rx, &acked, "deliver");
    assert!(
        missing.is_empty(),
        "acknowledged events without their delivery: {missing:?}"
    );
    // Every part of every acknowledged run's for_each arrived too.
    let part_keys: HashSet<String> = rx
        .hits()
        .iter()
        .filter(|h| h.path.ends_with("/part"))
        .filter_map(|h| h.key.clone())
        .collect();
    let missing_parts: Vec<String> = acked
        .values()
        .flat_map(|run| (0..3).map(move |i| format!("{run}:each:{i}")))
        .filter(|k| !part_keys.contains(k))
        .collect();
    assert!(
        missing_parts.is_empty(),
        "for_each items without their delivery: {} (first {:?})",
        missing_parts.len(),
        missing_parts.first()
    );
    let failed = get_json(&format!("{base}/api/v1/runs?status=failed")).await;
    assert_eq!(
        failed["runs"].as_array().map(Vec::len),
        Some(0),
        "no run failed: {failed}"
    );

    // Each schedule slot fired once, whichever serve was up.
    let mut runs_of_slot: HashMap<i64, HashSet<String>> = HashMap::new();
    for h in rx.hits().iter().filter(|h| h.path.ends_with("/tick")) {
        if let (Some(slot), Some(key)) = (h.body["slot"].as_i64(), h.key.clone()) {
            runs_of_slot.entry(slot).or_default().insert(key);
        }
    }
    let doubled: Vec<_> = runs_of_slot
        .iter()
        .filter(|(_, runs)| runs.len() > 1)
        .collect();
    assert!(doubled.is_empty(), "slots fired twice: {doubled:?}");
    assert!(!runs_of_slot.is_empty(), "the schedule fired");

    // Every running process of the cluster is listed, live, in its role
    // (killed ones may still show until their last beat is 30 s old).
    let workers = project.run(&["workers", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&workers.stdout).expect("workers json");
    let listed: Vec<(u64, String)> = listed["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["pid"].as_u64().unwrap_or(0),
                w["role"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (i, p) in procs.iter().enumerate() {
        let pid = u64::from(p.as_ref().expect("running").pid());
        let role = if i == 0 { "serve" } else { "worker" };
        assert!(
            listed.contains(&(pid, role.to_owned())),
            "plumb workers lists {role} {pid}: {listed:?}"
        );
    }
    for p in procs.into_iter().flatten() {
        p.kill().await;
    }
    let verify = project.run(&["audit", "verify"]).await;
    assert_eq!(verify.code, Some(0), "audit verify: {verify}");

    eprintln!(
        "{EVENTS} events at c={CONCURRENCY} on PostgreSQL, {KILLS} SIGKILLs (serve {}, workers {:?}) and a worker stopped past its lease: every acked event and item delivered; {resent} in-flight re-sends with the same key; {refused} refused/aborted sends retried; {unacked} runs whose 202 was lost in a kill; {} schedule slots, none twice",
        kills_of[0],
        &kills_of[1..],
        runs_of_slot.len(),
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_store_copied_to_postgres_keeps_secrets_tokens_and_audit_and_resumes_an_interrupted_run()
 {
    let Some(db) = Database::create().await else {
        return;
    };
    let rx = Receiver::start().await;
    let listen = format!("127.0.0.1:{}", support::free_port());
    let connections = format!(
        "connections:\n  rx:\n    http:\n      base_url: {}\n      auth: {{ header: {{ name: X-Api-Key, secret: rx_key }} }}\nserve:\n  lease: 2s\n",
        rx.base_url
    );
    let project = Project::new(&format!("listen: {listen}\n{connections}"));
    project.workflow(
        "slow",
        &format!(
            "name: slow\n{HEAD}cursor: '${{{{ .steps.first.status }}}}'\ntrigger:\n  webhook: {{ path: slow, record_key: '${{{{ .trigger.body.order }}}}' }}\nsteps:\n  - id: first\n    http: {{ connection: rx, method: POST, path: /ok/first }}\n  - id: second\n    http: {{ connection: rx, method: POST, path: /ok/second, query: {{ delay_ms: 3000 }} }}\n"
        ),
    );
    let set = project.set_secret("rx_key", "k-123").await;
    assert_eq!(set.code, Some(0), "{set}");

    // On SQLite: a run killed while its second step is in flight.
    let server = project.serve(&listen).await;
    let (code, body) = support::post_json(
        &format!("{}/hooks/slow", server.base_url),
        &serde_json::json!({"x": 1, "order": "ord-9"}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let run_id = body["run_id"].as_str().expect("run id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rx.hits().iter().any(|h| h.path.ends_with("/second")) {
        assert!(Instant::now() < deadline, "the second step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().await;
    // An operator moves the cursor meanwhile (the run pinned the one before).
    let set = project
        .run(&["cursor", "set", "slow", "set-on-sqlite"])
        .await;
    assert_eq!(set.code, Some(0), "{set}");

    // A copy into a database that is not empty is refused, leaving it as it was.
    let copy = project
        .cmd(&["store", "copy", "--to", &db.url])
        .output()
        .await
        .expect("plumb store copy");
    assert_eq!(
        copy.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let again = project.run(&["store", "copy", "--to", &db.url]).await;
    assert_eq!(
        again.code,
        Some(1),
        "a second copy into the same database: {again}"
    );
    assert!(again.stderr.contains("already holds"), "{again}");

    // Served from PostgreSQL.
    std::fs::write(
        project.path().join("plumb.yaml"),
        format!("store: {}\nlisten: {listen}\n{connections}", db.url),
    )
    .expect("rewrite plumb.yaml");
    let verify = project.run(&["audit", "verify"]).await;
    assert_eq!(verify.code, Some(0), "audit verify on the copy: {verify}");
    let secrets = project.run(&["secrets", "list"]).await;
    assert!(secrets.stdout.contains("rx_key"), "{secrets}");
    let server = project.serve(&listen).await;
    // The API token made on SQLite works here (the JSON helpers send it).
    let run = support::wait_run(&server.base_url, &run_id, Duration::from_secs(30)).await;
    assert_eq!(
        run["run"]["status"], "succeeded",
        "the interrupted run finished: {run}"
    );
    let second: Vec<_> = rx
        .hits()
        .into_iter()
        .filter(|h| h.path.ends_with("/second"))
        .collect();
    assert!(
        second
            .iter()
            .all(|h| h.key.as_deref() == Some(&format!("{run_id}:second"))),
        "the resumed step kept its key"
    );
    assert!(
        second
            .iter()
            .all(|h| h.headers.get("x-api-key").map(String::as_str) == Some("k-123")),
        "the sealed secret opens on the copy"
    );
    assert_eq!(
        rx.hits()
            .iter()
            .filter(|h| h.path.ends_with("/first"))
            .count(),
        1,
        "the step committed before the copy is not run again"
    );
    // The cursor came along, and the run pinned on SQLite did not move it.
    assert_eq!(run["run"]["cursor"]["moved"], false, "{run}");
    let cursor = project.run(&["cursor", "show", "slow", "--json"]).await;
    let cursor: serde_json::Value = serde_json::from_str(&cursor.stdout).expect("json");
    assert_eq!(
        (cursor["value"].clone(), cursor["version"].clone()),
        (serde_json::json!("set-on-sqlite"), serde_json::json!(1))
    );
    // The record's lineage came along, and goes on on PostgreSQL.
    let trace = project.run(&["trace", "ord-9", "--json"]).await;
    let trace: serde_json::Value = serde_json::from_str(&trace.stdout).expect("json");
    let events: Vec<String> = trace["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["event"].as_str().unwrap_or("?"),
                        e["step_id"].as_str().unwrap_or("-")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    for want in [
        "accepted -",
        "succeeded first",
        "succeeded second",
        "succeeded -",
    ] {
        assert!(events.iter().any(|e| e == want), "{want} in {events:?}");
    }
    server.kill().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_ended_runs_and_survives_a_sigkill_mid_purge_on_postgres() {
    let Some(db) = Database::create().await else {
        return;
    };
    support::retention_purges_old_runs_through_a_sigkill(&format!("store: {}\n", db.url)).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serves_sharing_postgresql_start_one_run_per_event_however_deliveries_race() {
    const EVENTS: usize = 200;
    let Some(db) = Database::create().await else {
        return;
    };
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "store: {}\nconnections:\n  rx:\n    http: {{ base_url: {} }}\n",
        db.url, rx.base_url
    ));
    project.workflow(
        "events",
        &format!(
            "name: events\n{HEAD}trigger:\n  webhook:\n    path: events\n    dedupe: '${{{{ .trigger.body.event_id }}}}'\nsteps:\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/events, body: '${{{{ .trigger.body }}}}' }}\n"
        ),
    );
    let (a, b) = (
        project.serve("127.0.0.1:0").await,
        project.serve("127.0.0.1:0").await,
    );
    // Each event delivered once to each serve, at the same time.
    let mut sends = Vec::new();
    for event in 0..EVENTS {
        for base in [&a.base_url, &b.base_url] {
            let hook = format!("{base}/hooks/events");
            sends.push(tokio::spawn(async move {
                let (status, body) = post_json(&hook, &json!({ "event_id": event })).await;
                (event, status, body)
            }));
        }
    }
    let mut named: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut accepted = 0;
    for send in sends {
        let (event, status, body) = send.await.expect("sender");
        let run = match status {
            202 => {
                accepted += 1;
                body["run_id"].as_str()
            }
            200 => body["duplicate_of"].as_str(),
            _ => panic!("event {event}: {status} {body}"),
        };
        named
            .entry(event)
            .or_default()
            .insert(run.expect("a run id").to_owned());
    }
    assert_eq!(
        accepted, EVENTS,
        "one 202 per event, the other delivery a duplicate"
    );
    assert!(named.values().all(|runs| runs.len() == 1), "{named:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.hits().len() < EVENTS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.hits().len(), EVENTS, "each event ran once");
    a.kill().await;
    b.kill().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serves_sharing_postgresql_poll_each_tick_once_and_run_each_item_once() {
    let Some(db) = Database::create().await else {
        return;
    };
    let rx = Receiver::start().await;
    let project = Project::new(&format!(
        "store: {}\nconnections:\n  rx:\n    http: {{ base_url: {} }}\n",
        db.url, rx.base_url
    ));
    project.workflow(
        "poller",
        &format!(
            "name: poller\n{HEAD}trigger:\n  poll:\n    every: 1s\n    http: {{ connection: rx, path: /feed }}\n    items: '${{{{ .response.body.items }}}}'\n    key: '${{{{ .id }}}}'\nsteps:\n  - id: post\n    http: {{ connection: rx, method: POST, path: /ok/items, body: '${{{{ .trigger.item }}}}' }}\n"
        ),
    );
    rx.set_feed(40);
    let started = Instant::now();
    let (a, b) = (
        project.serve("127.0.0.1:0").await,
        project.serve("127.0.0.1:0").await,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    rx.set_feed(80);
    let deadline = Instant::now() + Duration::from_secs(30);
    let by_item = loop {
        let runs = get_json(&format!(
            "{}/api/v1/runs?workflow=poller&limit=1000",
            a.base_url
        ))
        .await;
        let mut by_item: HashMap<u64, usize> = HashMap::new();
        let mut done = 0;
        for run in runs["runs"].as_array().into_iter().flatten() {
            *by_item
                .entry(run["trigger"]["item"]["id"].as_u64().unwrap_or(u64::MAX))
                .or_default() += 1;
            done += usize::from(run["status"] == "succeeded");
        }
        if by_item.len() >= 80 && done == by_item.values().sum::<usize>() {
            break by_item;
        }
        assert!(Instant::now() < deadline, "{by_item:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(by_item.len(), 80, "{by_item:?}");
    assert!(
        by_item.values().all(|n| *n == 1),
        "an item ran twice: {by_item:?}"
    );
    // Two processes, one poll per tick between them (plus a tick of slack
    // at either end).
    let polls = rx.hits().iter().filter(|h| h.path == "/feed").count();
    let ticks = started.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        polls <= ticks + 2,
        "{polls} polls in {ticks} s: two processes polled one tick"
    );
    a.kill().await;
    b.kill().await;
    db.drop().await;
}
