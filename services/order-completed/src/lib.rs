//! order-completed: on `payment.captured`, the terminal transition to
//! `completed` (orders table, conditional: the first terminal transition
//! wins) and, only if it won, `order.completed`. A capture that loses to a
//! cancellation publishes nothing here; the provider refunds it on
//! `order.cancelled`.

use std::sync::Arc;

use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing};
use orderflow_shared::events::{Event, OrderCompleted};
use orderflow_shared::store::orders::{Announcer, Terminal, finish};
use orderflow_shared::store::{Context, Db};

pub const SERVICE: &str = "order-completed";

pub struct OrderCompletedHandler {
    db: Db,
    /// Wakes the order API's long polls of an order this worker ended.
    announcer: Announcer,
}

impl Handler for OrderCompletedHandler {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Event::PaymentCaptured(captured) = &message.event else {
            return Ok(());
        };
        let Some(mut unit) = self.db.begin_unit(SERVICE, &message.envelope).await? else {
            return Ok(());
        };
        let outcome = Terminal::Completed {
            method: captured.provider.clone(),
            charged_cents: captured.charged_cents,
            capture_id: Some(captured.capture_id.clone()),
        };
        let won = finish(unit.conn(), &captured.order_id, &outcome).await?;
        if won {
            unit.emit(Outgoing::event(
                &Event::OrderCompleted(OrderCompleted {
                    order_id: captured.order_id.clone(),
                    method: captured.provider.clone(),
                    charged_cents: captured.charged_cents,
                }),
                Some(&message.envelope),
            ));
            tracing::info!(
                order_id = %captured.order_id,
                method = %captured.provider,
                charged_cents = captured.charged_cents,
                "order completed"
            );
        } else {
            tracing::warn!(
                order_id = %captured.order_id,
                "capture arrived after the order ended; not completing it (a cancelled order's capture is refunded)"
            );
        }
        unit.commit().await?;
        if won {
            // The order shows completed now: its long polls need not wait
            // for order.completed to reach the order API.
            self.announcer.changed(&captured.order_id);
        }
        Ok(())
    }
}

/// Runs order-completed until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Orders).await?;
    let (announcer, announcing) = Announcer::spawn(db.pool().clone(), shutdown.clone());
    let handler = Arc::new(OrderCompletedHandler {
        db: db.clone(),
        announcer,
    });
    run_worker(&ctx, SERVICE, handler, Some(db), shutdown).await?;
    announcing.await?;
    Ok(())
}
