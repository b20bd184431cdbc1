//! Per-step overhead of a durable run, in process, on SQLite with
//! `synchronous=FULL`: every step's outcome is fsynced before the next step
//! starts, exactly as in production.
//!
//! Workloads:
//! * `jq40`: 40 `jq` steps (one commit each);
//! * `http40`: 40 `http` POST steps to a local receiver in this process (two
//!   commits each: the attempt, then the outcome);
//! * `jq1`: one `jq` step, to separate the fixed cost of a run (create,
//!   claim, finish) from the cost per step.
//!
//! Usage: `cargo run --release -p plumb-bench --bin step-overhead -- [RUNS]`

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::routing::post;
use plumb_core::SourceFile;
use plumb_engine::{Engine, Quiet, RunEnd, manual_trigger};
use plumb_store::{RunStatus, SqliteStore, Store, Synchronous};
use tokio_util::sync::CancellationToken;

// The allocator the `plumb` binary ships with, so this measures what runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HEAD: &str = "owner: bench@example.com\ndescription: benchmark\n";

fn jq_workflow(name: &str, steps: usize) -> String {
    let mut w = format!("name: {name}\n{HEAD}steps:\n");
    for i in 0..steps {
        if i == 0 {
            w.push_str("  - id: s0\n    jq: '{n: 0, items: [1, 2, 3]}'\n");
        } else {
            w.push_str(&format!(
                "  - id: s{i}\n    jq: '.steps.s{} | .n += 1'\n",
                i - 1
            ));
        }
    }
    w
}

fn http_workflow(steps: usize) -> String {
    let mut w = format!("name: http40\n{HEAD}steps:\n");
    for i in 0..steps {
        w.push_str(&format!(
            "  - id: s{i}\n    http: {{ connection: rx, method: POST, path: /in, body: {{ n: {i}, key: '${{{{ .run.idempotency_key }}}}' }} }}\n"
        ));
    }
    w
}

struct Stats {
    runs: Vec<Duration>,
}

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.runs.clone();
        v.sort();
        let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[idx.min(v.len() - 1)]
    }
    fn mean(&self) -> Duration {
        self.runs.iter().sum::<Duration>() / u32::try_from(self.runs.len()).unwrap_or(1)
    }
}

async fn measure(engine: &Engine, workflow: &str, runs: usize) -> anyhow::Result<Stats> {
    let wf = engine
        .project()
        .workflow(workflow)
        .context("workflow")?
        .clone();
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let run = engine
            .create_run(&wf, manual_trigger(serde_json::json!({})))
            .await?;
        let end = engine
            .execute(run, &Quiet, CancellationToken::new())
            .await?;
        let took = started.elapsed();
        anyhow::ensure!(
            matches!(
                end,
                RunEnd::Finished {
                    status: RunStatus::Succeeded,
                    ..
                }
            ),
            "run of {workflow} did not succeed: {end:?}"
        );
        out.push(took);
    }
    Ok(Stats { runs: out })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("RUNS must be a number")?
        .unwrap_or(50);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new().route(
        "/in",
        post(|| async { axum::Json(serde_json::json!({"ok": true})) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let config = SourceFile {
        path: "plumb.yaml".into(),
        text: format!("connections:\n  rx:\n    http: {{ base_url: 'http://{addr}' }}\n"),
    };
    let workflows = vec![
        SourceFile {
            path: "workflows/jq40.yaml".into(),
            text: jq_workflow("jq40", 40),
        },
        SourceFile {
            path: "workflows/jq1.yaml".into(),
            text: jq_workflow("jq1", 1),
        },
        SourceFile {
            path: "workflows/http40.yaml".into(),
            text: http_workflow(40),
        },
    ];
    let project =
        plumb_core::load_project(&config, &workflows).map_err(|d| anyhow::anyhow!("{d}"))?;
    let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full).await?;
    let store: Arc<dyn Store> = Arc::new(store);
    let engine = Engine::new(store, Arc::new(project), "bench")?;

    // Warm up: page cache, connection pool, allocator.
    measure(&engine, "jq40", 3).await?;
    measure(&engine, "http40", 3).await?;

    let jq1 = measure(&engine, "jq1", runs).await?;
    let jq40 = measure(&engine, "jq40", runs).await?;
    let http40 = measure(&engine, "http40", runs).await?;

    println!(
        "plumb step overhead · {runs} runs each · SQLite WAL synchronous=FULL · {}",
        dir.path().display()
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "workload", "run p50", "run p99", "run mean", "per step", "marginal/step"
    );
    let per_step = |s: &Stats, n: u32| s.mean() / n;
    let marginal = |s: &Stats| s.mean().saturating_sub(jq1.mean()) / 39;
    for (name, s, n) in [
        ("jq1", &jq1, 1),
        ("jq40", &jq40, 40),
        ("http40", &http40, 40),
    ] {
        println!(
            "{:<8} {:>10} {:>10} {:>10} {:>12} {:>14}",
            name,
            fmt(s.pct(0.5)),
            fmt(s.pct(0.99)),
            fmt(s.mean()),
            fmt(per_step(s, n)),
            if n == 40 {
                fmt(marginal(s))
            } else {
                "-".into()
            },
        );
    }
    let target = Duration::from_micros(500);
    let jq_step = per_step(&jq40, 40);
    println!(
        "jq step end to end (run mean / 40): {} — target ≤ 0.500 ms: {}",
        fmt(jq_step),
        if jq_step <= target { "met" } else { "NOT met" }
    );
    Ok(())
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
