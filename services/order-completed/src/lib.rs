//! order-completed: on `payment.captured`, the terminal transition to
//! `completed` (orders table, conditional: the first terminal transition
//! wins) and, only if it won, `order.completed`. A capture that loses to a
//! cancellation publishes nothing here; the provider refunds it on
//! `order.cancelled`.

use orderflow_shared::Shutdown;
use orderflow_shared::app::Ctx;
use orderflow_shared::events::{Event, OrderCompleted};
use orderflow_shared::store::orders::{Terminal, TerminalHandler, Transition};

pub const SERVICE: &str = "order-completed";

/// The completion `event` asks for: a capture completes its order.
pub fn transition(event: &Event) -> Option<Transition> {
    let Event::PaymentCaptured(captured) = event else {
        return None;
    };
    Some(Transition {
        outcome: Terminal::Completed {
            method: captured.provider.clone(),
            charged_cents: captured.charged_cents,
            capture_id: Some(captured.capture_id.clone()),
        },
        announce: Event::OrderCompleted(OrderCompleted {
            order_id: captured.order_id.clone(),
            method: captured.provider.clone(),
            charged_cents: captured.charged_cents,
        }),
    })
}

/// Runs order-completed until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    TerminalHandler::run(ctx, SERVICE, transition, shutdown).await
}
