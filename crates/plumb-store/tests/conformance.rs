//! The store contract, written once against `&dyn Store` and run on every
//! backend (SQLite here; PostgreSQL joins when it lands).

use plumb_store::{
    AttemptFailure, Claim, Failure, Lease, NewRun, RunFilter, RunOutcome, RunStatus, SqliteStore,
    StepRecord, StepStatus, Store, StoreError, Synchronous, WorkflowVersion, now_ms,
};
use serde_json::json;

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full)
        .await
        .expect("open store");
    (dir, store)
}

fn lease(owner: &str, ms_from_now: i64) -> Lease {
    Lease {
        owner: owner.to_owned(),
        expires_at: now_ms() + ms_from_now,
    }
}

async fn seed(store: &dyn Store, id: &str, lease: Option<Lease>) {
    store
        .put_workflow_version(&WorkflowVersion {
            hash: "v1".into(),
            workflow: "w".into(),
            file: "workflows/w.yaml".into(),
            source: "name: w".into(),
            created_at: now_ms(),
        })
        .await
        .expect("version");
    store
        .create_run(&NewRun {
            id: id.into(),
            workflow: "w".into(),
            version: "v1".into(),
            trigger: json!({"body": {"n": 1}}),
            lease,
        })
        .await
        .expect("create run");
}

fn step(run: &str, id: &str, item: Option<u32>, status: StepStatus) -> StepRecord {
    StepRecord {
        run_id: run.into(),
        step_id: id.into(),
        item,
        status,
        attempt: 1,
        state: None,
        output: (status == StepStatus::Succeeded).then(|| json!({"ok": id})),
        error: None,
        status_code: None,
        started_at: now_ms(),
        finished_at: status.is_terminal().then(now_ms),
    }
}

async fn a_leased_run_cannot_be_claimed_by_another_owner_until_it_expires(store: &dyn Store) {
    seed(store, "r1", Some(lease("a", 60_000))).await;
    match store
        .claim_run("r1", &lease("b", 60_000), None)
        .await
        .expect("claim")
    {
        Claim::Busy { owner, .. } => assert_eq!(owner, "a"),
        other => panic!("expected Busy, got {other:?}"),
    }
    // The caller proved `a` is dead: it may take the lease from exactly `a`.
    match store
        .claim_run("r1", &lease("b", 60_000), Some("a"))
        .await
        .expect("steal")
    {
        Claim::Claimed(run) => {
            assert_eq!(run.lease_owner.as_deref(), Some("b"));
            assert_eq!(run.claims, 2);
        }
        other => panic!("expected Claimed, got {other:?}"),
    }
    seed(store, "r2", Some(lease("a", -1))).await;
    assert!(matches!(
        store
            .claim_run("r2", &lease("c", 60_000), None)
            .await
            .expect("claim expired"),
        Claim::Claimed(_)
    ));
    assert_eq!(
        store
            .claim_run("nope", &lease("c", 1), None)
            .await
            .expect("claim missing"),
        Claim::NotFound
    );
}

async fn journal_writes_are_fenced_by_the_lease(store: &dyn Store) {
    seed(store, "r3", Some(lease("a", 60_000))).await;
    store
        .record_step("a", &step("r3", "s1", None, StepStatus::Succeeded))
        .await
        .expect("owner writes");
    let err = store
        .record_step("b", &step("r3", "s2", None, StepStatus::Succeeded))
        .await
        .expect_err("non-owner is fenced");
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
    store
        .finish_run("r3", "a", &RunOutcome::Succeeded)
        .await
        .expect("finish");
    let err = store
        .record_step("a", &step("r3", "s3", None, StepStatus::Succeeded))
        .await
        .expect_err("an ended run takes no more journal rows");
    assert!(matches!(err, StoreError::LeaseLost { .. }));
    assert_eq!(
        store
            .claim_run("r3", &lease("a", 1000), None)
            .await
            .expect("claim ended"),
        Claim::Ended(RunStatus::Succeeded)
    );
    let journal = store.journal("r3").await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].output, Some(json!({"ok": "s1"})));
}

async fn upsert_replaces_the_row_but_keeps_state(store: &dyn Store) {
    seed(store, "r4", Some(lease("a", 60_000))).await;
    let mut running = step("r4", "each", None, StepStatus::Running);
    running.state = Some(json!({"items": [1, 2, 3]}));
    store.record_step("a", &running).await.expect("running");
    let mut item = step("r4", "each", Some(2), StepStatus::Failed);
    item.error = Some("boom".into());
    item.status_code = Some(400);
    store.record_step("a", &item).await.expect("item");
    let mut done = step("r4", "each", None, StepStatus::Succeeded);
    done.attempt = 2;
    store.record_step("a", &done).await.expect("done");
    let journal = store.journal("r4").await.expect("journal");
    let whole = journal.iter().find(|r| r.item.is_none()).expect("step row");
    assert_eq!(whole.status, StepStatus::Succeeded);
    assert_eq!(whole.attempt, 2);
    assert_eq!(whole.state, Some(json!({"items": [1, 2, 3]})));
    let item = journal
        .iter()
        .find(|r| r.item == Some(2))
        .expect("item row");
    assert_eq!(item.error.as_deref(), Some("boom"));
    assert_eq!(item.status_code, Some(400));
}

async fn failures_are_kept_with_the_run(store: &dyn Store) {
    seed(store, "r5", Some(lease("a", 60_000))).await;
    let f = AttemptFailure {
        run_id: "r5".into(),
        step_id: "push".into(),
        item: None,
        attempt: 1,
        started_at: now_ms(),
        finished_at: now_ms(),
        status_code: Some(503),
        error: "503 Service Unavailable".into(),
        retryable: true,
    };
    store
        .record_attempt_failure("a", &f)
        .await
        .expect("attempt");
    assert_eq!(store.attempt_failures("r5").await.expect("list"), vec![f]);
    let failure = Failure {
        message: "400 Bad Request".into(),
        step: Some("push".into()),
        item: None,
        attempt: Some(2),
        status_code: Some(400),
    };
    store
        .finish_run("r5", "a", &RunOutcome::Failed(failure.clone()))
        .await
        .expect("finish");
    let run = store.run("r5").await.expect("get").expect("exists");
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.failure, Some(failure));
    assert!(run.lease_owner.is_none());
    assert!(run.finished_at.is_some());
    let failed = store
        .list_runs(&RunFilter {
            status: Some(RunStatus::Failed),
            ..RunFilter::default()
        })
        .await
        .expect("list");
    assert!(failed.iter().any(|r| r.id == "r5"));
    assert!(failed.iter().all(|r| r.status == RunStatus::Failed));
}

async fn released_runs_can_be_claimed_at_once(store: &dyn Store) {
    seed(store, "r6", Some(lease("a", 60_000))).await;
    store.release_run("r6", "a").await.expect("release");
    assert!(matches!(
        store
            .claim_run("r6", &lease("b", 60_000), None)
            .await
            .expect("claim"),
        Claim::Claimed(_)
    ));
    assert!(
        !store
            .renew_lease("r6", &lease("a", 60_000))
            .await
            .expect("renew")
    );
    assert!(
        store
            .renew_lease("r6", &lease("b", 90_000))
            .await
            .expect("renew")
    );
}

#[tokio::test]
async fn sqlite_conforms_to_the_store_contract() {
    let (_dir, store) = sqlite().await;
    a_leased_run_cannot_be_claimed_by_another_owner_until_it_expires(&store).await;
    journal_writes_are_fenced_by_the_lease(&store).await;
    upsert_replaces_the_row_but_keeps_state(&store).await;
    failures_are_kept_with_the_run(&store).await;
    released_runs_can_be_claimed_at_once(&store).await;
}

#[tokio::test]
async fn sqlite_committed_rows_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plumb.db");
    {
        let store = SqliteStore::open(&path, Synchronous::Full)
            .await
            .expect("open");
        seed(&store, "r1", Some(lease("a", 60_000))).await;
        store
            .record_step("a", &step("r1", "s1", None, StepStatus::Succeeded))
            .await
            .expect("write");
        // Dropped without close(): like a process that dies.
    }
    let store = SqliteStore::open(&path, Synchronous::Full)
        .await
        .expect("reopen");
    let journal = store.journal("r1").await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].status, StepStatus::Succeeded);
}
