//! order-cancelled: on `payment.rejected`, `payment.failed`, `saga.timed-out`
//! or `order.info-rejected`, the terminal transition to `cancelled` (orders
//! table, conditional: the first terminal transition wins) and, only if it
//! won, `order.cancelled` with the reason, which the payment providers
//! answer with a refund when they had captured.

use orderflow_shared::Shutdown;
use orderflow_shared::app::Ctx;
use orderflow_shared::events::{Event, OrderCancelled, Step};
use orderflow_shared::store::orders::{Terminal, TerminalHandler, Transition};

pub const SERVICE: &str = "order-cancelled";

/// The cancellation reason an event stands for, if it cancels the order.
pub fn cancellation_reason(event: &Event) -> Option<String> {
    match event {
        Event::PaymentRejected(e) => Some(e.reason.clone()),
        Event::PaymentFailed(e) => Some(format!("payment failed at {}: {}", e.provider, e.reason)),
        Event::SagaTimedOut(e) => Some(
            match e.step {
                Step::GenerateInfo => "timed out waiting for the order information",
                Step::Payment => "timed out waiting for the payment",
                Step::Flow => "timed out: the order took longer than the flow allows",
            }
            .to_owned(),
        ),
        Event::InfoRejected(e) => Some(e.reason.clone()),
        _ => None,
    }
}

/// The cancellation `event` asks for, if it cancels the order.
pub fn transition(event: &Event) -> Option<Transition> {
    let reason = cancellation_reason(event)?;
    Some(Transition {
        outcome: Terminal::Cancelled {
            reason: reason.clone(),
        },
        announce: Event::OrderCancelled(OrderCancelled {
            order_id: event.order_id().to_owned(),
            reason,
        }),
    })
}

/// Runs order-cancelled until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    TerminalHandler::run(ctx, SERVICE, transition, shutdown).await
}

#[cfg(test)]
mod tests {
    use orderflow_shared::strategies;
    use proptest::prelude::*;

    use super::*;

    fn timed_out(step: Step) -> Event {
        Event::SagaTimedOut(orderflow_shared::events::SagaTimedOut {
            order_id: "o1".to_owned(),
            step,
        })
    }

    /// Each cancelling event gives the reason customers read on the order.
    #[test]
    fn each_cancelling_event_says_why() {
        use orderflow_shared::events::{InfoRejected, PaymentFailed, PaymentRejected};
        let cases = [
            (
                Event::PaymentRejected(PaymentRejected {
                    order_id: "o1".to_owned(),
                    method: "unionpay".to_owned(),
                    reason: "method not allowed".to_owned(),
                }),
                "method not allowed",
            ),
            (
                Event::PaymentFailed(PaymentFailed {
                    order_id: "o1".to_owned(),
                    provider: "weixin".to_owned(),
                    reason: "card declined".to_owned(),
                }),
                "payment failed at weixin: card declined",
            ),
            (
                Event::InfoRejected(InfoRejected {
                    order_id: "o1".to_owned(),
                    reason: "cannot price the order: unknown sku `caviar`".to_owned(),
                }),
                "cannot price the order: unknown sku `caviar`",
            ),
            (
                timed_out(Step::GenerateInfo),
                "timed out waiting for the order information",
            ),
            (
                timed_out(Step::Payment),
                "timed out waiting for the payment",
            ),
            (
                timed_out(Step::Flow),
                "timed out: the order took longer than the flow allows",
            ),
        ];
        for (event, reason) in cases {
            assert_eq!(
                cancellation_reason(&event).as_deref(),
                Some(reason),
                "{event:?}"
            );
            let transition = transition(&event).unwrap();
            assert_eq!(
                transition.outcome,
                Terminal::Cancelled {
                    reason: reason.to_owned()
                }
            );
            assert_eq!(
                transition.announce,
                Event::OrderCancelled(OrderCancelled {
                    order_id: "o1".to_owned(),
                    reason: reason.to_owned(),
                })
            );
        }
    }

    /// Events that do not cancel give no transition (a capture completes).
    #[test]
    fn other_events_do_not_cancel() {
        let captured = Event::PaymentCaptured(orderflow_shared::events::PaymentCaptured {
            order_id: "o1".to_owned(),
            provider: "weixin".to_owned(),
            charged_cents: 100,
            capture_id: "c1".to_owned(),
        });
        assert_eq!(cancellation_reason(&captured), None);
        assert_eq!(transition(&captured), None);
    }

    proptest! {
        /// Any event, strings of any content: the cancelling ones give their
        /// reason (the rejection's or failure's own text within it), the
        /// others none; never a panic.
        #[test]
        fn every_event_has_a_reason_or_none(event in strategies::event()) {
            let reason = cancellation_reason(&event);
            match &event {
                Event::PaymentRejected(e) => prop_assert_eq!(reason, Some(e.reason.clone())),
                Event::InfoRejected(e) => prop_assert_eq!(reason, Some(e.reason.clone())),
                Event::PaymentFailed(e) => {
                    let reason = reason.unwrap_or_default();
                    prop_assert!(reason.contains(&e.provider) && reason.ends_with(&e.reason));
                }
                Event::SagaTimedOut(_) => prop_assert!(reason.is_some_and(|r| r.starts_with("timed out"))),
                _ => prop_assert_eq!(reason, None),
            }
        }
    }
}
