//! The read model: every event bound to `orderflow.order-api` folded into the
//! `orders` table, once per message (inbox). Events may arrive in any order
//! (docs/design.md §11), so each one upserts the row, the status only moves forward,
//! and a terminal status is never replaced: order-completed and
//! order-cancelled write the same table conditionally, and whichever terminal
//! transition lands first wins.

use std::sync::Arc;

use orderflow_shared::bus::{HandleError, Handler, Message};
use orderflow_shared::envelope::Envelope;
use orderflow_shared::events::{Event, OrderCancelled, OrderCompleted};
use orderflow_shared::store::orders::{Terminal, finish};
use orderflow_shared::store::{Admission, Db};
use sqlx::PgExecutor;

use crate::SERVICE;
use crate::orders::{OrderView, VIEW_COLUMNS};
use crate::status::Status;
use crate::watch::Watcher;

/// The consumer of the order API's queue.
#[derive(Clone, Debug)]
pub struct ReadModelHandler {
    db: Db,
    watcher: Watcher,
}

impl ReadModelHandler {
    /// `watcher` hears of every committed change (long polls).
    pub fn new(db: Db, watcher: Watcher) -> Self {
        Self { db, watcher }
    }
}

impl Handler for ReadModelHandler {
    /// One message on its own is one statement: its inbox row and, only when
    /// it is new, its upsert (a message applied before changes nothing).
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let how = Admission::Alone {
            consumer: SERVICE,
            message: &message.envelope,
        };
        if let Some(applied) = apply(self.db.pool(), &message.event, how).await? {
            applied.announce(&self.watcher, message.event.order_id());
        } else {
            tracing::debug!(
                message_id = %message.envelope.message_id,
                order_id = %message.event.order_id(),
                kind = %message.envelope.kind,
                "read model unchanged (applied before, nothing shown, or the order had ended)"
            );
        }
        Ok(())
    }

    fn batch_size(&self) -> usize {
        BATCH_SIZE
    }

    /// The batch in one transaction, rows locked in order-id order (two
    /// concurrent batches never wait for each other in a cycle); the events
    /// of one order keep their delivery order.
    async fn handle_batch(&self, messages: &[Message]) -> Result<(), HandleError> {
        let mut sorted: Vec<&Message> = messages.iter().collect();
        sorted.sort_by(|a, b| a.event.order_id().cmp(b.event.order_id()));
        let mut unit = self.db.begin_unit_without_inbox().await?;
        let envelopes: Vec<&Envelope> = sorted.iter().map(|m| &m.envelope).collect();
        let admitted = unit.admit_all(SERVICE, &envelopes).await?;
        let mut changed: Vec<(&str, Applied)> = Vec::with_capacity(sorted.len());
        for (message, admitted) in sorted.into_iter().zip(admitted) {
            if admitted
                && let Some(applied) =
                    apply(unit.conn(), &message.event, Admission::Admitted).await?
            {
                let order_id = message.event.order_id();
                // Sorted by order: a later change of the same order replaces
                // the earlier one (its row is the one committed).
                match changed.last_mut() {
                    Some((last, earlier)) if *last == order_id => *earlier = applied,
                    _ => changed.push((order_id, applied)),
                }
            }
        }
        unit.commit().await?;
        for (order_id, applied) in changed {
            applied.announce(&self.watcher, order_id);
        }
        Ok(())
    }
}

/// Deliveries folded into one transaction at most: one commit instead of up
/// to this many under load; a single waiting delivery is not held back.
const BATCH_SIZE: usize = 32;

/// SQL: `status = <next>` if the row's status ranks below `next`, else
/// unchanged. `$2` must be `next`'s predecessors, `$3` `next` itself.
const FORWARD_STATUS: &str =
    "status = CASE WHEN orders.status = ANY($2::text[]) THEN $3 ELSE orders.status END";

/// An upsert of the order's row, returning it ([`VIEW_COLUMNS`]).
type Upsert<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, OrderView, sqlx::postgres::PgArguments>;

/// What applying an event changed, for the long polls.
#[derive(Debug)]
enum Applied {
    /// The row as the upsert returned it.
    Row(Arc<OrderView>),
    /// A terminal transition (the owner's statement, which returns no row).
    Finished(Status),
}

impl Applied {
    /// Wakes the order's long polls (after the commit).
    fn announce(self, watcher: &Watcher, order_id: &str) {
        match self {
            Self::Row(row) => watcher.changed_to(order_id, row),
            Self::Finished(status) => watcher.changed(order_id, Some(status)),
        }
    }
}

/// One event's upsert: its SQL, how many parameters it takes, and what
/// binds them (`$1`..`$N`, from the event).
type Change<'e> = (
    String,
    usize,
    Box<dyn FnOnce(Upsert<'e>) -> Upsert<'e> + Send + 'e>,
);

/// Applies `event` to its order as `how` says: the order after it, for the
/// long polls; `None` when nothing changed for a reader (a message
/// applied before, a terminal event the owner already applied and announced,
/// or an event not shown). Each event is one upsert, written as
/// `INSERT … SELECT … WHERE <only_if> ON CONFLICT …` so that alone it runs
/// only for a new message.
async fn apply<'c, 'e>(
    conn: impl PgExecutor<'c>,
    event: &'e Event,
    how: Admission<'e>,
) -> Result<Option<Applied>, sqlx::Error> {
    let only_if = how.only_if();
    let (change, params, bind): Change<'e> = match event {
        Event::OrderCompleted(e) => {
            return Ok(order_completed(conn, e, how)
                .await?
                .then_some(Applied::Finished(Status::Completed)));
        }
        Event::OrderCancelled(e) => {
            return Ok(order_cancelled(conn, e, how)
                .await?
                .then_some(Applied::Finished(Status::Cancelled)));
        }
        Event::OrderStarted(e) => (
            order_started(only_if),
            4,
            Box::new(|q| {
                q.bind(&e.order_id)
                    .bind(&e.supplier)
                    .bind(sqlx::types::Json(&e.products))
                    .bind(&e.address)
            }),
        ),
        Event::InfoGenerated(e) => (
            info_generated(only_if),
            4,
            Box::new(|q| {
                q.bind(&e.order_id)
                    .bind(&e.supplier)
                    .bind(&e.payment_methods)
                    .bind(e.amount_cents)
            }),
        ),
        Event::PaymentAwaiting(e) => (
            payment_awaiting(only_if),
            7,
            Box::new(|q| {
                let next = Status::AwaitingPayment;
                q.bind(&e.order_id)
                    .bind(next.predecessors())
                    .bind(next.as_str())
                    .bind(&e.token)
                    .bind(e.expires_at)
                    .bind(&e.payment_methods)
                    .bind(e.amount_cents)
            }),
        ),
        Event::PaymentSelected(e) => (
            payment_selected(only_if),
            4,
            Box::new(|q| {
                let next = Status::Paying;
                q.bind(&e.order_id)
                    .bind(next.predecessors())
                    .bind(next.as_str())
                    .bind(&e.method)
            }),
        ),
        // generate-info could not price it; order-cancelled cancels it.
        Event::InfoRejected(e) => rejection(only_if, &e.order_id, &e.reason),
        Event::PaymentRejected(e) => rejection(only_if, &e.order_id, &e.reason),
        Event::SubmissionRejected(e) => rejection(only_if, &e.order_id, &e.reason),
        Event::PaymentCaptured(e) => (
            payment_captured(only_if),
            3,
            Box::new(|q| {
                q.bind(&e.order_id)
                    .bind(e.charged_cents)
                    .bind(&e.capture_id)
            }),
        ),
        Event::PaymentRefunded(e) => (
            payment_refunded(only_if),
            2,
            Box::new(|q| q.bind(&e.order_id).bind(e.refunded_cents)),
        ),
        // saga.timed-out: order-cancelled acts on it, the order shows the
        // resulting order.cancelled. The others are not bound to this
        // queue. Nothing to apply; alone, the message is still recorded as
        // applied (its inbox row, the `WITH` of a query that returns nothing).
        Event::SagaTimedOut(_) | Event::PaymentSubmitted(_) | Event::PaymentFailed(_) => {
            if matches!(how, Admission::Admitted) {
                return Ok(None);
            }
            ("SELECT ''::text WHERE FALSE".to_owned(), 0, Box::new(|q| q))
        }
    };
    let sql = how.statement(&change, params);
    let row = how
        .bind(bind(sqlx::query_as(sqlx::AssertSqlSafe(sql))))
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|row| Applied::Row(Arc::new(row))))
}

/// The order's content. The first one known stays: an order's lines do not
/// change, and the API's own row was written from the same request.
/// `$1` order id, `$2` supplier, `$3` products, `$4` address.
fn order_started(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, supplier, products, address) \
         SELECT $1, $2, $3, $4 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET \
           supplier = COALESCE(orders.supplier, EXCLUDED.supplier), \
           products = COALESCE(orders.products, EXCLUDED.products), \
           address = COALESCE(orders.address, EXCLUDED.address), \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// The order's price. An order is priced once: the first price known stays
/// (generate-info never prices an order twice; a stray second price would
/// not change what the customer sees, nor what the coordinator accepts).
/// `$1` order id, `$2` supplier, `$3` methods, `$4` amount.
fn info_generated(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, supplier, payment_methods, amount_cents) \
         SELECT $1, $2, $3, $4 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET \
           supplier = COALESCE(orders.supplier, EXCLUDED.supplier), \
           payment_methods = COALESCE(orders.payment_methods, EXCLUDED.payment_methods), \
           amount_cents = COALESCE(orders.amount_cents, EXCLUDED.amount_cents), \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// The payment step is open. Its first token stays: the coordinator accepts
/// only the token of the first payment step it saw, so a later one would only
/// mislead the customer. `$1` order id, `$2`/`$3` [`FORWARD_STATUS`], `$4`
/// token, `$5` expiry, `$6` methods, `$7` amount.
fn payment_awaiting(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, status, payment_token, token_expires_at, payment_methods, \
           amount_cents) SELECT $1, $3, $4, $5, $6, $7 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET {FORWARD_STATUS}, \
           payment_token = COALESCE(orders.payment_token, EXCLUDED.payment_token), \
           token_expires_at = COALESCE(orders.token_expires_at, EXCLUDED.token_expires_at), \
           payment_methods = COALESCE(orders.payment_methods, EXCLUDED.payment_methods), \
           amount_cents = COALESCE(orders.amount_cents, EXCLUDED.amount_cents), \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// The customer's method was accepted. On a finished order (a late message)
/// the method is only filled in if missing. `$1` order id, `$2`/`$3`
/// [`FORWARD_STATUS`], `$4` method.
fn payment_selected(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, status, method) SELECT $1, $3, $4 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET {FORWARD_STATUS}, \
           method = CASE WHEN orders.status IN ('completed', 'cancelled') \
             THEN COALESCE(orders.method, EXCLUDED.method) ELSE EXCLUDED.method END, \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// The last reason a step was refused: `$1` order id, `$2` reason.
fn rejection<'e>(only_if: &str, order_id: &'e str, reason: &'e str) -> Change<'e> {
    let change = format!(
        "INSERT INTO orders (order_id, last_rejection) SELECT $1, $2 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET last_rejection = EXCLUDED.last_rejection, \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    );
    (change, 2, Box::new(move |q| q.bind(order_id).bind(reason)))
}

/// `$1` order id, `$2` charged cents, `$3` capture id.
fn payment_captured(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, charged_cents, capture_id) SELECT $1, $2, $3 \
         WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET charged_cents = EXCLUDED.charged_cents, \
           capture_id = EXCLUDED.capture_id, updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// `$1` order id, `$2` refunded cents.
fn payment_refunded(only_if: &str) -> String {
    format!(
        "INSERT INTO orders (order_id, refunded_cents) SELECT $1, $2 WHERE {only_if} \
         ON CONFLICT (order_id) DO UPDATE SET refunded_cents = EXCLUDED.refunded_cents, \
           updated_at = now() RETURNING {VIEW_COLUMNS}"
    )
}

/// Terminal: the same conditional transition the owner (order-completed)
/// makes; a no-op when it made it already or the order was cancelled first.
async fn order_completed<'c>(
    conn: impl PgExecutor<'c>,
    e: &OrderCompleted,
    how: Admission<'_>,
) -> Result<bool, sqlx::Error> {
    let outcome = Terminal::Completed {
        method: e.method.clone(),
        charged_cents: e.charged_cents,
        capture_id: None,
    };
    finish(conn, &e.order_id, &outcome, how).await
}

/// Terminal: the same conditional transition the owner (order-cancelled)
/// makes; a no-op when it made it already or the order was completed first.
async fn order_cancelled<'c>(
    conn: impl PgExecutor<'c>,
    e: &OrderCancelled,
    how: Admission<'_>,
) -> Result<bool, sqlx::Error> {
    let outcome = Terminal::Cancelled {
        reason: e.reason.clone(),
    };
    finish(conn, &e.order_id, &outcome, how).await
}
