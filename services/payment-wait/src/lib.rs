//! payment-wait: on `order.info-generated`, opens the payment step (the
//! demo's `waitForCallback`): mints the signed task token and publishes
//! `payment.awaiting` with it. The token is minted from the triggering event
//! alone (its order, methods, amount and time), so a redelivery mints the same
//! token and publishes the same message id.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing, Publisher};
use orderflow_shared::events::{Event, InfoGenerated, PaymentAwaiting};
use orderflow_shared::token::{Claims, TokenKeys};

pub const SERVICE: &str = "payment-wait";

/// The step name in the token's claims.
pub const PAYMENT_STEP: &str = "payment";

pub struct PaymentWait {
    keys: TokenKeys,
    timeout_secs: i64,
    publisher: Publisher,
}

impl PaymentWait {
    pub fn new(ctx: &Ctx) -> anyhow::Result<Self> {
        Ok(Self {
            keys: ctx.require_token_keys()?.clone(),
            timeout_secs: i64::try_from(ctx.settings.payment_timeout_secs).unwrap_or(i64::MAX),
            publisher: ctx.broker.publisher(),
        })
    }

    /// The `payment.awaiting` for `info`, triggered at `at_millis`
    /// (milliseconds since the epoch). The deadline is a whole second (token
    /// claims carry seconds), rounded up so the step is open at least the
    /// whole timeout.
    pub fn open_step(
        &self,
        info: &InfoGenerated,
        at_millis: i64,
    ) -> Result<PaymentAwaiting, HandleError> {
        let expires_at = at_millis
            .saturating_add(999)
            .div_euclid(1000)
            .saturating_add(self.timeout_secs);
        let claims = Claims {
            order_id: info.order_id.clone(),
            step: PAYMENT_STEP.to_owned(),
            attempt: 1,
            methods: info.payment_methods.clone(),
            amount_cents: info.amount_cents,
            expires_at,
            kid: self.keys.signing_kid().to_owned(),
        };
        let token = self.keys.mint(&claims).map_err(HandleError::permanent)?;
        let expires_at = DateTime::<Utc>::from_timestamp(expires_at, 0).ok_or_else(|| {
            HandleError::permanent(anyhow::anyhow!("deadline {expires_at} is out of range"))
        })?;
        Ok(PaymentAwaiting {
            order_id: info.order_id.clone(),
            token,
            payment_methods: info.payment_methods.clone(),
            amount_cents: info.amount_cents,
            expires_at,
        })
    }
}

impl Handler for PaymentWait {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Event::InfoGenerated(info) = &message.event else {
            return Ok(());
        };
        let at = i64::try_from(message.envelope.time_millis()).unwrap_or(i64::MAX);
        let awaiting = self.open_step(info, at)?;
        tracing::info!(
            order_id = %info.order_id,
            expires_at = %awaiting.expires_at,
            "payment step open; waiting for the customer"
        );
        self.publisher
            .publish(&Outgoing::derived(
                &Event::PaymentAwaiting(awaiting),
                &message.envelope,
            ))
            .await
            .map_err(HandleError::transient)
    }
}

/// Runs payment-wait until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let handler = Arc::new(PaymentWait::new(&ctx)?);
    run_worker(&ctx, SERVICE, handler, None, shutdown).await
}
