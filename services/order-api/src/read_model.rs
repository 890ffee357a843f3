//! The read model: every event bound to `orderflow.order-api` folded into the
//! `orders` table, once per message (inbox). Events may arrive in any order
//! (docs/design.md §11), so each one upserts the row, the status only moves forward,
//! and a terminal status is never replaced: order-completed and
//! order-cancelled write the same table conditionally, and whichever terminal
//! transition lands first wins.

use orderflow_shared::bus::{HandleError, Handler, Message};
use orderflow_shared::envelope::Envelope;
use orderflow_shared::events::{
    Event, InfoGenerated, OrderCancelled, OrderCompleted, OrderStarted, PaymentAwaiting,
    PaymentCaptured, PaymentRefunded, PaymentSelected,
};
use orderflow_shared::store::Db;
use orderflow_shared::store::orders::{Terminal, finish};
use sqlx::PgConnection;

use crate::SERVICE;
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
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Some(mut unit) = self.db.begin_unit(SERVICE, &message.envelope).await? else {
            return Ok(()); // applied before
        };
        let changed = apply(unit.conn(), &message.event).await?;
        unit.commit().await?;
        if let Some(status) = changed {
            self.watcher.changed(message.event.order_id(), Some(status));
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
        let mut changed = Vec::with_capacity(sorted.len());
        for (message, admitted) in sorted.into_iter().zip(admitted) {
            if admitted && let Some(status) = apply(unit.conn(), &message.event).await? {
                changed.push((message.event.order_id(), status));
            }
        }
        unit.commit().await?;
        for (order_id, status) in changed {
            self.watcher.changed(order_id, Some(status));
        }
        Ok(())
    }
}

/// Deliveries folded into one transaction at most: one commit instead of up
/// to this many under load; a single waiting delivery is not held back.
const BATCH_SIZE: usize = 32;

/// SQL: `status = <next>` if the row's status ranks below `next`, else
/// unchanged. `$2` must be `next`'s predecessors, `$3` `next` itself.
macro_rules! forward_status {
    () => {
        "status = CASE WHEN orders.status = ANY($2::text[]) THEN $3 ELSE orders.status END"
    };
}

/// Applies `event` to its order: the order's status after it, for the
/// long polls; `None` when nothing changed for a reader (a terminal event the
/// owner already applied, and announced, or an event not shown).
async fn apply(conn: &mut PgConnection, event: &Event) -> Result<Option<Status>, sqlx::Error> {
    let status = match event {
        Event::OrderCompleted(e) => {
            return Ok(order_completed(conn, e).await?.then_some(Status::Completed));
        }
        Event::OrderCancelled(e) => {
            return Ok(order_cancelled(conn, e).await?.then_some(Status::Cancelled));
        }
        Event::OrderStarted(e) => order_started(conn, e).await,
        Event::InfoGenerated(e) => info_generated(conn, e).await,
        Event::PaymentAwaiting(e) => payment_awaiting(conn, e).await,
        Event::PaymentSelected(e) => payment_selected(conn, e).await,
        // generate-info could not price it; order-cancelled cancels it.
        Event::InfoRejected(e) => last_rejection(conn, &e.order_id, &e.reason).await,
        Event::PaymentRejected(e) => last_rejection(conn, &e.order_id, &e.reason).await,
        Event::SubmissionRejected(e) => last_rejection(conn, &e.order_id, &e.reason).await,
        Event::PaymentCaptured(e) => payment_captured(conn, e).await,
        Event::PaymentRefunded(e) => payment_refunded(conn, e).await,
        // saga.timed-out: order-cancelled acts on it, the order shows the
        // resulting order.cancelled. The others are not bound to this queue.
        Event::SagaTimedOut(_) | Event::PaymentSubmitted(_) | Event::PaymentFailed(_) => {
            return Ok(None);
        }
    }?;
    // The table's CHECK allows only known statuses.
    Ok(status.parse().ok())
}

/// The order's content. The first one known stays: an order's lines do not
/// change, and the API's own row was written from the same request.
async fn order_started(conn: &mut PgConnection, e: &OrderStarted) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO orders (order_id, supplier, products, address) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (order_id) DO UPDATE SET \
           supplier = COALESCE(orders.supplier, EXCLUDED.supplier), \
           products = COALESCE(orders.products, EXCLUDED.products), \
           address = COALESCE(orders.address, EXCLUDED.address), \
           updated_at = now() RETURNING status",
    )
    .bind(&e.order_id)
    .bind(&e.supplier)
    .bind(sqlx::types::Json(&e.products))
    .bind(&e.address)
    .fetch_one(conn)
    .await
}

/// The order's price. An order is priced once: the first price known stays
/// (generate-info never prices an order twice; a stray second price would
/// not change what the customer sees, nor what the coordinator accepts).
async fn info_generated(conn: &mut PgConnection, e: &InfoGenerated) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO orders (order_id, supplier, payment_methods, amount_cents) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (order_id) DO UPDATE SET \
           supplier = COALESCE(orders.supplier, EXCLUDED.supplier), \
           payment_methods = COALESCE(orders.payment_methods, EXCLUDED.payment_methods), \
           amount_cents = COALESCE(orders.amount_cents, EXCLUDED.amount_cents), \
           updated_at = now() RETURNING status",
    )
    .bind(&e.order_id)
    .bind(&e.supplier)
    .bind(&e.payment_methods)
    .bind(e.amount_cents)
    .fetch_one(conn)
    .await
}

/// The payment step is open. Its first token stays: the coordinator accepts
/// only the token of the first payment step it saw, so a later one would only
/// mislead the customer.
async fn payment_awaiting(
    conn: &mut PgConnection,
    e: &PaymentAwaiting,
) -> Result<String, sqlx::Error> {
    let next = Status::AwaitingPayment;
    sqlx::query_scalar(concat!(
        "INSERT INTO orders (order_id, status, payment_token, token_expires_at, payment_methods, \
           amount_cents) VALUES ($1, $3, $4, $5, $6, $7) \
         ON CONFLICT (order_id) DO UPDATE SET ",
        forward_status!(),
        ", payment_token = COALESCE(orders.payment_token, EXCLUDED.payment_token), \
           token_expires_at = COALESCE(orders.token_expires_at, EXCLUDED.token_expires_at), \
           payment_methods = COALESCE(orders.payment_methods, EXCLUDED.payment_methods), \
           amount_cents = COALESCE(orders.amount_cents, EXCLUDED.amount_cents), \
           updated_at = now() RETURNING status",
    ))
    .bind(&e.order_id)
    .bind(next.predecessors())
    .bind(next.as_str())
    .bind(&e.token)
    .bind(e.expires_at)
    .bind(&e.payment_methods)
    .bind(e.amount_cents)
    .fetch_one(conn)
    .await
}

/// The customer's method was accepted. On a finished order (a late message)
/// the method is only filled in if missing.
async fn payment_selected(
    conn: &mut PgConnection,
    e: &PaymentSelected,
) -> Result<String, sqlx::Error> {
    let next = Status::Paying;
    sqlx::query_scalar(concat!(
        "INSERT INTO orders (order_id, status, method) VALUES ($1, $3, $4) \
         ON CONFLICT (order_id) DO UPDATE SET ",
        forward_status!(),
        ", method = CASE WHEN orders.status IN ('completed', 'cancelled') \
             THEN COALESCE(orders.method, EXCLUDED.method) ELSE EXCLUDED.method END, \
           updated_at = now() RETURNING status",
    ))
    .bind(&e.order_id)
    .bind(next.predecessors())
    .bind(next.as_str())
    .bind(&e.method)
    .fetch_one(conn)
    .await
}

async fn last_rejection(
    conn: &mut PgConnection,
    order_id: &str,
    reason: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO orders (order_id, last_rejection) VALUES ($1, $2) \
         ON CONFLICT (order_id) DO UPDATE SET last_rejection = EXCLUDED.last_rejection, \
           updated_at = now() RETURNING status",
    )
    .bind(order_id)
    .bind(reason)
    .fetch_one(conn)
    .await
}

async fn payment_captured(
    conn: &mut PgConnection,
    e: &PaymentCaptured,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO orders (order_id, charged_cents, capture_id) VALUES ($1, $2, $3) \
         ON CONFLICT (order_id) DO UPDATE SET charged_cents = EXCLUDED.charged_cents, \
           capture_id = EXCLUDED.capture_id, updated_at = now() RETURNING status",
    )
    .bind(&e.order_id)
    .bind(e.charged_cents)
    .bind(&e.capture_id)
    .fetch_one(conn)
    .await
}

async fn payment_refunded(
    conn: &mut PgConnection,
    e: &PaymentRefunded,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO orders (order_id, refunded_cents) VALUES ($1, $2) \
         ON CONFLICT (order_id) DO UPDATE SET refunded_cents = EXCLUDED.refunded_cents, \
           updated_at = now() RETURNING status",
    )
    .bind(&e.order_id)
    .bind(e.refunded_cents)
    .fetch_one(conn)
    .await
}

/// Terminal: the same conditional transition the owner (order-completed)
/// makes; a no-op when it made it already or the order was cancelled first.
async fn order_completed(conn: &mut PgConnection, e: &OrderCompleted) -> Result<bool, sqlx::Error> {
    let outcome = Terminal::Completed {
        method: e.method.clone(),
        charged_cents: e.charged_cents,
        capture_id: None,
    };
    finish(conn, &e.order_id, &outcome).await
}

/// Terminal: the same conditional transition the owner (order-cancelled)
/// makes; a no-op when it made it already or the order was completed first.
async fn order_cancelled(conn: &mut PgConnection, e: &OrderCancelled) -> Result<bool, sqlx::Error> {
    let outcome = Terminal::Cancelled {
        reason: e.reason.clone(),
    };
    finish(conn, &e.order_id, &outcome).await
}
