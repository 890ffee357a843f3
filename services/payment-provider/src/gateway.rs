//! The simulated payment gateway: the one part of orderflow that stands in for
//! the outside world. It has a latency, fails transiently at a configured
//! rate, and keeps its own ledger (table `gateway_ledger`) keyed by
//! idempotency key, like a real gateway: the same key charges once, and
//! reusing a key for another amount is refused.

use std::time::Duration;

use orderflow_shared::store::Db;

/// What the gateway answers a charge or refund with: the callback a real
/// gateway would send, which the provider verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub reference: String,
    pub amount_cents: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Try again later.
    #[error("gateway unavailable: {0}")]
    Unavailable(String),
    /// Will not succeed (a key reused with another amount).
    #[error("gateway declined: {0}")]
    Declined(String),
}

/// The kind of ledger entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Charge,
    Refund,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Refund => "refund",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimulatedGateway {
    db: Db,
    latency: Duration,
    failure_rate: f64,
}

impl SimulatedGateway {
    pub fn new(db: Db, latency: Duration, failure_rate: f64) -> Self {
        Self {
            db,
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
        }
    }

    /// Charges or refunds `amount_cents` once per `idempotency_key`.
    pub async fn execute(
        &self,
        operation: Operation,
        provider: &str,
        reference_prefix: &str,
        idempotency_key: &str,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<Receipt, GatewayError> {
        tokio::time::sleep(self.latency).await;
        if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            return Err(GatewayError::Unavailable(
                "simulated outage (ORDERFLOW_GATEWAY_FAILURE_RATE)".to_owned(),
            ));
        }
        let reference = format!("{reference_prefix}-{}", uuid::Uuid::now_v7().simple());
        let unavailable = |e: sqlx::Error| GatewayError::Unavailable(e.to_string());
        sqlx::query(
            "INSERT INTO gateway_ledger (idempotency_key, provider, order_id, kind, amount_cents, reference) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(idempotency_key)
        .bind(provider)
        .bind(order_id)
        .bind(operation.as_str())
        .bind(amount_cents)
        .bind(&reference)
        .execute(self.db.pool())
        .await
        .map_err(unavailable)?;
        let (amount, reference): (i64, String) = sqlx::query_as(
            "SELECT amount_cents, reference FROM gateway_ledger WHERE idempotency_key = $1",
        )
        .bind(idempotency_key)
        .fetch_one(self.db.pool())
        .await
        .map_err(unavailable)?;
        if amount != amount_cents {
            return Err(GatewayError::Declined(format!(
                "idempotency key {idempotency_key} was used for {amount} cents, not {amount_cents}"
            )));
        }
        Ok(Receipt {
            reference,
            amount_cents: amount,
        })
    }
}
