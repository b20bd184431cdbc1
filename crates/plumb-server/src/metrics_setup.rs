//! Prometheus metrics: the recorder, and gauges sampled from the store.
//!
//! Counters and histograms are recorded where things happen (the engine
//! records runs, steps and retries; the webhook handler records answers by
//! status code). Gauges that describe the store — queue depth, dead-letter
//! size, undelivered alerts — are sampled every few seconds.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use plumb_engine::Engine;
use tokio_util::sync::CancellationToken;

/// Renders the metrics of this process.
#[derive(Clone)]
pub struct Metrics {
    handle: Option<PrometheusHandle>,
}

impl Metrics {
    /// Installs the process-wide recorder (once; later calls share it).
    pub fn install() -> Self {
        static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
        let handle = HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full("plumb_step_duration_seconds".to_owned()),
                        &[
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                            2.5, 5.0, 10.0, 30.0, 60.0,
                        ],
                    )
                    .ok()?;
                match builder.install_recorder() {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "Metrics recorder not installed.");
                        None
                    }
                }
            })
            .clone();
        Self { handle }
    }

    /// Folds recorded histogram samples into their buckets. The recorder
    /// keeps every sample until this runs, so it must run on a timer, not
    /// only when someone scrapes `/metrics` (else memory grows per step).
    pub fn upkeep(&self) {
        if let Some(h) = &self.handle {
            h.run_upkeep();
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        match &self.handle {
            Some(h) => {
                h.run_upkeep();
                h.render()
            }
            None => String::new(),
        }
    }
}

/// Samples store-derived gauges, and keeps the recorder's memory bounded,
/// until `shutdown`.
pub async fn sample_gauges(engine: Arc<Engine>, metrics: Metrics, shutdown: CancellationToken) {
    // Every workflow a gauge was ever set for: one that no longer has
    // queued, running or failed runs must read 0, not its last value.
    let mut known: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    loop {
        metrics.upkeep();
        match engine.store().open_counts().await {
            Ok(stats) => {
                known.extend(engine.project().workflows.iter().map(|w| w.name.clone()));
                known.extend(stats.iter().map(|s| s.workflow.clone()));
                for workflow in &known {
                    let s = stats
                        .iter()
                        .find(|s| &s.workflow == workflow)
                        .cloned()
                        .unwrap_or_default();
                    let w = workflow.clone();
                    metrics::gauge!("plumb_queue_depth", "workflow" => w.clone())
                        .set(s.queued as f64);
                    metrics::gauge!("plumb_runs_in_progress", "workflow" => w.clone())
                        .set(s.running as f64);
                    metrics::gauge!("plumb_dead_letters", "workflow" => w)
                        .set(s.dead_letters as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Could not sample run counts for metrics."),
        }
        // Each queue consumer: 1 while it takes messages, 0 while it
        // reconnects or the store has paused it.
        for c in engine.connections() {
            metrics::gauge!(
                "plumb_broker_connected",
                "connection" => c.connection.clone(),
                "workflow" => c.workflow.clone(),
            )
            .set(if c.state == "connected" { 1.0 } else { 0.0 });
            metrics::gauge!(
                "plumb_queue_consumer_paused",
                "connection" => c.connection,
                "workflow" => c.workflow,
            )
            .set(if c.state == "paused" { 1.0 } else { 0.0 });
        }
        if let Ok(alerts) = engine.store().undelivered_alerts(1000).await {
            metrics::gauge!("plumb_alerts_undelivered").set(alerts.len() as f64);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GAUGE_INTERVAL) => {}
        }
    }
}

/// How often gauges are sampled from the store.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);
