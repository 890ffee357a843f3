//! What the services of the orders context share: the terminal transition
//! (the orders table owns the terminal state; it changes by one conditional
//! upsert, and the first terminal transition wins) and the announcement of a
//! committed change to an order, which wakes the order API's long polls in
//! every instance (`NOTIFY orderflow_orders`, payload: the announcer's tag,
//! `/`, the order id; see [`Announcement`]).

use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Db;
use crate::Shutdown;
use crate::bus::{HandleError, Handler, Message, Outgoing};
use crate::envelope::Envelope;
use crate::events::Event;

/// The channel on which committed changes to orders are announced.
pub const CHANGES_CHANNEL: &str = "orderflow_orders";

/// Announces committed changes to orders, many per statement: each batch is
/// one `pg_notify` statement in its own transaction, committed without
/// waiting for the WAL flush (a wake-up lost in a crash only lets a long
/// poll answer at its timeout or at the next change). Cheap to clone.
///
/// Every payload starts with the announcer's [`tag`](Self::tag), so that an
/// order API can tell its own announcements (whose waiters it has already
/// woken, with the status) from other processes' when they come back through
/// its `LISTEN`, and does not read the order again for them.
#[derive(Clone, Debug)]
pub struct Announcer {
    queue: Arc<(Mutex<Vec<String>>, Notify)>,
    tag: Arc<str>,
}

/// A notification on [`CHANGES_CHANNEL`], parsed: `<tag>/<order id>`, where
/// the tag is 16 lowercase hex digits naming the [`Announcer`] that sent it.
/// A payload without that prefix (a sender before tags, a `NOTIFY` typed by
/// hand) is an order id from an unknown sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement<'a> {
    /// The sending announcer's tag, when the payload carries one.
    pub from: Option<&'a str>,
    pub order_id: &'a str,
}

/// Length of an announcer's tag.
const TAG_LEN: usize = 16;

impl<'a> Announcement<'a> {
    pub fn parse(payload: &'a str) -> Self {
        let tagged = payload.as_bytes().get(TAG_LEN) == Some(&b'/')
            && payload.as_bytes()[..TAG_LEN]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if tagged {
            Self {
                from: Some(&payload[..TAG_LEN]),
                order_id: &payload[TAG_LEN + 1..],
            }
        } else {
            Self {
                from: None,
                order_id: payload,
            }
        }
    }
}

impl Announcer {
    /// Starts the announcing task on `pool`; it sends what is queued one last
    /// time when `shutdown` comes, then ends.
    pub fn spawn(pool: PgPool, shutdown: Shutdown) -> (Self, JoinHandle<()>) {
        let announcer = Self::unsent();
        let task = tokio::spawn(announcer.clone().run(pool, shutdown));
        (announcer, task)
    }

    /// An announcer without its task: it only queues (tests look at the queue).
    pub fn unsent() -> Self {
        Self {
            queue: Arc::new((Mutex::new(Vec::new()), Notify::new())),
            tag: format!("{:016x}", fastrand::u64(..)).into(),
        }
    }

    /// What this announcer's payloads start with (16 lowercase hex digits,
    /// random per announcer).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `order_id` changed (committed): announced with the next batch.
    pub fn changed(&self, order_id: &str) {
        self.lock().push(order_id.to_owned());
        self.queue.1.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A single push or take: consistent even if a holder panicked.
        self.queue.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is queued and not announced yet (tests).
    pub fn queued(&self) -> Vec<String> {
        self.lock().clone()
    }

    async fn run(self, pool: PgPool, shutdown: Shutdown) {
        loop {
            let stopping = tokio::select! {
                () = self.queue.1.notified() => false,
                () = shutdown.cancelled() => true,
            };
            let ids = std::mem::take(&mut *self.lock());
            if !ids.is_empty() {
                let sent = sqlx::query(
                    "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
                     SELECT pg_notify($1, $3 || '/' || id) FROM relaxed, unnest($2::text[]) AS id",
                )
                .bind(CHANGES_CHANNEL)
                .bind(&ids)
                .bind(&*self.tag)
                .execute(&pool)
                .await;
                if let Err(error) = sent {
                    tracing::warn!(%error, orders = ids.len(), "cannot announce changed orders; long polls answer at their timeout or next change");
                }
            }
            if stopping {
                break;
            }
        }
    }
}

/// A terminal outcome of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Terminal {
    Completed {
        method: String,
        charged_cents: i64,
        /// Known to order-completed (from the capture), not to readers of
        /// `order.completed`; a known one is never erased.
        capture_id: Option<String>,
    },
    Cancelled {
        reason: String,
    },
}

/// Moves the order to `outcome` unless it is already completed or cancelled
/// (creating the row if no event about the order reached the read model yet).
/// `true` when this call made the transition: only then may the caller
/// announce it. The loser publishes nothing. The order API's read model
/// mirrors `order.completed` / `order.cancelled` through this same function,
/// which is a no-op when the owner already made the transition. `how` says
/// whether the message asking for it was admitted already or is admitted by
/// this same statement (then a message applied before changes nothing).
pub async fn finish<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    order_id: &str,
    outcome: &Terminal,
    how: super::Admission<'_>,
) -> Result<bool, sqlx::Error> {
    let sql = how.statement(&finish_statement(outcome, how.only_if()), outcome.params());
    let won: Option<(String,)> = how
        .bind(outcome.bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), order_id))
        .fetch_optional(conn)
        .await?;
    Ok(won.is_some())
}

/// The upsert of [`finish`] for `outcome`, applied only where `only_if`
/// holds, returning the order id when it made the transition. Parameters:
/// `$1` the order id, then for a completion `$2` method, `$3` charged
/// cents, `$4` capture id, for a cancellation `$2` reason
/// ([`Terminal::params`] of them).
fn finish_statement(outcome: &Terminal, only_if: &str) -> String {
    match outcome {
        Terminal::Completed { .. } => format!(
            "INSERT INTO orders (order_id, status, method, charged_cents, capture_id) \
             SELECT $1, 'completed', $2, $3, $4 WHERE {only_if} \
             ON CONFLICT (order_id) DO UPDATE SET status = 'completed', \
               method = EXCLUDED.method, charged_cents = EXCLUDED.charged_cents, \
               capture_id = COALESCE(EXCLUDED.capture_id, orders.capture_id), updated_at = now() \
             WHERE orders.status NOT IN ('completed', 'cancelled') RETURNING order_id"
        ),
        Terminal::Cancelled { .. } => format!(
            "INSERT INTO orders (order_id, status, cancel_reason) \
             SELECT $1, 'cancelled', $2 WHERE {only_if} \
             ON CONFLICT (order_id) DO UPDATE SET status = 'cancelled', \
               cancel_reason = EXCLUDED.cancel_reason, updated_at = now() \
             WHERE orders.status NOT IN ('completed', 'cancelled') RETURNING order_id"
        ),
    }
}

impl Terminal {
    /// How many parameters [`finish_statement`] takes for this outcome.
    fn params(&self) -> usize {
        match self {
            Self::Completed { .. } => 4,
            Self::Cancelled { .. } => 2,
        }
    }

    /// Binds [`finish_statement`]'s parameters for `order_id` and this
    /// outcome, after what `query` already binds.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
        order_id: &'q str,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let query = query.bind(order_id);
        match self {
            Self::Completed {
                method,
                charged_cents,
                capture_id,
            } => query.bind(method).bind(charged_cents).bind(capture_id),
            Self::Cancelled { reason } => query.bind(reason),
        }
    }
}

/// A terminal transition an event asks for: the outcome, and the event
/// announcing it when the transition wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub outcome: Terminal,
    pub announce: Event,
}

/// The handler of terminal transitions (the order-completed and
/// order-cancelled workers each run one with their own `decide`): for
/// each message `decide` maps to a transition, [`finish`] it and, if it won,
/// announce it (the event, through the outbox; the long polls, through the
/// [`Announcer`]). Batches of waiting messages share one transaction (rows
/// locked in order-id order, one inbox statement).
pub struct TerminalHandler {
    service: &'static str,
    db: Db,
    announcer: Announcer,
    decide: fn(&Event) -> Option<Transition>,
}

impl std::fmt::Debug for TerminalHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalHandler")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Deliveries one unit of work of a [`TerminalHandler`] takes at most.
const TERMINAL_BATCH: usize = 32;

impl TerminalHandler {
    pub fn new(
        service: &'static str,
        db: Db,
        announcer: Announcer,
        decide: fn(&Event) -> Option<Transition>,
    ) -> Self {
        Self {
            service,
            db,
            announcer,
            decide,
        }
    }

    /// Runs the terminal worker `service` (its queue, the relay of the
    /// `orders` outbox, the announcer) with `decide` until `shutdown`.
    pub async fn run(
        ctx: crate::app::Ctx,
        service: &'static str,
        decide: fn(&Event) -> Option<Transition>,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let db = ctx.db(super::Context::Orders).await?;
        let (announcer, announcing) = Announcer::spawn(db.pool().clone(), shutdown.clone());
        let worker = Arc::new(Self::new(service, db.clone(), announcer, decide));
        crate::app::run_worker(&ctx, service, worker, Some(db), shutdown).await?;
        announcing.await?;
        Ok(())
    }

    async fn apply_all(&self, messages: &[&Message]) -> Result<(), HandleError> {
        let mut sorted: Vec<&Message> = messages.to_vec();
        sorted.sort_by(|a, b| a.order_id().cmp(b.order_id()));
        let mut unit = self.db.begin_unit_without_inbox().await?;
        let envelopes: Vec<&Envelope> = sorted.iter().map(|m| &m.envelope).collect();
        let admitted = unit.admit_all(self.service, &envelopes).await?;
        let mut won = Vec::new();
        for (message, admitted) in sorted.into_iter().zip(admitted) {
            let Some(transition) = admitted.then(|| (self.decide)(&message.event)).flatten() else {
                continue;
            };
            let order_id = message.order_id();
            if finish(
                unit.conn(),
                order_id,
                &transition.outcome,
                super::Admission::Admitted,
            )
            .await?
            {
                tracing::info!(service = self.service, %order_id, outcome = ?transition.outcome, "order ended");
                unit.emit(Outgoing::event(
                    &transition.announce,
                    Some(&message.envelope),
                ));
                won.push(order_id);
            } else {
                tracing::info!(service = self.service, %order_id, kind = %message.envelope.kind, "order already ended; nothing to do (a capture that lost to a cancellation is refunded)");
            }
        }
        unit.commit().await?;
        for order_id in won {
            // The order shows its end now: long polls need not wait for the
            // announcing event to reach the order API.
            self.announcer.changed(order_id);
        }
        Ok(())
    }
}

impl Handler for TerminalHandler {
    /// One message on its own is one statement: its inbox row, the
    /// transition (only when the message is new) and, when it wins, the
    /// announcing event's outbox row.
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Some(transition) = (self.decide)(&message.event) else {
            return self.apply_all(&[message]).await;
        };
        let order_id = message.order_id();
        let outcome = &transition.outcome;
        let won = self
            .db
            .admit_change_and_emit(
                self.service,
                &message.envelope,
                &finish_statement(outcome, super::ADMITTED),
                outcome.params(),
                |query| outcome.bind(query, order_id),
                vec![Outgoing::event(
                    &transition.announce,
                    Some(&message.envelope),
                )],
            )
            .await?;
        if won {
            tracing::info!(service = self.service, %order_id, outcome = ?transition.outcome, "order ended");
            self.announcer.changed(order_id);
        } else {
            tracing::info!(service = self.service, %order_id, kind = %message.envelope.kind, "no transition: the order had already ended (a capture that lost to a cancellation is refunded), or this message was applied before");
        }
        Ok(())
    }

    fn batch_size(&self) -> usize {
        TERMINAL_BATCH
    }

    async fn handle_batch(&self, messages: &[Message]) -> Result<(), HandleError> {
        let messages: Vec<&Message> = messages.iter().collect();
        self.apply_all(&messages).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_names_its_sender_and_its_order() {
        let announcer = Announcer::unsent();
        let payload = format!("{}/order-1", announcer.tag());
        assert_eq!(
            Announcement::parse(&payload),
            Announcement {
                from: Some(announcer.tag()),
                order_id: "order-1"
            }
        );
        // The order id is everything after the tag, slashes included.
        let parsed = Announcement::parse("0123456789abcdef/a/b");
        assert_eq!(
            (parsed.from, parsed.order_id),
            (Some("0123456789abcdef"), "a/b")
        );
    }

    #[test]
    fn a_payload_without_a_tag_is_an_order_id_from_an_unknown_sender() {
        for payload in [
            "order-1",
            "",
            "0123456789ABCDEF/x",
            "0123456789abcdeg/x",
            "0123456789abcdef",
        ] {
            assert_eq!(
                Announcement::parse(payload),
                Announcement {
                    from: None,
                    order_id: payload
                },
                "{payload:?}"
            );
        }
    }

    #[test]
    fn every_announcer_has_its_own_tag() {
        let (a, b) = (Announcer::unsent(), Announcer::unsent());
        assert_ne!(a.tag(), b.tag());
        assert_eq!(a.clone().tag(), a.tag(), "clones announce as one");
        assert_eq!(a.tag().len(), TAG_LEN);
    }
}
