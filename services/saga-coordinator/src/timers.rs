//! Durable timers in PostgreSQL: armed by events, settled (disarmed) when
//! their step completes, fired by a loop that claims due rows with
//! `FOR UPDATE SKIP LOCKED` and publishes `saga.timed-out` through the outbox
//! in the same transaction. A timer and its step's completion are conditional
//! updates of the same row, so exactly one of them wins. Deadlines survive
//! restarts of everything; one missed while the coordinator was down fires
//! when it comes back. Any number of coordinators may run the loop.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::bus::Outgoing;
use orderflow_shared::events::{Event, SagaTimedOut, Step};
use orderflow_shared::store::{Db, OutboxQuery};
use sqlx::PgConnection;
use tokio::sync::Notify;

orderflow_shared::text_enum! {
    /// Where a timer is: `armed` while its step is open, then `fired` (its
    /// deadline passed first) or `disarmed` (its step completed, or the saga
    /// ended).
    pub enum TimerState {
        Armed,
        Fired,
        Disarmed,
    }
}

/// Arms the timers `steps` (each with its deadline) for `order_id`, in one
/// statement, each unless it was armed before (a redelivered or replayed
/// event does not move a deadline).
pub async fn arm(
    conn: &mut PgConnection,
    order_id: &str,
    steps: &[(Step, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    let (steps, due): (Vec<Step>, Vec<DateTime<Utc>>) = steps.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO timers (order_id, step, due_at) \
         SELECT $1, s, d FROM unnest($2::text[], $3::timestamptz[]) AS u(s, d) \
         ON CONFLICT (order_id, step) DO NOTHING",
    )
    .bind(order_id)
    .bind(&steps)
    .bind(&due)
    .execute(conn)
    .await?;
    Ok(())
}

/// How settling a step's timer went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The step was open; it is now complete and its timer will not fire.
    Won,
    /// The timer fired first: the step timed out.
    TimedOut,
    /// The step was already completed, or never opened.
    NotOpen,
}

/// Completes `step` for `order_id`: disarms its timer if still armed.
pub async fn settle(
    conn: &mut PgConnection,
    order_id: &str,
    step: Step,
) -> Result<Settled, sqlx::Error> {
    let won = sqlx::query(
        "UPDATE timers SET state = 'disarmed', settled_at = now() \
         WHERE order_id = $1 AND step = $2 AND state = 'armed'",
    )
    .bind(order_id)
    .bind(step)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if won {
        return Ok(Settled::Won);
    }
    let state: Option<TimerState> =
        sqlx::query_scalar("SELECT state FROM timers WHERE order_id = $1 AND step = $2")
            .bind(order_id)
            .bind(step)
            .fetch_optional(conn)
            .await?;
    Ok(match state {
        Some(TimerState::Fired) => Settled::TimedOut,
        _ => Settled::NotOpen,
    })
}

/// The timer changes of a unit of work that nothing in it reads back: steps
/// completed and sagas ended. They are written with the unit's sagas, in
/// the same statement (`Sagas::write_and_commit`),
/// so they cost no round trip of their own.
#[derive(Debug, Default)]
pub struct Settling {
    completed_orders: Vec<String>,
    completed_steps: Vec<Step>,
    ended: Vec<String>,
}

impl Settling {
    /// Completes `step` of `order_id` whether or not its timer was armed
    /// yet: when the step's answer is handled before the event that arms
    /// it, a settled row is left so the late arming does nothing.
    pub fn complete(&mut self, order_id: &str, step: Step) {
        self.completed_orders.push(order_id.to_owned());
        self.completed_steps.push(step);
    }

    /// The saga of `order_id` ended: every armed timer of it is disarmed.
    pub fn end(&mut self, order_id: &str) {
        self.ended.push(order_id.to_owned());
    }

    /// How many parameters [`ctes`](Self::ctes) takes (its arrays).
    pub const PARAMS: usize = 3;

    /// Two `WITH`s (`completed`, `ended`) writing these changes, with
    /// [`PARAMS`](Self::PARAMS) parameters from `$first` ([`bind`](Self::bind)). A step of
    /// an order that also ended in this unit is left to the end, which
    /// disarms it as well: one statement must not change a row twice.
    pub fn ctes(first: usize) -> String {
        let (orders, steps, ended) = (first, first + 1, first + 2);
        format!(
            "completed AS ( \
               INSERT INTO timers (order_id, step, due_at, state, settled_at) \
               SELECT DISTINCT o, s, now(), 'disarmed', now() \
               FROM unnest(${orders}::text[], ${steps}::text[]) AS u(o, s) \
               WHERE o <> ALL(${ended}::text[]) \
               ON CONFLICT (order_id, step) DO UPDATE SET state = 'disarmed', settled_at = now() \
               WHERE timers.state = 'armed'), \
             ended AS ( \
               UPDATE timers SET state = 'disarmed', settled_at = now() \
               WHERE order_id = ANY(${ended}::text[]) AND state = 'armed')"
        )
    }

    /// Binds the three arrays of [`ctes`](Self::ctes), after what `query`
    /// already binds.
    pub fn bind<'q>(&'q self, query: OutboxQuery<'q>) -> OutboxQuery<'q> {
        query
            .bind(&self.completed_orders)
            .bind(&self.completed_steps)
            .bind(&self.ended)
    }
}

/// How many due timers one firing claims at most.
pub const FIRE_BATCH: i64 = 500;

/// When the next armed timer is due (the loop sleeps until then, capped).
pub const UNTIL_NEXT: &str = "SELECT min(due_at) FROM timers WHERE state = 'armed'";

/// Claims up to `$1` due timers (`SKIP LOCKED`: several coordinators share
/// the work) and settles them in one statement: per order, the earliest due
/// timer fires if its saga still runs; the order's other claimed timers, and
/// all its other armed ones, are disarmed (the saga is ending). No lock is
/// taken on the saga: handlers lock the saga first and the timer second, so
/// the other order could deadlock; the timer row, locked by the claim, is
/// what decides between firing and completing. Returns the claimed timers
/// with their new state.
pub const FIRE_DUE: &str = "\
WITH claimed AS (
    SELECT order_id, step, due_at FROM timers WHERE state = 'armed' AND due_at <= now()
    ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT c.order_id, c.step,
           (s.status IS NULL OR s.status = 'running')
           AND row_number() OVER (PARTITION BY c.order_id ORDER BY c.due_at, c.step) = 1 AS fire
    FROM claimed c LEFT JOIN sagas s ON s.order_id = c.order_id
), settled AS (
    UPDATE timers t SET state = CASE WHEN d.fire THEN 'fired' ELSE 'disarmed' END,
                        settled_at = now()
    FROM decided d WHERE t.order_id = d.order_id AND t.step = d.step AND t.state = 'armed'
    RETURNING t.order_id, t.step, t.state
), others AS (
    UPDATE timers t SET state = 'disarmed', settled_at = now()
    FROM (SELECT DISTINCT order_id FROM decided WHERE fire) f
    WHERE t.order_id = f.order_id AND t.state = 'armed'
      AND (t.order_id, t.step) NOT IN (SELECT order_id, step FROM claimed)
)
SELECT order_id, step, state FROM settled";

/// How handlers tell the timer loop about a new deadline: only one earlier
/// than the loop's next wake-up wakes it (deadlines are usually minutes
/// away, and the loop looks at least every second anyway).
#[derive(Debug)]
pub struct TimerWake {
    notify: Notify,
    /// When the loop wakes up next, in milliseconds since the epoch.
    next_wake_millis: std::sync::atomic::AtomicI64,
}

impl Default for TimerWake {
    fn default() -> Self {
        Self {
            notify: Notify::new(),
            next_wake_millis: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }
}

impl TimerWake {
    /// A timer was armed at `due`: wakes the loop if it would sleep past it.
    pub fn armed(&self, due: DateTime<Utc>) {
        let next = self
            .next_wake_millis
            .load(std::sync::atomic::Ordering::Acquire);
        if due.timestamp_millis() < next {
            self.notify.notify_one();
        }
    }

    /// Resolves when a handler armed a deadline earlier than the loop's
    /// wake-up (for loops other than [`TimerLoop`], e.g. a benchmark's).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// The loop sleeps until `at` (or an earlier arming).
    pub fn sleeping_until(&self, at: DateTime<Utc>) {
        self.next_wake_millis
            .store(at.timestamp_millis(), std::sync::atomic::Ordering::Release);
    }

    /// The loop is awake and will look at every timer before it sleeps again.
    pub fn awake(&self) {
        self.next_wake_millis
            .store(i64::MIN, std::sync::atomic::Ordering::Release);
    }
}

/// The loop that fires due timers.
#[derive(Clone, Debug)]
pub struct TimerLoop {
    db: Db,
    wake: Arc<TimerWake>,
    batch: i64,
    max_sleep: Duration,
}

impl TimerLoop {
    pub fn new(db: Db, wake: Arc<TimerWake>) -> Self {
        Self {
            db,
            wake,
            batch: FIRE_BATCH,
            max_sleep: Duration::from_secs(1),
        }
    }

    /// Fires up to one batch of due timers in one unit of work: one
    /// statement claims, settles and disarms them (`FIRE_DUE`), each fired
    /// one's `saga.timed-out` goes into the outbox and the history, and one
    /// commit makes it all happen; returns how many fired.
    pub async fn fire_due(&self) -> Result<usize, sqlx::Error> {
        let mut unit = self.db.begin_unit_without_inbox().await?;
        let settled: Vec<(String, Step, TimerState)> = sqlx::query_as(FIRE_DUE)
            .bind(self.batch)
            .fetch_all(unit.conn())
            .await?;
        let mut fired = 0;
        let mut history = crate::history::Pending::default();
        for (order_id, step, state) in settled {
            if state != TimerState::Fired {
                continue;
            }
            let event = Event::SagaTimedOut(SagaTimedOut {
                order_id: order_id.clone(),
                step,
            });
            let outgoing = Outgoing::event(&event, None);
            // The coordinator does not consume its own events: the timer
            // goes into the history with the message it is sent as.
            history.push(&outgoing.envelope, &event, "timer", None);
            unit.emit(outgoing);
            tracing::warn!(%order_id, %step, "deadline passed; saga timed out");
            fired += 1;
        }
        // The history and the outbox rows in the unit's last statement.
        unit.commit_with(
            |emitted| {
                format!(
                    "WITH recorded AS ({}), {emitted} SELECT id, message_id FROM emitted",
                    crate::history::Pending::insert(1)
                )
            },
            crate::history::Pending::PARAMS,
            |query| history.bind(query),
        )
        .await?;
        Ok(fired)
    }

    /// How long until the next armed timer is due (capped).
    async fn until_next(&self) -> Duration {
        let next: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(UNTIL_NEXT)
            .fetch_one(self.db.pool())
            .await;
        match next {
            Ok(Some(due)) => (due - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(self.max_sleep),
            _ => self.max_sleep,
        }
    }

    /// Fires timers as they fall due until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        loop {
            self.wake.awake();
            match self.fire_due().await {
                Ok(n) if n as i64 >= self.batch => continue,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "firing due timers failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // From here on a deadline earlier than the longest sleep wakes the
            // loop (a permit is kept if it is not sleeping yet), so one armed
            // while the next deadline is being read is not slept past.
            let max_wake = Utc::now()
                + chrono::Duration::from_std(self.max_sleep).unwrap_or(chrono::Duration::zero());
            self.wake.sleeping_until(max_wake);
            let sleep = self.until_next().await;
            if sleep.is_zero() {
                continue;
            }
            let wake_at =
                Utc::now() + chrono::Duration::from_std(sleep).unwrap_or(chrono::Duration::zero());
            self.wake.sleeping_until(wake_at.min(max_wake));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::info!("timer loop stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether the loop would be woken now (a permit is waiting).
    async fn woken(wake: &TimerWake) -> bool {
        tokio::time::timeout(Duration::from_millis(20), wake.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn only_a_deadline_before_the_next_wake_up_wakes_the_loop() {
        let wake = TimerWake::default();
        let now = Utc::now();
        wake.sleeping_until(now + chrono::Duration::seconds(1));
        // Deadlines minutes away (the usual case) leave the loop asleep.
        wake.armed(now + chrono::Duration::minutes(5));
        assert!(!woken(&wake).await);
        // One due before the wake-up wakes it, even before it waits.
        wake.armed(now + chrono::Duration::milliseconds(100));
        assert!(woken(&wake).await);
        // While it is awake (about to look at every timer) nothing is needed.
        wake.awake();
        wake.armed(now);
        assert!(!woken(&wake).await);
    }
}
