//! The store contract, written once against `&dyn Store` and run on every
//! backend: SQLite, and PostgreSQL when `PLUMB_TEST_POSTGRES` names a
//! database (e.g. `postgres://postgres@127.0.0.1:5432/test`; each test
//! works in a schema of its own and drops it, so tests run in parallel and
//! leave nothing behind). Without it the PostgreSQL tests say why and pass.

#![allow(clippy::print_stderr)] // a skipped PostgreSQL test says why

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use plumb_store::audit::verify_chain;
use plumb_store::postgres::PostgresOptions;
use plumb_store::prelude::*;
use plumb_store::{
    AlertAttempt, AlertStatus, ApiToken, AttemptFailure, CancelResult, Claim, Dedupe, Deployed,
    Failure, Lease, LeasedRun, NewAlert, NewAuditEntry, NewRun, PgStore, PollCommit, PollCommitted,
    ProcessBeat, PurgePosition, PurgeScope, Purged, Release, ReplayResult, Role, RunFilter,
    RunOutcome, RunStatus, SealedSecret, SecretWrite, SecretWriteResult, SqliteStore, StepRecord,
    StepStatus, Store, StoreError, Synchronous, WorkflowVersion, now_ms,
};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection};

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full)
        .await
        .expect("open store");
    (dir, store)
}

fn lease(owner: &str, ttl_ms: i64) -> Lease {
    Lease {
        owner: owner.to_owned(),
        ttl_ms,
    }
}

/// The lease on `id` as a watcher sees it.
async fn seen(store: &dyn Store, id: &str) -> LeasedRun {
    store
        .leased_runs()
        .await
        .expect("leased runs")
        .into_iter()
        .find(|l| l.id == id)
        .expect("the run is leased")
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
            max_concurrency: None,
            deadline: None,
            dedupe: None,
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
    let heartbeat = match store
        .claim_run("r1", &lease("b", 60_000), None)
        .await
        .expect("claim")
    {
        Claim::Busy {
            owner,
            heartbeat,
            ttl_ms,
            ..
        } => {
            assert_eq!(owner, "a#1");
            assert_eq!(ttl_ms, 60_000);
            heartbeat
        }
        other => panic!("expected Busy, got {other:?}"),
    };
    // Stealing needs the holder *and* the heartbeat the caller saw: a
    // holder that renewed since is still alive.
    assert!(matches!(
        store
            .claim_run("r1", &lease("b", 60_000), Some(("a#1", heartbeat - 1)))
            .await
            .expect("stale steal"),
        Claim::Busy { .. }
    ));
    match store
        .claim_run("r1", &lease("b", 60_000), Some(("a#1", heartbeat)))
        .await
        .expect("steal")
    {
        Claim::Claimed(run) => {
            assert_eq!(run.lease_owner.as_deref(), Some("b#2"));
            assert_eq!(run.claims, 2);
            assert_eq!(run.strikes, 2, "the first claim never ended cleanly");
        }
        other => panic!("expected Claimed, got {other:?}"),
    }
    assert_eq!(
        store
            .claim_run("nope", &lease("c", 1), None)
            .await
            .expect("claim missing"),
        Claim::NotFound
    );
}

async fn leases_end_by_watching_heartbeats_not_wall_clocks(store: &dyn Store) {
    // A lease whose expiry time has long passed by the wall clock is still
    // held: only a watcher that saw it unrenewed may end it.
    seed(store, "h1", Some(lease("a", 1))).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(
        store.claim_next(&lease("b", 60_000)).await.expect("claim"),
        None
    );
    let before = seen(store, "h1").await;
    assert_eq!(before.holder, "a#1");
    assert_eq!(before.strikes, 1);
    assert!(
        store
            .renew_lease("h1", &lease("a#1", 60_000))
            .await
            .expect("renew")
    );
    let after = seen(store, "h1").await;
    assert!(
        after.heartbeat > before.heartbeat,
        "a renewal bumps the heartbeat"
    );
    assert_eq!(after.ttl_ms, 60_000);
    assert!(
        !store
            .expire_lease(&before, "stalled", now_ms())
            .await
            .expect("expire"),
        "a lease renewed since it was seen is not expired"
    );
    let later = now_ms() + 60_000;
    assert!(
        store
            .expire_lease(&after, "its process stopped renewing", later)
            .await
            .expect("expire")
    );
    let run = store.run("h1").await.expect("get").expect("exists");
    assert_eq!(run.status, RunStatus::Running);
    assert!(run.lease_owner.is_none());
    assert_eq!(
        run.last_error.as_deref(),
        Some("its process stopped renewing")
    );
    assert_eq!(run.not_before, Some(later));
    // Backing off: not claimable before `not_before`, except explicitly.
    assert_eq!(
        store.claim_next(&lease("b", 60_000)).await.expect("claim"),
        None
    );
    match store
        .claim_run("h1", &lease("c", 60_000), None)
        .await
        .expect("explicit claim")
    {
        Claim::Claimed(run) => assert_eq!(run.strikes, 2),
        other => panic!("expected Claimed, got {other:?}"),
    }
}

async fn strikes_count_claims_that_did_not_end_cleanly(store: &dyn Store) {
    seed(store, "k1", Some(lease("a", 60_000))).await;
    // Interrupted on purpose (shutdown): the strike is taken back.
    store
        .release_run("k1", "a#1", &Release::Clean)
        .await
        .expect("release");
    let run = store
        .claim_next(&lease("b", 60_000))
        .await
        .expect("claim")
        .expect("the released run");
    assert_eq!((run.id.as_str(), run.claims, run.strikes), ("k1", 2, 1));
    // Stopped by an error: the strike stays, with the reason and a backoff.
    let retry_at = now_ms() + 60_000;
    store
        .release_run(
            "k1",
            "b#2",
            &Release::Failed {
                error: "the journal could not be written".into(),
                not_before: retry_at,
            },
        )
        .await
        .expect("release");
    let run = store.run("k1").await.expect("get").expect("exists");
    assert_eq!(run.strikes, 1);
    assert_eq!(run.not_before, Some(retry_at));
    assert_eq!(
        run.last_error.as_deref(),
        Some("the journal could not be written")
    );
    assert_eq!(
        store.claim_next(&lease("c", 60_000)).await.expect("claim"),
        None
    );
    store
        .release_run(
            "k1",
            "nobody#9",
            &Release::Failed {
                error: "x".into(),
                not_before: 0,
            },
        )
        .await
        .expect("a stranger's release changes nothing");
    assert_eq!(
        store
            .run("k1")
            .await
            .expect("get")
            .expect("exists")
            .not_before,
        Some(retry_at)
    );
}

async fn a_second_claim_by_the_same_process_fences_the_first(store: &dyn Store) {
    // The same owner claims a run twice (its lease expired in between, say
    // after missed heartbeats): each claim gets its own token, and the first
    // execution's writes are refused.
    seed(store, "t1", Some(lease("a", 60_000))).await;
    let first = seen(store, "t1").await;
    assert!(
        store
            .expire_lease(&first, "stalled", 0)
            .await
            .expect("expire")
    );
    let again = store
        .claim_next(&lease("a", 60_000))
        .await
        .expect("claim")
        .expect("the expired run");
    assert_eq!(again.id, "t1");
    assert_eq!(again.lease_owner.as_deref(), Some("a#2"));
    let err = store
        .record_step("a#1", &step("t1", "s", None, StepStatus::Succeeded))
        .await
        .expect_err("the first claim is fenced off");
    assert!(matches!(err, StoreError::LeaseLost { .. }));
    store
        .record_step("a#2", &step("t1", "s", None, StepStatus::Succeeded))
        .await
        .expect("the current claim writes");
    assert!(
        !store
            .renew_lease("t1", &lease("a#1", 60_000))
            .await
            .expect("renew")
    );
}

async fn what_would_not_read_back_is_refused_not_stored(store: &dyn Store) {
    let mut deep = json!(1);
    for _ in 0..130 {
        deep = serde_json::Value::Array(vec![deep]);
    }
    let mut run = queued("deep1", "w", None);
    run.trigger = json!({"body": deep.clone()});
    let err = store.create_run(&run).await.expect_err("too deep");
    assert!(matches!(err, StoreError::Rejected(_)), "{err}");
    assert!(store.run("deep1").await.expect("get").is_none());
    seed(store, "deep2", Some(lease("a", 60_000))).await;
    let mut row = step("deep2", "s", None, StepStatus::Succeeded);
    row.output = Some(deep);
    let err = store.record_step("a#1", &row).await.expect_err("too deep");
    assert!(matches!(err, StoreError::Rejected(_)), "{err}");
    // The refusal is the write's own: the store goes on working.
    store
        .record_step("a#1", &step("deep2", "s", None, StepStatus::Succeeded))
        .await
        .expect("a normal row");
}

async fn journal_writes_are_fenced_by_the_lease(store: &dyn Store) {
    seed(store, "r3", Some(lease("a", 60_000))).await;
    store
        .record_step("a#1", &step("r3", "s1", None, StepStatus::Succeeded))
        .await
        .expect("owner writes");
    let err = store
        .record_step("b", &step("r3", "s2", None, StepStatus::Succeeded))
        .await
        .expect_err("non-owner is fenced");
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
    store
        .finish_run("r3", "a#1", &RunOutcome::Succeeded, None, &[])
        .await
        .expect("finish");
    let err = store
        .record_step("a#1", &step("r3", "s3", None, StepStatus::Succeeded))
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
    store.record_step("a#1", &running).await.expect("running");
    let mut item = step("r4", "each", Some(2), StepStatus::Failed);
    item.error = Some("boom".into());
    item.status_code = Some(400);
    store.record_step("a#1", &item).await.expect("item");
    let mut done = step("r4", "each", None, StepStatus::Succeeded);
    done.attempt = 2;
    store.record_step("a#1", &done).await.expect("done");
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
        round: 0,
        attempt: 1,
        started_at: now_ms(),
        finished_at: now_ms(),
        status_code: Some(503),
        error: "503 Service Unavailable".into(),
        retryable: true,
    };
    store
        .record_attempt_failure("a#1", &f)
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
        .finish_run("r5", "a#1", &RunOutcome::Failed(failure.clone()), None, &[])
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
    store
        .release_run("r6", "a#1", &Release::Clean)
        .await
        .expect("release");
    assert!(matches!(
        store
            .claim_run("r6", &lease("b", 60_000), None)
            .await
            .expect("claim"),
        Claim::Claimed(_)
    ));
    assert!(
        !store
            .renew_lease("r6", &lease("a#1", 60_000))
            .await
            .expect("renew")
    );
    assert!(
        store
            .renew_lease("r6", &lease("b#2", 90_000))
            .await
            .expect("renew")
    );
}

fn queued(id: &str, workflow: &str, max_concurrency: Option<u32>) -> NewRun {
    NewRun {
        id: id.into(),
        workflow: workflow.into(),
        version: "v1".into(),
        trigger: json!({}),
        lease: None,
        max_concurrency,
        deadline: None,
        dedupe: None,
    }
}

async fn claim_next_takes_interrupted_runs_then_queued_ones_oldest_first_within_limits(
    store: &dyn Store,
) {
    seed(store, "q0", None).await;
    for (id, wf, limit) in [
        ("q1", "w", None),
        ("q2", "single", Some(1)),
        ("q3", "single", Some(1)),
        ("q4", "w", None),
    ] {
        store
            .create_run(&queued(id, wf, limit))
            .await
            .expect("queue");
    }
    let a = lease("a", 60_000);
    let order: Vec<String> = {
        let mut got = Vec::new();
        while let Some(run) = store.claim_next(&a).await.expect("claim") {
            assert_eq!(run.status, RunStatus::Running);
            assert_eq!(
                run.lease_owner.as_deref(),
                Some(format!("a#{}", run.claims).as_str())
            );
            got.push(run.id);
        }
        got
    };
    // q3 waits: `single` allows one run at a time and q2 holds it. Within
    // a workflow, the oldest first.
    let mut claimed = order.clone();
    claimed.sort();
    assert_eq!(claimed, ["q0", "q1", "q2", "q4"], "{order:?}");
    let of_w: Vec<&String> = order.iter().filter(|id| *id != "q2").collect();
    assert_eq!(of_w, ["q0", "q1", "q4"], "{order:?}");
    store
        .finish_run("q2", "a#1", &RunOutcome::Succeeded, None, &[])
        .await
        .expect("finish");
    assert_eq!(
        store.claim_next(&a).await.expect("claim").map(|r| r.id),
        Some("q3".to_owned())
    );
    // A released (interrupted) run is claimable again, before the queue.
    store
        .create_run(&queued("q5", "w", None))
        .await
        .expect("queue");
    store
        .release_run("q1", "a#1", &Release::Clean)
        .await
        .expect("release");
    let next = store
        .claim_next(&lease("b", 60_000))
        .await
        .expect("claim")
        .expect("a run");
    assert_eq!(next.id, "q1");
    assert_eq!(next.claims, 2);
}

async fn the_last_step_is_committed_with_the_runs_end(store: &dyn Store) {
    seed(store, "l1", Some(lease("a", 60_000))).await;
    let last = step("l1", "final", None, StepStatus::Succeeded);
    store
        .finish_run("l1", "a#1", &RunOutcome::Succeeded, Some(&last), &[])
        .await
        .expect("finish");
    let journal = store.journal("l1").await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].step_id, "final");
    assert_eq!(
        store.run("l1").await.expect("get").expect("run").status,
        RunStatus::Succeeded
    );
    // Fenced like any journal write: a process without the lease writes neither.
    seed(store, "l2", Some(lease("a", 60_000))).await;
    let err = store
        .finish_run(
            "l2",
            "b",
            &RunOutcome::Succeeded,
            Some(&step("l2", "final", None, StepStatus::Succeeded)),
            &[],
        )
        .await
        .expect_err("not the owner");
    assert!(matches!(err, StoreError::LeaseLost { .. }));
    assert!(store.journal("l2").await.expect("journal").is_empty());
}

async fn cancel_and_replay_move_runs_between_states(store: &dyn Store) {
    seed(store, "c1", None).await;
    assert_eq!(
        store
            .cancel_run("c1", "no longer needed", "cli:ada")
            .await
            .expect("cancel"),
        CancelResult::Cancelled
    );
    assert_eq!(
        store
            .cancel_run("c1", "again", "cli:ada")
            .await
            .expect("cancel"),
        CancelResult::AlreadyEnded(RunStatus::Cancelled)
    );
    assert_eq!(
        store
            .cancel_run("nope", "x", "cli:ada")
            .await
            .expect("cancel"),
        CancelResult::NotFound
    );
    let run = store.run("c1").await.expect("get").expect("exists");
    assert_eq!(
        run.failure.map(|f| f.message).as_deref(),
        Some("no longer needed")
    );

    seed(store, "d1", Some(lease("a", 60_000))).await;
    store
        .record_step("a#1", &step("d1", "ok", None, StepStatus::Succeeded))
        .await
        .expect("ok step");
    let mut each = step("d1", "each", None, StepStatus::Running);
    each.state = Some(json!({"items": [1, 2]}));
    store.record_step("a#1", &each).await.expect("each");
    store
        .record_step("a#1", &step("d1", "each", Some(0), StepStatus::Succeeded))
        .await
        .expect("item 0");
    let mut bad = step("d1", "each", Some(1), StepStatus::Failed);
    bad.error = Some("bad item".into());
    store.record_step("a#1", &bad).await.expect("item 1");
    let mut whole = step("d1", "each", None, StepStatus::Failed);
    whole.error = Some("1 of 2 items failed".into());
    store.record_step("a#1", &whole).await.expect("step failed");
    assert_eq!(
        store
            .replay_run("d1", "api:ops")
            .await
            .expect("replay running"),
        ReplayResult::NotFailed(RunStatus::Running)
    );
    store
        .finish_run(
            "d1",
            "a#1",
            &RunOutcome::Failed(Failure {
                message: "1 of 2 items failed".into(),
                ..Failure::default()
            }),
            None,
            &[],
        )
        .await
        .expect("finish");
    assert_eq!(
        store.replay_run("d1", "api:ops").await.expect("replay"),
        ReplayResult::Replayed
    );
    let run = store.run("d1").await.expect("get").expect("exists");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.replays, 1);
    assert!(run.failure.is_none());
    let journal = store.journal("d1").await.expect("journal");
    let find =
        |id: &str, item: Option<u32>| journal.iter().find(|r| r.step_id == id && r.item == item);
    assert_eq!(
        find("ok", None).map(|r| r.status),
        Some(StepStatus::Succeeded)
    );
    assert_eq!(
        find("each", Some(0)).map(|r| r.status),
        Some(StepStatus::Succeeded)
    );
    assert!(
        find("each", Some(1)).is_none(),
        "the failed item runs again"
    );
    let each = find("each", None).expect("for_each row kept");
    assert_eq!(each.status, StepStatus::Running);
    assert_eq!(
        each.state,
        Some(json!({"items": [1, 2]})),
        "the item list is kept"
    );

    // Only the operations that changed something are audited, with who.
    let audit = store.audit_entries(0, 100).await.expect("audit");
    let actions: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|e| (e.action.as_str(), e.subject.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("run.cancelled", "c1", "cli:ada"),
            ("run.replayed", "d1", "api:ops")
        ]
    );
    assert_eq!(verify_chain(&audit), Ok(2));
}

fn sealed(tag: u8, key: &str) -> SealedSecret {
    SealedSecret {
        nonce: vec![tag; 24],
        ciphertext: vec![tag; 40],
        key_id: key.into(),
    }
}

async fn secrets_are_created_rotated_rekeyed_and_deleted_with_an_audit_trail(store: &dyn Store) {
    let before = store.audit_entries(0, 1000).await.expect("audit").len();
    let v0 = store.secrets_version().await.expect("version");
    assert_eq!(
        store
            .put_secret(
                "crm_token",
                &sealed(1, "k1"),
                SecretWrite::Create,
                "cli:ada"
            )
            .await
            .expect("set"),
        SecretWriteResult::Created
    );
    assert_eq!(
        store
            .put_secret(
                "crm_token",
                &sealed(2, "k1"),
                SecretWrite::Create,
                "cli:ada"
            )
            .await
            .expect("set again"),
        SecretWriteResult::AlreadyExists,
        "set never overwrites"
    );
    assert_eq!(
        store
            .put_secret("nope", &sealed(2, "k1"), SecretWrite::Rotate, "cli:ada")
            .await
            .expect("rotate missing"),
        SecretWriteResult::NotFound
    );
    let v1 = store.secrets_version().await.expect("version");
    assert_ne!(v0, v1, "a new secret changes the version");
    assert_eq!(
        store
            .put_secret(
                "crm_token",
                &sealed(3, "k1"),
                SecretWrite::Rotate,
                "cli:ada"
            )
            .await
            .expect("rotate"),
        SecretWriteResult::Rotated
    );
    let v2 = store.secrets_version().await.expect("version");
    assert_ne!(v1, v2, "a rotation changes the version");
    let (value, meta) = store
        .secret("crm_token")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(value, sealed(3, "k1"));
    assert!(meta.rotated_at.is_some());

    store
        .put_secret("other", &sealed(4, "k1"), SecretWrite::Create, "cli:ada")
        .await
        .expect("second secret");
    let version = store.secrets_version().await.expect("version");
    let partial = store
        .rekey_secrets(
            &[("crm_token".into(), sealed(5, "k2"))],
            &version,
            "cli:ada",
        )
        .await;
    assert!(partial.is_err(), "a rekey must cover every secret");
    assert_eq!(
        store.secret("crm_token").await.expect("read").map(|s| s.0),
        Some(sealed(3, "k1")),
        "a refused rekey changes nothing"
    );
    let all = [
        ("crm_token".to_owned(), sealed(5, "k2")),
        ("other".to_owned(), sealed(6, "k2")),
    ];
    store
        .put_secret("other", &sealed(7, "k1"), SecretWrite::Rotate, "cli:bob")
        .await
        .expect("a rotation during the rekey");
    assert!(
        store
            .rekey_secrets(&all, &version, "cli:ada")
            .await
            .is_err(),
        "a rekey never undoes a rotation made since it read the secrets"
    );
    assert_eq!(
        store.secret("other").await.expect("read").map(|s| s.0),
        Some(sealed(7, "k1"))
    );
    let version = store.secrets_version().await.expect("version");
    store
        .rekey_secrets(&all, &version, "cli:ada")
        .await
        .expect("rekey");
    let metas = store.list_secrets().await.expect("list");
    assert!(metas.iter().all(|m| m.key_id == "k2"));
    assert!(
        store
            .delete_secret("other", "cli:ada")
            .await
            .expect("delete")
    );
    assert!(
        !store
            .delete_secret("other", "cli:ada")
            .await
            .expect("again")
    );
    assert_eq!(store.list_secrets().await.expect("list").len(), 1);

    let audit = store.audit_entries(0, 1000).await.expect("audit");
    let actions: Vec<&str> = audit[before..].iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "secret.set",
            "secret.rotated",
            "secret.set",
            "secret.rotated",
            "secrets.rekeyed",
            "secret.deleted"
        ]
    );
    assert!(verify_chain(&audit).is_ok());
}

async fn tokens_are_found_by_hash_until_revoked(store: &dyn Store) {
    let token = ApiToken {
        id: "t1".into(),
        name: "ci".into(),
        role: Role::Operator,
        created_at: now_ms(),
        revoked_at: None,
    };
    assert!(
        store
            .create_token(&token, "hash-1", "cli:ada")
            .await
            .expect("create")
    );
    let taken = ApiToken {
        id: "t2".into(),
        ..token.clone()
    };
    assert!(
        !store
            .create_token(&taken, "hash-2", "cli:ada")
            .await
            .expect("dup"),
        "names are unique"
    );
    let found = store
        .token_by_hash("hash-1")
        .await
        .expect("find")
        .expect("exists");
    assert_eq!((found.name.as_str(), found.role), ("ci", Role::Operator));
    assert!(found.revoked_at.is_none());
    assert!(store.revoke_token("ci", "cli:ada").await.expect("revoke"));
    assert!(!store.revoke_token("ci", "cli:ada").await.expect("again"));
    let found = store
        .token_by_hash("hash-1")
        .await
        .expect("find")
        .expect("kept");
    assert!(
        found.revoked_at.is_some(),
        "a revoked token is kept, marked"
    );
    assert!(store.token_by_hash("hash-2").await.expect("find").is_none());
}

fn deployed(kind: &str, name: &str, version: &str) -> Deployed {
    Deployed {
        kind: kind.into(),
        name: name.into(),
        version: version.into(),
        file: format!("{name}.yaml"),
    }
}

async fn deployments_are_audited_only_when_something_changed(store: &dyn Store) {
    let first = [
        deployed("config", "plumb.yaml", "c1"),
        deployed("connection", "crm", "x1"),
        deployed("workflow", "orders", "o1"),
        deployed("workflow", "refunds", "r1"),
    ];
    assert_eq!(
        store
            .record_deployment(&first, "serve")
            .await
            .expect("first")
            .len(),
        4
    );
    assert!(
        store
            .record_deployment(&first, "serve")
            .await
            .expect("same")
            .is_empty(),
        "a restart with the same files changes nothing"
    );
    let second = [
        deployed("config", "plumb.yaml", "c2"),
        deployed("workflow", "orders", "o2"),
        deployed("workflow", "refunds", "r1"),
    ];
    let changed = store
        .record_deployment(&second, "serve")
        .await
        .expect("second");
    assert_eq!(
        changed,
        ["config:plumb.yaml", "workflow:orders", "connection:crm"]
    );
    let audit = store.audit_entries(0, 1000).await.expect("audit");
    let last: Vec<(&str, &str)> = audit[audit.len() - 3..]
        .iter()
        .map(|e| (e.action.as_str(), e.subject.as_str()))
        .collect();
    assert_eq!(
        last,
        [
            ("config.changed", "plumb.yaml"),
            ("workflow.deployed", "orders"),
            ("connection.removed", "crm")
        ]
    );
    assert_eq!(audit[audit.len() - 2].details["previous"], json!("o1"));
    assert!(verify_chain(&audit).is_ok());
}

async fn a_schedule_slot_is_recorded_once(store: &dyn Store) {
    seed(store, "seed-s", None).await;
    assert_eq!(store.last_fire("sched").await.expect("last"), None);
    let run = queued("s1", "sched", None);
    assert!(
        store
            .record_fire("sched", 1_000, Some(&run))
            .await
            .expect("fire")
    );
    let again = queued("s2", "sched", None);
    assert!(
        !store
            .record_fire("sched", 1_000, Some(&again))
            .await
            .expect("fire again")
    );
    assert!(
        store.run("s2").await.expect("get").is_none(),
        "no run for a slot fired before"
    );
    assert!(store.record_fire("sched", 2_000, None).await.expect("skip"));
    assert_eq!(store.last_fire("sched").await.expect("last"), Some(2_000));
}

/// Seeds run `run` leased to `a`, and fails it with alert `alert` (to
/// channel `ops`) committed in the same transaction.
async fn fail_with_an_alert(store: &dyn Store, run: &str, alert: &str) {
    seed(store, run, Some(lease("a", 60_000))).await;
    store
        .finish_run(
            run,
            "a#1",
            &RunOutcome::Failed(Failure {
                message: "boom".into(),
                ..Failure::default()
            }),
            None,
            &[NewAlert {
                id: alert.into(),
                channel: "ops".into(),
                payload: json!({ "run_id": run }),
            }],
        )
        .await
        .expect("finish");
}

async fn alerts_are_committed_with_the_failure_and_tracked_to_delivery(store: &dyn Store) {
    fail_with_an_alert(store, "al1", "alert-1").await;
    let due = store.due_alerts(now_ms() + 1, 10).await.expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].workflow, "w");
    assert_eq!(due[0].status, AlertStatus::Pending);
    store
        .record_alert_attempt(
            "alert-1",
            0,
            &AlertAttempt::RetryAt {
                error: "503".into(),
                at: now_ms() + 60_000,
            },
        )
        .await
        .expect("retry");
    assert!(
        store
            .due_alerts(now_ms() + 1, 10)
            .await
            .expect("due")
            .is_empty()
    );
    let pending = store.undelivered_alerts(10).await.expect("undelivered");
    assert_eq!(pending[0].attempts, 1);
    assert_eq!(pending[0].last_error.as_deref(), Some("503"));
    store
        .record_alert_attempt(
            "alert-1",
            1,
            &AlertAttempt::GaveUp {
                error: "still 503".into(),
            },
        )
        .await
        .expect("give up");
    let failed = store.undelivered_alerts(10).await.expect("undelivered");
    assert_eq!(failed[0].status, AlertStatus::Failed);
    let stats = store.workflow_stats().await.expect("stats");
    let w = stats.iter().find(|s| s.workflow == "w").expect("w stats");
    assert!(w.dead_letters >= 1);
    assert!(w.last_failure_at.is_some());
}

async fn stale_alert_results_and_expired_deadlines_are_not_committed(store: &dyn Store) {
    fail_with_an_alert(store, "al2", "alert-2").await;
    assert!(
        store
            .record_alert_attempt("alert-2", 0, &AlertAttempt::Delivered)
            .await
            .expect("deliver")
    );
    // A slower deliverer reporting the same attempt must not undo "delivered".
    assert!(
        !store
            .record_alert_attempt(
                "alert-2",
                0,
                &AlertAttempt::GaveUp {
                    error: "late".into()
                }
            )
            .await
            .expect("stale")
    );
    assert!(
        store
            .undelivered_alerts(10)
            .await
            .expect("list")
            .iter()
            .all(|a| a.id != "alert-2")
    );

    let mut late = queued("late", "w", None);
    late.deadline = Some(std::time::Instant::now() - std::time::Duration::from_millis(1));
    let err = store
        .create_run(&late)
        .await
        .expect_err("past its deadline");
    assert!(err.is_transient(), "{err}");
    assert!(
        store.run("late").await.expect("get").is_none(),
        "never committed"
    );

    // A fire whose run cannot be inserted (duplicate id) leaves no slot row.
    store
        .create_run(&queued("dup-run", "w", None))
        .await
        .expect("queue");
    let clash = queued("dup-run", "fires", None);
    assert!(
        store
            .record_fire("fires", 5_000, Some(&clash))
            .await
            .is_err()
    );
    assert_eq!(
        store.last_fire("fires").await.expect("last"),
        None,
        "the slot can still fire"
    );
}

async fn concurrent_writes_share_commits_and_all_land(store: Arc<dyn Store>) {
    seed(store.as_ref(), "seed-g", None).await;
    let mut tasks = Vec::new();
    for i in 0..500 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .create_run(&queued(&format!("g{i}"), "burst", None))
                .await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("create");
    }
    let stats = store.workflow_stats().await.expect("stats");
    assert_eq!(
        stats
            .iter()
            .find(|s| s.workflow == "burst")
            .map(|s| s.queued),
        Some(500)
    );
    // A write that fails on its own does not fail the others in its batch.
    let dup = store.create_run(&queued("g1", "burst", None)).await;
    assert!(dup.is_err(), "a duplicate id is refused");
}

/// How many checks need a store of their own.
/// Two deliverers (two processes) that both read a due alert: only the one
/// that takes the attempt sends it; the other finds it taken.
async fn an_alert_attempt_is_taken_by_one_deliverer(store: &dyn Store) {
    fail_with_an_alert(store, "al-claim", "alert-claim").await;
    let now = now_ms() + 1;
    let due = store.due_alerts(now, 10).await.expect("due");
    assert!(due.iter().any(|a| a.id == "alert-claim"), "{due:?}");
    assert!(
        store
            .claim_alert("alert-claim", 0, now, now + 60_000)
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_alert("alert-claim", 0, now, now + 60_000)
            .await
            .expect("claim"),
        "a second deliverer does not get the same attempt"
    );
    assert!(
        !store
            .due_alerts(now, 10)
            .await
            .expect("due")
            .iter()
            .any(|a| a.id == "alert-claim"),
        "a taken alert is not due while it is held"
    );
    // A deliverer that died: the alert is due again when the hold ends.
    assert!(
        store
            .due_alerts(now + 60_000, 10)
            .await
            .expect("due")
            .iter()
            .any(|a| a.id == "alert-claim")
    );
    assert!(
        store
            .record_alert_attempt("alert-claim", 0, &AlertAttempt::Delivered)
            .await
            .expect("record")
    );
}

/// The process list: each process's last beat, with its broker
/// connections' state, forgotten when it stops.
async fn processes_are_listed_by_their_last_beat_until_forgotten(store: &dyn Store) {
    let beat = |owner: &str, role: &str, runs: u32| ProcessBeat {
        owner: owner.into(),
        role: role.into(),
        host: "h1".into(),
        pid: 42,
        version: "0.1.0".into(),
        started_at: now_ms(),
        runs,
        capacity: 64,
        connections: serde_json::json!([{ "connection": "bus", "state": format!("runs {runs}") }]),
    };
    let since = store.store_now().await.expect("now") - 1_000;
    store
        .beat(&beat("p-serve", "serve", 1))
        .await
        .expect("beat");
    store
        .beat(&beat("p-worker", "worker", 0))
        .await
        .expect("beat");
    store
        .beat(&beat("p-serve", "serve", 3))
        .await
        .expect("beat again");
    let live = store.processes(since).await.expect("list");
    let serve = live
        .iter()
        .find(|p| p.owner == "p-serve")
        .expect("serve listed");
    assert_eq!(
        (serve.role.as_str(), serve.runs, serve.capacity),
        ("serve", 3, 64)
    );
    assert_eq!(
        serve.connections,
        serde_json::json!([{ "connection": "bus", "state": "runs 3" }]),
        "the last beat's connection state is kept"
    );
    assert!(live.iter().any(|p| p.owner == "p-worker"));
    assert!(serve.beat_at >= since, "beats are on the store's clock");
    // A clean stop takes a process off; so does a day without a beat.
    store
        .forget_processes("p-serve", since - 86_400_000)
        .await
        .expect("forget");
    let live = store.processes(since).await.expect("list");
    assert!(!live.iter().any(|p| p.owner == "p-serve"), "{live:?}");
    assert!(live.iter().any(|p| p.owner == "p-worker"));
    store
        .forget_processes("nobody", store.store_now().await.expect("now") + 1_000)
        .await
        .expect("forget the old");
    assert!(store.processes(0).await.expect("list").is_empty());
}

/// Retention removes exactly what is old and ended, and keeps the rest:
/// queued and running runs whatever their age, young runs, dead letters'
/// payloads, other workflows' runs, the audit log.
async fn retention_purges_only_old_ended_runs(store: &dyn Store) {
    let a = lease("ret", 60_000);
    // Ends `id` (created leased) with `outcome`, with a journal row and an
    // alert hanging off it.
    async fn ended(store: &dyn Store, id: &str, workflow: &str, outcome: RunOutcome, a: &Lease) {
        let mut run = queued(id, workflow, None);
        run.lease = Some(a.clone());
        store.create_run(&run).await.expect("create");
        let token = format!("{}#1", a.owner);
        store
            .record_step(&token, &step(id, "s", None, StepStatus::Succeeded))
            .await
            .expect("journal");
        store
            .finish_run(
                id,
                &token,
                &outcome,
                None,
                &[NewAlert {
                    id: format!("alert-{id}"),
                    channel: "ops".into(),
                    payload: json!({}),
                }],
            )
            .await
            .expect("finish");
    }
    let failed = || {
        RunOutcome::Failed(Failure {
            message: "boom".into(),
            ..Failure::default()
        })
    };
    seed(store, "ret-seed", None).await;
    ended(store, "ret-old-ok", "w", RunOutcome::Succeeded, &a).await;
    ended(store, "ret-old-failed", "w", failed(), &a).await;
    ended(store, "ret-other", "other", RunOutcome::Succeeded, &a).await;
    store
        .create_run(&queued("ret-queued", "w", None))
        .await
        .expect("queue");
    let mut running = queued("ret-running", "w", None);
    running.lease = Some(a.clone());
    store.create_run(&running).await.expect("running");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let cut = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    ended(store, "ret-young", "w", RunOutcome::Succeeded, &a).await;
    let audit_before = store.audit_entries(0, 1000).await.expect("audit").len();

    // Payloads first: old succeeded runs are blanked, the dead letter keeps
    // its payload for a replay.
    let p = store
        .purge(
            &PurgeScope::Workflow("w".into()),
            0,
            cut,
            100,
            &mut PurgePosition::default(),
        )
        .await
        .expect("purge payloads");
    assert_eq!(
        p,
        Purged {
            runs: 0,
            payloads: 1,
            dedupe_keys: 0,
        }
    );
    let ok = store.run("ret-old-ok").await.expect("read").expect("kept");
    assert_eq!(ok.trigger, serde_json::Value::Null);
    assert_eq!(ok.status, RunStatus::Succeeded);
    assert!(
        store.journal("ret-old-ok").await.expect("journal")[0]
            .output
            .is_none()
    );
    let dead = store
        .run("ret-old-failed")
        .await
        .expect("read")
        .expect("kept");
    assert_ne!(dead.trigger, serde_json::Value::Null);

    // Then runs: the old ended ones of `w`, in batches that carry their
    // position.
    let mut position = PurgePosition::default();
    let p = store
        .purge(
            &PurgeScope::Workflow("w".into()),
            cut,
            cut,
            1,
            &mut position,
        )
        .await
        .expect("purge");
    assert_eq!(p.runs, 1, "one per batch");
    let p = store
        .purge(
            &PurgeScope::Workflow("w".into()),
            cut,
            cut,
            100,
            &mut position,
        )
        .await
        .expect("purge");
    assert_eq!(p.runs, 1);
    for gone in ["ret-old-ok", "ret-old-failed"] {
        assert!(store.run(gone).await.expect("read").is_none(), "{gone}");
        assert!(store.journal(gone).await.expect("journal").is_empty());
    }
    for kept in [
        "ret-queued",
        "ret-running",
        "ret-young",
        "ret-other",
        "ret-seed",
    ] {
        assert!(
            store.run(kept).await.expect("read").is_some(),
            "{kept} is kept"
        );
    }
    assert!(
        !store
            .undelivered_alerts(1000)
            .await
            .expect("alerts")
            .iter()
            .any(|al| al.run_id.starts_with("ret-old")),
        "alerts go with their run"
    );
    // Workflows no longer in the project: `Others` leaves the named ones.
    let p = store
        .purge(
            &PurgeScope::Others(vec!["w".into()]),
            now_ms() + 1,
            0,
            100,
            &mut PurgePosition::default(),
        )
        .await
        .expect("purge others");
    assert!(p.runs >= 1);
    assert!(store.run("ret-other").await.expect("read").is_none());
    assert!(store.run("ret-young").await.expect("read").is_some());
    assert_eq!(
        store.audit_entries(0, 1000).await.expect("audit").len(),
        audit_before,
        "the audit log is never purged"
    );
    let size = store.store_size().await.expect("size");
    assert!(size.bytes > 0);
    assert!(size.oldest_run_at.is_some());

    // Batches of one that carry their position find every run, those that
    // ended in the same millisecond included (a batch resumes at the last
    // run taken, not after it), and blank before they delete.
    for i in 0..4 {
        ended(
            store,
            &format!("ret-burst-{i}"),
            "burst",
            RunOutcome::Succeeded,
            &a,
        )
        .await;
    }
    let cut = now_ms() + 1;
    // Ten batches of one, each pass with a position of its own.
    let pass = |runs_before: i64, payloads_before: i64| async move {
        let mut position = PurgePosition::default();
        let mut done = Purged::default();
        for _ in 0..10 {
            let p = store
                .purge(
                    &PurgeScope::Workflow("burst".into()),
                    runs_before,
                    payloads_before,
                    1,
                    &mut position,
                )
                .await
                .expect("purge");
            done.runs += p.runs;
            done.payloads += p.payloads;
        }
        done
    };
    let done = pass(0, cut).await;
    assert_eq!(done.payloads, 4, "every burst run blanked once");
    let done = pass(cut, 0).await;
    assert_eq!(done.runs, 4, "every burst run deleted");
    for i in 0..4 {
        assert!(
            store
                .run(&format!("ret-burst-{i}"))
                .await
                .expect("read")
                .is_none()
        );
    }
}

/// The status figures per workflow, exactly.
async fn workflow_stats_count_every_state_of_every_workflow(store: &dyn Store) {
    seed(store, "st-seed", None).await; // w: queued
    let a = lease("st", 60_000);
    let token = "st#1";
    let make = |id: &str, workflow: &str, leased: bool| {
        let mut run = queued(id, workflow, None);
        if leased {
            run.lease = Some(a.clone());
        }
        run
    };
    for (id, wf, leased) in [
        ("st-q", "w", false),
        ("st-r", "w", true),
        ("st-ok", "w", true),
        ("st-f1", "w", true),
        ("st-f2", "w", true),
        ("st-b", "b", true),
    ] {
        store
            .create_run(&make(id, wf, leased))
            .await
            .expect("create");
    }
    let fail = RunOutcome::Failed(Failure {
        message: "boom".into(),
        ..Failure::default()
    });
    for (id, outcome) in [
        ("st-ok", RunOutcome::Succeeded),
        ("st-f1", fail.clone()),
        ("st-f2", fail),
        ("st-b", RunOutcome::Succeeded),
    ] {
        store
            .finish_run(id, token, &outcome, None, &[])
            .await
            .expect("finish");
    }
    let stats = store.workflow_stats().await.expect("stats");
    let names: Vec<&str> = stats.iter().map(|s| s.workflow.as_str()).collect();
    assert_eq!(names, ["b", "w"], "every workflow with runs, by name");
    let w = &stats[1];
    assert_eq!((w.queued, w.running, w.dead_letters), (2, 1, 2), "{w:?}");
    assert!(w.last_success_at.is_some() && w.last_failure_at.is_some());
    let b = &stats[0];
    assert_eq!((b.queued, b.running, b.dead_letters), (0, 0, 0), "{b:?}");
    assert!(b.last_success_at.is_some() && b.last_failure_at.is_none());
    let open = store.open_counts().await.expect("open");
    let w = open.iter().find(|s| s.workflow == "w").expect("w open");
    assert_eq!((w.queued, w.running, w.dead_letters), (2, 1, 2));
}

/// A workflow with a long queue, older than everything else, does not keep
/// another workflow's runs waiting behind it: claims go round the
/// workflows that have queued runs.
async fn a_backlog_of_one_workflow_does_not_starve_the_others(store: &dyn Store) {
    // The seed run (workflow `w`) is claimed first: the next claim looks
    // after `w`.
    seed(store, "seed", None).await;
    let first = store.claim_next(&lease("a", 60_000)).await.expect("claim");
    assert_eq!(first.map(|r| r.id).as_deref(), Some("seed"));
    for i in 0..30 {
        store
            .create_run(&queued(&format!("big-{i:02}"), "a_big", None))
            .await
            .expect("queue");
    }
    for i in 0..2 {
        store
            .create_run(&queued(&format!("small-{i}"), "z_small", None))
            .await
            .expect("queue");
    }
    let a = lease("a", 60_000);
    let mut order = Vec::new();
    for _ in 0..6 {
        let run = store.claim_next(&a).await.expect("claim").expect("a run");
        order.push(run.id);
    }
    assert_eq!(
        order,
        ["small-0", "big-00", "small-1", "big-01", "big-02", "big-03"],
        "claims alternate between the workflows with queued runs, oldest first in each"
    );
}

/// Webhooks arrive together and are committed together (group commit on
/// both stores): one that the store refuses (here, a run id already taken)
/// fails alone, and every other one is committed and answered as such.
async fn one_refused_run_among_concurrent_arrivals_fails_alone(store: &dyn Store) {
    seed(store, "burst-taken", None).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let ids: Vec<String> = (0..40)
        .map(|i| {
            if i == 17 {
                "burst-taken".to_owned()
            } else {
                format!("burst-{i}")
            }
        })
        .collect();
    let answers = futures::future::join_all(ids.iter().map(|id| {
        let mut run = queued(id, "burst", None);
        run.deadline = Some(deadline);
        async move { store.create_run(&run).await }
    }))
    .await;
    for (id, answer) in ids.iter().zip(&answers) {
        if id == "burst-taken" {
            assert!(answer.is_err(), "a second run with a taken id is refused");
        } else {
            assert!(answer.is_ok(), "{id}: {answer:?}");
            assert!(
                store.run(id).await.expect("read").is_some(),
                "{id} was answered committed and is stored"
            );
        }
    }
}

/// A dedupe key is committed with the run it starts: a second delivery
/// within the window creates nothing and names the first run, however many
/// arrive at once; an expired key starts a new run, and the purge removes
/// expired keys.
async fn a_dedupe_key_starts_one_run_per_window(store: &dyn Store) {
    let keyed = |id: &str, workflow: &str, key: &str, expires_at: i64, deadline: bool| {
        let mut run = queued(id, workflow, None);
        run.dedupe = Some(Dedupe {
            key: key.into(),
            expires_at,
        });
        if deadline {
            run.deadline = Some(std::time::Instant::now() + std::time::Duration::from_secs(10));
        }
        run
    };
    let later = now_ms() + 3_600_000;
    store
        .create_run(&keyed("dd-a", "dd", "evt-1", later, true))
        .await
        .expect("the first delivery starts a run");
    match store
        .create_run(&keyed("dd-b", "dd", "evt-1", later, true))
        .await
    {
        Err(StoreError::Duplicate { run_id }) => assert_eq!(run_id, "dd-a"),
        other => panic!("a second delivery is a duplicate of dd-a, got {other:?}"),
    }
    assert!(store.run("dd-b").await.expect("read").is_none());
    store
        .create_run(&keyed("dd-c", "dd-other", "evt-1", later, false))
        .await
        .expect("keys are per workflow");

    // Twenty deliveries of one event at once: one run.
    let mut arrivals = futures::stream::FuturesUnordered::new();
    for i in 0..20 {
        let run = keyed(&format!("dd-burst-{i}"), "dd", "evt-2", later, i % 2 == 0);
        arrivals.push(async move { (run.id.clone(), store.create_run(&run).await) });
    }
    let mut created = Vec::new();
    let mut duplicates = Vec::new();
    while let Some((id, result)) = futures::StreamExt::next(&mut arrivals).await {
        match result {
            Ok(()) => created.push(id),
            Err(StoreError::Duplicate { run_id }) => duplicates.push(run_id),
            Err(e) => panic!("{id}: {e}"),
        }
    }
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(duplicates.len(), 19);
    assert!(
        duplicates.iter().all(|d| d == &created[0]),
        "{duplicates:?}"
    );

    // A key past its window starts a new run, and is purged.
    store
        .create_run(&keyed("dd-old", "dd", "evt-3", now_ms() - 1, false))
        .await
        .expect("create");
    store
        .create_run(&keyed("dd-new", "dd", "evt-3", later, false))
        .await
        .expect("an expired key lets the event start a run again");
    store
        .create_run(&keyed("dd-gone", "dd", "evt-4", now_ms() - 1, false))
        .await
        .expect("create");
    let purged = store
        .purge_dedupe_keys(now_ms(), 100)
        .await
        .expect("purge keys");
    assert!(purged >= 1, "the expired key evt-4 is purged");
    store
        .create_run(&keyed("dd-again", "dd", "evt-4", later, false))
        .await
        .expect("a purged key dedupes nothing");
    match store
        .create_run(&keyed("dd-again-2", "dd", "evt-4", later, false))
        .await
    {
        Err(StoreError::Duplicate { run_id }) => assert_eq!(run_id, "dd-again"),
        other => panic!("{other:?}"),
    }
}

async fn a_cursor_moves_only_forward_with_success(store: &dyn Store) {
    let leased = |id: &str, owner: &str| NewRun {
        id: id.into(),
        workflow: "cw".into(),
        version: "v1".into(),
        trigger: json!({}),
        lease: Some(lease(owner.split('#').next().unwrap_or(owner), 60_000)),
        max_concurrency: None,
        deadline: None,
        dedupe: None,
    };
    let moving = |value: serde_json::Value| {
        RunOutcome::SucceededMovingCursor(plumb_store::CursorMove { value })
    };
    assert_eq!(store.cursor("cw").await.expect("cursor"), None);
    for (id, owner) in [("cur1", "a#1"), ("cur2", "b#1")] {
        store.create_run(&leased(id, owner)).await.expect("create");
    }
    let pinned = store.pin_cursor("cur1", "a#1").await.expect("pin");
    assert_eq!(pinned, json!({"from": {"value": null, "version": 0}}));
    assert_eq!(
        store.pin_cursor("cur1", "a#1").await.expect("pin again"),
        pinned,
        "a resume starts from the same cursor"
    );
    assert!(matches!(
        store.pin_cursor("cur1", "b#1").await,
        Err(StoreError::LeaseLost { .. })
    ));
    store.pin_cursor("cur2", "b#1").await.expect("pin c2");

    store
        .finish_run("cur1", "a#1", &moving(json!("2026-01-02")), None, &[])
        .await
        .expect("finish c1");
    let cursor = store.cursor("cw").await.expect("cursor").expect("moved");
    assert_eq!(
        (cursor.value.clone(), cursor.version),
        (json!("2026-01-02"), 1)
    );
    assert_eq!(cursor.updated_by, "run:cur1");
    let c1 = store.run("cur1").await.expect("read").expect("cur1");
    assert_eq!(c1.status, RunStatus::Succeeded);
    assert_eq!(
        c1.cursor.as_ref().map(|c| c["moved"].clone()),
        Some(json!(true))
    );
    assert_eq!(
        c1.cursor.as_ref().map(|c| c["to"]["version"].clone()),
        Some(json!(1))
    );

    // c2 started from version 0 too: it succeeds, the cursor stays.
    store
        .finish_run("cur2", "b#1", &moving(json!("2025-12-31")), None, &[])
        .await
        .expect("finish c2");
    let after = store.cursor("cw").await.expect("cursor").expect("cursor");
    assert_eq!(after, cursor, "an older run never moves the cursor back");
    let c2 = store.run("cur2").await.expect("read").expect("cur2");
    assert_eq!(c2.status, RunStatus::Succeeded);
    let record = c2.cursor.expect("record");
    assert_eq!(record["moved"], json!(false));
    assert!(
        record["note"]
            .as_str()
            .is_some_and(|n| n.contains("moved on since this run started")),
        "{record}"
    );

    // A null result leaves it; a failure leaves it.
    store
        .create_run(&leased("cur3", "a#1"))
        .await
        .expect("create");
    store.pin_cursor("cur3", "a#1").await.expect("pin");
    store
        .finish_run("cur3", "a#1", &moving(serde_json::Value::Null), None, &[])
        .await
        .expect("finish c3");
    let c3 = store.run("cur3").await.expect("read").expect("cur3");
    assert_eq!(
        c3.cursor.as_ref().map(|c| c["moved"].clone()),
        Some(json!(false))
    );
    store
        .create_run(&leased("cur4", "a#1"))
        .await
        .expect("create");
    store.pin_cursor("cur4", "a#1").await.expect("pin");
    store
        .finish_run(
            "cur4",
            "a#1",
            &RunOutcome::Failed(Failure {
                message: "boom".into(),
                ..Failure::default()
            }),
            None,
            &[],
        )
        .await
        .expect("fail c4");
    assert_eq!(
        store
            .cursor("cw")
            .await
            .expect("cursor")
            .expect("cursor")
            .version,
        1
    );

    // An operator's set is a new version: a run in progress then keeps it.
    store
        .create_run(&leased("cur5", "a#1"))
        .await
        .expect("create");
    store.pin_cursor("cur5", "a#1").await.expect("pin");
    let set = store
        .set_cursor("cw", &json!({"since": 5}), "ops")
        .await
        .expect("set");
    assert_eq!((set.value.clone(), set.version), (json!({"since": 5}), 2));
    store
        .finish_run("cur5", "a#1", &moving(json!("late")), None, &[])
        .await
        .expect("finish c5");
    assert_eq!(
        store
            .cursor("cw")
            .await
            .expect("cursor")
            .expect("cursor")
            .value,
        json!({"since": 5})
    );
    let reset = store
        .set_cursor("cw", &serde_json::Value::Null, "ops")
        .await
        .expect("reset");
    assert_eq!((reset.value, reset.version), (serde_json::Value::Null, 3));
    let audit = store.audit_entries(0, 10_000).await.expect("audit");
    let actions: Vec<&str> = audit
        .iter()
        .filter(|e| e.subject == "cw")
        .map(|e| e.action.as_str())
        .collect();
    assert_eq!(actions, ["cursor.set", "cursor.reset"]);
    assert!(
        store
            .cursors()
            .await
            .expect("cursors")
            .iter()
            .any(|c| c.workflow == "cw"),
        "listed"
    );
}

async fn a_poll_is_held_by_one_process_and_commits_whole(store: &dyn Store) {
    let run = |id: &str| NewRun {
        id: id.into(),
        workflow: "pw".into(),
        version: "v1".into(),
        trigger: json!({"type": "poll", "item": {"id": id}}),
        lease: None,
        max_concurrency: None,
        deadline: None,
        dedupe: None,
    };
    let claim = store
        .claim_poll("pw", "a#1", 60_000)
        .await
        .expect("claim")
        .expect("due at once");
    assert_eq!(
        (claim.cursor.clone(), claim.cursor_version, claim.failures),
        (serde_json::Value::Null, 0, 0)
    );
    assert_eq!(
        store.claim_poll("pw", "b#1", 60_000).await.expect("claim"),
        None,
        "held by a#1: polls never overlap"
    );
    assert!(store.renew_poll("pw", "a#1", 60_000).await.expect("renew"));
    assert!(!store.renew_poll("pw", "b#1", 60_000).await.expect("renew"));
    let keys = vec!["k1".to_owned(), "k2".to_owned()];
    assert_eq!(
        store.seen_keys("pw", &keys).await.expect("seen"),
        [false, false]
    );
    let later = now_ms() + 3_600_000;
    let committed = store
        .commit_poll(&PollCommit {
            workflow: "pw".into(),
            owner: "a#1".into(),
            runs: vec![run("pw-1"), run("pw-2")],
            seen: vec![("k1".into(), 0), ("k2".into(), 1)],
            seen_until: later,
            cursor: Some((0, json!("c1"))),
            next_poll_at: now_ms() - 1,
        })
        .await
        .expect("commit");
    assert_eq!(committed, PollCommitted::Committed);
    assert_eq!(
        store.seen_keys("pw", &keys).await.expect("seen"),
        [true, true]
    );
    assert!(store.run("pw-1").await.expect("read").is_some());
    assert_eq!(
        store.cursor("pw").await.expect("cursor").map(|c| c.value),
        Some(json!("c1"))
    );
    // Released and due again: b#1 takes it, and sees the cursor.
    let claim = store
        .claim_poll("pw", "b#1", 60_000)
        .await
        .expect("claim")
        .expect("due");
    assert_eq!((claim.cursor, claim.cursor_version), (json!("c1"), 1));
    // a#1 lost it: its commit is refused, nothing written.
    let stale = store
        .commit_poll(&PollCommit {
            workflow: "pw".into(),
            owner: "a#1".into(),
            runs: vec![run("pw-stale")],
            seen: vec![("k3".into(), 0)],
            seen_until: later,
            cursor: None,
            next_poll_at: now_ms(),
        })
        .await;
    assert!(
        matches!(stale, Err(StoreError::LeaseLost { .. })),
        "{stale:?}"
    );
    assert!(store.run("pw-stale").await.expect("read").is_none());
    // An operator moved the cursor meanwhile: the poll commits nothing.
    store
        .set_cursor("pw", &json!("ops"), "ops")
        .await
        .expect("set");
    let moved = store
        .commit_poll(&PollCommit {
            workflow: "pw".into(),
            owner: "b#1".into(),
            runs: vec![run("pw-3")],
            seen: vec![("k3".into(), 0)],
            seen_until: later,
            cursor: Some((1, json!("c2"))),
            next_poll_at: now_ms(),
        })
        .await
        .expect("commit");
    assert_eq!(moved, PollCommitted::CursorMoved);
    assert!(store.run("pw-3").await.expect("read").is_none());
    assert_eq!(
        store
            .seen_keys("pw", &["k3".to_owned()])
            .await
            .expect("seen"),
        [false]
    );
    store
        .claim_poll("pw", "b#1", 60_000)
        .await
        .expect("claim")
        .expect("released and due again after a cursor conflict");
    // A failure is recorded with its alert, and releases the poll.
    store
        .fail_poll(
            "pw",
            "b#1",
            "HTTP 503",
            now_ms() + 60_000,
            &[NewAlert {
                id: "poll-alert-1".into(),
                channel: "ops".into(),
                payload: json!({"event": "poll_failed"}),
            }],
        )
        .await
        .expect("fail");
    let state = store
        .poll_states()
        .await
        .expect("states")
        .into_iter()
        .find(|p| p.workflow == "pw")
        .expect("pw");
    assert_eq!(
        (state.failures, state.last_error.as_deref()),
        (1, Some("HTTP 503"))
    );
    assert!(state.last_new_item_at.is_some() && state.last_success_at.is_some());
    assert_eq!(
        store.claim_poll("pw", "c#1", 60_000).await.expect("claim"),
        None,
        "not due before next_poll_at"
    );
}

const ISOLATED_CHECKS: usize = 7;

/// Check number `check` of those that need a store of their own.
async fn isolated_check(check: usize, store: &dyn Store) {
    match check {
        0 => leases_end_by_watching_heartbeats_not_wall_clocks(store).await,
        1 => strikes_count_claims_that_did_not_end_cleanly(store).await,
        2 => a_backlog_of_one_workflow_does_not_starve_the_others(store).await,
        3 => retention_purges_only_old_ended_runs(store).await,
        4 => workflow_stats_count_every_state_of_every_workflow(store).await,
        5 => one_refused_run_among_concurrent_arrivals_fails_alone(store).await,
        _ => what_would_not_read_back_is_refused_not_stored(store).await,
    }
}

/// The contract's checks that share one store, in order (each leaves rows
/// the later ones expect to find, or to ignore).
async fn the_store_contract(store: &dyn Store) {
    a_leased_run_cannot_be_claimed_by_another_owner_until_it_expires(store).await;
    journal_writes_are_fenced_by_the_lease(store).await;
    a_second_claim_by_the_same_process_fences_the_first(store).await;
    upsert_replaces_the_row_but_keeps_state(store).await;
    failures_are_kept_with_the_run(store).await;
    released_runs_can_be_claimed_at_once(store).await;
    claim_next_takes_interrupted_runs_then_queued_ones_oldest_first_within_limits(store).await;
    cancel_and_replay_move_runs_between_states(store).await;
    the_last_step_is_committed_with_the_runs_end(store).await;
    stale_alert_results_and_expired_deadlines_are_not_committed(store).await;
    a_schedule_slot_is_recorded_once(store).await;
    alerts_are_committed_with_the_failure_and_tracked_to_delivery(store).await;
    an_alert_attempt_is_taken_by_one_deliverer(store).await;
    secrets_are_created_rotated_rekeyed_and_deleted_with_an_audit_trail(store).await;
    tokens_are_found_by_hash_until_revoked(store).await;
    deployments_are_audited_only_when_something_changed(store).await;
    processes_are_listed_by_their_last_beat_until_forgotten(store).await;
    a_dedupe_key_starts_one_run_per_window(store).await;
    a_cursor_moves_only_forward_with_success(store).await;
    a_poll_is_held_by_one_process_and_commits_whole(store).await;
    lineage_lists_a_records_events_in_order_replays_included_and_goes_with_its_run(store).await;
}

/// Lineage: a record's events come back oldest first (optionally of one
/// workflow), an event of a run that does not exist is skipped, a replay
/// indexes itself in its own transaction, and purging a run takes its
/// events with it.
async fn lineage_lists_a_records_events_in_order_replays_included_and_goes_with_its_run(
    store: &dyn Store,
) {
    let a = lease("lin", 60_000);
    let mut run = queued("lin-1", "w", None);
    run.lease = Some(a.clone());
    store.create_run(&run).await.expect("create");
    store
        .create_run(&queued("lin-2", "w2", None))
        .await
        .expect("create");
    let event =
        |n: i64, key: &str, run: &str, workflow: &str, what: &str| plumb_store::LineageEntry {
            id: format!("lin-e{n}"),
            record_key: key.into(),
            workflow: workflow.into(),
            run_id: run.into(),
            step_id: (what != "accepted").then(|| "s".to_owned()),
            item: None,
            event: what.into(),
            attempt: (what != "accepted").then_some(1),
            idempotency_key: (what != "accepted").then(|| format!("{run}:s")),
            effect: (what == "succeeded").then(|| "HTTP 201".to_owned()),
            detail: None,
            at: 1_000 + n,
        };
    store
        .record_lineage(&[
            event(3, "ord-1", "lin-1", "w", "succeeded"),
            event(1, "ord-1", "lin-1", "w", "accepted"),
            event(2, "ord-1", "lin-2", "w2", "accepted"),
            event(4, "ord-2", "lin-2", "w2", "accepted"),
            event(5, "ord-1", "lin-missing", "w", "accepted"),
        ])
        .await
        .expect("record");
    let trace = store.trace("ord-1", None, 100).await.expect("trace");
    let seen: Vec<(&str, &str)> = trace
        .iter()
        .map(|e| (e.run_id.as_str(), e.event.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("lin-1", "accepted"),
            ("lin-2", "accepted"),
            ("lin-1", "succeeded")
        ],
        "oldest first; the event of a run that does not exist is skipped"
    );
    assert_eq!(trace[2].effect.as_deref(), Some("HTTP 201"));
    assert_eq!(trace[2].idempotency_key.as_deref(), Some("lin-1:s"));
    // A sender repeating one event forever: the hits kept are capped.
    let hits: Vec<plumb_store::LineageEntry> = (0..plumb_store::lineage::MAX_DEDUPE_HITS + 5)
        .map(|n| {
            let mut e = event(100 + i64::from(n), "ord-hits", "lin-1", "w", "dedupe_hit");
            e.step_id = None;
            e
        })
        .collect();
    store.record_lineage(&hits).await.expect("hits");
    assert_eq!(
        store
            .trace("ord-hits", None, 1000)
            .await
            .expect("trace")
            .len(),
        plumb_store::lineage::MAX_DEDUPE_HITS as usize
    );
    let only_w2 = store.trace("ord-1", Some("w2"), 100).await.expect("trace");
    assert_eq!(only_w2.len(), 1);
    assert_eq!(
        store.trace("ord-1", None, 1).await.expect("trace")[0].event,
        "succeeded",
        "the newest when limited"
    );
    // A dead letter replayed: the replay is indexed under the run's records.
    let token = format!("{}#1", a.owner);
    store
        .finish_run(
            "lin-1",
            &token,
            &RunOutcome::Failed(Failure {
                message: "boom".into(),
                ..Failure::default()
            }),
            None,
            &[],
        )
        .await
        .expect("fail");
    assert_eq!(
        store
            .replay_run("lin-1", "ops@example.com")
            .await
            .expect("replay"),
        ReplayResult::Replayed
    );
    let last = store.trace("ord-1", Some("w"), 100).await.expect("trace");
    let replayed = last.last().expect("an event");
    assert_eq!(
        (replayed.event.as_str(), replayed.run_id.as_str()),
        ("replayed", "lin-1")
    );
    assert!(
        replayed
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("ops@example.com"))
    );
    // Purging a run takes its events.
    store
        .cancel_run("lin-2", "done", "ops@example.com")
        .await
        .expect("cancel");
    let cancelled = store.trace("ord-2", None, 100).await.expect("trace");
    assert_eq!(
        cancelled
            .last()
            .map(|e| (e.event.as_str(), e.detail.as_deref())),
        Some(("cancelled", Some("cancelled by ops@example.com: done"))),
        "a cancellation is indexed in its own transaction"
    );
    let mut position = PurgePosition::default();
    store
        .purge(
            &PurgeScope::Workflow("w2".into()),
            now_ms() + 1,
            now_ms() + 1,
            100,
            &mut position,
        )
        .await
        .expect("purge");
    assert!(
        store
            .trace("ord-2", None, 100)
            .await
            .expect("trace")
            .is_empty()
    );
    assert_eq!(
        store.trace("ord-1", None, 100).await.expect("trace").len(),
        3
    );
}

#[tokio::test]
async fn sqlite_conforms_to_the_store_contract() {
    let (_dir, store) = sqlite().await;
    the_store_contract(&store).await;
}

#[tokio::test]
async fn sqlite_ends_leases_by_observation_and_counts_strikes() {
    for check in 0..ISOLATED_CHECKS {
        let (_dir, store) = sqlite().await;
        isolated_check(check, &store).await;
    }
}

/// The store holds a good run `ok1` and, written behind its back, a run
/// `bad1` (older) whose trigger document does not read back.
async fn the_unreadable_run_fails_alone(store: &dyn Store) {
    let listed = store
        .list_runs(&RunFilter::default())
        .await
        .expect("the listing still works");
    assert_eq!(listed.len(), 2);
    let bad = store.run("bad1").await.expect("get").expect("exists");
    let why = bad.unreadable.expect("marked unreadable");
    assert!(why.contains("trigger"), "{why}");
    // Claims go on: the bad run comes out (oldest first) for the engine to
    // fail, and the good one after it.
    let a = lease("a", 60_000);
    let first = store.claim_next(&a).await.expect("claim").expect("a run");
    assert_eq!(first.id, "bad1");
    assert!(first.unreadable.is_some());
    let second = store.claim_next(&a).await.expect("claim").expect("a run");
    assert_eq!(second.id, "ok1");
}

/// A record written before limits existed (or by hand): its trigger
/// nests past what the JSON reader takes.
fn unreadable_trigger() -> String {
    format!("{{\"body\": {}{}}}", "[".repeat(200), "]".repeat(200))
}

#[tokio::test]
async fn sqlite_an_unreadable_row_fails_alone() {
    let (dir, store) = sqlite().await;
    seed(&store, "ok1", None).await;
    {
        let conn = rusqlite::Connection::open(dir.path().join("plumb.db")).expect("open");
        conn.execute(
            "INSERT INTO runs (id, workflow, version, trigger_payload, status, claims, \
             created_at, updated_at) VALUES ('bad1', 'w', 'v1', ?1, 'queued', 0, 0, 0)",
            [unreadable_trigger()],
        )
        .expect("insert");
    }
    the_unreadable_run_fails_alone(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_batches_concurrent_writes() {
    let (_dir, store) = sqlite().await;
    concurrent_writes_share_commits_and_all_land(Arc::new(store)).await;
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
            .record_step("a#1", &step("r1", "s1", None, StepStatus::Succeeded))
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

/// A schema of its own on the database `PLUMB_TEST_POSTGRES` names,
/// dropped (with everything in it) when this is dropped, even when the
/// test fails.
struct PgSchema {
    options: PgConnectOptions,
    name: String,
}

impl PgSchema {
    /// A new empty schema, or `None` (the test is skipped, saying why)
    /// when no database is named.
    async fn create() -> Option<Self> {
        let Ok(url) = std::env::var("PLUMB_TEST_POSTGRES") else {
            eprintln!(
                "skipped: set PLUMB_TEST_POSTGRES (e.g. postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL store tests"
            );
            return None;
        };
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let name = format!(
            "plumb_t_{}_{}_{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let options = PgConnectOptions::from_str(&url).expect("PLUMB_TEST_POSTGRES is a URL");
        let schema = Self { options, name };
        schema
            .execute(&format!("CREATE SCHEMA {}", schema.name))
            .await;
        Some(schema)
    }

    /// Options that work in this schema.
    fn options(&self) -> PgConnectOptions {
        self.options
            .clone()
            .options([("search_path", self.name.as_str())])
    }

    /// A store on this schema (migrating it if needed).
    async fn store(&self) -> PgStore {
        PgStore::connect_with(self.options())
            .await
            .expect("connect to PostgreSQL")
    }

    /// Runs raw SQL in this schema, behind the store's back.
    async fn execute(&self, sql: &str) {
        let mut conn = PgConnection::connect_with(&self.options())
            .await
            .expect("connect");
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .expect("raw SQL");
        let _ = conn.close().await;
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs outside any runtime's async context only on a thread of
        // its own: a small runtime there drops the schema and waits.
        let options = self.options.clone();
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conn = PgConnection::connect_with(&options).await?;
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

#[tokio::test]
async fn postgres_conforms_to_the_store_contract() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let store = schema.store().await;
    the_store_contract(&store).await;
    store.ping().await.expect("ping");
    store.close().await;
}

#[tokio::test]
async fn postgres_ends_leases_by_observation_and_counts_strikes() {
    for check in 0..ISOLATED_CHECKS {
        let Some(schema) = PgSchema::create().await else {
            return;
        };
        let store = schema.store().await;
        isolated_check(check, &store).await;
        store.close().await;
    }
}

#[tokio::test]
async fn postgres_an_unreadable_row_fails_alone() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let store = schema.store().await;
    seed(&store, "ok1", None).await;
    schema
        .execute(&format!(
            "INSERT INTO runs (id, workflow, version, trigger_payload, status, claims, \
             created_at, updated_at) VALUES ('bad1', 'w', 'v1', '{}', 'queued', 0, 0, 0)",
            unreadable_trigger()
        ))
        .await;
    the_unreadable_run_fails_alone(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_writes_all_land() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let store = schema.store().await;
    concurrent_writes_share_commits_and_all_land(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_committed_rows_survive_reconnecting() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    {
        let store = schema.store().await;
        seed(&store, "r1", Some(lease("a", 60_000))).await;
        store
            .record_step("a#1", &step("r1", "s1", None, StepStatus::Succeeded))
            .await
            .expect("write");
        // Dropped without close(): like a process that dies.
    }
    let store = schema.store().await;
    let journal = store.journal("r1").await.expect("journal");
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].status, StepStatus::Succeeded);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_processes_starting_at_once_migrate_once_and_a_newer_schema_is_refused() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let mut starting = Vec::new();
    for _ in 0..10 {
        let options = schema.options();
        starting.push(tokio::spawn(PgStore::connect_with(options)));
    }
    for s in starting {
        let store = s.await.expect("join").expect("every process starts");
        store.close().await;
    }
    let store = schema.store().await;
    assert_eq!(
        store.audit_head().await.expect("head"),
        None,
        "an empty log has no head"
    );
    assert_eq!(
        store.instance_secret().await.expect("secret").len(),
        64,
        "the instance secret is 32 random bytes in hex"
    );
    store.close().await;
    schema
        .execute("UPDATE plumb_schema_version SET version = version + 1")
        .await;
    let err = PgStore::connect_with(schema.options())
        .await
        .expect_err("a newer schema");
    assert!(
        matches!(&err, StoreError::Open { message, .. } if message.contains("upgrade plumb")),
        "{err}"
    );
}

/// Many concurrent `claim_next` calls, half on each store, until no run is
/// left: the runs each got, in claim order.
async fn claim_all(stores: [Arc<PgStore>; 2], per_store: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for t in 0..per_store {
            let store = Arc::clone(store);
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let l = lease(&format!("p{s}t{t}"), 60_000);
                while let Some(run) = store.claim_next(&l).await.expect("claim") {
                    got.push(run.id);
                }
                got
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_processes_claiming_at_once_never_get_the_same_run() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let stores = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    seed(stores[0].as_ref(), "seed-c", None).await;
    for i in 0..200 {
        stores[i % 2]
            .create_run(&queued(&format!("c{i:03}"), "w", None))
            .await
            .expect("queue");
    }
    let mut claimed = claim_all(stores.clone(), 6).await;
    claimed.sort();
    let n = claimed.len();
    claimed.dedup();
    assert_eq!(claimed.len(), n, "a run was claimed twice");
    assert_eq!(n, 201, "every run was claimed");
    for store in stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_concurrency_limit_holds_across_processes() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let stores = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    seed(stores[0].as_ref(), "seed-l", None).await;
    stores[0]
        .cancel_run("seed-l", "not part of this test", "test")
        .await
        .expect("cancel");
    const RUNS: usize = 30;
    for i in 0..RUNS {
        stores[i % 2]
            .create_run(&queued(&format!("l{i:02}"), "single", Some(1)))
            .await
            .expect("queue");
    }
    // A workflow without a limit, behind the limited one in the queue: it
    // is claimed while `single` is at its limit.
    stores[1]
        .create_run(&queued("free", "other", None))
        .await
        .expect("queue");
    let holding = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for t in 0..4 {
            let (store, holding, finished, claimed) = (
                Arc::clone(store),
                Arc::clone(&holding),
                Arc::clone(&finished),
                Arc::clone(&claimed),
            );
            tasks.push(tokio::spawn(async move {
                let l = lease(&format!("p{s}t{t}"), 60_000);
                while finished.load(Ordering::SeqCst) < RUNS {
                    assert!(std::time::Instant::now() < give_up, "claims stalled");
                    let Some(run) = store.claim_next(&l).await.expect("claim") else {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        continue;
                    };
                    claimed.lock().expect("lock").push(run.id.clone());
                    if run.workflow != "single" {
                        continue;
                    }
                    assert_eq!(
                        holding.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two runs of `single` leased at once"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                    // Counted down before the end commits: no other claim
                    // can take a run of `single` until it has.
                    holding.fetch_sub(1, Ordering::SeqCst);
                    let owner = run.lease_owner.expect("leased");
                    store
                        .finish_run(&run.id, &owner, &RunOutcome::Succeeded, None, &[])
                        .await
                        .expect("finish");
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("join");
    }
    let mut claimed = claimed.lock().expect("lock").clone();
    assert!(claimed.contains(&"free".to_owned()), "{claimed:?}");
    claimed.sort();
    let n = claimed.len();
    claimed.dedup();
    assert_eq!(
        (n, claimed.len()),
        (RUNS + 1, RUNS + 1),
        "each run claimed once"
    );
    for store in stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_audit_appends_from_two_processes_never_fork_the_chain() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let stores = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = Arc::clone(&stores[i % 2]);
        tasks.push(tokio::spawn(async move {
            store
                .append_audit(&NewAuditEntry::new(
                    "test",
                    "secret.set",
                    &format!("s{i}"),
                    json!({ "i": i }),
                ))
                .await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    let audit = stores[1].audit_entries(0, 1000).await.expect("audit");
    assert_eq!(verify_chain(&audit), Ok(40));
    let head = stores[0].audit_head().await.expect("head").expect("a head");
    assert_eq!(head, (40, audit[39].hash.clone()));
    for store in stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_run_past_its_deadline_is_never_kept() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let store = schema.store().await;
    seed(&store, "seed-d", None).await;
    let ms = std::time::Duration::from_millis;

    // The insert waits for a lock past the deadline: it is never committed.
    let mut holder = PgConnection::connect_with(&schema.options())
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE runs IN EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let mut blocked = queued("d1", "w", None);
    blocked.deadline = Some(std::time::Instant::now() + ms(100));
    let err = store.create_run(&blocked).await.expect_err("blocked");
    assert!(err.is_transient(), "{err}");
    sqlx::raw_sql("COMMIT")
        .execute(&mut holder)
        .await
        .expect("unlock");
    tokio::time::sleep(ms(500)).await;
    assert!(store.run("d1").await.expect("get").is_none(), "never kept");

    // The commit itself outlasts the deadline (a deferred trigger sleeps
    // at COMMIT): it lands after the caller was told "not accepted", and
    // the run is withdrawn at once.
    sqlx::raw_sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON runs \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )
    .execute(&mut holder)
    .await
    .expect("slow commits");
    let mut late = queued("d2", "w", None);
    late.deadline = Some(std::time::Instant::now() + ms(100));
    let err = store
        .create_run(&late)
        .await
        .expect_err("committed too late");
    assert!(err.is_transient(), "{err}");
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let run = loop {
        let run = store.run("d2").await.expect("get");
        if run.as_ref().is_some_and(|r| r.status != RunStatus::Queued)
            || std::time::Instant::now() > give_up
        {
            break run;
        }
        tokio::time::sleep(ms(50)).await;
    };
    let run = run.expect("the late commit landed");
    assert_eq!(run.status, RunStatus::Cancelled);
    let why = run.failure.map(|f| f.message).unwrap_or_default();
    assert!(why.starts_with("withdrawn:"), "{why}");
    let _ = holder.close().await;
    store.close().await;
}

#[tokio::test]
async fn postgres_never_shows_the_password() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let secret = "pw-that-must-never-show";
    // The test server trusts local logins: any password is taken.
    let store = PgStore::connect_with(schema.options().password(secret))
        .await
        .expect("connect");
    assert!(!format!("{store:?}").contains(secret));
    assert!(!store.location().contains(secret));
    store.close().await;
    for (url, password) in [
        (
            "postgres://postgres@127.0.0.1:1/test".to_owned(),
            Some(secret.to_owned()),
        ),
        (
            format!("postgres://postgres:{secret}@127.0.0.1:1/test"),
            None,
        ),
        (
            format!("postgres://postgres:{secret}@127.0.0.1:port/test"),
            None,
        ),
    ] {
        let err = PgStore::connect(&url, password, PostgresOptions::default())
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(!err.to_string().contains(secret), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_new_run_wakes_the_idle_workers_of_other_processes() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let (a, b) = (schema.store().await, schema.store().await);
    let signal = a.work_signal().expect("PostgreSQL signals new work");
    seed(&b, "seed-n", None).await;
    // The listener starts in the background (and wakes whoever waits when
    // it does): waiting starts once it surely listens; then runs are queued
    // until one is heard (each commit notifies).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let heard = tokio::spawn(async move {
        tokio::time::timeout(std::time::Duration::from_secs(10), signal.notified()).await
    });
    let mut queued = 0;
    while !heard.is_finished() && queued < 40 {
        b.create_run(&queued_run(&format!("n{queued}")))
            .await
            .expect("queue");
        queued += 1;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        heard.await.expect("waiter").is_ok(),
        "a run queued by another process woke this one"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_notify_works_by_polling_and_never_calls_pg_notify() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let listening = schema.store().await;
    let signal = listening.work_signal().expect("this one listens");
    let quiet = PgStore::connect_with_settings(
        schema.options(),
        PostgresOptions {
            pool: 2,
            notify: false,
            ..PostgresOptions::default()
        },
    )
    .await
    .expect("connect without notifications");
    assert!(
        quiet.work_signal().is_none(),
        "a store without notifications leaves idle workers to poll"
    );
    seed(&quiet, "seed-q", None).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let heard = tokio::spawn(async move {
        tokio::time::timeout(std::time::Duration::from_millis(1500), signal.notified()).await
    });
    // Every statement that would announce work: a new run, and a claim
    // released cleanly (it puts the run back in the queue).
    for i in 0..3 {
        quiet
            .create_run(&queued_run(&format!("q{i}")))
            .await
            .expect("queue without pg_notify");
    }
    let run = quiet
        .claim_next(&lease("w1", 60_000))
        .await
        .expect("claim")
        .expect("a queued run");
    quiet
        .release_run(&run.id, "w1", &Release::Clean)
        .await
        .expect("release without pg_notify");
    assert!(
        heard.await.expect("waiter").is_err(),
        "no notification was sent by a store told not to"
    );
    listening.close().await;
    quiet.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_one_shot_command_does_not_listen_but_still_announces_the_runs_it_queues() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let serving = schema.store().await;
    let signal = serving.work_signal().expect("a serving process listens");
    let command =
        PgStore::connect_with_settings(schema.options(), PostgresOptions::default().for_command())
            .await
            .expect("connect as a command");
    assert!(
        command.work_signal().is_none(),
        "a one-shot command opens no listening connection"
    );
    seed(&command, "seed-c", None).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let heard = tokio::spawn(async move {
        tokio::time::timeout(std::time::Duration::from_secs(10), signal.notified()).await
    });
    let mut queued = 0;
    while !heard.is_finished() && queued < 40 {
        command
            .create_run(&queued_run(&format!("c{queued}")))
            .await
            .expect("queue from a command");
        queued += 1;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        heard.await.expect("waiter").is_ok(),
        "a run queued by a command (`plumb dlq replay`) wakes the serving process at once"
    );
    serving.close().await;
    command.close().await;
}

fn queued_run(id: &str) -> NewRun {
    queued(id, "w", None)
}

#[tokio::test]
async fn sqlite_has_no_cross_process_signal_and_relies_on_polling() {
    let (_dir, store) = sqlite().await;
    assert!(store.work_signal().is_none());
}
