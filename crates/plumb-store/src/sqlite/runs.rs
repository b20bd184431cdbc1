//! Runs, the journal and the queue on SQLite: every query of
//! [`RunStore`](crate::RunStore).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::audit::append_audit;
use super::{Done, Op, SqliteStore, map_err, query_all, unexpected};
use crate::json::to_json_text;
use crate::rows::{self, ATTEMPT_COLUMNS, RUN_COLUMNS, STEP_COLUMNS, item_to_db};
use crate::writes::{
    ClaimStep, EncodedStep, Ending, LEASE_STATE_COLUMNS, LeaseState, NewRunRow, NextLease, Visit,
    WorkflowWalk, decide_claim, entries,
};
use crate::{
    AttemptFailure, CancelResult, Claim, Lease, LeasedRun, Millis, NewAlert, NewRun, Release,
    ReplayResult, Run, RunFilter, RunOutcome, RunStatus, RunStore, StepRecord, StoreError,
    WorkflowStats, WorkflowVersion, now_ms,
};

/// A write of this module, as handed to the writer thread.
#[derive(Debug)]
pub(super) enum Write {
    PutVersion(WorkflowVersion),
    CreateRun(NewRun),
    Claim {
        id: String,
        lease: Lease,
        steal_from: Option<(String, i64)>,
    },
    ClaimNext {
        lease: Lease,
        after_workflow: String,
    },
    Renew {
        id: String,
        lease: Lease,
    },
    Release {
        id: String,
        owner: String,
        how: Release,
    },
    Expire {
        seen: LeasedRun,
        reason: String,
        not_before: Millis,
    },
    RecordStep {
        owner: String,
        record: EncodedStep,
    },
    RecordAttempt {
        owner: String,
        failure: AttemptFailure,
    },
    Finish {
        id: String,
        owner: String,
        outcome: RunOutcome,
        last_step: Option<EncodedStep>,
        alerts: Vec<NewAlert>,
    },
    Cancel {
        id: String,
        reason: String,
        actor: String,
    },
    Replay {
        id: String,
        actor: String,
    },
}

impl From<Write> for Op {
    fn from(w: Write) -> Self {
        Op::Runs(w)
    }
}

/// Performs one write inside the writer's open transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &Write) -> Result<Done, StoreError> {
    match op {
        Write::PutVersion(v) => {
            tx.prepare_cached(
                "INSERT INTO workflow_versions (hash, workflow, file, source, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (hash) DO NOTHING",
            )
            .and_then(|mut st| {
                st.execute(params![v.hash, v.workflow, v.file, v.source, v.created_at])
            })
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Write::CreateRun(run) => {
            insert_run(tx, run)?;
            Ok(Done::Unit)
        }
        Write::Claim {
            id,
            lease,
            steal_from,
        } => claim(
            tx,
            id,
            lease,
            steal_from.as_ref().map(|(h, b)| (h.as_str(), *b)),
        )
        .map(Done::Claim),
        Write::ClaimNext {
            lease,
            after_workflow,
        } => claim_next(tx, lease, after_workflow).map(Done::MaybeRun),
        Write::Renew { id, lease } => tx
            .prepare_cached(
                "UPDATE runs SET lease_expires_at = ?3, lease_ms = ?4, heartbeat = heartbeat + 1 \
                 WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    lease.owner,
                    now_ms().saturating_add(lease.ttl_ms),
                    lease.ttl_ms
                ])
            })
            .map(Done::Rows)
            .map_err(map_err),
        Write::Release { id, owner, how } => {
            match how {
                // A clean release takes this claim's strike back.
                Release::Clean => tx
                    .prepare_cached(
                        "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                         updated_at = ?3, strikes = max(strikes - 1, 0), not_before = NULL \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .and_then(|mut st| st.execute(params![id, owner, now_ms()])),
                Release::Failed { error, not_before } => tx
                    .prepare_cached(
                        "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, \
                         updated_at = ?3, last_error = ?4, not_before = ?5 \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .and_then(|mut st| st.execute(params![id, owner, now_ms(), error, not_before])),
            }
            .map_err(map_err)?;
            Ok(Done::Unit)
        }
        Write::Expire {
            seen,
            reason,
            not_before,
        } => tx
            .prepare_cached(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4, \
                 last_error = ?5, not_before = ?6 \
                 WHERE id = ?1 AND lease_owner = ?2 AND heartbeat = ?3 AND status = 'running'",
            )
            .and_then(|mut st| {
                st.execute(params![
                    seen.id,
                    seen.holder,
                    seen.heartbeat,
                    now_ms(),
                    reason,
                    not_before
                ])
            })
            .map(Done::Rows)
            .map_err(map_err),
        Write::RecordStep { owner, record } => record_step(tx, owner, record),
        Write::RecordAttempt { owner, failure: f } => {
            let rows = tx
                .prepare_cached(
                    "INSERT INTO step_attempts (run_id, step_id, item, round, attempt, started_at, \
                     finished_at, status_code, error, retryable) \
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 \
                     WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_owner = ?11 AND status = 'running') \
                     ON CONFLICT (run_id, step_id, item, round, attempt) DO UPDATE SET \
                     finished_at = excluded.finished_at, status_code = excluded.status_code, \
                     error = excluded.error, retryable = excluded.retryable",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        f.run_id,
                        f.step_id,
                        item_to_db(f.item),
                        i64::from(f.round),
                        i64::from(f.attempt),
                        f.started_at,
                        f.finished_at,
                        f.status_code.map(i64::from),
                        f.error,
                        f.retryable,
                        owner,
                    ])
                })
                .map_err(map_err)?;
            fenced(rows, &f.run_id)
        }
        Write::Finish {
            id,
            owner,
            outcome,
            last_step,
            alerts,
        } => {
            if let Some(record) = last_step {
                record_step(tx, owner, record)?;
            }
            finish(tx, id, owner, outcome, alerts)
        }
        Write::Cancel { id, reason, actor } => {
            let result = cancel(tx, id, reason)?;
            if result == CancelResult::Cancelled {
                append_audit(tx, &entries::run_cancelled(actor, id, reason))?;
                tx.prepare_cached(&crate::lineage::CANCELLED.replace('$', "?"))
                    .and_then(|mut st| st.execute(params![id, actor, reason, crate::now_ms()]))
                    .map_err(map_err)?;
            }
            Ok(Done::Cancel(result))
        }
        Write::Replay { id, actor } => {
            let result = replay(tx, id)?;
            if result == ReplayResult::Replayed {
                append_audit(tx, &entries::run_replayed(actor, id))?;
                // SQLite numbers `?N` explicitly (`$N` would be named).
                tx.prepare_cached(&crate::lineage::REPLAYED.replace('$', "?"))
                    .and_then(|mut st| st.execute(params![id, actor, crate::now_ms()]))
                    .map_err(map_err)?;
            }
            Ok(Done::Replay(result))
        }
    }
}

fn record_step(tx: &Transaction<'_>, owner: &str, r: &EncodedStep) -> Result<Done, StoreError> {
    let (state, output) = (&r.state, &r.output);
    let rows = tx
        .prepare_cached(
            "INSERT INTO steps (run_id, step_id, item, status, attempt, state, output, error, \
             status_code, started_at, finished_at) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 \
             WHERE EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND lease_owner = ?12 AND status = 'running') \
             ON CONFLICT (run_id, step_id, item) DO UPDATE SET \
             status = excluded.status, attempt = excluded.attempt, \
             state = COALESCE(excluded.state, steps.state), output = excluded.output, \
             error = excluded.error, status_code = excluded.status_code, \
             started_at = excluded.started_at, finished_at = excluded.finished_at",
        )
        .and_then(|mut st| {
            st.execute(params![
                r.run_id,
                r.step_id,
                item_to_db(r.item),
                r.status.as_str(),
                i64::from(r.attempt),
                state,
                output,
                r.error,
                r.status_code.map(i64::from),
                r.started_at,
                r.finished_at,
                owner,
            ])
        })
        .map_err(map_err)?;
    fenced(rows, &r.run_id)
}

fn fenced(rows: usize, run_id: &str) -> Result<Done, StoreError> {
    if rows == 0 {
        Err(StoreError::LeaseLost {
            run_id: run_id.to_owned(),
        })
    } else {
        Ok(Done::Rows(rows))
    }
}

pub(super) fn insert_run(tx: &Transaction<'_>, run: &NewRun) -> Result<(), StoreError> {
    let row = NewRunRow::new(run)?;
    if let Some(dedupe) = &run.dedupe {
        take_dedupe_key(tx, run, dedupe, row.now)?;
    }
    tx.prepare_cached(
        "INSERT INTO runs (id, workflow, version, trigger_payload, status, claims, strikes, \
         heartbeat, created_at, started_at, updated_at, lease_owner, lease_expires_at, lease_ms, \
         max_concurrency) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6, ?7, ?8, ?7, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut st| {
        st.execute(params![
            run.id,
            run.workflow,
            run.version,
            row.trigger,
            row.status.as_str(),
            row.claims,
            row.now,
            row.started_at,
            row.lease_owner,
            row.lease_expires_at,
            row.lease_ms,
            row.max_concurrency,
        ])
    })
    .map_err(map_err)?;
    Ok(())
}

/// Records `dedupe` as the key of `run`, unless an unexpired key of the
/// same workflow is already there: then the run is not created and the
/// caller learns which run the first delivery started. One writer applies
/// the writes one after the other, so two deliveries in one batch see each
/// other.
fn take_dedupe_key(
    tx: &Transaction<'_>,
    run: &NewRun,
    dedupe: &crate::Dedupe,
    now: Millis,
) -> Result<(), StoreError> {
    let first: Option<String> = tx
        .prepare_cached(
            "SELECT run_id FROM dedupe_keys WHERE workflow = ?1 AND key = ?2 AND expires_at > ?3",
        )
        .and_then(|mut st| {
            st.query_row(params![run.workflow, dedupe.key, now], |r| r.get(0))
                .optional()
        })
        .map_err(map_err)?;
    if let Some(run_id) = first {
        return Err(StoreError::Duplicate { run_id });
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO dedupe_keys (workflow, key, run_id, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut st| {
        st.execute(params![
            run.workflow,
            dedupe.key,
            run.id,
            now,
            dedupe.expires_at
        ])
    })
    .map_err(map_err)?;
    Ok(())
}

fn select_run(conn: &Connection, id: &str) -> Result<Option<Run>, StoreError> {
    conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))
        .and_then(|mut st| st.query_row(params![id], |r| rows::run(r)).optional())
        .map_err(map_err)
}

fn claim(
    tx: &Transaction<'_>,
    id: &str,
    lease: &Lease,
    steal_from: Option<(&str, i64)>,
) -> Result<Claim, StoreError> {
    let current: Option<LeaseState> = tx
        .prepare_cached(&format!(
            "SELECT {LEASE_STATE_COLUMNS} FROM runs WHERE id = ?1"
        ))
        .and_then(|mut st| {
            st.query_row(params![id], |r| LeaseState::read(r))
                .optional()
        })
        .map_err(map_err)?;
    match decide_claim(current, steal_from)? {
        ClaimStep::Answer(answer) => Ok(answer),
        ClaimStep::Take(claims) => {
            take_lease(tx, id, claims, lease).map(|run| Claim::Claimed(Box::new(run)))
        }
    }
}

/// Gives `lease.owner` the run's next claim: a fresh token, a new heartbeat
/// and a strike that a clean end or release takes back.
fn take_lease(
    tx: &Transaction<'_>,
    id: &str,
    claims: i64,
    lease: &Lease,
) -> Result<Run, StoreError> {
    let next = NextLease::new(claims, lease);
    tx.prepare_cached(&format!(
        "UPDATE runs SET status = 'running', claims = ?2, strikes = strikes + 1, \
         heartbeat = heartbeat + 1, started_at = COALESCE(started_at, ?3), updated_at = ?3, \
         lease_owner = ?4, lease_expires_at = ?5, lease_ms = ?6 \
         WHERE id = ?1 RETURNING {RUN_COLUMNS}"
    ))
    .and_then(|mut st| {
        st.query_row(
            params![
                id,
                next.claim,
                next.now,
                next.token,
                next.expires_at,
                next.ttl_ms
            ],
            |r| rows::run(r),
        )
    })
    .map_err(map_err)
}

/// A claim candidate `r` whose workflow is under its concurrency limit: a
/// run counts against it while anyone holds its lease.
const UNDER_LIMIT: &str = "(r.max_concurrency IS NULL OR (SELECT count(*) FROM runs x \
    WHERE x.workflow = r.workflow AND x.status = 'running' AND x.lease_owner IS NOT NULL) \
    < r.max_concurrency)";

/// The first workflow after `?1` with a queued run. The index is named:
/// left to itself SQLite reads `runs_queue` and walks every queued run for
/// the minimum, once per claim (measured: W6 at c=64 fell from ~3,100 to
/// 225 completed runs/s under a backlog).
const NEXT_QUEUED_WORKFLOW: &str = "SELECT min(workflow) FROM runs \
    INDEXED BY runs_queued_by_workflow WHERE status = 'queued' AND workflow > ?1";

/// The oldest interrupted run (running, lease released or expired,
/// backoff over, `?1` = now) whose workflow is under its limit.
fn interrupted_sql() -> String {
    format!(
        "SELECT r.id, r.claims FROM runs r WHERE r.status = 'running' AND r.lease_owner IS NULL \
         AND (r.not_before IS NULL OR r.not_before <= ?1 OR r.not_before > ?1 + 120000) \
         AND {UNDER_LIMIT} ORDER BY r.created_at, r.id LIMIT 1"
    )
}

/// The oldest queued run of workflow `?2` (backoff over, `?1` = now),
/// if the workflow is under its limit.
fn queued_sql() -> String {
    format!(
        "SELECT r.id, r.claims FROM runs r WHERE r.status = 'queued' AND r.workflow = ?2 \
         AND (r.not_before IS NULL OR r.not_before <= ?1 OR r.not_before > ?1 + 120000) \
         AND {UNDER_LIMIT} ORDER BY r.created_at, r.id LIMIT 1"
    )
}

fn claim_next(
    tx: &Transaction<'_>,
    lease: &Lease,
    after_workflow: &str,
) -> Result<Option<Box<Run>>, StoreError> {
    // Interrupted runs (running, lease released or expired, backoff over)
    // first, oldest first; then the queue, workflow by workflow (see
    // `WorkflowWalk`), oldest first within each; skipping any workflow
    // already at its concurrency limit. Every statement walks an index and
    // stops at its first match.
    //
    // A backoff is at most a minute (see the engine's crash backoff), so a
    // `not_before` more than two minutes ahead was written by a clock that
    // runs ahead of this one: it is ignored rather than obeyed, or that
    // clock would park the run for as long as it is wrong.
    let now = now_ms();
    let interrupted = interrupted_sql();
    let found: Option<(String, i64)> = tx
        .prepare_cached(&interrupted)
        .and_then(|mut st| {
            st.query_row(params![now], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(map_err)?;
    if let Some((id, claims)) = found {
        return take_lease(tx, &id, claims, lease).map(|run| Some(Box::new(run)));
    }
    let queued = queued_sql();
    let mut walk = WorkflowWalk::new(after_workflow);
    loop {
        let next: Option<String> = tx
            .prepare_cached(NEXT_QUEUED_WORKFLOW)
            .and_then(|mut st| st.query_row(params![walk.cursor()], |r| r.get(0)))
            .map_err(map_err)?;
        let workflow = match walk.next(next) {
            Visit::Try(w) => w,
            Visit::Again => continue,
            Visit::Done => return Ok(None),
        };
        let found: Option<(String, i64)> = tx
            .prepare_cached(&queued)
            .and_then(|mut st| {
                st.query_row(params![now, workflow], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(map_err)?;
        if let Some((id, claims)) = found {
            return take_lease(tx, &id, claims, lease).map(|run| Some(Box::new(run)));
        }
    }
}

fn finish(
    tx: &Transaction<'_>,
    id: &str,
    owner: &str,
    outcome: &RunOutcome,
    alerts: &[NewAlert],
) -> Result<Done, StoreError> {
    let end = Ending::new(outcome);
    let (item, attempt, status_code) = end.numbers();
    let workflow: Option<String> = tx
        .prepare_cached(
            "UPDATE runs SET status = ?3, finished_at = ?4, updated_at = ?4, \
             error = ?5, failed_step = ?6, failed_item = ?7, failed_attempt = ?8, \
             failed_status_code = ?9, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running' \
             RETURNING workflow",
        )
        .and_then(|mut st| {
            st.query_row(
                params![
                    id,
                    owner,
                    end.status.as_str(),
                    end.now,
                    end.error,
                    end.failure.step,
                    item,
                    attempt,
                    status_code,
                ],
                |row| row.get(0),
            )
            .optional()
        })
        .map_err(map_err)?;
    let Some(workflow) = workflow else {
        return Err(StoreError::LeaseLost {
            run_id: id.to_owned(),
        });
    };
    if let RunOutcome::SucceededMovingCursor(wanted) = outcome {
        super::cursors::move_cursor(tx, id, &workflow, wanted)?;
    }
    for alert in alerts {
        let payload = to_json_text(&alert.payload, "an alert")?;
        tx.prepare_cached(
            "INSERT INTO alerts (id, run_id, workflow, channel, payload, status, attempts, \
             next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
        )
        .and_then(|mut st| {
            st.execute(params![
                alert.id,
                id,
                workflow,
                alert.channel,
                payload,
                end.now
            ])
        })
        .map_err(map_err)?;
    }
    Ok(Done::Unit)
}

fn cancel(tx: &Transaction<'_>, id: &str, reason: &str) -> Result<CancelResult, StoreError> {
    let rows = tx
        .prepare_cached(
            "UPDATE runs SET status = 'cancelled', finished_at = ?2, updated_at = ?2, error = ?3, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND status IN ('queued', 'running')",
        )
        .and_then(|mut st| st.execute(params![id, now_ms(), reason]))
        .map_err(map_err)?;
    if rows == 1 {
        return Ok(CancelResult::Cancelled);
    }
    Ok(match select_run(tx, id)? {
        None => CancelResult::NotFound,
        Some(run) => CancelResult::AlreadyEnded(run.status),
    })
}

fn replay(tx: &Transaction<'_>, id: &str) -> Result<ReplayResult, StoreError> {
    let rows = tx
        .prepare_cached(
            "UPDATE runs SET status = 'queued', replays = replays + 1, updated_at = ?2, \
             finished_at = NULL, error = NULL, failed_step = NULL, failed_item = NULL, \
             failed_attempt = NULL, failed_status_code = NULL, lease_owner = NULL, \
             lease_expires_at = NULL, strikes = 0, last_error = NULL, not_before = NULL \
             WHERE id = ?1 AND status = 'failed'",
        )
        .and_then(|mut st| st.execute(params![id, now_ms()]))
        .map_err(map_err)?;
    if rows == 0 {
        return Ok(match select_run(tx, id)? {
            None => ReplayResult::NotFound,
            Some(run) => ReplayResult::NotFailed(run.status),
        });
    }
    // A failed `for_each` keeps its committed item list (so indices and
    // keys stay the same) and becomes "in progress" again; every other
    // failed row is removed so the step, or item, runs afresh. Succeeded
    // rows stay: they are not run again.
    tx.prepare_cached(
        "UPDATE steps SET status = 'running', error = NULL, finished_at = NULL, output = NULL \
         WHERE run_id = ?1 AND status = 'failed' AND item = -1 AND state IS NOT NULL",
    )
    .and_then(|mut st| st.execute(params![id]))
    .map_err(map_err)?;
    tx.prepare_cached("DELETE FROM steps WHERE run_id = ?1 AND status = 'failed'")
        .and_then(|mut st| st.execute(params![id]))
        .map_err(map_err)?;
    Ok(ReplayResult::Replayed)
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn put_workflow_version(&self, v: &WorkflowVersion) -> Result<(), StoreError> {
        self.write(Write::PutVersion(v.clone())).await.map(|_| ())
    }

    async fn workflow_version(&self, hash: &str) -> Result<Option<WorkflowVersion>, StoreError> {
        let hash = hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT hash, workflow, file, source, created_at FROM workflow_versions WHERE hash = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![hash], |r| rows::workflow_version(r))
                    .optional()
            })
            .map_err(map_err)
        })
        .await
    }

    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        self.write(Write::CreateRun(run.clone())).await.map(|_| ())
    }

    async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| select_run(conn, &id)).await
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let limit = if filter.limit == 0 { 50 } else { filter.limit };
        let workflow = filter.workflow.clone();
        let status = filter.status.map(RunStatus::as_str);
        // Only the conditions asked for: `(?1 IS NULL OR workflow = ?1)`
        // would keep SQLite from using the index that serves each listing,
        // and the dead-letter list would read every stored run.
        let filter_sql = match (&workflow, status) {
            (Some(_), Some(_)) => "WHERE workflow = ?1 AND status = ?2",
            (Some(_), None) => "WHERE workflow = ?1 AND ?2 IS NULL",
            (None, Some(_)) => "WHERE ?1 IS NULL AND status = ?2",
            (None, None) => "WHERE ?1 IS NULL AND ?2 IS NULL",
        };
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs {filter_sql} \
                     ORDER BY created_at DESC, id DESC LIMIT ?3"
                ),
                params![workflow, status, i64::from(limit)],
                |r| rows::run(r),
            )
        })
        .await
    }

    async fn run_ids_with_prefix(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let Some((low, high)) = rows::run_id_range(prefix) else {
            return Ok(Vec::new());
        };
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id FROM runs WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3",
                params![low, high, i64::from(limit)],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn claim_run(
        &self,
        id: &str,
        lease: &Lease,
        steal_from: Option<(&str, i64)>,
    ) -> Result<Claim, StoreError> {
        match self
            .write(Write::Claim {
                id: id.to_owned(),
                lease: lease.clone(),
                steal_from: steal_from.map(|(h, b)| (h.to_owned(), b)),
            })
            .await?
        {
            Done::Claim(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn renew_lease(&self, id: &str, lease: &Lease) -> Result<bool, StoreError> {
        match self
            .write(Write::Renew {
                id: id.to_owned(),
                lease: lease.clone(),
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn release_run(&self, id: &str, owner: &str, how: &Release) -> Result<(), StoreError> {
        self.write(Write::Release {
            id: id.to_owned(),
            owner: owner.to_owned(),
            how: how.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn journal(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?1 \
                     ORDER BY started_at, step_id, item"
                ),
                params![run_id],
                |r| rows::step(r),
            )
        })
        .await
    }

    async fn item_outputs(&self, run_id: &str, step_id: &str) -> Result<Vec<String>, StoreError> {
        let (run_id, step_id) = (run_id.to_owned(), step_id.to_owned());
        self.read(move |conn| {
            let rows: Vec<(i64, Option<String>)> = query_all(
                conn,
                "SELECT item, output FROM steps WHERE run_id = ?1 AND step_id = ?2 AND item >= 0 \
                 ORDER BY item",
                params![run_id, step_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(rows::item_outputs(rows))
        })
        .await
    }

    async fn record_step(&self, owner: &str, record: &StepRecord) -> Result<(), StoreError> {
        self.write(Write::RecordStep {
            owner: owner.to_owned(),
            record: EncodedStep::new(record)?,
        })
        .await
        .map(|_| ())
    }

    async fn record_attempt_failure(
        &self,
        owner: &str,
        failure: &AttemptFailure,
    ) -> Result<(), StoreError> {
        self.write(Write::RecordAttempt {
            owner: owner.to_owned(),
            failure: failure.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn attempt_failures(&self, run_id: &str) -> Result<Vec<AttemptFailure>, StoreError> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM step_attempts WHERE run_id = ?1 \
                     ORDER BY started_at, step_id, item, round, attempt"
                ),
                params![run_id],
                |r| rows::attempt_failure(r),
            )
        })
        .await
    }

    async fn finish_run(
        &self,
        id: &str,
        owner: &str,
        outcome: &RunOutcome,
        last_step: Option<&StepRecord>,
        alerts: &[NewAlert],
    ) -> Result<(), StoreError> {
        self.write(Write::Finish {
            id: id.to_owned(),
            owner: owner.to_owned(),
            outcome: outcome.clone(),
            last_step: last_step.map(EncodedStep::new).transpose()?,
            alerts: alerts.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn claim_next(&self, lease: &Lease) -> Result<Option<Run>, StoreError> {
        let after_workflow = self.claimed_from();
        match self
            .write(Write::ClaimNext {
                lease: lease.clone(),
                after_workflow,
            })
            .await?
        {
            Done::MaybeRun(r) => {
                let run = r.map(|b| *b);
                if let Some(run) = &run {
                    self.claimed(&run.workflow);
                }
                Ok(run)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn leased_runs(&self) -> Result<Vec<LeasedRun>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, lease_owner, heartbeat, lease_ms, strikes FROM runs \
                 WHERE status = 'running' AND lease_owner IS NOT NULL",
                [],
                |r| rows::leased_run(r),
            )
        })
        .await
    }

    async fn expire_lease(
        &self,
        seen: &LeasedRun,
        reason: &str,
        not_before: Millis,
    ) -> Result<bool, StoreError> {
        match self
            .write(Write::Expire {
                seen: seen.clone(),
                reason: reason.to_owned(),
                not_before,
            })
            .await?
        {
            Done::Rows(n) => Ok(n == 1),
            other => Err(unexpected(&other)),
        }
    }

    async fn cancel_run(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<CancelResult, StoreError> {
        match self
            .write(Write::Cancel {
                id: id.to_owned(),
                reason: reason.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Cancel(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    async fn replay_run(&self, id: &str, actor: &str) -> Result<ReplayResult, StoreError> {
        match self
            .write(Write::Replay {
                id: id.to_owned(),
                actor: actor.to_owned(),
            })
            .await?
        {
            Done::Replay(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn workflow_stats(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        self.read(|conn| query_all(conn, rows::WORKFLOW_STATS, [], |r| rows::workflow_stats(r)))
            .await
    }

    async fn open_counts(&self) -> Result<Vec<WorkflowStats>, StoreError> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT workflow, status, count(*) FROM runs \
                 WHERE status IN ('queued', 'running', 'failed') GROUP BY workflow, status",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map(rows::open_counts)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::config::DbConfig;

    use super::NEXT_QUEUED_WORKFLOW;
    use crate::{SqliteStore, Synchronous};

    /// The writer plans each statement once. Without the query planner
    /// stability guarantee a busy serve parsed and planned its claim
    /// statement on every claim (seen with gdb on `sqlite3Reprepare`:
    /// 1,251 times for 3,000 webhooks; none with it).
    #[test]
    fn the_writer_plans_each_statement_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = crate::sqlite::open_writer(&dir.path().join("plumb.db"), Synchronous::Full)
            .expect("open");
        assert!(
            conn.db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
                .expect("db_config")
        );
    }

    /// A claim under a backlog is a few index steps: the lookup of the next
    /// workflow with queued runs must never walk the queue.
    #[tokio::test]
    async fn the_next_workflow_lookup_is_one_index_search() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("plumb.db"), Synchronous::Full)
            .await
            .expect("open");
        let plan: Vec<String> = store
            .read(|conn| {
                conn.prepare(&format!("EXPLAIN QUERY PLAN {NEXT_QUEUED_WORKFLOW}"))
                    .and_then(|mut st| st.query_map(["w"], |r| r.get(3))?.collect())
                    .map_err(super::map_err)
            })
            .await
            .expect("plan");
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert!(
            plan[0].starts_with("SEARCH runs USING")
                && plan[0].ends_with("INDEX runs_queued_by_workflow (workflow>?)"),
            "{plan:?}"
        );
    }
}
