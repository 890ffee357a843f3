//! payment-provider: one worker per payment method (`--provider <method>`).
//! On `payment.selected.<method>` it captures the payment, at most once per
//! order and only for the amount it expects (the server-side amount with the
//! method's discount), and publishes `payment.captured` or, when the gateway
//! gives up, `payment.failed`. On `order.cancelled` it refunds what it had
//! captured (`payment.refunded`), exactly once; an order cancelled before its
//! payment is never charged.
//!
//! The amount charged is the one the saga coordinator recorded when it
//! accepted the payment (`coordinator.payment_steps`, read only), never the
//! one a message carries: a `payment.selected` the coordinator did not make
//! is dead-lettered, not charged.
//!
//! The per-order state machine lives in `captures` (schema `payments`):
//! `charging → captured → refunded`, `charging → failed`, `charging →
//! refunded | cancelled` when a cancellation resolves an open charge, or
//! `cancelled` when the cancellation came first. The intent (`charging`, with
//! the gateway's idempotency key) is committed before the gateway is called,
//! and the call runs outside any transaction: if the provider dies during the
//! call, the next delivery charges again with the same key (the gateway
//! charges once), and a cancellation closes the key at the gateway, which
//! tells whether it had charged (then it is refunded). Every other transition
//! holds the row lock.

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
use orderflow_shared::store::{ADMIT_ALL, ADMITTED, Context, Db, UnitOfWork, admitted_now};

use crate::gateway::{GatewayError, Receipt, SimulatedGateway, Voided};
use crate::providers::{Payment, PaymentProvider};

/// The service (and queue) name of the provider for `method`.
pub fn service_name(method: &str) -> String {
    format!("payment-provider-{method}")
}

pub struct ProviderHandler {
    method: String,
    service: String,
    provider: Box<dyn PaymentProvider>,
    metadata: Arc<Metadata>,
    db: Db,
    retries: usize,
}

impl ProviderHandler {
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

    /// Calls the gateway, retrying while it is unavailable or does not
    /// answer (backoff from 50 ms, `ORDERFLOW_GATEWAY_RETRIES` times), as a
    /// provider integration retries a flaky gateway before giving up.
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
            .when(GatewayError::worth_retrying)
            .notify(|error, delay| {
                tracing::warn!(%order_id, %error, ?delay, "gateway call failed, retrying");
            })
            .await
    }

    /// The state of `order_id`'s capture, locked for this transaction.
    async fn lock_capture(
        conn: &mut sqlx::PgConnection,
        order_id: &str,
    ) -> Result<Capture, sqlx::Error> {
        sqlx::query_as(
            "SELECT provider, status, charged_cents, charge_key FROM captures \
             WHERE order_id = $1 FOR UPDATE",
        )
        .bind(order_id)
        .fetch_one(conn)
        .await
    }

    /// What this provider may charge for `selected`, given the amount the
    /// coordinator recorded when it accepted this method for the order
    /// (`accepted`): that amount with its discount. Nothing on the bus decides
    /// it: a `payment.selected` the coordinator did not make, or with another
    /// amount, is refused.
    fn expected_charge(
        &self,
        selected: &PaymentSelected,
        accepted: Option<i64>,
    ) -> Result<i64, HandleError> {
        let order_id = &selected.order_id;
        let refuse = |why: String| {
            Err(HandleError::permanent(anyhow::anyhow!(
                "payment.selected.{} for order {order_id} not charged: {why}",
                self.method
            )))
        };
        let Some(amount) = accepted else {
            return refuse(format!(
                "the saga coordinator accepted no {} payment for this order (a forged or \
                 stale decision)",
                self.method
            ));
        };
        if amount != selected.amount_cents {
            return refuse(format!(
                "it says {} cents, the coordinator accepted {amount}",
                selected.amount_cents
            ));
        }
        match self.metadata.charge_for(&self.method, amount) {
            Some(charge) if charge > 0 => Ok(charge),
            Some(charge) => refuse(format!("{charge} cents is not an amount to charge")),
            None => refuse(format!("`{}` has no discount configured", self.method)),
        }
    }

    /// `payment.selected`, for one message or a batch: records the intents
    /// to charge (committed before the gateway is called), charges (the
    /// batch's calls concurrently, outside any transaction), then records the
    /// outcomes with the inbox rows and the events. A duplicate delivery, a
    /// second decision for an order, or an order cancelled first charges
    /// nothing; a delivery that finds an intent left by a crashed attempt
    /// charges again with the same idempotency key (the gateway charges
    /// once). A decision the coordinator did not make fails the call (and a
    /// batch falls back to one message at a time, so only that one is
    /// dead-lettered).
    async fn capture(&self, selected: &[(&Message, &PaymentSelected)]) -> Result<(), HandleError> {
        let mut selected = selected.to_vec();
        selected.sort_by(|a, b| a.1.order_id.cmp(&b.1.order_id));
        // Before the gateway call, each statement on its own (the intent
        // must be durable before anything is charged; nothing here needs
        // two statements to see each other's locks).
        let pool = self.db.pool();
        let message_ids: Vec<&str> = selected
            .iter()
            .map(|(m, _)| m.envelope.message_id.as_str())
            .collect();
        let orders: Vec<&str> = selected.iter().map(|(_, s)| s.order_id.as_str()).collect();
        // One round trip: the messages applied before, and what the
        // coordinator accepted for this method (for every order of the
        // batch; those applied before are skipped below).
        let (seen, accepted_orders, accepted_amounts): (Vec<String>, Vec<String>, Vec<i64>) =
            sqlx::query_as(
                "SELECT \
                   ARRAY(SELECT message_id FROM inbox WHERE consumer = $1 AND message_id = ANY($2)), \
                   COALESCE(array_agg(order_id), '{}'), COALESCE(array_agg(amount_cents), '{}') \
                 FROM coordinator.payment_steps WHERE order_id = ANY($3) AND accepted_method = $4",
            )
            .bind(&self.service)
            .bind(&message_ids)
            .bind(&orders)
            .bind(&self.method)
            .fetch_one(pool)
            .await?;
        let accepted: Vec<(String, i64)> =
            accepted_orders.into_iter().zip(accepted_amounts).collect();
        // Applied before, or the same message twice in this batch: once.
        let mut once = std::collections::HashSet::new();
        selected.retain(|(m, _)| {
            !seen.contains(&m.envelope.message_id) && once.insert(m.envelope.message_id.as_str())
        });
        if selected.is_empty() {
            return Ok(());
        }
        let mut charges: Vec<Charge<'_>> = Vec::with_capacity(selected.len());
        let mut copies: Vec<&Message> = Vec::new();
        for (message, decision) in selected {
            let amount = accepted
                .iter()
                .find(|(order, _)| *order == decision.order_id)
                .map(|(_, amount)| *amount);
            let expected = self.expected_charge(decision, amount)?;
            if charges.iter().any(|c| c.order_id == decision.order_id) {
                copies.push(message); // a second copy of a decision in one batch
                continue;
            }
            charges.push(Charge {
                message,
                order_id: &decision.order_id,
                amount_cents: decision.amount_cents,
                key: format!("charge:{}", decision.order_id),
                expected,
            });
        }
        let orders: Vec<&str> = charges.iter().map(|c| c.order_id).collect();
        let amounts: Vec<i64> = charges.iter().map(|c| c.amount_cents).collect();
        let keys: Vec<&str> = charges.iter().map(|c| c.key.as_str()).collect();
        // One statement: the intents, and the rows they meet, locked in
        // order-id order; an existing row comes back as it is.
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "INSERT INTO captures (order_id, provider, amount_cents, status, charge_key) \
             SELECT o, $2, a, 'charging', k FROM unnest($1::text[], $3::int8[], $4::text[]) \
               AS u(o, a, k) ORDER BY o \
             ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id \
             RETURNING order_id, provider, status",
        )
        .bind(&orders)
        .bind(&self.method)
        .bind(&amounts)
        .bind(&keys)
        .fetch_all(pool)
        .await?;
        let open = |order_id: &str| {
            rows.iter().any(|(order, provider, status)| {
                order == order_id
                    && *provider == self.method
                    && matches!(status.as_str(), "charging" | "pending")
            })
        };
        let (charges, handled): (Vec<Charge<'_>>, Vec<Charge<'_>>) =
            charges.into_iter().partition(|c| open(c.order_id));
        for charge in &handled {
            tracing::warn!(order_id = %charge.order_id, "payment already handled for this order (or cancelled first); not charging");
        }
        let done: Vec<&Envelope> = handled
            .iter()
            .map(|c| &c.message.envelope)
            .chain(copies.iter().map(|m| &m.envelope))
            .collect();
        if !done.is_empty() {
            let ids: Vec<&str> = done.iter().map(|e| e.message_id.as_str()).collect();
            sqlx::query(ADMIT_ALL)
                .bind(&self.service)
                .bind(&ids)
                .execute(pool)
                .await?;
        }
        if charges.is_empty() {
            return Ok(());
        }

        let mut outcomes = futures::future::join_all(charges.iter().map(|c| self.charge(c))).await;
        if let ([charge], [Ok(Outcome::Captured(_))]) = (charges.as_slice(), outcomes.as_slice())
            && let Some(Ok(Outcome::Captured(receipt))) = outcomes.pop()
        {
            return Ok(self.record_captured_alone(charge, &receipt).await?);
        }

        let mut unit = self.db.begin_unit_without_inbox().await?;
        let message_ids: Vec<&str> = charges
            .iter()
            .map(|c| c.message.envelope.message_id.as_str())
            .collect();
        let orders: Vec<&str> = charges.iter().map(|c| c.order_id).collect();
        // One round trip: the inbox rows (`admit_all`'s statement)
        // and the intents still open, locked in order-id order.
        let sql = format!(
            "WITH admitted AS ({ADMIT_ALL}), \
             open AS ( \
               SELECT order_id FROM captures WHERE order_id = ANY($3) \
                 AND status IN ('charging', 'pending') ORDER BY order_id FOR UPDATE) \
             SELECT ARRAY(SELECT message_id FROM admitted), ARRAY(SELECT order_id FROM open)"
        );
        let (fresh, still_open): (Vec<String>, Vec<String>) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&self.service)
                .bind(&message_ids)
                .bind(&orders)
                .fetch_one(unit.conn())
                .await?;
        let admitted = admitted_now(&message_ids, fresh);
        for ((charge, outcome), admitted) in charges.iter().zip(outcomes).zip(admitted) {
            let outcome = outcome?;
            if !admitted {
                continue;
            }
            if still_open.iter().any(|o| o == charge.order_id) {
                self.record(
                    &mut unit,
                    charge.order_id,
                    &outcome,
                    &charge.message.envelope,
                )
                .await?;
            } else {
                // The cancellation resolved the intent meanwhile (it refunded
                // what was charged, or closed the key before the charge).
                tracing::info!(order_id = %charge.order_id, "charge resolved by the cancellation meanwhile");
            }
        }
        unit.commit().await?;
        Ok(())
    }

    /// One charge at the gateway, resolved when the gateway gives up. No
    /// answer at all is a transient error: the intent stays open and the
    /// message comes back to charge again with the same key (a database
    /// restart must not fail payments).
    async fn charge(&self, charge: &Charge<'_>) -> Result<Outcome, HandleError> {
        let (order_id, key, expected) = (charge.order_id, charge.key.as_str(), charge.expected);
        match self
            .at_gateway(order_id, || {
                self.provider.charge(Payment {
                    idempotency_key: key,
                    order_id,
                    amount_cents: expected,
                })
            })
            .await
        {
            Ok(receipt) if receipt.amount_cents == expected => Ok(Outcome::Captured(receipt)),
            Ok(receipt) => {
                self.resolve_gave_up(
                    order_id,
                    key,
                    expected,
                    format!(
                        "gateway confirmed {} cents, expected {expected}; not accepted",
                        receipt.amount_cents
                    ),
                )
                .await
            }
            Err(error @ GatewayError::Unreachable(_)) => Err(HandleError::transient(
                anyhow::anyhow!("order {order_id}: charge left open, trying again: {error}"),
            )),
            Err(error) => {
                self.resolve_gave_up(order_id, key, expected, error.to_string())
                    .await
            }
        }
    }

    /// The gateway gave up (or answered something unacceptable): closes the
    /// charge key, which says whether it charged after all. When the gateway
    /// cannot even say that, the payment fails but the intent stays open:
    /// the cancellation that follows resolves it once the gateway answers.
    async fn resolve_gave_up(
        &self,
        order_id: &str,
        charge_key: &str,
        expected: i64,
        reason: String,
    ) -> Result<Outcome, HandleError> {
        let voided = match self.void_at_gateway(order_id, charge_key).await {
            Ok(voided) => voided,
            Err(error @ GatewayError::Unreachable(_)) => {
                return Err(HandleError::transient(anyhow::anyhow!(
                    "order {order_id}: the gateway gave up the charge and did not answer its \
                     void; the charge stays open, trying again: {error}"
                )));
            }
            Err(error @ GatewayError::Unavailable(_)) => {
                tracing::warn!(%order_id, %error, "the gateway cannot say whether it charged; the charge stays open for the cancellation to resolve");
                return Ok(Outcome::Failed {
                    reason,
                    refund: None,
                    resolved: false,
                });
            }
            Err(error) => return Err(error.into_handle_error()),
        };
        match voided {
            Voided::NothingCharged => Ok(Outcome::Failed {
                reason,
                refund: None,
                resolved: true,
            }),
            Voided::Charged(receipt) if receipt.amount_cents == expected => {
                Ok(Outcome::Captured(receipt))
            }
            Voided::Charged(receipt) => {
                let refund = self.refund(order_id, &receipt).await?;
                Ok(Outcome::Failed {
                    reason,
                    refund: Some((receipt, refund)),
                    resolved: true,
                })
            }
        }
    }

    /// Closes `charge_key` at the gateway (retrying while it is away; still
    /// away afterwards is a transient error: the intent stays open and is
    /// resolved by a later attempt or by the cancellation).
    async fn void(&self, order_id: &str, charge_key: &str) -> Result<Voided, HandleError> {
        self.void_at_gateway(order_id, charge_key)
            .await
            .map_err(GatewayError::into_handle_error)
    }

    /// [`void`](Self::void) with the gateway's own error.
    async fn void_at_gateway(
        &self,
        order_id: &str,
        charge_key: &str,
    ) -> Result<Voided, GatewayError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(self.retries)
            .with_jitter();
        (|| self.provider.void(charge_key, order_id))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(GatewayError::worth_retrying)
            .notify(|error, delay| {
                tracing::warn!(%order_id, %error, ?delay, "gateway void failed, retrying");
            })
            .await
    }

    /// Refunds `charge` (once per order: the key is `refund:<order>`).
    async fn refund(&self, order_id: &str, charge: &Receipt) -> Result<Receipt, HandleError> {
        let key = format!("refund:{order_id}");
        self.at_gateway(order_id, || {
            self.provider.refund(Payment {
                idempotency_key: &key,
                order_id,
                amount_cents: charge.amount_cents,
            })
        })
        .await
        .map_err(GatewayError::into_handle_error)
    }

    /// The common end of one charge on its own, in **one statement**: the
    /// message's inbox row, the capture recorded on the intent if it is
    /// still open (the row locked; a cancellation that resolved it
    /// meanwhile wins) and, only then, `payment.captured` in the outbox.
    async fn record_captured_alone(
        &self,
        charge: &Charge<'_>,
        receipt: &Receipt,
    ) -> Result<(), sqlx::Error> {
        let order_id = charge.order_id;
        let cause = &charge.message.envelope;
        let captured = self.captured(order_id, receipt, cause);
        let recorded = self
            .db
            .admit_change_and_emit(
                &self.service,
                cause,
                &format!(
                    "{RECORD_CAPTURE} AND status IN ('charging', 'pending') AND {ADMITTED} \
                     RETURNING order_id"
                ),
                3,
                |query| {
                    query
                        .bind(order_id)
                        .bind(receipt.amount_cents)
                        .bind(receipt.reference.clone())
                },
                vec![captured],
            )
            .await?;
        if recorded {
            self.log_captured(order_id, receipt);
        } else {
            // Applied before (a redelivery that charged with the same key:
            // the gateway charged once), or the cancellation resolved the
            // intent meanwhile (it refunded what was charged).
            tracing::info!(%order_id, message_id = %cause.message_id, "capture not recorded: applied before, or resolved by the cancellation meanwhile");
        }
        Ok(())
    }

    /// Says which capture was recorded.
    fn log_captured(&self, order_id: &str, receipt: &Receipt) {
        tracing::info!(%order_id, provider = %self.method, charged_cents = receipt.amount_cents, capture_id = %receipt.reference, "payment captured");
    }

    /// `payment.captured` for `receipt`, caused by `cause`.
    fn captured(&self, order_id: &str, receipt: &Receipt, cause: &Envelope) -> Outgoing {
        Outgoing::event(
            &Event::PaymentCaptured(PaymentCaptured {
                order_id: order_id.to_owned(),
                provider: self.method.clone(),
                charged_cents: receipt.amount_cents,
                capture_id: receipt.reference.clone(),
            }),
            Some(cause),
        )
    }

    /// Writes `outcome` of a charge on the open capture of `order_id`.
    async fn record(
        &self,
        unit: &mut UnitOfWork,
        order_id: &str,
        outcome: &Outcome,
        cause: &Envelope,
    ) -> Result<(), sqlx::Error> {
        match outcome {
            Outcome::Captured(receipt) => {
                sqlx::query(RECORD_CAPTURE)
                    .bind(order_id)
                    .bind(receipt.amount_cents)
                    .bind(&receipt.reference)
                    .execute(unit.conn())
                    .await?;
                unit.emit(self.captured(order_id, receipt, cause));
                self.log_captured(order_id, receipt);
            }
            Outcome::Failed {
                reason,
                refund,
                resolved,
            } => {
                // Unresolved, the intent stays `charging` for the cancellation.
                sqlx::query(
                    "UPDATE captures SET status = CASE WHEN $5 THEN 'failed' ELSE status END, \
                     charged_cents = $2, capture_id = $3, refunded_cents = $4, updated_at = now() \
                     WHERE order_id = $1",
                )
                .bind(order_id)
                .bind(refund.as_ref().map(|(charge, _)| charge.amount_cents))
                .bind(refund.as_ref().map(|(charge, _)| charge.reference.clone()))
                .bind(refund.as_ref().map(|(_, refund)| refund.amount_cents))
                .bind(resolved)
                .execute(unit.conn())
                .await?;
                if let Some((_, refund)) = refund {
                    self.emit_refunded(unit, order_id, refund, cause);
                }
                unit.emit(Outgoing::event(
                    &Event::PaymentFailed(PaymentFailed {
                        order_id: order_id.to_owned(),
                        provider: self.method.clone(),
                        reason: reason.clone(),
                    }),
                    Some(cause),
                ));
                tracing::warn!(%order_id, provider = %self.method, %reason, "payment failed; the order will be cancelled");
            }
        }
        Ok(())
    }

    /// `order.cancelled`: refunds what was captured, resolves an open intent
    /// against the gateway (refunds what it charged, or closes the key so
    /// that nothing is charged later), or leaves a marker so that a later
    /// `payment.selected` charges nothing.
    async fn compensate(
        &self,
        unit: &mut UnitOfWork,
        order_id: &str,
        cause: &Envelope,
    ) -> Result<(), HandleError> {
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
        let capture = Self::lock_capture(unit.conn(), order_id).await?;
        if capture.provider != self.method {
            return Ok(());
        }
        let charge = if capture.status == "captured" {
            Receipt {
                reference: String::new(),
                amount_cents: capture.charged_cents.unwrap_or_default(),
            }
        } else if capture.is_open() {
            let key = capture
                .charge_key
                .clone()
                .unwrap_or_else(|| format!("charge:{order_id}"));
            match self.void(order_id, &key).await? {
                Voided::NothingCharged => {
                    sqlx::query(
                        "UPDATE captures SET status = 'cancelled', updated_at = now() WHERE order_id = $1",
                    )
                    .bind(order_id)
                    .execute(unit.conn())
                    .await?;
                    tracing::info!(%order_id, provider = %self.method, "open charge closed at the gateway before it charged (order cancelled)");
                    return Ok(());
                }
                Voided::Charged(receipt) => receipt,
            }
        } else {
            return Ok(());
        };
        let refund = self.refund(order_id, &charge).await?;
        sqlx::query(
            "UPDATE captures SET status = 'refunded', refunded_cents = $2, \
             charged_cents = COALESCE(charged_cents, $3), \
             capture_id = COALESCE(capture_id, NULLIF($4, '')), updated_at = now() \
             WHERE order_id = $1",
        )
        .bind(order_id)
        .bind(refund.amount_cents)
        .bind(charge.amount_cents)
        .bind(&charge.reference)
        .execute(unit.conn())
        .await?;
        self.emit_refunded(unit, order_id, &refund, cause);
        tracing::info!(%order_id, provider = %self.method, refunded_cents = refund.amount_cents, "payment refunded (order cancelled)");
        Ok(())
    }

    /// `payment.refunded` for `refund` of `order_id`, when `unit` commits.
    fn emit_refunded(
        &self,
        unit: &mut UnitOfWork,
        order_id: &str,
        refund: &Receipt,
        cause: &Envelope,
    ) {
        unit.emit(Outgoing::event(
            &Event::PaymentRefunded(PaymentRefunded {
                order_id: order_id.to_owned(),
                provider: self.method.clone(),
                refunded_cents: refund.amount_cents,
            }),
            Some(cause),
        ));
    }
}

/// A row of `captures`.
#[derive(Debug, sqlx::FromRow)]
struct Capture {
    provider: String,
    status: String,
    charged_cents: Option<i64>,
    charge_key: Option<String>,
}

impl Capture {
    /// An intent to charge whose outcome is not recorded yet.
    fn is_open(&self) -> bool {
        matches!(self.status.as_str(), "charging" | "pending")
    }
}

/// How a charge ended, as the provider records it.
#[derive(Debug)]
enum Outcome {
    Captured(Receipt),
    /// Nothing kept: nothing charged, or the charge (first) refunded
    /// (second); or, not `resolved`, the gateway could not say whether it
    /// charged (the intent stays open).
    Failed {
        reason: String,
        refund: Option<(Receipt, Receipt)>,
        resolved: bool,
    },
}

impl Handler for ProviderHandler {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        match &message.event {
            Event::PaymentSelected(selected) if selected.method == self.method => {
                self.capture(&[(message, selected)]).await
            }
            Event::OrderCancelled(cancelled) => {
                let Some(mut unit) = self.db.begin_unit(&self.service, &message.envelope).await?
                else {
                    return Ok(());
                };
                self.compensate(&mut unit, &cancelled.order_id, &message.envelope)
                    .await?;
                unit.commit().await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn batch_size(&self) -> usize {
        BATCH_SIZE
    }

    /// The payment decisions of the batch together ([`capture`]); the
    /// cancellations each in its own unit of work (each may refund at the
    /// gateway while holding its capture's lock). Each unit is idempotent,
    /// so a batch that fails part-way is redone one message at a time.
    ///
    /// [`capture`]: ProviderHandler::capture
    async fn handle_batch(&self, messages: &[Message]) -> Result<(), HandleError> {
        let selected: Vec<(&Message, &PaymentSelected)> = messages
            .iter()
            .filter_map(|m| match &m.event {
                Event::PaymentSelected(s) if s.method == self.method => Some((m, s)),
                _ => None,
            })
            .collect();
        if !selected.is_empty() {
            self.capture(&selected).await?;
        }
        for message in messages
            .iter()
            .filter(|m| !matches!(&m.event, Event::PaymentSelected(s) if s.method == self.method))
        {
            self.handle(message).await?;
        }
        Ok(())
    }
}

/// Deliveries a provider takes at once at most.
const BATCH_SIZE: usize = 32;

/// Records a capture on the intent of `$1`: `$2` charged cents, `$3` the
/// gateway's reference. A batch runs it on intents it locked open; a charge
/// on its own adds the still-open and first-delivery conditions.
const RECORD_CAPTURE: &str = "UPDATE captures SET status = 'captured', charged_cents = $2, \
     capture_id = $3, updated_at = now() WHERE order_id = $1";

/// One payment decision being charged.
#[derive(Debug)]
struct Charge<'a> {
    message: &'a Message,
    order_id: &'a str,
    amount_cents: i64,
    key: String,
    /// What the gateway must charge (the discount applied).
    expected: i64,
}

/// Connections of the simulated gateway's ledger (one statement per call).
const GATEWAY_CONNECTIONS: u32 = 4;

/// Runs the provider for `method` until `shutdown`.
pub async fn run(ctx: Ctx, method: String, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Payments).await?;
    let gateway_db = ctx
        .open_db(Context::Payments.schema(), GATEWAY_CONNECTIONS)
        .await
        .context("connecting the simulated gateway to its ledger")?;
    let worker = Arc::new(ProviderHandler::new(&ctx, &method, db.clone(), gateway_db)?);
    let service = worker.service.clone();
    run_worker(&ctx, &service, worker, Some(db), shutdown).await
}
