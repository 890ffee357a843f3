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

#[cfg(test)]
mod tests {
    use orderflow_shared::events::{PaymentCaptured, PaymentFailed};

    use super::*;

    /// A capture completes its order with what was charged, and announces
    /// `order.completed` with the provider as the method.
    #[test]
    fn a_capture_completes_the_order_with_what_was_charged() {
        let captured = Event::PaymentCaptured(PaymentCaptured {
            order_id: "o1".to_owned(),
            provider: "weixin".to_owned(),
            charged_cents: 6_850,
            capture_id: "cap-1".to_owned(),
        });
        assert_eq!(
            transition(&captured),
            Some(Transition {
                outcome: Terminal::Completed {
                    method: "weixin".to_owned(),
                    charged_cents: 6_850,
                    capture_id: Some("cap-1".to_owned()),
                },
                announce: Event::OrderCompleted(OrderCompleted {
                    order_id: "o1".to_owned(),
                    method: "weixin".to_owned(),
                    charged_cents: 6_850,
                }),
            })
        );
    }

    /// Nothing but a capture completes an order.
    #[test]
    fn other_events_do_not_complete() {
        let failed = Event::PaymentFailed(PaymentFailed {
            order_id: "o1".to_owned(),
            provider: "weixin".to_owned(),
            reason: "declined".to_owned(),
        });
        assert_eq!(transition(&failed), None);
    }
}
