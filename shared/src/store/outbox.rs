//! The outbox relay: publishes committed outbox rows with publisher confirms
//! and marks them sent. Two paths lead a row to the broker:
//!
//! - **Hand-over** (the fast path): a unit of work that commits in a process
//!   whose relay runs hands its rows over in memory. The relay publishes them
//!   at once, many confirms in flight, and marks the confirmed ones sent in
//!   batches. No query finds them, no notification wakes anyone.
//! - **Sweep** (the safety net): rows nobody handed over — the process died
//!   between commit and publish, a publish failed, another process has no
//!   relay — are claimed with `FOR UPDATE SKIP LOCKED` once they are older
//!   than a grace period and not in this relay's hands, published again with
//!   the same `message_id` (consumers' inboxes drop the duplicate) and marked
//!   sent. Any number of relays can sweep one outbox.
//!
//! Two bounds keep a relay from being stuck on what it cannot publish:
//!
//! - **Memory**: the relay holds at most [`HAND_OVER_LIMIT`] handed-over
//!   rows at once. While the broker is away, rows beyond it are not kept in
//!   memory (and not marked as held): they wait in the table like rows of a
//!   process without a relay, and a sweep publishes them once the broker is
//!   back.
//! - **Unroutable rows**: a row the broker refuses as unroutable (no queue
//!   bound to its routing key; the mandatory publish came back) is counted
//!   (`attempts`, `last_error`) by each sweep that tries it; refused
//!   [`DEAD_AFTER_REFUSALS`] times and at least [`DEAD_AFTER_AGE`] old, it
//!   is moved to `outbox_dead` in the same transaction, so sweeps stop
//!   trying it. `orderflow dlq list` shows such rows and `orderflow dlq
//!   replay --outbox` puts one back. A broker that is away (timeouts,
//!   connection errors, nacks) never sends a row there.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use sqlx::Row;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;

use super::Db;
use crate::Shutdown;
use crate::bus::{Outgoing, PublishError, Publisher};
use crate::envelope::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox of schema `{schema}`: {cause}")]
    Sql { schema: String, cause: sqlx::Error },
    #[error(
        "outbox of schema `{schema}`: {failed} of {claimed} messages not published, first: {first}"
    )]
    Publish {
        schema: String,
        claimed: usize,
        failed: usize,
        first: PublishError,
    },
}

/// Most rows a relay holds from hand-overs at once (by default): handed
/// over and not yet published and marked sent. Beyond it, committed rows are
/// not kept in memory: they are safe in the table, and a sweep publishes
/// them (once the broker is back, when it is away).
pub const HAND_OVER_LIMIT: usize = 10_000;

/// Rows handed over by committed units of work, and the ids the relay holds
/// from hand-overs (handed over, not yet marked sent), which sweeps skip.
/// Every held row is in memory (waiting, being published, or its id waiting
/// to be marked), so bounding `held` bounds the memory: a unit whose rows
/// find no room keeps them out of `held` too, and sweeps take them.
#[derive(Debug)]
pub(crate) struct HandOver {
    /// The schema, for logs.
    schema: String,
    /// Set while a relay runs on this `Db`; otherwise units hand nothing over
    /// and their rows wait for a sweep.
    attached: AtomicBool,
    /// Most rows held at once (the running relay's hand-over limit).
    limit: AtomicUsize,
    /// Whether rows were turned away since the hand-over last had room
    /// (logged once per episode).
    overflowing: AtomicBool,
    pending: Mutex<Vec<(i64, Outgoing)>>,
    held: Mutex<HashSet<i64>>,
    wake: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a single push, drain or set update: the
    // data is consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HandOver {
    pub(crate) fn new(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            attached: AtomicBool::new(false),
            limit: AtomicUsize::new(HAND_OVER_LIMIT),
            overflowing: AtomicBool::new(false),
            pending: Mutex::default(),
            held: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// Gives committed rows to the running relay, as many as its limit
    /// leaves room for; returns how many it took. The others (all of them
    /// when no relay runs on this `Db`) wait in the table for a sweep.
    pub(crate) fn hand_over(&self, mut rows: Vec<(i64, Outgoing)>) -> usize {
        if !self.attached.load(Ordering::Acquire) || rows.is_empty() {
            return 0;
        }
        let offered = rows.len();
        let taken = {
            // Always `pending` before `held` (nothing else holds both).
            let mut pending = lock(&self.pending);
            let mut held = lock(&self.held);
            let room = self
                .limit
                .load(Ordering::Relaxed)
                .saturating_sub(held.len());
            rows.truncate(room);
            held.extend(rows.iter().map(|(id, _)| *id));
            let taken = rows.len();
            pending.extend(rows);
            taken
        };
        if taken < offered {
            if !self.overflowing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    schema = %self.schema,
                    limit = self.limit.load(Ordering::Relaxed),
                    "the outbox relay holds as many handed-over rows as it may (the broker is slow \
                     or away); further committed rows wait in the outbox table and a sweep \
                     publishes them"
                );
            }
        } else if self.overflowing.swap(false, Ordering::Relaxed) {
            tracing::info!(schema = %self.schema, "the outbox relay takes handed-over rows again");
        }
        if taken > 0 {
            self.wake.notify_one();
        }
        taken
    }

    /// Rows handed over and not yet published and marked sent.
    pub(crate) fn held_len(&self) -> usize {
        lock(&self.held).len()
    }

    fn take(&self) -> Vec<(i64, Outgoing)> {
        std::mem::take(&mut *lock(&self.pending))
    }

    fn held_ids(&self) -> Vec<i64> {
        lock(&self.held).iter().copied().collect()
    }

    fn release(&self, ids: &[i64]) {
        let mut held = lock(&self.held);
        for id in ids {
            held.remove(id);
        }
    }
}

/// How many sweeps must have had the broker refuse a row as unroutable
/// before it goes to `outbox_dead`.
pub const DEAD_AFTER_REFUSALS: u32 = 5;

/// How old a refused row must be before it goes to `outbox_dead`: a route
/// that is missing for a moment (a topology being declared) costs nothing.
pub const DEAD_AFTER_AGE: Duration = Duration::from_mins(1);

/// Moves the rows among `$1` refused at least `$2` times and committed more
/// than `$3` seconds ago from `outbox` to `outbox_dead`, in one statement.
const MOVE_TO_DEAD: &str = "\
WITH dead AS (
    DELETE FROM outbox
    WHERE id = ANY($1) AND attempts >= $2 AND created_at <= now() - make_interval(secs => $3)
    RETURNING id, message_id, routing_key, correlation_id, causation_id, traceparent,
              occurred_at, body, created_at, attempts, last_error
)
INSERT INTO outbox_dead (id, message_id, routing_key, correlation_id, causation_id, traceparent,
                         occurred_at, body, created_at, attempts, last_error, reason)
SELECT id, message_id, routing_key, correlation_id, causation_id, traceparent, occurred_at, body,
       created_at, attempts, last_error,
       format('unroutable: the broker refused it %s times; no queue is bound to routing key %s',
              attempts, routing_key)
FROM dead
RETURNING id, message_id, routing_key, correlation_id, attempts, last_error, reason, created_at,
          failed_at, body";

/// A row of `outbox_dead`: an event the broker kept refusing, kept with why
/// (moved there by a sweep, listed and replayed by `orderflow dlq`).
#[derive(Debug, sqlx::FromRow)]
pub struct DeadRow {
    pub id: i64,
    pub message_id: String,
    pub routing_key: String,
    /// The order the event is about.
    pub correlation_id: String,
    /// How many sweeps the broker refused it in.
    pub attempts: i32,
    pub last_error: Option<String>,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub failed_at: DateTime<Utc>,
    pub body: Vec<u8>,
}

impl Db {
    /// How many rows `outbox_dead` holds, and the first `limit` by id.
    pub async fn dead_outbox(&self, limit: usize) -> Result<(i64, Vec<DeadRow>), sqlx::Error> {
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_dead")
            .fetch_one(self.pool())
            .await?;
        let rows = sqlx::query_as(
            "SELECT id, message_id, routing_key, correlation_id, attempts, last_error, reason, \
             created_at, failed_at, body FROM outbox_dead ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        Ok((total, rows))
    }
}

/// When sweeping may start again after failures.
#[derive(Debug)]
struct SweepBackoff {
    failures: u32,
    not_before: tokio::time::Instant,
}

impl Default for SweepBackoff {
    fn default() -> Self {
        Self {
            failures: 0,
            not_before: tokio::time::Instant::now(),
        }
    }
}

/// Publishes one schema's outbox.
#[derive(Clone, Debug)]
pub struct Relay {
    db: Db,
    publisher: Publisher,
    batch_size: i64,
    poll_interval: Duration,
    grace: Duration,
    /// Most messages of hand-over batches waiting for their confirm at once.
    in_flight: Arc<Semaphore>,
    /// Most rows held from hand-overs at once.
    hand_over_limit: usize,
}

/// Publishes `rows` with all confirms in flight at once: the ids the broker
/// confirmed, and the ids that failed with their errors (each one logged;
/// its row stays unsent for the next sweep).
async fn publish_rows(
    publisher: &Publisher,
    rows: &[(i64, Outgoing)],
) -> (Vec<i64>, Vec<(i64, PublishError)>) {
    let results = join_all(rows.iter().map(|(_, message)| publisher.publish(message))).await;
    let mut sent = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    for ((id, message), result) in rows.iter().zip(results) {
        match result {
            Ok(()) => sent.push(*id),
            Err(error) => {
                log_unpublished(message, &error);
                failed.push((*id, error));
            }
        }
    }
    (sent, failed)
}

fn log_unpublished(message: &Outgoing, error: &PublishError) {
    tracing::warn!(
        order_id = %message.envelope.correlation_id,
        message_id = %message.envelope.message_id,
        %error,
        "outbox message not published; it stays in the outbox for the next sweep"
    );
}

impl Relay {
    pub fn new(db: Db, publisher: Publisher) -> Self {
        Self {
            db,
            publisher,
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            grace: Duration::from_secs(2),
            in_flight: Arc::new(Semaphore::new(4096)),
            hand_over_limit: HAND_OVER_LIMIT,
        }
    }

    /// Most rows the relay holds from hand-overs at once ([`HAND_OVER_LIMIT`]
    /// by default); at least 1.
    #[must_use]
    pub fn with_hand_over_limit(mut self, rows: usize) -> Self {
        self.hand_over_limit = rows.max(1);
        self
    }

    /// How old an unsent row must be before a sweep takes it: younger rows
    /// are normally being published by the process that committed them.
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How often the relay sweeps.
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    fn sql_error(&self, source: sqlx::Error) -> RelayError {
        RelayError::Sql {
            schema: self.db.schema().to_owned(),
            cause: source,
        }
    }

    /// One sweep: claims up to one batch of unsent rows older than the grace
    /// period that this relay does not hold, publishes them (all confirms in
    /// flight at once) and marks the confirmed ones sent; in the same
    /// transaction it counts the rows the broker refused as unroutable and
    /// moves those refused too often to `outbox_dead`. Returns how many were
    /// published, or the first failure when any row was not.
    pub async fn relay_batch(&self) -> Result<usize, RelayError> {
        let hand_over = self.db.hand_over();
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| self.sql_error(e))?;
        let rows = sqlx::query(
            "SELECT id, message_id, routing_key, correlation_id, causation_id, traceparent, \
             occurred_at, body FROM outbox \
             WHERE sent_at IS NULL AND created_at <= now() - make_interval(secs => $2) \
             AND id <> ALL($3) ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch_size)
        .bind(self.grace.as_secs_f64())
        .bind(hand_over.held_ids())
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.sql_error(e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            claimed.push(decode_row(&row).map_err(|e| self.sql_error(e))?);
        }
        let (sent, mut failures) = publish_rows(&self.publisher, &claimed).await;
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.sql_error(e))?;
        let dead = self
            .record_refusals(&mut tx, &failures)
            .await
            .map_err(|e| self.sql_error(e))?;
        tx.commit().await.map_err(|e| self.sql_error(e))?;
        for row in &dead {
            tracing::error!(
                schema = %self.db.schema(),
                order_id = %row.correlation_id,
                message_id = %row.message_id,
                routing_key = %row.routing_key,
                outbox_id = row.id,
                refusals = row.attempts,
                "outbox message moved to outbox_dead: the broker kept refusing it as unroutable (no \
                 queue is bound to its routing key); sweeps no longer try it. Bind a queue to the \
                 routing key (declare the topology), then `orderflow dlq replay --outbox --schema \
                 {} --id {}`",
                self.db.schema(),
                row.id
            );
        }
        let claimed_count = claimed.len();
        match failures.len() {
            0 => Ok(sent.len()),
            failed => Err(RelayError::Publish {
                schema: self.db.schema().to_owned(),
                claimed: claimed_count,
                failed,
                first: failures.swap_remove(0).1,
            }),
        }
    }

    /// Counts, in the sweep's transaction, the claimed rows the broker
    /// refused as unroutable, and moves those refused [`DEAD_AFTER_REFUSALS`]
    /// times and committed at least [`DEAD_AFTER_AGE`] ago to `outbox_dead`.
    /// Other failures (a broker away, a timeout) count for nothing: those
    /// rows stay for the next sweep, however long it takes. Returns the rows
    /// moved.
    async fn record_refusals(
        &self,
        tx: &mut sqlx::PgConnection,
        failures: &[(i64, PublishError)],
    ) -> Result<Vec<DeadRow>, sqlx::Error> {
        let (ids, errors): (Vec<i64>, Vec<String>) = failures
            .iter()
            .filter(|(_, error)| matches!(error, PublishError::Unroutable { .. }))
            .map(|(id, error)| (*id, error.to_string()))
            .unzip();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query(
            "UPDATE outbox o SET attempts = o.attempts + 1, last_error = r.error \
             FROM UNNEST($1::int8[], $2::text[]) AS r(id, error) WHERE o.id = r.id",
        )
        .bind(&ids)
        .bind(&errors)
        .execute(&mut *tx)
        .await?;
        sqlx::query_as(MOVE_TO_DEAD)
            .bind(&ids)
            .bind(i32::try_from(DEAD_AFTER_REFUSALS).unwrap_or(i32::MAX))
            .bind(DEAD_AFTER_AGE.as_secs_f64())
            .fetch_all(&mut *tx)
            .await
    }

    /// Sweeps until nothing old enough is left. After a failure the next
    /// sweeps are skipped for a while (doubling); the loop itself never
    /// sleeps, so hand-overs keep flowing meanwhile.
    async fn sweep(&self, backoff: &mut SweepBackoff) {
        if tokio::time::Instant::now() < backoff.not_before {
            return;
        }
        loop {
            match self.relay_batch().await {
                Ok(n) if n as i64 == self.batch_size => {}
                Ok(_) => {
                    backoff.failures = 0;
                    return;
                }
                Err(error) => {
                    backoff.failures = backoff.failures.saturating_add(1);
                    let delay = Duration::from_millis(100 * 2u64.pow(backoff.failures.min(6)));
                    backoff.not_before = tokio::time::Instant::now() + delay;
                    tracing::warn!(%error, ?delay, "outbox sweep failed; sweeping again after the delay");
                    return;
                }
            }
        }
    }

    /// Publishes one hand-over batch and passes the confirmed ids to the marker.
    async fn publish_handed_over(
        &self,
        batch: Vec<(i64, Outgoing)>,
        marker: &mpsc::UnboundedSender<Vec<i64>>,
    ) {
        let (sent, failed) = publish_rows(&self.publisher, &batch).await;
        // Failed rows are let go: the next sweep after the grace period tries again.
        let failed: Vec<i64> = failed.into_iter().map(|(id, _)| id).collect();
        self.db.hand_over().release(&failed);
        if !sent.is_empty()
            && let Err(unmarked) = marker.send(sent)
        {
            self.db.hand_over().release(&unmarked.0);
        }
    }

    /// Runs until `shutdown`: publishes what units of work hand over, and
    /// sweeps every poll interval for what nobody did. Units committing on
    /// this `Db` hand their rows over from the moment this is called (not
    /// only once the future is first polled).
    pub fn run(self, shutdown: Shutdown) -> impl std::future::Future<Output = ()> + Send {
        let hand_over = self.db.hand_over().clone();
        hand_over
            .limit
            .store(self.hand_over_limit, Ordering::Relaxed);
        hand_over.attached.store(true, Ordering::Release);
        self.serve(hand_over, shutdown)
    }

    async fn serve(self, hand_over: Arc<HandOver>, shutdown: Shutdown) {
        let (marker_tx, marker_rx) = mpsc::unbounded_channel();
        let marker = tokio::spawn(
            Marker {
                db: self.db.clone(),
            }
            .run(marker_rx),
        );
        let mut publishing = JoinSet::new();
        let mut failures = SweepBackoff::default();
        let mut sweep = tokio::time::interval(self.poll_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while publishing.try_join_next().is_some() {}
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = hand_over.wake.notified() => {
                    self.spawn_batch(hand_over.take(), &marker_tx, &mut publishing).await;
                }
                _ = sweep.tick() => self.sweep(&mut failures).await,
            }
        }
        // Units still committing hand nothing over from now on; what was
        // handed over is published, and a last sweep takes anything else.
        hand_over.attached.store(false, Ordering::Release);
        self.spawn_batch(hand_over.take(), &marker_tx, &mut publishing)
            .await;
        while publishing.join_next().await.is_some() {}
        drop(marker_tx);
        let _ = marker.await;
        failures.not_before = tokio::time::Instant::now();
        self.sweep(&mut failures).await;
        tracing::info!(schema = %self.db.schema(), "outbox relay stopped");
    }

    async fn spawn_batch(
        &self,
        batch: Vec<(i64, Outgoing)>,
        marker: &mpsc::UnboundedSender<Vec<i64>>,
        publishing: &mut JoinSet<()>,
    ) {
        if batch.is_empty() {
            return;
        }
        let size = u32::try_from(batch.len()).unwrap_or(u32::MAX).min(4096);
        // Waits while too many confirms are outstanding: backpressure on the
        // relay, not on the units (their rows are safe in the table).
        let permit = self.in_flight.clone().acquire_many_owned(size).await;
        let relay = self.clone();
        let marker = marker.clone();
        publishing.spawn(async move {
            relay.publish_handed_over(batch, &marker).await;
            drop(permit);
        });
    }
}

fn decode_row(row: &sqlx::postgres::PgRow) -> Result<(i64, Outgoing), sqlx::Error> {
    let id: i64 = row.try_get("id")?;
    let routing_key: String = row.try_get("routing_key")?;
    let occurred_at: i64 = row.try_get("occurred_at")?;
    let envelope = Envelope {
        message_id: row.try_get("message_id")?,
        correlation_id: row.try_get("correlation_id")?,
        kind: routing_key.clone(),
        timestamp: u64::try_from(occurred_at).unwrap_or_default(),
        causation_id: row.try_get("causation_id")?,
        traceparent: row.try_get("traceparent")?,
    };
    let body: Vec<u8> = row.try_get("body")?;
    Ok((
        id,
        Outgoing {
            routing_key,
            envelope,
            body,
        },
    ))
}

/// Marks handed-over rows sent, many per statement, with `synchronous_commit`
/// off for that statement only: a mark lost in a crash only means the row is
/// published again, and the inbox drops the duplicate. Confirmations are
/// gathered for [`MARK_LINGER`] before each statement: nothing waits for a
/// mark (the rows stay in the relay's hands until then, so no sweep takes
/// them), and with few messages a second it is one statement for many rows
/// instead of one for each.
struct Marker {
    db: Db,
}

/// One statement, one implicit transaction: `set_config(..., true)` applies
/// to that transaction, and its commit does not wait for the WAL flush.
const MARK_SENT: &str = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
     UPDATE outbox SET sent_at = now() FROM relaxed WHERE id = ANY($1)";

/// How long confirmations gather before they are marked sent together.
const MARK_LINGER: Duration = Duration::from_millis(50);

impl Marker {
    async fn run(self, mut confirmed: mpsc::UnboundedReceiver<Vec<i64>>) {
        while let Some(first) = confirmed.recv().await {
            tokio::time::sleep(MARK_LINGER).await;
            let mut ids = first;
            while let Ok(more) = confirmed.try_recv() {
                ids.extend(more);
            }
            let marked = sqlx::query(MARK_SENT)
                .bind(&ids)
                .execute(self.db.pool())
                .await;
            if let Err(error) = marked {
                tracing::warn!(%error, schema = %self.db.schema(), rows = ids.len(), "marking outbox rows sent failed; a sweep will publish them again (the inbox drops the duplicates)");
            }
            self.db.hand_over().release(&ids);
        }
    }
}
