//! saga-coordinator: what choreography cannot do alone. It keeps each saga's
//! state (running, completed, cancelled) from the events it sees and the
//! task-token ledger, and decides a customer's payment submission: a valid,
//! unused token for a running saga with an allowed method becomes
//! `payment.selected.<method>`; a method the merchant does not allow becomes
//! `payment.rejected` (the demo's default branch, which cancels the order);
//! anything else becomes `payment.submission-rejected` with the reason and
//! changes nothing.

use std::sync::Arc;

use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing};
use orderflow_shared::events::{
    Event, PaymentRejected, PaymentSelected, PaymentSubmitted, SubmissionRejected,
};
use orderflow_shared::store::{Context, Db, UnitOfWork};
use orderflow_shared::token::{self, TokenKeys};

pub const SERVICE: &str = "saga-coordinator";

/// The step a payment token must be for.
const PAYMENT_STEP: &str = "payment";

/// The reason of `payment.rejected` when the merchant does not accept the method.
pub const METHOD_NOT_ALLOWED: &str = "method not allowed";

pub struct Coordinator {
    db: Db,
    keys: TokenKeys,
}

impl Coordinator {
    pub fn new(db: Db, keys: TokenKeys) -> Self {
        Self { db, keys }
    }

    /// Records the saga's status; a terminal status is never left.
    async fn set_status(
        unit: &mut UnitOfWork,
        order_id: &str,
        status: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sagas (order_id, status) VALUES ($1, $2) \
             ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now() \
             WHERE sagas.status = 'running'",
        )
        .bind(order_id)
        .bind(status)
        .execute(unit.conn())
        .await?;
        Ok(())
    }

    async fn set_step(
        unit: &mut UnitOfWork,
        order_id: &str,
        step: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sagas (order_id, step) VALUES ($1, $2) \
             ON CONFLICT (order_id) DO UPDATE SET step = EXCLUDED.step, updated_at = now() \
             WHERE sagas.status = 'running'",
        )
        .bind(order_id)
        .bind(step)
        .execute(unit.conn())
        .await?;
        Ok(())
    }

    /// The decision on a submission, within `unit` (which consumes the token
    /// when it is accepted).
    async fn decide(
        &self,
        unit: &mut UnitOfWork,
        submitted: &PaymentSubmitted,
    ) -> Result<Event, sqlx::Error> {
        let order_id = submitted.order_id.clone();
        let reject = |reason: String| {
            Event::SubmissionRejected(SubmissionRejected {
                order_id: order_id.clone(),
                reason,
            })
        };
        let now = chrono::Utc::now().timestamp();
        let claims = match self.keys.verify(&submitted.token, now) {
            Ok(claims) => claims,
            Err(error) => return Ok(reject(error.to_string())),
        };
        if claims.order_id != submitted.order_id {
            return Ok(reject("token belongs to another order".to_owned()));
        }
        if claims.step != PAYMENT_STEP {
            return Ok(reject(format!(
                "token is for step `{}`, not `{PAYMENT_STEP}`",
                claims.step
            )));
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM sagas WHERE order_id = $1 FOR UPDATE")
                .bind(&submitted.order_id)
                .fetch_optional(unit.conn())
                .await?;
        if let Some(status) = status.filter(|s| s != "running") {
            return Ok(reject(format!("order is already {status}")));
        }
        let fresh = sqlx::query(
            "INSERT INTO used_tokens (token_digest, order_id, method) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(token::digest(&submitted.token))
        .bind(&submitted.order_id)
        .bind(&submitted.method)
        .execute(unit.conn())
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            return Ok(reject("token already used".to_owned()));
        }
        Ok(if claims.methods.contains(&submitted.method) {
            Event::PaymentSelected(PaymentSelected {
                order_id: submitted.order_id.clone(),
                method: submitted.method.clone(),
                amount_cents: claims.amount_cents,
            })
        } else {
            Event::PaymentRejected(PaymentRejected {
                order_id: submitted.order_id.clone(),
                method: submitted.method.clone(),
                reason: METHOD_NOT_ALLOWED.to_owned(),
            })
        })
    }
}

impl Handler for Coordinator {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Some(mut unit) = self.db.begin_unit(SERVICE, &message.envelope).await? else {
            return Ok(());
        };
        let order_id = message.order_id();
        match &message.event {
            Event::OrderStarted(_) => Self::set_status(&mut unit, order_id, "running").await?,
            Event::InfoGenerated(_) => Self::set_step(&mut unit, order_id, "payment-wait").await?,
            Event::PaymentAwaiting(_) => Self::set_step(&mut unit, order_id, "payment").await?,
            Event::OrderCompleted(_) => Self::set_status(&mut unit, order_id, "completed").await?,
            Event::OrderCancelled(_) => Self::set_status(&mut unit, order_id, "cancelled").await?,
            Event::PaymentSubmitted(submitted) => {
                let decision = self.decide(&mut unit, submitted).await?;
                match &decision {
                    Event::PaymentSelected(s) => {
                        tracing::info!(%order_id, method = %s.method, "payment accepted");
                    }
                    Event::PaymentRejected(r) => {
                        tracing::info!(%order_id, method = %r.method, reason = %r.reason, "payment method rejected");
                    }
                    Event::SubmissionRejected(r) => {
                        tracing::warn!(%order_id, reason = %r.reason, "payment submission rejected");
                    }
                    _ => {}
                }
                if matches!(decision, Event::PaymentSelected(_)) {
                    Self::set_step(&mut unit, order_id, "paying").await?;
                }
                unit.emit(Outgoing::event(&decision, Some(&message.envelope)));
            }
            _ => {}
        }
        unit.commit().await?;
        Ok(())
    }
}

/// Runs the coordinator until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Coordinator).await?;
    let handler = Arc::new(Coordinator::new(
        db.clone(),
        ctx.require_token_keys()?.clone(),
    ));
    run_worker(&ctx, SERVICE, handler, Some(db), shutdown).await
}
