//! The one rule of the orders context that several services share: the
//! terminal transition. The orders table owns the terminal state; it changes
//! by one conditional upsert, and the first terminal transition wins.

use sqlx::PgConnection;

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
/// which is a no-op when the owner already made the transition.
pub async fn finish(
    conn: &mut PgConnection,
    order_id: &str,
    outcome: &Terminal,
) -> Result<bool, sqlx::Error> {
    let won =
        match outcome {
            Terminal::Completed {
                method,
                charged_cents,
                capture_id,
            } => {
                sqlx::query(
                    "INSERT INTO orders (order_id, status, method, charged_cents, capture_id) \
                 VALUES ($1, 'completed', $2, $3, $4) \
                 ON CONFLICT (order_id) DO UPDATE SET status = 'completed', \
                   method = EXCLUDED.method, charged_cents = EXCLUDED.charged_cents, \
                   capture_id = COALESCE(EXCLUDED.capture_id, orders.capture_id), updated_at = now() \
                 WHERE orders.status NOT IN ('completed', 'cancelled')",
                )
                .bind(order_id)
                .bind(method)
                .bind(charged_cents)
                .bind(capture_id)
                .execute(&mut *conn)
                .await?
            }
            Terminal::Cancelled { reason } => sqlx::query(
                "INSERT INTO orders (order_id, status, cancel_reason) VALUES ($1, 'cancelled', $2) \
                 ON CONFLICT (order_id) DO UPDATE SET status = 'cancelled', \
                   cancel_reason = EXCLUDED.cancel_reason, updated_at = now() \
                 WHERE orders.status NOT IN ('completed', 'cancelled')",
            )
            .bind(order_id)
            .bind(reason)
            .execute(&mut *conn)
            .await?,
        };
    Ok(won.rows_affected() == 1)
}
