//! Group commit of new runs on PostgreSQL, as SQLite's writer does it:
//! runs that arrive while earlier commits are in flight are inserted
//! together, one statement and one commit (one WAL flush) for the lot.
//! Without it every webhook waited for a commit of its own, and intake was
//! bounded by the pool's connections times the flush rate (measured:
//! ~1,300 webhooks/s against SQLite's ~12,000).
//!
//! The answer to each sender stays exact. A run whose sender stopped
//! waiting, or whose deadline passed, before the commit is sent is left
//! out (or deleted again inside the transaction); a run committed after
//! its sender stopped waiting, or whose commit's outcome is unknown, is
//! withdrawn, as for a run committed on its own (see `runs::withdraw`).
//! A batch the database refuses is committed again run by run, so one
//! bad run fails alone.

use std::sync::Arc;
use std::time::Instant;

use sqlx::postgres::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::runs::{create_before, notify_work_sql, withdraw};
use super::{map_err, sql};
use crate::writes::{DEADLINE_MISSED, NewRunRow};
use crate::{NewRun, StoreError};

/// Runs one commit takes at most.
const MAX_BATCH: usize = 512;

/// Trigger bytes one commit takes at most (a batch stops growing past it):
/// webhook bodies may be large, and one statement holds them all.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Commits in flight at once: while they are, new runs gather into the
/// next batch.
const COMMITS_IN_FLIGHT: usize = 4;

/// Runs waiting to be handed to a batch.
const QUEUE: usize = 4 * MAX_BATCH;

/// A run waiting to be committed with others.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) run: NewRun,
    pub(super) row: NewRunRow,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<Result<(), StoreError>>,
}

impl Pending {
    /// Whether it may no longer be committed: its sender stopped waiting,
    /// or its deadline passed.
    fn late(&self) -> bool {
        self.reply.is_closed() || Instant::now() > self.deadline
    }

    fn miss(self) {
        let _ = self
            .reply
            .send(Err(StoreError::Unavailable(DEADLINE_MISSED.into())));
    }
}

/// Starts the task that commits new runs in batches; it ends when every
/// sender is gone.
pub(super) fn start(pool: PgPool, notify: bool) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(gather(pool, notify, rx));
    tx
}

/// Takes what has arrived, up to a batch, once a commit slot is free.
async fn gather(pool: PgPool, notify: bool, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(COMMITS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is what lets the next batch grow.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut bytes = first.row.trigger.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.row.trigger.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, notify, batch).await;
            drop(slot);
        });
    }
}

/// Commits `batch` in one transaction and answers each sender.
async fn commit(pool: &PgPool, notify: bool, batch: Vec<Pending>) {
    let (late, live): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(Pending::late);
    late.into_iter().for_each(Pending::miss);
    if live.is_empty() {
        return;
    }
    let mut commit_sent = false;
    let mut dropped: Vec<usize> = Vec::new();
    let result: Result<(), StoreError> = async {
        let mut tx = pool.begin().await.map_err(map_err)?;
        insert_all(&mut tx, &live, notify).await?;
        // Runs whose sender stopped waiting meanwhile leave the batch.
        dropped = (0..live.len()).filter(|&i| live[i].late()).collect();
        if !dropped.is_empty() {
            let ids: Vec<&str> = dropped.iter().map(|&i| live[i].run.id.as_str()).collect();
            sqlx::query("DELETE FROM runs WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        commit_sent = true;
        tx.commit().await.map_err(map_err)
    }
    .await;
    match result {
        Ok(()) => {
            for (i, p) in live.into_iter().enumerate() {
                if dropped.contains(&i) {
                    p.miss();
                } else if p.reply.send(Ok(())).is_err() {
                    tracing::warn!(run_id = %p.run.id, "A run committed after its sender was answered 503; withdrawing it.");
                    withdraw(pool, &p.run.id).await;
                }
            }
        }
        Err(e) if commit_sent => {
            // The commit may have landed: every run of it is withdrawn, and
            // its sender told "not accepted" sends it again.
            for p in live {
                let _ = p.reply.send(Err(e.clone()));
                tracing::warn!(run_id = %p.run.id, "A run's commit has an unknown outcome; withdrawing it.");
                withdraw(pool, &p.run.id).await;
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, runs = live.len(), "A batch of new runs failed; committing them one by one.");
            for p in live {
                create_before(pool.clone(), notify, p.run, p.row, p.deadline, p.reply).await;
            }
        }
    }
}

/// Inserts every run of `batch` in one statement (and announces new work
/// once, when the transaction commits).
async fn insert_all(
    tx: &mut sqlx::PgConnection,
    batch: &[Pending],
    notify: bool,
) -> Result<(), StoreError> {
    let col = |f: &dyn Fn(&Pending) -> Option<i64>| batch.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<&str> = batch.iter().map(|p| p.run.id.as_str()).collect();
    let workflows: Vec<&str> = batch.iter().map(|p| p.run.workflow.as_str()).collect();
    let versions: Vec<&str> = batch.iter().map(|p| p.run.version.as_str()).collect();
    let triggers: Vec<&str> = batch.iter().map(|p| p.row.trigger.as_str()).collect();
    let statuses: Vec<&str> = batch.iter().map(|p| p.row.status.as_str()).collect();
    let owners: Vec<Option<&str>> = batch.iter().map(|p| p.row.lease_owner.as_deref()).collect();
    sqlx::query(sql(format!(
        "WITH inserted AS (INSERT INTO runs (id, workflow, version, trigger_payload, status, \
         claims, strikes, heartbeat, created_at, started_at, updated_at, lease_owner, \
         lease_expires_at, lease_ms, max_concurrency) \
         SELECT id, workflow, version, trigger_payload, status, claims, claims, claims, now, \
         started_at, now, lease_owner, lease_expires_at, lease_ms, max_concurrency \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], \
         $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::int8[], $12::int8[]) \
         AS t(id, workflow, version, trigger_payload, status, claims, now, started_at, \
         lease_owner, lease_expires_at, lease_ms, max_concurrency) \
         RETURNING 1) \
         SELECT {} FROM (SELECT 1 FROM inserted LIMIT 1) AS any_inserted",
        notify_work_sql(notify)
    )))
    .bind(&ids)
    .bind(&workflows)
    .bind(&versions)
    .bind(&triggers)
    .bind(&statuses)
    .bind(col(&|p| Some(p.row.claims)))
    .bind(col(&|p| Some(p.row.now)))
    .bind(col(&|p| p.row.started_at))
    .bind(&owners)
    .bind(col(&|p| p.row.lease_expires_at))
    .bind(col(&|p| p.row.lease_ms))
    .bind(col(&|p| p.row.max_concurrency))
    .execute(tx)
    .await
    .map_err(map_err)?;
    Ok(())
}
