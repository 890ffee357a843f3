//! The bounded contexts and their schemas (DESIGN.md §5), each with its own
//! migrations under `shared/migrations/<schema>/`.

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
