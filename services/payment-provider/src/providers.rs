//! The `PaymentProvider` trait and the registry of implementations by name.
//! Adding a payment method = a `config/providers.toml` entry (discount), an
//! implementation registered here, and the merchants that accept it.

use futures::future::BoxFuture;

use crate::gateway::{GatewayError, Operation, Receipt, SimulatedGateway, Voided};

/// A payment provider's gateway integration.
pub trait PaymentProvider: Send + Sync + 'static {
    /// The method name it is registered under.
    fn name(&self) -> &'static str;

    /// Charges the payment's amount for its order; the same idempotency
    /// key never charges twice.
    fn charge<'a>(&'a self, payment: Payment<'a>) -> BoxFuture<'a, Result<Receipt, GatewayError>>;

    /// Refunds the payment's amount of its order's charge, once per key.
    fn refund<'a>(&'a self, payment: Payment<'a>) -> BoxFuture<'a, Result<Receipt, GatewayError>>;

    /// Closes the charge key `charge_key` (a trade nobody may pay any more):
    /// the charge it had made, or the promise that it never will. This is
    /// how an intent whose outcome the provider never learnt is resolved.
    fn void<'a>(
        &'a self,
        charge_key: &'a str,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<Voided, GatewayError>>;
}

/// What a charge or a refund asks of a gateway.
#[derive(Clone, Copy, Debug)]
pub struct Payment<'a> {
    /// The same key never moves money twice.
    pub idempotency_key: &'a str,
    pub order_id: &'a str,
    pub amount_cents: i64,
}

/// A provider on the simulated gateway; the providers differ in name and in
/// the shape of their references, as real ones do.
struct Simulated {
    name: &'static str,
    reference_prefix: &'static str,
    gateway: SimulatedGateway,
}

impl Simulated {
    /// `operation` at the gateway under this provider's name and references.
    fn execute<'a>(
        &'a self,
        operation: Operation,
        payment: Payment<'a>,
    ) -> BoxFuture<'a, Result<Receipt, GatewayError>> {
        Box::pin(self.gateway.execute(
            operation,
            self.name,
            self.reference_prefix,
            payment.idempotency_key,
            payment.order_id,
            payment.amount_cents,
        ))
    }
}

impl PaymentProvider for Simulated {
    fn name(&self) -> &'static str {
        self.name
    }

    fn charge<'a>(&'a self, payment: Payment<'a>) -> BoxFuture<'a, Result<Receipt, GatewayError>> {
        self.execute(Operation::Charge, payment)
    }

    fn refund<'a>(&'a self, payment: Payment<'a>) -> BoxFuture<'a, Result<Receipt, GatewayError>> {
        self.execute(Operation::Refund, payment)
    }

    fn void<'a>(
        &'a self,
        charge_key: &'a str,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<Voided, GatewayError>> {
        Box::pin(self.gateway.void(self.name, charge_key, order_id))
    }
}

type Constructor = fn(SimulatedGateway) -> Box<dyn PaymentProvider>;

/// Every registered implementation, by method name.
const REGISTRY: &[(&str, Constructor)] = &[
    ("zhifubao", |gateway| {
        Box::new(Simulated {
            name: "zhifubao",
            reference_prefix: "ZFB",
            gateway,
        })
    }),
    ("weixin", |gateway| {
        Box::new(Simulated {
            name: "weixin",
            reference_prefix: "WX",
            gateway,
        })
    }),
    ("unionpay", |gateway| {
        Box::new(Simulated {
            name: "unionpay",
            reference_prefix: "UP",
            gateway,
        })
    }),
];

/// The implementation registered as `method`.
pub fn lookup(method: &str, gateway: SimulatedGateway) -> Option<Box<dyn PaymentProvider>> {
    REGISTRY
        .iter()
        .find(|(name, _)| *name == method)
        .map(|(_, constructor)| constructor(gateway))
}

/// The names of all registered implementations.
pub fn registered() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}
