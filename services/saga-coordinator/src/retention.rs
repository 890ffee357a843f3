//! Retention of finished sagas in the `coordinator` schema: a saga that
//! completed or was cancelled longer ago than the retention
//! (`ORDERFLOW_RETENTION_DAYS`) is deleted together with everything the
//! coordinator kept about its order: timers, history, used tokens and the
//! payment step. Settled timers of sagas that no longer run go too. The
//! runtime's own tables of the schema (inbox, outbox) are pruned by the
//! runtime's [`Retention`](orderflow_shared::store::Retention), which
//! `run_worker` starts beside this one.
//!
//! A running saga is never touched, however old: only `completed` and
//! `cancelled` sagas are candidates, and their end is final (a saga never
//! runs again). Each batch is one statement over a few hundred sagas that
//! locks them with `SKIP LOCKED`: a saga a handler holds (a late event being
//! applied) is left for the next pass, never waited for, and handlers wait
//! at most for one short batch. Rows of a pruned saga are not needed for
//! anything but its history: a message for its order that arrives after it
//! (older than the retention, so never a redelivery; see `Settings::
//! retention_days`) finds nothing and is treated as the first of a new
//! order, which is why `orderflow dlq replay` refuses such old dead letters
//! without `--force`. A payment token of a pruned saga expired long ago
//! (payment timeout), so forgetting it was used accepts nothing.
//!
//! The payment providers' captures and their gateway ledger (schema
//! `payments`) are not pruned at all: they are money records, kept for
//! reconciliation and disputes far longer than any message, and a capture
//! is also what stops an order from being charged twice.

use std::time::Duration;

use orderflow_shared::Shutdown;
use orderflow_shared::store::Db;
use orderflow_shared::store::retention::{BATCH_PAUSE, BATCH_ROWS, Schedule, another_batch};

/// Sagas deleted per statement: with their history (a dozen rows each) and
/// the rest, a few thousand rows per transaction.
pub const SAGA_BATCH: i64 = 250;

#[derive(Debug, thiserror::Error)]
#[error(
    "pruning {what} of schema `coordinator` failed: {cause}; the next pass tries again (a \
     saga is deleted with all its rows in one statement, so nothing is half done)"
)]
pub struct RetentionError {
    pub what: &'static str,
    pub cause: sqlx::Error,
}

/// What one pass deleted, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished sagas.
    pub sagas: u64,
    /// Timers of those sagas.
    pub timers: u64,
    /// History entries of those sagas.
    pub history: u64,
    /// Used tokens of those sagas.
    pub used_tokens: u64,
    /// Payment steps of those sagas.
    pub payment_steps: u64,
    /// Settled timers of sagas that no longer run (or no longer exist),
    /// settled longer ago than the retention.
    pub settled_timers: u64,
}

/// Finished sagas that ended more than `$1` seconds ago, at most `$2`, with
/// all their rows; returns the rows deleted per table.
const PRUNE_FINISHED: &str = "\
WITH doomed AS (
    SELECT order_id FROM sagas
    WHERE status IN ('completed', 'cancelled')
      AND updated_at < now() - make_interval(secs => $1)
    ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED
), timers_gone AS (
    DELETE FROM timers t USING doomed d WHERE t.order_id = d.order_id RETURNING 1
), history_gone AS (
    DELETE FROM history h USING doomed d WHERE h.order_id = d.order_id RETURNING 1
), tokens_gone AS (
    DELETE FROM used_tokens u USING doomed d WHERE u.order_id = d.order_id RETURNING 1
), steps_gone AS (
    DELETE FROM payment_steps p USING doomed d WHERE p.order_id = d.order_id RETURNING 1
), sagas_gone AS (
    DELETE FROM sagas s USING doomed d WHERE s.order_id = d.order_id RETURNING 1
)
SELECT (SELECT count(*) FROM sagas_gone), (SELECT count(*) FROM timers_gone),
       (SELECT count(*) FROM history_gone), (SELECT count(*) FROM tokens_gone),
       (SELECT count(*) FROM steps_gone)";

/// Timers settled more than `$1` seconds ago whose saga does not run, at
/// most `$2`. (A running saga keeps its settled timers: they are what stops
/// a redelivered event from arming a step again.)
const PRUNE_SETTLED_TIMERS: &str = "\
DELETE FROM timers WHERE (order_id, step) IN (
    SELECT t.order_id, t.step FROM timers t
    WHERE t.state <> 'armed' AND t.settled_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM sagas s WHERE s.order_id = t.order_id AND s.status = 'running')
    LIMIT $2 FOR UPDATE OF t SKIP LOCKED
)";

/// Prunes finished sagas of the coordinator's schema.
#[derive(Clone, Debug)]
pub struct SagaRetention {
    db: Db,
    keep: Duration,
    sagas_per_batch: i64,
    pause: Duration,
    schedule: Schedule,
}

impl SagaRetention {
    /// Keeps finished sagas for `keep` after they ended (the settings'
    /// `retention()`).
    pub fn new(db: Db, keep: Duration) -> Self {
        Self {
            db,
            keep,
            sagas_per_batch: SAGA_BATCH,
            pause: BATCH_PAUSE,
            schedule: Schedule::default(),
        }
    }

    /// Deletes at most `sagas` per statement (tests use small batches).
    #[must_use]
    pub fn with_batch(mut self, sagas: i64) -> Self {
        self.sagas_per_batch = sagas.max(1);
        self
    }

    /// One whole pass, now: every batch until nothing old is left.
    pub async fn prune_once(&self) -> Result<Pruned, RetentionError> {
        self.pass(&Shutdown::new()).await
    }

    async fn pass(&self, shutdown: &Shutdown) -> Result<Pruned, RetentionError> {
        let mut pruned = Pruned::default();
        let keep = self.keep.as_secs_f64();
        let count = |n: i64| u64::try_from(n).unwrap_or_default();
        loop {
            let (sagas, timers, history, tokens, steps): (i64, i64, i64, i64, i64) =
                sqlx::query_as(PRUNE_FINISHED)
                    .bind(keep)
                    .bind(self.sagas_per_batch)
                    .fetch_one(self.db.pool())
                    .await
                    .map_err(|cause| RetentionError {
                        what: "finished sagas",
                        cause,
                    })?;
            pruned.sagas += count(sagas);
            pruned.timers += count(timers);
            pruned.history += count(history);
            pruned.used_tokens += count(tokens);
            pruned.payment_steps += count(steps);
            if !another_batch(count(sagas), self.sagas_per_batch, self.pause, shutdown).await {
                break;
            }
        }
        if shutdown.is_cancelled() {
            return Ok(pruned);
        }
        let settled_batch = BATCH_ROWS.min(self.sagas_per_batch.saturating_mul(8));
        loop {
            let deleted = sqlx::query(PRUNE_SETTLED_TIMERS)
                .bind(keep)
                .bind(settled_batch)
                .execute(self.db.pool())
                .await
                .map_err(|cause| RetentionError {
                    what: "settled timers",
                    cause,
                })?
                .rows_affected();
            pruned.settled_timers += deleted;
            if !another_batch(deleted, settled_batch, self.pause, shutdown).await {
                break;
            }
        }
        Ok(pruned)
    }

    /// Runs a pass on the schedule until `shutdown` (which also ends a pass
    /// between two batches).
    pub async fn run(self, shutdown: Shutdown) {
        let mut delay = self.schedule.first();
        while Schedule::wait(delay, &shutdown).await {
            match self.pass(&shutdown).await {
                Ok(pruned) if pruned == Pruned::default() => {
                    tracing::debug!("saga retention pass: no saga ended long enough ago");
                }
                Ok(pruned) => tracing::info!(
                    sagas = pruned.sagas,
                    timers = pruned.timers,
                    history = pruned.history,
                    used_tokens = pruned.used_tokens,
                    payment_steps = pruned.payment_steps,
                    settled_timers = pruned.settled_timers,
                    retention_days = self.keep.as_secs() / 86_400,
                    "saga retention pass: pruned finished sagas older than the retention"
                ),
                Err(error) => tracing::warn!(%error, "saga retention pass failed"),
            }
            delay = self.schedule.next();
        }
        tracing::debug!("saga retention stopped");
    }
}
