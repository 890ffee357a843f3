//! Retention of the runtime's tables in one context schema: inbox rows older
//! than the retention (`ORDERFLOW_RETENTION_DAYS`) and outbox rows sent more
//! than an hour ago are deleted, a batch at a time, by a pass that runs
//! every few minutes beside the service ([`Retention::run`]).
//!
//! Why inbox rows must be kept longer than any redelivery: an inbox row is
//! what turns a second delivery of a message into a no-op. The broker's
//! redeliveries are over within minutes (the delay tiers add up to 1 s +
//! 10 s + 1 min), but an operator may replay a dead letter days later; if
//! the inbox row of its message were gone by then, the replay would apply
//! the message twice. Hence a retention in days (at least one, 30 by
//! default), and `orderflow dlq replay` refuses a dead letter older than it
//! unless forced. A sent outbox row, on the other hand, is needed by nobody
//! (consumers' inboxes drop a message published twice): an hour is kept for
//! whoever looks at the table. Dead outbox rows (`outbox_dead`) are never
//! pruned: each waits for an operator.
//!
//! Passes never get in the way of handlers: each batch is one short
//! statement of at most a few thousand rows (its own transaction), with a
//! pause between batches; rows another transaction holds are skipped
//! (`SKIP LOCKED`), not waited for. Several services sharing a schema may
//! all prune it: they split the work. The schedule and the batching are
//! shared with the coordinator's retention of finished sagas
//! ([`Schedule`], [`another_batch`]).

use std::time::Duration;

use super::Db;
use crate::Shutdown;

/// Rows deleted per statement (and transaction).
pub const BATCH_ROWS: i64 = 2_000;

/// Pause between two batches of one pass, so a long backlog is worked off
/// without taking the database from the handlers.
pub const BATCH_PAUSE: Duration = Duration::from_millis(200);

/// How long sent outbox rows are kept (for whoever looks at the table).
pub const SENT_OUTBOX_KEPT: Duration = Duration::from_hours(1);

#[derive(Debug, thiserror::Error)]
#[error(
    "pruning `{table}` of schema `{schema}` failed: {cause}; the next pass tries again (rows \
     are only ever deleted, so nothing is half done)"
)]
pub struct RetentionError {
    pub schema: String,
    pub table: &'static str,
    pub cause: sqlx::Error,
}

/// When passes run: the first some minutes after start, then every few
/// minutes, each delay with jitter so that services started together do
/// not prune together.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Least delay before the first pass.
    pub first_after: Duration,
    /// Least delay between two passes.
    pub every: Duration,
    /// Up to this much is added to each delay, at random.
    pub jitter: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            first_after: Duration::from_mins(3),
            every: Duration::from_mins(10),
            jitter: Duration::from_mins(2),
        }
    }
}

impl Schedule {
    fn jittered(&self, base: Duration) -> Duration {
        let spread = u64::try_from(self.jitter.as_millis()).unwrap_or(u64::MAX);
        base + Duration::from_millis(fastrand::u64(0..=spread))
    }

    /// The delay before the first pass.
    pub fn first(&self) -> Duration {
        self.jittered(self.first_after)
    }

    /// The delay between two passes.
    pub fn next(&self) -> Duration {
        self.jittered(self.every)
    }

    /// Waits for the next pass: `false` when `shutdown` came first.
    pub async fn wait(delay: Duration, shutdown: &Shutdown) -> bool {
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// Whether a pass goes on after a batch that deleted `deleted` rows of at
/// most `limit`: only after a full batch, after `pause`, and not once
/// `shutdown` came (a pass stops between two batches).
pub async fn another_batch(deleted: u64, limit: i64, pause: Duration, shutdown: &Shutdown) -> bool {
    i64::try_from(deleted).unwrap_or(i64::MAX) >= limit
        && !shutdown.is_cancelled()
        && Schedule::wait(pause, shutdown).await
}

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Inbox rows older than the retention.
    pub inbox: u64,
    /// Outbox rows sent more than [`SENT_OUTBOX_KEPT`] ago.
    pub sent_outbox: u64,
}

/// Inbox rows older than `$1` seconds, at most `$2`.
const PRUNE_INBOX: &str = "\
DELETE FROM inbox WHERE (consumer, message_id) IN (
    SELECT consumer, message_id FROM inbox
    WHERE received_at < now() - make_interval(secs => $1)
    LIMIT $2 FOR UPDATE SKIP LOCKED
)";

/// Outbox rows sent more than `$1` seconds ago, at most `$2`.
const PRUNE_SENT_OUTBOX: &str = "\
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
    WHERE sent_at < now() - make_interval(secs => $1)
    LIMIT $2 FOR UPDATE SKIP LOCKED
)";

/// Prunes the runtime's tables of one schema.
#[derive(Clone, Debug)]
pub struct Retention {
    db: Db,
    keep: Duration,
    batch: i64,
    pause: Duration,
    schedule: Schedule,
}

impl Retention {
    /// Keeps inbox rows for `keep` (the settings' `retention()`).
    pub fn new(db: Db, keep: Duration) -> Self {
        Self {
            db,
            keep,
            batch: BATCH_ROWS,
            pause: BATCH_PAUSE,
            schedule: Schedule::default(),
        }
    }

    /// Deletes at most `rows` per statement (tests use small batches).
    #[must_use]
    pub fn with_batch(mut self, rows: i64) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// When passes run.
    #[must_use]
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// One whole pass, now: every batch until nothing old is left.
    pub async fn prune_once(&self) -> Result<Pruned, RetentionError> {
        self.pass(&Shutdown::new()).await
    }

    async fn pass(&self, shutdown: &Shutdown) -> Result<Pruned, RetentionError> {
        let inbox = self
            .delete("inbox", PRUNE_INBOX, self.keep, shutdown)
            .await?;
        let sent_outbox = self
            .delete("outbox", PRUNE_SENT_OUTBOX, SENT_OUTBOX_KEPT, shutdown)
            .await?;
        Ok(Pruned { inbox, sent_outbox })
    }

    async fn delete(
        &self,
        table: &'static str,
        statement: &'static str,
        older_than: Duration,
        shutdown: &Shutdown,
    ) -> Result<u64, RetentionError> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(statement)
                .bind(older_than.as_secs_f64())
                .bind(self.batch)
                .execute(self.db.pool())
                .await
                .map_err(|cause| RetentionError {
                    schema: self.db.schema().to_owned(),
                    table,
                    cause,
                })?
                .rows_affected();
            total += deleted;
            if !another_batch(deleted, self.batch, self.pause, shutdown).await {
                return Ok(total);
            }
        }
    }

    /// Runs a pass on the schedule until `shutdown` (which also ends a pass
    /// between two batches).
    pub async fn run(self, shutdown: Shutdown) {
        let schema = self.db.schema().to_owned();
        let mut delay = self.schedule.first();
        while Schedule::wait(delay, &shutdown).await {
            match self.pass(&shutdown).await {
                Ok(pruned) if pruned == Pruned::default() => {
                    tracing::debug!(%schema, "retention pass: nothing old enough to prune");
                }
                Ok(pruned) => tracing::info!(
                    %schema,
                    inbox = pruned.inbox,
                    sent_outbox = pruned.sent_outbox,
                    retention_days = self.keep.as_secs() / 86_400,
                    "retention pass: pruned old inbox rows and sent outbox rows"
                ),
                Err(error) => tracing::warn!(%error, "retention pass failed"),
            }
            delay = self.schedule.next();
        }
        tracing::debug!(%schema, "retention stopped");
    }
}
