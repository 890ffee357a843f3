//! generate-info: on `order.started`, prices the order from the catalogue (the
//! server's prices, never the client's) and looks up the payment methods the
//! merchant accepts, then publishes `order.info-generated`; an order that
//! cannot be priced (unknown sku, no products) gets `order.info-rejected`, so
//! it is cancelled with the reason instead of waiting for a timeout.
//!
//! **An order is priced once.** The first `order.started` of an order id is
//! recorded (`pricing.priced_orders`: a digest of its content and its message
//! id) before anything is published. The same message again (a redelivery)
//! publishes the same outcome again, with the same message id, so downstream
//! inboxes drop it; the same content in another message is a duplicate and
//! publishes nothing; other content for a known order is refused: it is
//! dead-lettered with the reason, and never priced again (anyone who can
//! publish `order.started` could otherwise re-price an order that awaits
//! payment).
//!
//! It publishes directly (with confirms, before the ack), with a message id
//! derived from the trigger.

use std::sync::Arc;

use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing, Publisher};
use orderflow_shared::events::{Event, InfoGenerated, InfoRejected, OrderStarted};
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::{Context, Db};

pub const SERVICE: &str = "generate-info";

/// The handler; public so tests can drive it.
pub struct GenerateInfoHandler {
    metadata: Arc<Metadata>,
    publisher: Publisher,
    db: Db,
}

/// What the record of priced orders says about an `order.started`.
#[derive(Debug, PartialEq, Eq)]
pub enum Pricing {
    /// The first (or the same message again): publish its outcome.
    Price,
    /// The same content in another message: already priced, publish nothing.
    Duplicate,
    /// Other content for a priced order: refuse.
    Conflict { first_message_id: String },
}

/// What `order` leads to: its info (the catalogue's total, the merchant's
/// methods), or the reason it cannot be priced (an unknown sku, no products,
/// a quantity of 0, a total too large for an `i64`). Pure: any order, with
/// any strings and quantities, gives one or the other.
pub fn decide(metadata: &Metadata, order: &OrderStarted) -> Event {
    let lines = order
        .products
        .iter()
        .map(|line| (line.sku.as_str(), i64::from(line.quantity)));
    match metadata.price(lines) {
        Ok(amount_cents) if amount_cents > 0 => Event::InfoGenerated(InfoGenerated {
            order_id: order.order_id.clone(),
            supplier: order.supplier.clone(),
            payment_methods: metadata.payment_methods_for(&order.supplier).to_vec(),
            amount_cents,
        }),
        Ok(amount_cents) => Event::InfoRejected(InfoRejected {
            order_id: order.order_id.clone(),
            reason: format!("cannot price the order: its total {amount_cents} is not positive"),
        }),
        Err(error) => Event::InfoRejected(InfoRejected {
            order_id: order.order_id.clone(),
            reason: format!("cannot price the order: {error}"),
        }),
    }
}

impl GenerateInfoHandler {
    pub fn new(ctx: &Ctx, db: Db) -> Self {
        Self {
            metadata: ctx.metadata.clone(),
            publisher: ctx.broker.publisher(),
            db,
        }
    }

    /// What `order` leads to: [`decide`] with this service's metadata.
    pub fn decide(&self, order: &OrderStarted) -> Event {
        decide(&self.metadata, order)
    }

    /// Records that `message` prices `order`, unless the order was priced
    /// before; what to do about it.
    pub async fn record(
        &self,
        order: &OrderStarted,
        message_id: &str,
    ) -> Result<Pricing, sqlx::Error> {
        let digest = order.content_digest();
        // DO UPDATE (a no-op) so that RETURNING gives the existing row too.
        let (first_digest, first_message_id): (String, String) = sqlx::query_as(
            "INSERT INTO priced_orders (order_id, content_digest, message_id) VALUES ($1, $2, $3) \
             ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id \
             RETURNING content_digest, message_id",
        )
        .bind(&order.order_id)
        .bind(&digest)
        .bind(message_id)
        .fetch_one(self.db.pool())
        .await?;
        Ok(if first_digest != digest {
            Pricing::Conflict { first_message_id }
        } else if first_message_id == message_id {
            Pricing::Price
        } else {
            Pricing::Duplicate
        })
    }
}

impl Handler for GenerateInfoHandler {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Event::OrderStarted(order) = &message.event else {
            return Ok(());
        };
        let message_id = &message.envelope.message_id;
        match self.record(order, message_id).await? {
            Pricing::Price => {}
            Pricing::Duplicate => {
                tracing::info!(order_id = %order.order_id, %message_id, "order.started again with the same content; already priced");
                return Ok(());
            }
            Pricing::Conflict { first_message_id } => {
                return Err(HandleError::permanent(anyhow::anyhow!(
                    "order {} was already priced from another order.started (message \
                     {first_message_id}) with other content; an order is priced once, so this \
                     one is refused",
                    order.order_id
                )));
            }
        }
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
            .map_err(HandleError::from)
    }
}

/// Runs generate-info until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Pricing).await?;
    let handler = Arc::new(GenerateInfoHandler::new(&ctx, db));
    run_worker(&ctx, SERVICE, handler, None, shutdown).await
}

#[cfg(test)]
mod tests {
    use orderflow_shared::events::ProductLine;
    use orderflow_shared::strategies;
    use proptest::prelude::*;

    use super::*;

    fn order() -> impl Strategy<Value = OrderStarted> {
        let sku = prop_oneof![
            Just("hotpot-set".to_owned()),
            Just("tea".to_owned()),
            strategies::text(),
        ];
        let quantity = prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>()];
        let line = (sku, quantity).prop_map(|(sku, quantity)| ProductLine { sku, quantity });
        (
            strategies::text(),
            prop_oneof![Just("haidilao".to_owned()), strategies::text()],
            prop::collection::vec(line, 0..6),
            strategies::text(),
        )
            .prop_map(|(order_id, supplier, products, address)| OrderStarted {
                order_id,
                supplier,
                products,
                address,
            })
    }

    fn started(supplier: &str, products: &[(&str, u32)]) -> OrderStarted {
        OrderStarted {
            order_id: "o1".to_owned(),
            supplier: supplier.to_owned(),
            products: products
                .iter()
                .map(|(sku, quantity)| ProductLine {
                    sku: (*sku).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
            address: "1 Harbour Road".to_owned(),
        }
    }

    /// The catalogue's prices (hotpot-set 128.00, tea 9.00) times the
    /// quantities, and the merchant's own methods.
    #[test]
    fn an_order_is_priced_from_the_catalogue_with_the_merchants_methods() {
        let metadata = Metadata::embedded().unwrap();
        let outcome = decide(
            &metadata,
            &started("haidilao", &[("hotpot-set", 2), ("tea", 1)]),
        );
        assert_eq!(
            outcome,
            Event::InfoGenerated(InfoGenerated {
                order_id: "o1".to_owned(),
                supplier: "haidilao".to_owned(),
                payment_methods: vec!["zhifubao".to_owned(), "weixin".to_owned()],
                amount_cents: 2 * 12_800 + 900,
            })
        );
    }

    /// A merchant without an entry takes every method.
    #[test]
    fn an_unknown_merchant_takes_the_default_methods() {
        let metadata = Metadata::embedded().unwrap();
        let Event::InfoGenerated(info) = decide(&metadata, &started("corner-shop", &[("tea", 3)]))
        else {
            panic!("priced");
        };
        assert_eq!(info.payment_methods, ["zhifubao", "weixin", "unionpay"]);
        assert_eq!(info.amount_cents, 2700);
    }

    /// What cannot be priced is rejected with the reason, for this order.
    #[test]
    fn an_order_that_cannot_be_priced_is_rejected_with_the_reason() {
        let metadata = Metadata::embedded().unwrap();
        for (products, reason) in [
            (&[("caviar", 1)][..], "unknown sku `caviar`"),
            (&[][..], "the order has no products"),
            (&[("tea", 0)][..], "quantity"),
        ] {
            match decide(&metadata, &started("haidilao", products)) {
                Event::InfoRejected(rejected) => {
                    assert_eq!(rejected.order_id, "o1");
                    assert!(
                        rejected.reason.starts_with("cannot price the order: ")
                            && rejected.reason.contains(reason),
                        "{products:?}: {}",
                        rejected.reason
                    );
                }
                other => panic!("{products:?} was priced: {other:?}"),
            }
        }
    }

    proptest! {
        /// Any order, quantities up to u32::MAX: its exact positive total
        /// and the merchant's methods, or a reason; never a panic.
        #[test]
        fn every_order_is_priced_or_rejected(order in order()) {
            let metadata = Metadata::embedded().unwrap();
            match decide(&metadata, &order) {
                Event::InfoGenerated(info) => {
                    let exact: i128 = order
                        .products
                        .iter()
                        .map(|line| {
                            i128::from(metadata.product(&line.sku).unwrap().price_cents)
                                * i128::from(line.quantity)
                        })
                        .sum();
                    prop_assert!(info.amount_cents > 0);
                    prop_assert_eq!(i128::from(info.amount_cents), exact);
                    prop_assert_eq!(info.payment_methods, metadata.payment_methods_for(&order.supplier));
                    prop_assert_eq!(info.order_id, order.order_id);
                }
                Event::InfoRejected(rejected) => {
                    prop_assert!(rejected.reason.starts_with("cannot price the order: "));
                    prop_assert_eq!(rejected.order_id, order.order_id);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
