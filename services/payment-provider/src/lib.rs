//! payment-provider: one worker per payment method (`--provider <method>`).
//! On `payment.selected.<method>` it captures the payment, at most once per
//! order and only for the amount it expects (the server-side amount with the
//! method's discount), and publishes `payment.captured` or, when the gateway
//! gives up, `payment.failed`. On `order.cancelled` it refunds what it had
//! captured (`payment.refunded`), exactly once; an order cancelled before its
//! payment is never charged.
//!
//! The per-order state machine lives in `captures` (schema `payments`):
//! `pending → captured → refunded`, `pending → failed`, or `cancelled` when the
//! cancellation came first. Each transition holds the row lock, so a capture
//! and a cancellation of the same order never interleave.

pub mod gateway;
pub mod providers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing};
use orderflow_shared::envelope::Envelope;
use orderflow_shared::events::{
    Event, PaymentCaptured, PaymentFailed, PaymentRefunded, PaymentSelected,
};
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::{Context, Db, UnitOfWork};

use crate::gateway::{GatewayError, Receipt, SimulatedGateway};
use crate::providers::PaymentProvider;

/// The service (and queue) name of the provider for `method`.
pub fn service_name(method: &str) -> String {
    format!("payment-provider-{method}")
}

pub struct ProviderWorker {
    method: String,
    service: String,
    provider: Box<dyn PaymentProvider>,
    metadata: Arc<Metadata>,
    db: Db,
    retries: usize,
}

impl ProviderWorker {
    /// The worker for `method`: it must be configured (discount) and registered.
    /// `gateway_db` is the simulated gateway's own pool: a handler holds a
    /// connection of `db` (its unit of work) while it calls the gateway, so
    /// the gateway must not wait for one of the same pool (all of them could
    /// be held by handlers waiting for the gateway).
    pub fn new(ctx: &Ctx, method: &str, db: Db, gateway_db: Db) -> anyhow::Result<Self> {
        ctx.metadata.provider(method).with_context(|| {
            format!(
                "payment method `{method}` is not in config/providers.toml (configured: {})",
                ctx.metadata.methods().join(", ")
            )
        })?;
        let gateway = SimulatedGateway::new(
            gateway_db,
            Duration::from_millis(ctx.settings.gateway_latency_ms),
            ctx.settings.gateway_failure_rate,
        );
        let provider = providers::lookup(method, gateway).with_context(|| {
            format!(
                "no PaymentProvider implementation is registered for `{method}` (registered: {})",
                providers::registered().join(", ")
            )
        })?;
        Ok(Self {
            method: method.to_owned(),
            service: service_name(method),
            provider,
            metadata: ctx.metadata.clone(),
            db,
            retries: ctx.settings.gateway_retries,
        })
    }

    /// Calls the gateway, retrying while it is unavailable (backoff from
    /// 50 ms, `ORDERFLOW_GATEWAY_RETRIES` times), as a provider integration
    /// retries a flaky gateway before giving up.
    async fn at_gateway<F, Fut>(&self, order_id: &str, call: F) -> Result<Receipt, GatewayError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Receipt, GatewayError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(self.retries)
            .with_jitter();
        call.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, GatewayError::Unavailable(_)))
            .notify(|error, delay| {
                tracing::warn!(%order_id, %error, ?delay, "gateway call failed, retrying");
            })
            .await
    }

    /// The state of `order_id`'s capture, locked for this transaction.
    async fn lock_capture(
        unit: &mut UnitOfWork,
        order_id: &str,
    ) -> Result<(String, String, Option<i64>), sqlx::Error> {
        sqlx::query_as(
            "SELECT provider, status, charged_cents FROM captures WHERE order_id = $1 FOR UPDATE",
        )
        .bind(order_id)
        .fetch_one(unit.conn())
        .await
    }

    async fn capture(
        &self,
        unit: &mut UnitOfWork,
        selected: &PaymentSelected,
        cause: &Envelope,
    ) -> Result<(), HandleError> {
        let order_id = selected.order_id.as_str();
        let expected = self
            .metadata
            .charge_for(&self.method, selected.amount_cents)
            .ok_or_else(|| {
                HandleError::permanent(anyhow::anyhow!(
                    "`{}` has no discount configured",
                    self.method
                ))
            })?;
        sqlx::query(
            "INSERT INTO captures (order_id, provider, amount_cents, status) VALUES ($1, $2, $3, 'pending') \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(&self.method)
        .bind(selected.amount_cents)
        .execute(unit.conn())
        .await?;
        let (provider, status, _) = Self::lock_capture(unit, order_id).await?;
        if status != "pending" || provider != self.method {
            tracing::warn!(
                %order_id,
                %provider,
                %status,
                "payment already handled for this order; not charging again"
            );
            return Ok(());
        }
        let key = format!("charge:{order_id}");
        let result = self
            .at_gateway(order_id, || self.provider.charge(&key, order_id, expected))
            .await;
        let failure = match result {
            Ok(receipt) if receipt.amount_cents == expected => {
                sqlx::query(
                    "UPDATE captures SET status = 'captured', charged_cents = $2, capture_id = $3, \
                     updated_at = now() WHERE order_id = $1",
                )
                .bind(order_id)
                .bind(receipt.amount_cents)
                .bind(&receipt.reference)
                .execute(unit.conn())
                .await?;
                unit.emit(Outgoing::event(
                    &Event::PaymentCaptured(PaymentCaptured {
                        order_id: order_id.to_owned(),
                        provider: self.method.clone(),
                        charged_cents: receipt.amount_cents,
                        capture_id: receipt.reference.clone(),
                    }),
                    Some(cause),
                ));
                tracing::info!(%order_id, provider = %self.method, charged_cents = receipt.amount_cents, capture_id = %receipt.reference, "payment captured");
                return Ok(());
            }
            Ok(receipt) => format!(
                "gateway confirmed {} cents, expected {expected}; not accepted",
                receipt.amount_cents
            ),
            Err(error) => error.to_string(),
        };
        sqlx::query(
            "UPDATE captures SET status = 'failed', updated_at = now() WHERE order_id = $1",
        )
        .bind(order_id)
        .execute(unit.conn())
        .await?;
        unit.emit(Outgoing::event(
            &Event::PaymentFailed(PaymentFailed {
                order_id: order_id.to_owned(),
                provider: self.method.clone(),
                reason: failure.clone(),
            }),
            Some(cause),
        ));
        tracing::warn!(%order_id, provider = %self.method, reason = %failure, "payment failed; the order will be cancelled");
        Ok(())
    }

    async fn compensate(
        &self,
        unit: &mut UnitOfWork,
        order_id: &str,
        cause: &Envelope,
    ) -> Result<(), HandleError> {
        // A cancellation before any payment leaves a marker, so a late
        // payment.selected is never charged.
        let marked = sqlx::query(
            "INSERT INTO captures (order_id, provider, amount_cents, status) VALUES ($1, $2, 0, 'cancelled') \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(order_id)
        .bind(&self.method)
        .execute(unit.conn())
        .await?
        .rows_affected()
            == 1;
        if marked {
            return Ok(());
        }
        let (provider, status, charged) = Self::lock_capture(unit, order_id).await?;
        if provider != self.method || status != "captured" {
            return Ok(());
        }
        let charged = charged.unwrap_or_default();
        let key = format!("refund:{order_id}");
        let receipt = self
            .at_gateway(order_id, || self.provider.refund(&key, order_id, charged))
            .await
            .map_err(|error| match error {
                GatewayError::Unavailable(_) => HandleError::transient(error),
                GatewayError::Declined(_) => HandleError::permanent(error),
            })?;
        sqlx::query(
            "UPDATE captures SET status = 'refunded', refunded_cents = $2, updated_at = now() WHERE order_id = $1",
        )
        .bind(order_id)
        .bind(receipt.amount_cents)
        .execute(unit.conn())
        .await?;
        unit.emit(Outgoing::event(
            &Event::PaymentRefunded(PaymentRefunded {
                order_id: order_id.to_owned(),
                provider: self.method.clone(),
                refunded_cents: receipt.amount_cents,
            }),
            Some(cause),
        ));
        tracing::info!(%order_id, provider = %self.method, refunded_cents = receipt.amount_cents, "payment refunded (order cancelled)");
        Ok(())
    }
}

impl Handler for ProviderWorker {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Some(mut unit) = self.db.begin_unit(&self.service, &message.envelope).await? else {
            return Ok(());
        };
        match &message.event {
            Event::PaymentSelected(selected) if selected.method == self.method => {
                self.capture(&mut unit, selected, &message.envelope).await?;
            }
            Event::OrderCancelled(cancelled) => {
                self.compensate(&mut unit, &cancelled.order_id, &message.envelope)
                    .await?;
            }
            _ => {}
        }
        unit.commit().await?;
        Ok(())
    }
}

/// Connections of the simulated gateway's ledger (one statement per call).
const GATEWAY_CONNECTIONS: u32 = 4;

/// Runs the provider for `method` until `shutdown`.
pub async fn run(ctx: Ctx, method: String, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Payments).await?;
    let gateway_db = Db::open(
        &ctx.settings.database_url,
        Context::Payments.schema(),
        GATEWAY_CONNECTIONS,
    )
    .await
    .context("connecting the simulated gateway to its ledger")?;
    let worker = Arc::new(ProviderWorker::new(&ctx, &method, db.clone(), gateway_db)?);
    let service = worker.service.clone();
    run_worker(&ctx, &service, worker, Some(db), shutdown).await
}
