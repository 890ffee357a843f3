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
}

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

/// Creates `order` unless its id exists; in one transaction with its
/// `order.started` outbox row.
pub async fn create(db: &Db, order: &ValidOrder) -> Result<Creation, sqlx::Error> {
    let OrderStarted {
        order_id,
        supplier,
        products,
        address,
    } = &order.started;
    let mut unit = db.begin_unit_without_inbox().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (order_id, request_hash, supplier, products, address) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&order.request_hash)
    .bind(supplier)
    .bind(sqlx::types::Json(products))
    .bind(address)
    .execute(unit.conn())
    .await?
    .rows_affected()
        == 1;
    if inserted {
        unit.emit(Outgoing::event(
            &Event::OrderStarted(order.started.clone()),
            None,
        ));
        unit.commit().await?;
        return Ok(Creation::Created);
    }
    // The conflicting row is committed (an INSERT waits for a concurrent one),
    // so this statement sees it. Nothing was written: the unit rolls back.
    let existing: Option<(Option<String>, String)> =
        sqlx::query_as("SELECT request_hash, status FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(unit.conn())
            .await?;
    Ok(match existing {
        Some((Some(hash), status)) if hash == order.request_hash => Creation::Repeated { status },
        _ => Creation::Conflict,
    })
}

/// The order `order_id`, as the API shows it.
pub async fn fetch(db: &Db, order_id: &str) -> Result<Option<OrderView>, sqlx::Error> {
    let view: Option<OrderView> = sqlx::query_as(
        "SELECT order_id, status, supplier, products, address, payment_methods, amount_cents, \
         payment_token, token_expires_at, method, charged_cents, capture_id, refunded_cents, \
         cancel_reason, last_rejection, created_at, updated_at \
         FROM orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(db.pool())
    .await?;
    Ok(view.map(|mut view| {
        if view.status() != Some(Status::AwaitingPayment) {
            view.payment_token = None;
        }
        view
    }))
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

/// Emits `payment.submitted` for an existing, unfinished order. The row is
/// share-locked so that the order cannot end between the check and the commit.
pub async fn submit_payment(
    db: &Db,
    submission: PaymentSubmitted,
) -> Result<Submission, sqlx::Error> {
    let mut unit = db.begin_unit_without_inbox().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1 FOR SHARE")
            .bind(&submission.order_id)
            .fetch_optional(unit.conn())
            .await?;
    let Some(status) = status else {
        return Ok(Submission::NotFound);
    };
    if let Ok(status) = status.parse::<Status>()
        && status.is_terminal()
    {
        return Ok(Submission::Finished(status));
    }
    unit.emit(Outgoing::event(&Event::PaymentSubmitted(submission), None));
    unit.commit().await?;
    Ok(Submission::Submitted)
}
