//! The simulated payment gateway: the one part of orderflow that stands in for
//! the outside world. It fails transiently at a configured rate, answers after
//! a latency (the charge is made, then the answer travels back: a provider
//! that dies meanwhile has charged without knowing it), and keeps its own
//! ledger (table `gateway_ledger`) keyed by idempotency key, like a real
//! gateway: the same key charges once, reusing a key for another amount is
//! refused, and a key can be closed ("voided") before it is charged, after
//! which a charge with it is declined, as real gateways close an unpaid trade.

use std::time::Duration;

use orderflow_shared::store::Db;

/// What the gateway answers a charge or refund with: the callback a real
/// gateway would send, which the provider verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub reference: String,
    pub amount_cents: i64,
}

/// What closing a charge's idempotency key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Voided {
    /// Nothing was charged with the key; from now on nothing will be.
    NothingCharged,
    /// The key had been charged: this is the charge (refund it).
    Charged(Receipt),
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway answered that it cannot serve now: try again later; after
    /// a few tries the provider gives up on the payment (it closes the key).
    #[error("gateway unavailable: {0}")]
    Unavailable(String),
    /// No answer at all (the call may or may not have happened): never a
    /// reason to give up a payment, only to try the same key again later.
    /// The simulated gateway answers this when its own ledger, which lives
    /// in orderflow's PostgreSQL, cannot be reached (a database restart).
    #[error("no answer from the gateway: {0}")]
    Unreachable(String),
    /// Will not succeed (a key reused with another amount, a closed key).
    #[error("gateway declined: {0}")]
    Declined(String),
}

impl GatewayError {
    /// Worth calling again with the same key: it did not answer, or said to.
    pub fn worth_retrying(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Unreachable(_))
    }

    /// As a handler's error: a decline is permanent, the rest may heal.
    pub fn into_handle_error(self) -> orderflow_shared::bus::HandleError {
        if self.worth_retrying() {
            orderflow_shared::bus::HandleError::transient(self)
        } else {
            orderflow_shared::bus::HandleError::permanent(self)
        }
    }
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

    fn outage(&self) -> Result<(), GatewayError> {
        if self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate {
            return Err(GatewayError::Unavailable(
                "simulated outage (ORDERFLOW_GATEWAY_FAILURE_RATE)".to_owned(),
            ));
        }
        Ok(())
    }

    /// Writes `(key, kind, amount)` unless the key exists, and returns the
    /// key's entry as the ledger holds it: (kind, amount, reference).
    async fn record(
        &self,
        kind: &str,
        provider: &str,
        reference_prefix: &str,
        idempotency_key: &str,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<(String, i64, String), GatewayError> {
        let reference = format!("{reference_prefix}-{}", uuid::Uuid::now_v7().simple());
        // One statement: a concurrent call with the same key either inserts
        // or finds the winner's row.
        sqlx::query_as(
            "INSERT INTO gateway_ledger (idempotency_key, provider, order_id, kind, amount_cents, reference) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key \
             RETURNING kind, amount_cents, reference",
        )
        .bind(idempotency_key)
        .bind(provider)
        .bind(order_id)
        .bind(kind)
        .bind(amount_cents)
        .bind(&reference)
        .fetch_one(self.db.pool())
        .await
        .map_err(|e| GatewayError::Unreachable(format!("its ledger did not answer: {e}")))
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
        self.outage()?;
        if amount_cents <= 0 {
            return Err(GatewayError::Declined(format!(
                "amount {amount_cents} is not positive"
            )));
        }
        let (kind, amount, reference) = self
            .record(
                operation.as_str(),
                provider,
                reference_prefix,
                idempotency_key,
                order_id,
                amount_cents,
            )
            .await?;
        answer_after(self.latency).await;
        if kind == "void" {
            return Err(GatewayError::Declined(format!(
                "idempotency key {idempotency_key} was closed before it was charged"
            )));
        }
        if kind != operation.as_str() || amount != amount_cents {
            return Err(GatewayError::Declined(format!(
                "idempotency key {idempotency_key} was used for a {kind} of {amount} cents, \
                 not a {} of {amount_cents}",
                operation.as_str()
            )));
        }
        Ok(Receipt {
            reference,
            amount_cents: amount,
        })
    }

    /// Closes the charge key `idempotency_key`: what it had charged, or the
    /// promise that it never will.
    pub async fn void(
        &self,
        provider: &str,
        idempotency_key: &str,
        order_id: &str,
    ) -> Result<Voided, GatewayError> {
        self.outage()?;
        let (kind, amount, reference) = self
            .record("void", provider, "VOID", idempotency_key, order_id, 0)
            .await?;
        answer_after(self.latency).await;
        Ok(if kind == "charge" {
            Voided::Charged(Receipt {
                reference,
                amount_cents: amount,
            })
        } else {
            Voided::NothingCharged
        })
    }
}

/// Waits `latency`, the simulated gateway's time to answer; not at all when
/// it is zero. tokio's timer rounds every deadline up to its next
/// millisecond tick, so even `sleep(Duration::ZERO)` waited ≈ 1.1 ms: with
/// the bench's gateway at 0 ms, a millisecond on every order's path for a
/// latency nobody asked for.
async fn answer_after(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime without timers panics at any sleep: a gateway without
    /// latency answers without one.
    #[test]
    fn no_latency_takes_no_timer() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(answer_after(Duration::ZERO));
    }
}
