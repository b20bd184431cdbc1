//! SPEC G2/G3 with real processes: a run SIGKILLed at random points and then
//! resumed must send every step exactly once by idempotency key, re-sending
//! at most the one step that was in flight at the kill.

#![allow(clippy::print_stderr)] // the trial summary is the point of --nocapture

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{Project, Receiver};

const STEPS: usize = 30;
const TRIALS: usize = 20;

fn thirty_step_workflow() -> String {
    let mut text = String::from(
        "name: thirty\nowner: qa@example.com\ndescription: thirty side effects in a row\nsteps:\n",
    );
    for i in 0..STEPS {
        text.push_str(&format!(
            "  - id: s{i}\n    http:\n      connection: rx\n      method: POST\n      path: /ok/s{i}\n      query: {{ delay_ms: 8 }}\n      body: {{ step: {i}, key: '${{{{ .run.idempotency_key }}}}' }}\n"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_then_resume_sends_every_step_once_by_key() {
    let rx = Receiver::start().await;
    let project = Project::with_receiver(&rx.base_url);
    project.workflow("thirty", &thirty_step_workflow());

    let mut killed_mid_run = 0;
    let mut resent_total = 0;
    for trial in 0..TRIALS {
        rx.clear();
        let started = project.start(&["run", "thirty"]).await;
        let run_id = started.run_id.clone();
        let mut child = started.child;
        // Kill at a random point: once a random number of steps has reached
        // the receiver, plus a random slice of a step's time, so kills land
        // before a request, while it is in flight, and while its outcome is
        // being committed.
        let after_steps = rand::random_range(0..STEPS);
        let jitter_us = rand::random_range(0..12_000);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while rx.hits().len() < after_steps && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_micros(jitter_us)).await;
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("wait");
        let at_kill = rx.hits().len();
        if !status.success() && at_kill > 0 && at_kill < STEPS {
            killed_mid_run += 1;
        }

        let resumed = project.run(&["run", "--resume", &run_id]).await;
        let finished_before_kill = status.success();
        if finished_before_kill {
            assert_eq!(
                resumed.code,
                Some(2),
                "resuming a finished run is refused: {resumed}"
            );
        } else {
            assert_eq!(
                resumed.code,
                Some(0),
                "trial {trial}: resume must finish the run: {resumed}"
            );
        }

        let hits = rx.hits();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for hit in &hits {
            let key = hit
                .key
                .clone()
                .expect("every request carries an Idempotency-Key");
            *by_key.entry(key).or_default() += 1;
        }
        assert_eq!(
            by_key.len(),
            STEPS,
            "trial {trial}: 30 distinct keys, got {by_key:?}"
        );
        for i in 0..STEPS {
            assert!(
                by_key.contains_key(&format!("{run_id}:s{i}")),
                "trial {trial}: key for s{i}"
            );
        }
        let resent: usize = by_key.values().map(|n| n - 1).sum();
        assert!(
            resent <= 1,
            "trial {trial}: at most the in-flight step is re-sent, got {resent} duplicates (killed after step {after_steps} + {jitter_us} µs, {at_kill} requests)"
        );
        resent_total += resent;
        let shown = project.show(&run_id).await;
        assert_eq!(shown["run"]["status"], "succeeded", "trial {trial}");
        // The body carries the same key the header did, on every attempt.
        for hit in &hits {
            assert_eq!(hit.body["key"].as_str(), hit.key.as_deref());
        }
    }
    eprintln!(
        "{TRIALS} trials: {killed_mid_run} killed mid-run, {resent_total} in-flight steps re-sent in total"
    );
    assert!(
        killed_mid_run >= TRIALS * 3 / 4,
        "most kills must land mid-run for the test to mean anything; only {killed_mid_run} of {TRIALS} did"
    );
}
