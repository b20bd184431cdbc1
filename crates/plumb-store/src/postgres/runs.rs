//! Runs, the journal and the queue on PostgreSQL: every query of
//! [`RunStore`](crate::RunStore).
//!
//! # Claims across processes
//!
//! `claim_next` walks the same two lanes as SQLite, in the same order
//! (interrupted runs past their backoff, then the queue; oldest first),
//! taking each candidate `FOR UPDATE SKIP LOCKED`: a run another claimer
//! is looking at is passed over, never waited for, and never taken twice.
//!
//! A workflow's concurrency limit must hold across processes, and a count
//! read in one transaction says nothing about another's uncommitted claim.
//! So a candidate whose run carries a limit is taken only under the
//! transaction-scoped advisory lock of its workflow, after counting the
//! workflow's leased runs again *after* the lock was granted (under READ
//! COMMITTED each statement sees every commit before it, and a claimer
//! releases the lock only once its claim is committed). The lock is only
//! *tried*: a claimer never waits for another, so two claimers holding
//! each other's workflows cannot deadlock. A workflow at its limit, or
//! whose lock another claimer holds right now, is set aside for the rest
//! of this claim and the next candidate is tried: `None` means no run of
//! any other workflow was claimable either.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use tokio::sync::{Notify, oneshot};

use super::audit::append_audit;
use super::intake::Pending;
use super::{PgStore, fenced, fetch_all, fetch_optional, map_err, no_nul, sql};
use crate::json::to_json_text;
use crate::rows::{self, ATTEMPT_COLUMNS, Columns, RUN_COLUMNS, STEP_COLUMNS, item_to_db};
use crate::writes::{
    ClaimStep, DEADLINE_GRACE, DEADLINE_MISSED, EncodedStep, Ending, LEASE_STATE_COLUMNS,
    LeaseState, NewRunRow, NextLease, Visit, WITHDRAWN, WorkflowWalk, decide_claim, entries,
};
use crate::{
    AttemptFailure, CancelResult, Claim, Lease, LeasedRun, Millis, NewAlert, NewRun, Release,
    ReplayResult, Run, RunFilter, RunOutcome, RunStore, StepRecord, StoreError, WorkflowStats,
    WorkflowVersion, now_ms,
};

/// The advisory-lock class of concurrency limits (the first of the two
/// 32-bit keys; the second is the workflow name's hash): "plmc" in ASCII.
/// Two-key locks never conflict with the one-key migration lock.
const LIMIT_LOCK_CLASS: i32 = 0x706c_6d63;

/// The claim lanes, in order. A backoff is at most a minute (see the
/// engine's crash backoff), so a `not_before` more than two minutes ahead
/// was written by a clock that runs ahead of this one: it is ignored
/// rather than obeyed, or that clock would park the run for as long as it
/// is wrong.
const LANES: [&str; 2] = [
    "r.status = 'running' AND r.lease_owner IS NULL \
     AND (r.not_before IS NULL OR r.not_before <= $1 OR r.not_before > $1 + 120000)",
    "r.status = 'queued' AND (r.not_before IS NULL OR r.not_before <= $1 \
     OR r.not_before > $1 + 120000)",
];

/// A claim candidate `r` whose workflow looks under its concurrency limit
/// (a run counts against it while anyone holds its lease). Only a filter
/// that spares a lock and a count for workflows plainly at their limit:
/// the limit itself is checked under the workflow's lock.
const UNDER_LIMIT: &str = "(r.max_concurrency IS NULL OR (SELECT count(*) FROM runs x \
    WHERE x.workflow = r.workflow AND x.status = 'running' AND x.lease_owner IS NOT NULL) \
    < r.max_concurrency)";

/// Inserts a run whose row is already encoded.
pub(super) async fn insert_run(
    conn: &mut PgConnection,
    run: &NewRun,
    row: &NewRunRow,
    notify: bool,
) -> Result<(), StoreError> {
    if let Some(dedupe) = &run.dedupe {
        take_dedupe_key(conn, run, dedupe, row.now).await?;
    }
    // The notification is sent when the transaction commits: idle workers
    // of every process wake up (see `PgStore::work_signal`).
    let notify_work = notify_work_sql(notify);
    sqlx::query(sql(format!(
        "WITH inserted AS (INSERT INTO runs (id, workflow, version, trigger_payload, status, \
         claims, strikes, heartbeat, created_at, started_at, updated_at, lease_owner, \
         lease_expires_at, lease_ms, max_concurrency) \
         VALUES ($1, $2, $3, $4, $5, $6, $6, $6, $7, $8, $7, $9, $10, $11, $12) RETURNING 1) \
         SELECT {notify_work} FROM inserted"
    )))
    .bind(&run.id)
    .bind(&run.workflow)
    .bind(&run.version)
    .bind(&row.trigger)
    .bind(row.status.as_str())
    .bind(row.claims)
    .bind(row.now)
    .bind(row.started_at)
    .bind(&row.lease_owner)
    .bind(row.lease_expires_at)
    .bind(row.lease_ms)
    .bind(row.max_concurrency)
    .execute(conn)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// The expression that announces that a run may be claimable, sent when
/// the transaction commits, on a channel of this store's schema (two
/// installations in one database do not wake each other's workers); `NULL`
/// for a store without notifications (`notify=false`), whose database may
/// not have `pg_notify` at all.
pub(super) fn notify_work_sql(notify: bool) -> &'static str {
    if notify {
        "pg_notify('plumb_work_' || left(md5(current_schema()), 16), '')"
    } else {
        "NULL"
    }
}

/// Tells idle workers of every process, when the transaction commits, that
/// a run may be claimable.
async fn notify_work(conn: &mut PgConnection, notify: bool) -> Result<(), StoreError> {
    if notify {
        sqlx::query(sql(format!("SELECT {}", notify_work_sql(true))))
            .execute(conn)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

/// Creates a run in a transaction of its own.
async fn create_run_now(
    pool: &PgPool,
    run: &NewRun,
    row: &NewRunRow,
    notify: bool,
) -> Result<(), StoreError> {
    if run.dedupe.is_some() {
        let mut tx = pool.begin().await.map_err(map_err)?;
        insert_run(&mut tx, run, row, notify).await?;
        return tx.commit().await.map_err(map_err);
    }
    let mut conn = pool.acquire().await.map_err(map_err)?;
    insert_run(&mut conn, run, row, notify).await
}

/// Records the dedupe key of `run` (in the caller's transaction), unless
/// an unexpired key of the same workflow is there: then
/// [`StoreError::Duplicate`] names the run the first delivery started. Two
/// deliveries in flight at once meet at the key's primary key: the second
/// waits for the first transaction, then sees its key.
async fn take_dedupe_key(
    conn: &mut PgConnection,
    run: &NewRun,
    dedupe: &crate::Dedupe,
    now: Millis,
) -> Result<(), StoreError> {
    let taken: Option<String> = sqlx::query_scalar(
        "INSERT INTO dedupe_keys (workflow, key, run_id, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (workflow, key) DO UPDATE SET run_id = excluded.run_id, \
         created_at = excluded.created_at, expires_at = excluded.expires_at \
         WHERE dedupe_keys.expires_at <= $4 \
         RETURNING run_id",
    )
    .bind(&run.workflow)
    .bind(no_nul(&dedupe.key))
    .bind(&run.id)
    .bind(now)
    .bind(dedupe.expires_at)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    if taken.is_some() {
        return Ok(());
    }
    let first: Option<String> =
        sqlx::query_scalar("SELECT run_id FROM dedupe_keys WHERE workflow = $1 AND key = $2")
            .bind(&run.workflow)
            .bind(no_nul(&dedupe.key))
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
    Err(StoreError::Duplicate {
        run_id: first.unwrap_or_default(),
    })
}

/// Commits `run` if that can be done before `deadline`, answering on
/// `reply`; withdraws it if the commit landed after the caller stopped
/// waiting (see the module doc of `postgres`).
pub(super) async fn create_before(
    pool: PgPool,
    notify: bool,
    run: NewRun,
    row: NewRunRow,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), StoreError>>,
) {
    let late = |reply: &oneshot::Sender<_>| reply.is_closed() || Instant::now() > deadline;
    // Whether the commit was sent: if it then fails (the connection drops
    // before the server's answer arrives), the run may be committed all the
    // same while its sender is told "not accepted".
    let mut commit_sent = false;
    let result = async {
        let mut tx = pool.begin().await.map_err(map_err)?;
        // Waiting for a connection may have outlasted the deadline: a run
        // that may no longer be committed is not (dropping `tx` rolls back).
        if late(&reply) {
            return Err(StoreError::Unavailable(DEADLINE_MISSED.into()));
        }
        insert_run(&mut tx, &run, &row, notify).await?;
        if late(&reply) {
            return Err(StoreError::Unavailable(DEADLINE_MISSED.into()));
        }
        commit_sent = true;
        tx.commit().await.map_err(map_err)
    }
    .await;
    let committed = result.is_ok();
    let unknown = commit_sent && !committed;
    // A run with a dedupe key is never withdrawn: its sender's retry finds
    // the key and is answered with this run, which then must run.
    let keyed = run.dedupe.is_some();
    if ((reply.send(result).is_err() && committed) || unknown) && !keyed {
        tracing::warn!(run_id = %run.id, "A run may have committed after its sender was answered 503; withdrawing it.");
        withdraw(&pool, &run.id).await;
    }
}

/// Cancels a run committed behind its sender's back, while it is still
/// queued; retried for a while if the store fails, since its sender will
/// send it again.
pub(super) async fn withdraw(pool: &PgPool, id: &str) {
    let mut pause = std::time::Duration::from_millis(50);
    for attempt in 1..=12 {
        let done = sqlx::query(
            "UPDATE runs SET status = 'cancelled', finished_at = $2, updated_at = $2, error = $3 \
             WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .bind(now_ms())
        .bind(WITHDRAWN)
        .execute(pool)
        .await;
        match done {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(run_id = %id, attempt, error = %map_err(e), "Could not withdraw a run committed too late; retrying.");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
    tracing::error!(run_id = %id, "Gave up withdrawing a run committed after its sender was answered 503; it may run twice.");
}

/// `insert … SELECT … FROM lease`, fenced: it inserts only while the
/// claim token bound as `owner` (e.g. `$12`) holds the lease of run `$1`
/// and the run is running. The run's row stays locked (`FOR NO KEY
/// UPDATE`) until the write commits, so the lease cannot change hands
/// under it: a claim or expiry waits for the write, and a write that waited
/// for one finds the new holder and inserts nothing. Not `FOR SHARE`:
/// shared locks let a stream of concurrent item writes of one `for_each`
/// overtake a waiting lease renewal indefinitely; exclusive ones queue.
fn fenced_insert(owner: &str, insert: &str) -> AssertSqlSafe<String> {
    sql(format!(
        "WITH lease AS (SELECT 1 FROM runs WHERE id = $1 AND lease_owner = {owner} \
         AND status = 'running' FOR NO KEY UPDATE) {insert}"
    ))
}

/// A journal row, fenced (see [`fenced_insert`]).
async fn record_step(
    conn: &mut PgConnection,
    owner: &str,
    r: &EncodedStep,
) -> Result<(), StoreError> {
    let rows = sqlx::query(fenced_insert(
        "$12",
        "INSERT INTO steps (run_id, step_id, item, status, attempt, state, output, error, \
         status_code, started_at, finished_at) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM lease \
         ON CONFLICT (run_id, step_id, item) DO UPDATE SET \
         status = excluded.status, attempt = excluded.attempt, \
         state = COALESCE(excluded.state, steps.state), output = excluded.output, \
         error = excluded.error, status_code = excluded.status_code, \
         started_at = excluded.started_at, finished_at = excluded.finished_at",
    ))
    .bind(&r.run_id)
    .bind(&r.step_id)
    .bind(item_to_db(r.item))
    .bind(r.status.as_str())
    .bind(i64::from(r.attempt))
    .bind(&r.state)
    .bind(&r.output)
    .bind(r.error.as_deref().map(no_nul))
    .bind(r.status_code.map(i64::from))
    .bind(r.started_at)
    .bind(r.finished_at)
    .bind(owner)
    .execute(conn)
    .await
    .map_err(map_err)?
    .rows_affected();
    fenced(rows, &r.run_id)
}

async fn select_run(conn: &mut PgConnection, id: &str) -> Result<Option<Run>, StoreError> {
    sqlx::query(sql(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(map_err)?
        .map(|r| rows::run(&r))
        .transpose()
}

/// Gives `lease.owner` the run's next claim: a fresh token, a new
/// heartbeat and a strike that a clean end or release takes back. The
/// caller holds the run's row lock.
async fn take_lease(
    conn: &mut PgConnection,
    id: &str,
    claims: i64,
    lease: &Lease,
) -> Result<Run, StoreError> {
    let next = NextLease::new(claims, lease);
    let row = sqlx::query(sql(format!(
        "UPDATE runs SET status = 'running', claims = $2, strikes = strikes + 1, \
         heartbeat = heartbeat + 1, started_at = COALESCE(started_at, $3), updated_at = $3, \
         lease_owner = $4, lease_expires_at = $5, lease_ms = $6 \
         WHERE id = $1 RETURNING {RUN_COLUMNS}"
    )))
    .bind(id)
    .bind(next.claim)
    .bind(next.now)
    .bind(&next.token)
    .bind(next.expires_at)
    .bind(next.ttl_ms)
    .fetch_one(conn)
    .await
    .map_err(map_err)?;
    rows::run(&row)
}

/// A claim candidate: the run and what its concurrency limit needs.
struct Candidate {
    id: String,
    claims: i64,
    workflow: String,
    max_concurrency: Option<i64>,
}

/// The oldest claimable run of `lane` not of a workflow in `set_aside`
/// (and of workflow `only`, when given), locked.
async fn candidate(
    conn: &mut PgConnection,
    lane: &str,
    now: Millis,
    set_aside: &[String],
    only: Option<&str>,
) -> Result<Option<Candidate>, StoreError> {
    let of_workflow = if only.is_some() {
        "AND r.workflow = $3"
    } else {
        ""
    };
    let query = sqlx::query(sql(format!(
        "SELECT r.id, r.claims, r.workflow, r.max_concurrency FROM runs r \
         WHERE {lane} AND {UNDER_LIMIT} AND r.workflow <> ALL($2) {of_workflow} \
         ORDER BY r.created_at, r.id LIMIT 1 FOR UPDATE OF r SKIP LOCKED"
    )))
    .bind(now)
    .bind(set_aside);
    let query = match only {
        Some(w) => query.bind(w.to_owned()),
        None => query,
    };
    let row: Option<PgRow> = query.fetch_optional(conn).await.map_err(map_err)?;
    row.map(|r| {
        Ok(Candidate {
            id: r.text("id")?,
            claims: r.int("claims")?,
            workflow: r.text("workflow")?,
            max_concurrency: r.opt_int("max_concurrency")?,
        })
    })
    .transpose()
}

/// Whether `workflow` may have one more leased run, decided under its
/// advisory lock (held until the claim commits). `false` also when another
/// claimer holds that lock right now.
async fn under_limit(
    conn: &mut PgConnection,
    workflow: &str,
    limit: i64,
) -> Result<bool, StoreError> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
        .bind(LIMIT_LOCK_CLASS)
        .bind(workflow)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    if !locked {
        return Ok(false);
    }
    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE workflow = $1 AND status = 'running' \
         AND lease_owner IS NOT NULL",
    )
    .bind(workflow)
    .fetch_one(conn)
    .await
    .map_err(map_err)?;
    Ok(leased < limit)
}

async fn claim_next(
    conn: &mut PgConnection,
    lease: &Lease,
    after_workflow: &str,
) -> Result<Option<Run>, StoreError> {
    let now = now_ms();
    // Interrupted runs first, oldest first, whatever their workflow.
    let mut set_aside: Vec<String> = Vec::new();
    while let Some(c) = candidate(conn, LANES[0], now, &set_aside, None).await? {
        if let Some(limit) = c.max_concurrency
            && !under_limit(conn, &c.workflow, limit).await?
        {
            set_aside.push(c.workflow);
            continue;
        }
        return take_lease(conn, &c.id, c.claims, lease).await.map(Some);
    }
    // Then the queue, workflow by workflow (see `WorkflowWalk`), oldest
    // first within each.
    let mut walk = WorkflowWalk::new(after_workflow);
    loop {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT min(workflow) FROM runs WHERE status = 'queued' AND workflow > $1",
        )
        .bind(walk.cursor())
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
        let workflow = match walk.next(next) {
            Visit::Try(w) => w,
            Visit::Again => continue,
            Visit::Done => return Ok(None),
        };
        if let Some(c) = candidate(conn, LANES[1], now, &[], Some(&workflow)).await? {
            if let Some(limit) = c.max_concurrency
                && !under_limit(conn, &c.workflow, limit).await?
            {
                continue;
            }
            return take_lease(conn, &c.id, c.claims, lease).await.map(Some);
        }
    }
}

async fn finish(
    conn: &mut PgConnection,
    id: &str,
    owner: &str,
    outcome: &RunOutcome,
    last_step: Option<&EncodedStep>,
    alerts: &[(&NewAlert, String)],
) -> Result<(), StoreError> {
    // The run's row is locked first, for the whole end: the last step's
    // fenced write then finds it held by this transaction.
    let workflow: Option<String> = sqlx::query_scalar(
        "SELECT workflow FROM runs WHERE id = $1 AND lease_owner = $2 AND status = 'running' \
         FOR UPDATE",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_err)?;
    let Some(workflow) = workflow else {
        return Err(StoreError::LeaseLost {
            run_id: id.to_owned(),
        });
    };
    if let Some(record) = last_step {
        record_step(conn, owner, record).await?;
    }
    let end = Ending::new(outcome);
    let (item, attempt, status_code) = end.numbers();
    sqlx::query(
        "UPDATE runs SET status = $2, finished_at = $3, updated_at = $3, \
         error = $4, failed_step = $5, failed_item = $6, failed_attempt = $7, \
         failed_status_code = $8, lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1",
    )
    .bind(id)
    .bind(end.status.as_str())
    .bind(end.now)
    .bind(end.error.as_deref().map(no_nul))
    .bind(&end.failure.step)
    .bind(item)
    .bind(attempt)
    .bind(status_code)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    if let RunOutcome::SucceededMovingCursor(wanted) = outcome {
        super::cursors::move_cursor(conn, id, &workflow, wanted).await?;
    }
    for (alert, payload) in alerts {
        sqlx::query(
            "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
             next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
        )
        .bind(&alert.id)
        .bind(id)
        .bind(&workflow)
        .bind(&alert.channel)
        .bind(payload)
        .bind(end.now)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    Ok(())
}

async fn cancel(
    conn: &mut PgConnection,
    id: &str,
    reason: &str,
) -> Result<CancelResult, StoreError> {
    let rows = sqlx::query(
        "UPDATE runs SET status = 'cancelled', finished_at = $2, updated_at = $2, error = $3, \
         lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND status IN ('queued', 'running')",
    )
    .bind(id)
    .bind(now_ms())
    .bind(no_nul(reason))
    .execute(&mut *conn)
    .await
    .map_err(map_err)?
    .rows_affected();
    if rows == 1 {
        return Ok(CancelResult::Cancelled);
    }
    Ok(match select_run(conn, id).await? {
        None => CancelResult::NotFound,
        Some(run) => CancelResult::AlreadyEnded(run.status),
    })
}

async fn replay(conn: &mut PgConnection, id: &str) -> Result<ReplayResult, StoreError> {
    let rows = sqlx::query(
        "UPDATE runs SET status = 'queued', replays = replays + 1, updated_at = $2, \
         finished_at = NULL, error = NULL, failed_step = NULL, failed_item = NULL, \
         failed_attempt = NULL, failed_status_code = NULL, lease_owner = NULL, \
         lease_expires_at = NULL, strikes = 0, last_error = NULL, not_before = NULL \
         WHERE id = $1 AND status = 'failed'",
    )
    .bind(id)
    .bind(now_ms())
    .execute(&mut *conn)
    .await
    .map_err(map_err)?
    .rows_affected();
    if rows == 0 {
        return Ok(match select_run(conn, id).await? {
            None => ReplayResult::NotFound,
            Some(run) => ReplayResult::NotFailed(run.status),
        });
    }
    // A failed `for_each` keeps its committed item list (so indices and
    // keys stay the same) and becomes "in progress" again; every other
    // failed row is removed so the step, or item, runs afresh. Succeeded
    // rows stay: they are not run again.
    sqlx::query(
        "UPDATE steps SET status = 'running', error = NULL, finished_at = NULL, output = NULL \
         WHERE run_id = $1 AND status = 'failed' AND item = -1 AND state IS NOT NULL",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(map_err)?;
    sqlx::query("DELETE FROM steps WHERE run_id = $1 AND status = 'failed'")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    Ok(ReplayResult::Replayed)
}

#[async_trait]
impl RunStore for PgStore {
    async fn put_workflow_version(&self, v: &WorkflowVersion) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO workflow_versions (hash, workflow, file, source, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&v.hash)
        .bind(&v.workflow)
        .bind(&v.file)
        .bind(&v.source)
        .bind(v.created_at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError> {
        let query = sqlx::query(
            "SELECT hash, workflow, file, source, created_at FROM workflow_versions \
             WHERE hash = $1",
        )
        .bind(hash);
        fetch_optional(query, &self.pool, rows::workflow_version).await
    }

    fn work_signal(&self) -> Option<Arc<Notify>> {
        self.listening().then(|| Arc::clone(&self.work))
    }

    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        let row = NewRunRow::new(run)?;
        let Some(deadline) = run.deadline else {
            return create_run_now(&self.pool, run, &row, self.notify).await;
        };
        if run.dedupe.is_some() {
            // A run with a dedupe key goes in a transaction of its own: a
            // duplicate must fail alone, not send a whole group commit to
            // its run-by-run fallback.
            let (reply, answer) = oneshot::channel();
            tokio::spawn(create_before(
                self.pool.clone(),
                self.notify,
                run.clone(),
                row,
                deadline,
                reply,
            ));
            let grace = deadline + DEADLINE_GRACE;
            return match tokio::time::timeout_at(grace.into(), answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(StoreError::Unavailable(
                    "the task committing the run stopped".into(),
                )),
                Err(_) => Err(StoreError::Unavailable(DEADLINE_MISSED.into())),
            };
        }
        // The commit runs in a task of its own, so it finishes (and can
        // withdraw the run) even after this caller stopped waiting. The
        // answer is decided exactly once: either it arrived in time, or
        // the channel is closed first and the task, finding nobody to
        // tell, withdraws the run if its commit lands after all. An answer
        // that raced the close is still taken, never dropped.
        let (reply, mut answer) = oneshot::channel();
        let pending = Pending {
            run: run.clone(),
            row,
            deadline,
            reply,
        };
        // Committed with whatever else arrives meanwhile (see `intake`).
        match tokio::time::timeout_at(deadline.into(), self.intake.send(pending)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StoreError::Unavailable("the store is closed".into())),
            Err(_) => return Err(StoreError::Unavailable(DEADLINE_MISSED.into())),
        }
        let grace = deadline + DEADLINE_GRACE;
        match tokio::time::timeout_at(grace.into(), &mut answer).await {
            Ok(answer) => answer.map_err(|_| {
                StoreError::Unavailable("the task committing the run stopped".into())
            })?,
            Err(_) => {
                answer.close();
                match answer.try_recv() {
                    Ok(answer) => answer,
                    Err(_) => Err(StoreError::Unavailable(DEADLINE_MISSED.into())),
                }
            }
        }
    }

    async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        select_run(&mut conn, id).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let limit = if filter.limit == 0 { 50 } else { filter.limit };
        // Only the conditions asked for, so each listing gets the plan of
        // its own index.
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut param = || {
            n += 1;
            n
        };
        if filter.workflow.is_some() {
            conditions.push(format!("workflow = ${}", param()));
        }
        if filter.status.is_some() {
            conditions.push(format!("status = ${}", param()));
        }
        let limit_param = param();
        let filter_sql = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let mut query = sqlx::query(sql(format!(
            "SELECT {RUN_COLUMNS} FROM runs {filter_sql} \
             ORDER BY created_at DESC, id DESC LIMIT ${limit_param}"
        )));
        if let Some(workflow) = &filter.workflow {
            query = query.bind(workflow.clone());
        }
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        fetch_all(query.bind(i64::from(limit)), &self.pool, rows::run).await
    }

    async fn run_ids_with_prefix(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        // A range of the primary key, in byte order: the column is
        // COLLATE "C".
        let Some((low, high)) = rows::run_id_range(prefix) else {
            return Ok(Vec::new());
        };
        sqlx::query_scalar("SELECT id FROM runs WHERE id >= $1 AND id < $2 ORDER BY id LIMIT $3")
            .bind(low)
            .bind(high)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn claim_run(
        &self,
        id: &str,
        lease: &Lease,
        steal_from: Option<(&str, i64)>,
    ) -> Result<Claim, StoreError> {
        let mut tx = self.begin().await?;
        let current = sqlx::query(sql(format!(
            "SELECT {LEASE_STATE_COLUMNS} FROM runs WHERE id = $1 FOR UPDATE"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?
        .map(|r| LeaseState::read(&r))
        .transpose()?;
        let answer = match decide_claim(current, steal_from)? {
            ClaimStep::Answer(answer) => answer,
            ClaimStep::Take(claims) => {
                Claim::Claimed(Box::new(take_lease(&mut tx, id, claims, lease).await?))
            }
        };
        tx.commit().await.map_err(map_err)?;
        Ok(answer)
    }

    async fn renew_lease(&self, id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let rows = sqlx::query(
            "UPDATE runs SET lease_expires_at = $3, lease_ms = $4, heartbeat = heartbeat + 1 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id)
        .bind(&lease.owner)
        .bind(now_ms().saturating_add(lease.ttl_ms))
        .bind(lease.ttl_ms)
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        Ok(rows == 1)
    }

    async fn release_run(&self, id: &str, owner: &str, how: &Release) -> Result<(), StoreError> {
        let query = match how {
            // A clean release takes this claim's strike back.
            Release::Clean => sqlx::query(sql(format!(
                "WITH released AS (UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = $3, strikes = GREATEST(strikes - 1, 0), not_before = NULL \
                 WHERE id = $1 AND lease_owner = $2 RETURNING 1) \
                 SELECT {} FROM released",
                notify_work_sql(self.notify)
            )))
            .bind(id)
            .bind(owner)
            .bind(now_ms()),
            Release::Failed { error, not_before } => sqlx::query(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = $3, last_error = $4, not_before = $5 \
                 WHERE id = $1 AND lease_owner = $2",
            )
            .bind(id)
            .bind(owner)
            .bind(now_ms())
            .bind(no_nul(error))
            .bind(*not_before),
        };
        query.execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    async fn journal(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let query = sqlx::query(sql(format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 \
             ORDER BY started_at, step_id, item"
        )))
        .bind(run_id);
        fetch_all(query, &self.pool, rows::step).await
    }

    async fn item_outputs(&self, run_id: &str, step_id: &str) -> Result<Vec<String>, StoreError> {
        let found: Vec<(i64, Option<String>)> = sqlx::query_as(
            "SELECT item, output FROM steps WHERE run_id = $1 AND step_id = $2 AND item >= 0 \
             ORDER BY item",
        )
        .bind(run_id)
        .bind(step_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows::item_outputs(found))
    }

    async fn record_step(&self, owner: &str, record: &StepRecord) -> Result<(), StoreError> {
        let record = EncodedStep::new(record)?;
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        record_step(&mut conn, owner, &record).await
    }

    async fn record_attempt_failure(
        &self,
        owner: &str,
        f: &AttemptFailure,
    ) -> Result<(), StoreError> {
        let rows = sqlx::query(fenced_insert(
            "$11",
            "INSERT INTO step_attempts (run_id, step_id, item, round, attempt, started_at, \
             finished_at, status_code, error, retryable) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM lease \
             ON CONFLICT (run_id, step_id, item, round, attempt) DO UPDATE SET \
             finished_at = excluded.finished_at, status_code = excluded.status_code, \
             error = excluded.error, retryable = excluded.retryable",
        ))
        .bind(&f.run_id)
        .bind(&f.step_id)
        .bind(item_to_db(f.item))
        .bind(i64::from(f.round))
        .bind(i64::from(f.attempt))
        .bind(f.started_at)
        .bind(f.finished_at)
        .bind(f.status_code.map(i64::from))
        .bind(no_nul(&f.error))
        .bind(f.retryable)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        fenced(rows, &f.run_id)
    }

    async fn attempt_failures(&self, run_id: &str) -> Result<Vec<AttemptFailure>, StoreError> {
        let query = sqlx::query(sql(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM step_attempts WHERE run_id = $1 \
             ORDER BY started_at, step_id, item, round, attempt"
        )))
        .bind(run_id);
        fetch_all(query, &self.pool, rows::attempt_failure).await
    }

    async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &RunOutcome,
        last_step: Option<&StepRecord>,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        // Encoded before the transaction: a refusal costs no round trip.
        let last_step = last_step.map(EncodedStep::new).transpose()?;
        let alerts = alerts
            .iter()
            .map(|a| Ok((a, to_json_text(&a.payload, "an alert")?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let mut tx = self.begin().await?;
        finish(&mut tx, id, owner, outcome, last_step.as_ref(), &alerts).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn claim_next(&self, lease: &Lease) -> Result<Option<Run>, StoreError> {
        let after = self
            .claimed_from
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default();
        let mut tx = self.begin().await?;
        let run = claim_next(&mut tx, lease, &after).await?;
        tx.commit().await.map_err(map_err)?;
        if let Some(run) = &run
            && let Ok(mut w) = self.claimed_from.lock()
        {
            run.workflow.clone_into(&mut w);
        }
        Ok(run)
    }

    async fn leased_runs(&self) -> Result<Vec<LeasedRun>, StoreError> {
        let query = sqlx::query(
            "SELECT id, lease_owner, heartbeat, lease_ms, strikes FROM runs \
             WHERE status = 'running' AND lease_owner IS NOT NULL",
        );
        fetch_all(query, &self.pool, rows::leased_run).await
    }

    async fn expire_lease(
        &self,
        seen: &LeasedRun,
        reason: &str,
        not_before: Millis,
    ) -> Result<bool, StoreError> {
        // Claimable at `not_before` (a backoff): idle workers find it by
        // polling then; one that wakes now finds it not yet due.
        let rows = sqlx::query(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = $4, \
             last_error = $5, not_before = $6 \
             WHERE id = $1 AND lease_owner = $2 AND heartbeat = $3 AND status = 'running'",
        )
        .bind(&seen.id)
        .bind(&seen.holder)
        .bind(seen.heartbeat)
        .bind(now_ms())
        .bind(no_nul(reason))
        .bind(not_before)
        .execute(&self.pool)
        .await
        .map_err(map_err)?
        .rows_affected();
        Ok(rows == 1)
    }

    async fn cancel_run(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<CancelResult, StoreError> {
        let mut tx = self.begin().await?;
        let result = cancel(&mut tx, id, reason).await?;
        if result == CancelResult::Cancelled {
            append_audit(&mut tx, &entries::run_cancelled(actor, id, reason)).await?;
            sqlx::query(crate::lineage::CANCELLED)
                .bind(id)
                .bind(actor)
                .bind(reason)
                .bind(crate::now_ms())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(result)
    }

    async fn replay_run(&self, id: &str, actor: &str) -> Result<ReplayResult, StoreError> {
        let mut tx = self.begin().await?;
        let result = replay(&mut tx, id).await?;
        if result == ReplayResult::Replayed {
            append_audit(&mut tx, &entries::run_replayed(actor, id)).await?;
            sqlx::query(crate::lineage::REPLAYED)
                .bind(id)
                .bind(actor)
                .bind(crate::now_ms())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            notify_work(&mut tx, self.notify).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(result)
    }

    async fn workflow_stats(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        let query = sqlx::query(rows::WORKFLOW_STATS);
        fetch_all(query, &self.pool, rows::workflow_stats).await
    }

    async fn open_counts(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        let found: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT workflow, status, count(*) FROM runs \
             WHERE status IN ('queued', 'running', 'failed') GROUP BY workflow, status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows::open_counts(found))
    }
}
