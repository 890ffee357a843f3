//! The bounded contexts and their schemas, each with its own migrations under
//! `shared/migrations/<schema>/`, its own PostgreSQL role (owner of the
//! schema, in a deployment provisioned by `orderflow db init`), and the few
//! tables of other contexts it may read.

use sqlx::migrate::Migrator;

/// A bounded context: one schema, one set of migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// order-api, order-completed, order-cancelled: the orders table.
    Orders,
    /// saga-coordinator: sagas, tokens, timers, history.
    Coordinator,
    /// payment providers: captures and refunds.
    Payments,
    /// generate-info: the orders it priced (an order is priced once).
    Pricing,
}

impl Context {
    /// Every context, in the order `orderflow db init` provisions them.
    pub const ALL: [Self; 4] = [
        Self::Orders,
        Self::Coordinator,
        Self::Payments,
        Self::Pricing,
    ];

    /// The context whose schema `service` works in (`None` for payment-wait,
    /// which keeps no state).
    pub fn of_service(service: &str) -> Option<Self> {
        match service {
            "order-api" | "order-completed" | "order-cancelled" => Some(Self::Orders),
            "saga-coordinator" => Some(Self::Coordinator),
            "generate-info" => Some(Self::Pricing),
            provider if provider.starts_with("payment-provider-") => Some(Self::Payments),
            _ => None,
        }
    }

    /// The PostgreSQL role that owns the context's schema (and that its
    /// services connect as), after `prefix`.
    pub fn role(self, prefix: &str) -> String {
        format!("{prefix}orderflow_{}", self.schema())
    }

    /// Tables of other contexts this one may read, and nothing else there:
    /// the order API serves the coordinator's execution history, and its
    /// console the saga's step and deadlines (sagas, timers) and stuck
    /// sagas; payment providers charge exactly what the coordinator accepted.
    pub fn reads(self) -> &'static [(Self, &'static str)] {
        match self {
            Self::Orders => &[
                (Self::Coordinator, "history"),
                (Self::Coordinator, "sagas"),
                (Self::Coordinator, "timers"),
            ],
            Self::Payments => &[(Self::Coordinator, "payment_steps")],
            Self::Coordinator | Self::Pricing => &[],
        }
    }

    pub fn schema(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Coordinator => "coordinator",
            Self::Payments => "payments",
            Self::Pricing => "pricing",
        }
    }

    pub fn migrator(self) -> Migrator {
        match self {
            Self::Orders => sqlx::migrate!("./migrations/orders"),
            Self::Coordinator => sqlx::migrate!("./migrations/coordinator"),
            Self::Payments => sqlx::migrate!("./migrations/payments"),
            Self::Pricing => sqlx::migrate!("./migrations/pricing"),
        }
    }
}
