//! generate-info: on `order.started`, prices the order from the catalogue (the
//! server's prices, never the client's) and looks up the payment methods the
//! merchant accepts, then publishes `order.info-generated`; an order that
//! cannot be priced (unknown sku, no products) gets `order.info-rejected`, so
//! it is cancelled with the reason instead of waiting for a timeout.
//!
//! Stateless: it publishes directly (with confirms, before the ack), with a
//! message id derived from the trigger, so a redelivery is a duplicate downstream.

use std::sync::Arc;

use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing, Publisher};
use orderflow_shared::events::{Event, InfoGenerated, InfoRejected, OrderStarted};
use orderflow_shared::metadata::Metadata;

pub const SERVICE: &str = "generate-info";

/// The handler; public so tests can drive it.
pub struct GenerateInfo {
    metadata: Arc<Metadata>,
    publisher: Publisher,
}

impl GenerateInfo {
    pub fn new(ctx: &Ctx) -> Self {
        Self {
            metadata: ctx.metadata.clone(),
            publisher: ctx.broker.publisher(),
        }
    }

    /// What `order` leads to: its info, or the reason it cannot be priced.
    pub fn decide(&self, order: &OrderStarted) -> Event {
        let lines = order
            .products
            .iter()
            .map(|line| (line.sku.as_str(), i64::from(line.quantity)));
        match self.metadata.price(lines) {
            Ok(amount_cents) => Event::InfoGenerated(InfoGenerated {
                order_id: order.order_id.clone(),
                supplier: order.supplier.clone(),
                payment_methods: self.metadata.payment_methods_for(&order.supplier).to_vec(),
                amount_cents,
            }),
            Err(error) => Event::InfoRejected(InfoRejected {
                order_id: order.order_id.clone(),
                reason: format!("cannot price the order: {error}"),
            }),
        }
    }
}

impl Handler for GenerateInfo {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Event::OrderStarted(order) = &message.event else {
            return Ok(());
        };
        let outcome = self.decide(order);
        match &outcome {
            Event::InfoGenerated(info) => tracing::info!(
                order_id = %order.order_id,
                supplier = %order.supplier,
                amount_cents = info.amount_cents,
                methods = ?info.payment_methods,
                "order priced"
            ),
            Event::InfoRejected(rejected) => tracing::warn!(
                order_id = %order.order_id,
                reason = %rejected.reason,
                "order cannot be priced; it will be cancelled"
            ),
            _ => {}
        }
        self.publisher
            .publish(&Outgoing::derived(&outcome, &message.envelope))
            .await
            .map_err(HandleError::transient)
    }
}

/// Runs generate-info until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let handler = Arc::new(GenerateInfo::new(&ctx));
    run_worker(&ctx, SERVICE, handler, None, shutdown).await
}
