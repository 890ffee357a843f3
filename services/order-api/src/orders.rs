//! The API's side of the `orders` table: creating an order (idempotently,
//! with its `order.started` in the same transaction), reading one for
//! `GET /orders/{id}`, and recording a payment submission through the outbox.

use chrono::{DateTime, Utc};
use orderflow_shared::bus::Outgoing;
use orderflow_shared::events::{Event, OrderStarted, PaymentSubmitted};
use orderflow_shared::store::Db;
use serde::Serialize;

use crate::input::ValidOrder;
use crate::status::Status;

/// An order as `GET /orders/{id}` shows it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct OrderView {
    pub order_id: String,
    pub status: String,
    pub supplier: Option<String>,
    pub products: Option<serde_json::Value>,
    pub address: Option<String>,
    pub payment_methods: Option<Vec<String>>,
    pub amount_cents: Option<i64>,
    /// Only while the order awaits payment; `null` otherwise.
    pub payment_token: Option<String>,
    pub token_expires_at: Option<DateTime<Utc>>,
    pub method: Option<String>,
    pub charged_cents: Option<i64>,
    pub capture_id: Option<String>,
    pub refunded_cents: Option<i64>,
    pub cancel_reason: Option<String>,
    pub last_rejection: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl OrderView {
    /// The status, if the column holds one we know (the table's CHECK makes sure).
    pub fn status(&self) -> Option<Status> {
        self.status.parse().ok()
    }

    /// As a client sees it: the payment token only while the order awaits
    /// payment.
    #[must_use]
    pub fn shown(mut self) -> Self {
        if self.status() != Some(Status::AwaitingPayment) {
            self.payment_token = None;
        }
        self
    }
}

/// The columns of [`OrderView`]: what [`fetch`] reads, and what the read
/// model's upserts return (their row wakes long polls without a read).
pub const VIEW_COLUMNS: &str = "order_id, status, supplier, products, address, payment_methods, \
     amount_cents, payment_token, token_expires_at, method, charged_cents, capture_id, \
     refunded_cents, cancel_reason, last_rejection, created_at, updated_at";

/// What `POST /orders` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Creation {
    /// A new order; its `order.started` is in the outbox.
    Created,
    /// The same request again: the order as it is now.
    Repeated { status: String },
    /// The id is taken by another request (or by an order that arrived as an
    /// event and has no request hash).
    Conflict,
}

/// Creates `order` unless its id exists, with its `order.started` outbox
/// row, in one statement.
pub async fn create(db: &Db, order: &ValidOrder) -> Result<Creation, sqlx::Error> {
    let OrderStarted {
        order_id,
        supplier,
        products,
        address,
    } = &order.started;
    let started = Outgoing::event(&Event::OrderStarted(order.started.clone()), None);
    let created = db
        .change_and_emit(
            "INSERT INTO orders (order_id, request_hash, supplier, products, address) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            5,
            |query| {
                query
                    .bind(order_id)
                    .bind(&order.request_hash)
                    .bind(supplier)
                    .bind(sqlx::types::Json(products))
                    .bind(address)
            },
            vec![started],
        )
        .await?;
    if created {
        return Ok(Creation::Created);
    }
    // The conflicting row is committed (an INSERT waits for a concurrent
    // one), so this statement, with a snapshot of its own, sees it.
    let existing: Option<(Option<String>, String)> =
        sqlx::query_as("SELECT request_hash, status FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(db.pool())
            .await?;
    Ok(match existing {
        Some((Some(hash), status)) if hash == order.request_hash => Creation::Repeated { status },
        _ => Creation::Conflict,
    })
}

/// The order `order_id`, as the API shows it.
pub async fn fetch(db: &Db, order_id: &str) -> Result<Option<OrderView>, sqlx::Error> {
    let view: Option<OrderView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {VIEW_COLUMNS} FROM orders WHERE order_id = $1"
    )))
    .bind(order_id)
    .fetch_optional(db.pool())
    .await?;
    Ok(view.map(OrderView::shown))
}

/// What `POST /orders/{id}/payment` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Submission {
    /// `payment.submitted` is in the outbox.
    Submitted,
    NotFound,
    /// The order is completed or cancelled.
    Finished(Status),
}

/// Emits `payment.submitted` for an existing, unfinished order, in one
/// statement that share-locks the row, so the order cannot end between the
/// check and the commit.
pub async fn submit_payment(
    db: &Db,
    submission: PaymentSubmitted,
) -> Result<Submission, sqlx::Error> {
    let order_id = submission.order_id.clone();
    let event = Event::PaymentSubmitted(submission);
    // A second try only when the order appeared between the two statements.
    for _ in 0..2 {
        let emitted = db
            .change_and_emit(
                "SELECT order_id FROM orders WHERE order_id = $1 \
                 AND status NOT IN ('completed', 'cancelled') FOR SHARE",
                1,
                |query| query.bind(&order_id),
                vec![Outgoing::event(&event, None)],
            )
            .await?;
        if emitted {
            return Ok(Submission::Submitted);
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
                .bind(&order_id)
                .fetch_optional(db.pool())
                .await?;
        match status.map(|s| s.parse::<Status>()) {
            None => return Ok(Submission::NotFound),
            Some(Ok(status)) if status.is_terminal() => return Ok(Submission::Finished(status)),
            // The table's CHECK allows no other status; say so rather than guess.
            Some(Err(error)) => return Err(sqlx::Error::Decode(Box::new(error))),
            Some(Ok(_)) => {}
        }
    }
    Ok(Submission::NotFound)
}
