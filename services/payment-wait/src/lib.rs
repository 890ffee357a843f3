//! payment-wait: on `order.info-generated`, opens the payment step (the
//! demo's `waitForCallback`): mints the signed task token and publishes
//! `payment.awaiting` with it. The token is minted from the triggering event
//! alone (its order, methods, amount and time), so a redelivery mints the same
//! token and publishes the same message id. An `order.info-generated` that
//! cannot open a step (an amount that is not positive) is dead-lettered with
//! the reason ([`StepError`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing, Publisher};
use orderflow_shared::events::{Event, InfoGenerated, PaymentAwaiting};
use orderflow_shared::token::{Claims, TokenError, TokenKeys};

pub const SERVICE: &str = "payment-wait";

/// The step name in the token's claims.
pub const PAYMENT_STEP: &str = "payment";

pub struct PaymentWaitHandler {
    keys: TokenKeys,
    timeout_secs: u64,
    publisher: Publisher,
}

/// Why no payment step is opened for an `order.info-generated`: permanent,
/// the same message would fail the same way again.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    #[error(
        "order {order_id}: order.info-generated carries amount {amount_cents}, not a positive \
         amount; no payment step is opened (nothing could be charged)"
    )]
    NotPositive { order_id: String, amount_cents: i64 },
    #[error(
        "order {order_id}: a deadline {timeout_secs} s after {start_secs} s since the epoch is \
         not a date; no payment step is opened (check ORDERFLOW_PAYMENT_TIMEOUT_SECS)"
    )]
    OutOfRange {
        order_id: String,
        start_secs: i64,
        timeout_secs: u64,
    },
    #[error("order {order_id}: cannot mint the payment token: {cause}")]
    Token { order_id: String, cause: TokenError },
}

/// The `payment.awaiting` for `info`, sent at `sent_millis` and handled at
/// `now_millis` (milliseconds since the epoch), open `timeout_secs`.
///
/// The deadline is a whole second (token claims carry seconds), rounded up
/// so the step is open at least the whole timeout, counted from when the
/// message was sent: a redelivery mints the same token. A message cannot be
/// sent after it is handled, so a time later than now (a publisher's absurd
/// AMQP timestamp) counts as now, as the coordinator's deadlines do, and a
/// token never lives longer than the timeout from now.
///
/// A late cause (an `order.info-generated` priced long after its order
/// started, stamped with the order's time, that waited out a broker or
/// worker outage) would open a step already expired, or about to: the
/// customer could not pay and the order would time out. When less than half
/// the timeout would be left, the timeout counts from now instead. (A
/// redelivery then may mint another token, but it carries the same message
/// id: the coordinator and the read model keep the first.) An amount that
/// is not positive, or a deadline no date can hold, is a [`StepError`].
pub fn open_step(
    keys: &TokenKeys,
    timeout_secs: u64,
    info: &InfoGenerated,
    sent_millis: u64,
    now_millis: i64,
) -> Result<PaymentAwaiting, StepError> {
    if info.amount_cents <= 0 {
        return Err(StepError::NotPositive {
            order_id: info.order_id.clone(),
            amount_cents: info.amount_cents,
        });
    }
    let ceil_secs = |millis: i64| millis.saturating_add(999).div_euclid(1000);
    let now_secs = ceil_secs(now_millis);
    let sent_secs = ceil_secs(
        i64::try_from(sent_millis)
            .unwrap_or(i64::MAX)
            .min(now_millis),
    );
    let half = i64::try_from(timeout_secs / 2).unwrap_or(i64::MAX);
    let left_from_sent = i64::try_from(timeout_secs)
        .ok()
        .and_then(|timeout| sent_secs.checked_add(timeout))
        .map(|deadline| deadline.saturating_sub(now_secs));
    let start_secs = match left_from_sent {
        Some(left) if left < half => now_secs,
        _ => sent_secs,
    };
    let out_of_range = || StepError::OutOfRange {
        order_id: info.order_id.clone(),
        start_secs,
        timeout_secs,
    };
    let expires_at = i64::try_from(timeout_secs)
        .ok()
        .and_then(|timeout| start_secs.checked_add(timeout))
        .ok_or_else(out_of_range)?;
    let deadline = DateTime::<Utc>::from_timestamp(expires_at, 0).ok_or_else(out_of_range)?;
    let claims = Claims {
        order_id: info.order_id.clone(),
        step: PAYMENT_STEP.to_owned(),
        attempt: 1,
        methods: info.payment_methods.clone(),
        amount_cents: info.amount_cents,
        expires_at,
        kid: keys.signing_kid().to_owned(),
    };
    let token = keys.mint(&claims).map_err(|cause| StepError::Token {
        order_id: info.order_id.clone(),
        cause,
    })?;
    Ok(PaymentAwaiting {
        order_id: info.order_id.clone(),
        token,
        payment_methods: info.payment_methods.clone(),
        amount_cents: info.amount_cents,
        expires_at: deadline,
    })
}

impl PaymentWaitHandler {
    pub fn new(ctx: &Ctx) -> anyhow::Result<Self> {
        Ok(Self {
            keys: ctx.require_token_keys()?.clone(),
            timeout_secs: ctx.settings.payment_timeout_secs,
            publisher: ctx.broker.publisher(),
        })
    }

    /// [`open_step`] with this service's keys and timeout.
    pub fn open_step(
        &self,
        info: &InfoGenerated,
        sent_millis: u64,
        now_millis: i64,
    ) -> Result<PaymentAwaiting, StepError> {
        open_step(&self.keys, self.timeout_secs, info, sent_millis, now_millis)
    }
}

impl Handler for PaymentWaitHandler {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        let Event::InfoGenerated(info) = &message.event else {
            return Ok(());
        };
        let awaiting = self
            .open_step(
                info,
                message.envelope.time_millis(),
                Utc::now().timestamp_millis(),
            )
            .map_err(HandleError::permanent)?;
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
            .map_err(HandleError::from)
    }
}

/// Runs payment-wait until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let handler = Arc::new(PaymentWaitHandler::new(&ctx)?);
    run_worker(&ctx, SERVICE, handler, None, shutdown).await
}

#[cfg(test)]
mod tests {
    use orderflow_shared::strategies;
    use proptest::prelude::*;

    use super::*;

    fn info() -> impl Strategy<Value = InfoGenerated> {
        (
            strategies::text(),
            strategies::text(),
            prop::collection::vec(strategies::text(), 0..3),
            strategies::extreme_i64(),
        )
            .prop_map(|(order_id, supplier, payment_methods, amount_cents)| {
                InfoGenerated {
                    order_id,
                    supplier,
                    payment_methods,
                    amount_cents,
                }
            })
    }

    fn timeout_secs() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(300),
            Just(orderflow_shared::config::MAX_TIMEOUT_SECS),
            Just(u64::MAX),
            any::<u64>(),
        ]
    }

    fn now_millis() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(Utc::now().timestamp_millis()),
            Just(i64::MIN),
            Just(i64::MAX),
            strategies::extreme_i64(),
        ]
    }

    proptest! {
        /// Any info, sent any time, any timeout, any now: a step whose token
        /// says what the awaiting carries and expires no later than the
        /// timeout from now, or the reason there is none; never a panic.
        #[test]
        fn opening_a_step_never_panics(
            info in info(),
            timeout in timeout_secs(),
            sent in strategies::extreme_u64(),
            now in now_millis(),
        ) {
            match open_step(&strategies::token_keys(), timeout, &info, sent, now) {
                Ok(awaiting) => {
                    prop_assert!(awaiting.amount_cents > 0);
                    let claims = strategies::token_keys().verify(&awaiting.token, i64::MIN).unwrap();
                    prop_assert_eq!(claims.expires_at, awaiting.expires_at.timestamp());
                    prop_assert_eq!(&claims.order_id, &info.order_id);
                    prop_assert_eq!(claims.amount_cents, info.amount_cents);
                    let latest = i128::from(now).div_euclid(1000) + 1 + i128::from(timeout);
                    prop_assert!(i128::from(claims.expires_at) <= latest);
                    let now_secs = i128::from(now).div_euclid(1000) + i128::from(now.rem_euclid(1000) > 0);
                    if let Ok(sent) = i64::try_from(sent) && sent <= now {
                        let from_sent = i128::from(sent.div_euclid(1000) + i64::from(sent.rem_euclid(1000) > 0))
                            + i128::from(timeout);
                        if from_sent - now_secs >= i128::from(timeout / 2) {
                            // Fresh enough: the timeout from when it was sent (a redelivery mints the same).
                            prop_assert_eq!(i128::from(claims.expires_at), from_sent);
                        } else {
                            // A late cause: the whole timeout from now.
                            prop_assert_eq!(i128::from(claims.expires_at), now_secs + i128::from(timeout));
                        }
                    }
                    // Never a step with less than half its timeout left.
                    prop_assert!(i128::from(claims.expires_at) - now_secs >= i128::from(timeout / 2));
                }
                Err(StepError::NotPositive { amount_cents, .. }) => prop_assert!(amount_cents <= 0),
                Err(error) => prop_assert!(info.amount_cents > 0, "{}", error),
            }
        }
    }

    /// haidilao's order `order_id`, priced at 128.00 payable with zhifubao.
    fn haidilao_info(order_id: &str) -> InfoGenerated {
        InfoGenerated {
            order_id: order_id.to_owned(),
            supplier: "haidilao".to_owned(),
            payment_methods: vec!["zhifubao".to_owned()],
            amount_cents: 12_800,
        }
    }

    #[test]
    fn a_redelivery_mints_the_same_token_and_a_future_time_counts_from_now() {
        let info = haidilao_info("o-1");
        let now = 1_741_064_767_000;
        let sent = 1_741_064_700_001_u64;
        let first = open_step(&strategies::token_keys(), 300, &info, sent, now).unwrap();
        let again = open_step(&strategies::token_keys(), 300, &info, sent, now + 60_000).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.expires_at.timestamp(), 1_741_064_701 + 300);
        for absurd in [u64::MAX, 8_000_000_000_000_000] {
            let awaiting = open_step(&strategies::token_keys(), 300, &info, absurd, now).unwrap();
            assert_eq!(awaiting.expires_at.timestamp(), now / 1000 + 300);
        }
    }

    #[test]
    fn a_late_cause_opens_a_step_with_its_whole_timeout_from_now() {
        let info = haidilao_info("o-late");
        let now = 1_741_064_767_000;
        // (when the cause was sent, when its step expires), timeout 5 minutes.
        let cases = [
            // Sent 10 minutes ago: it would have expired 5 minutes ago; from now.
            (1_741_064_167_000, now / 1000 + 300),
            // Sent 4 minutes ago: a minute left, less than half; from now too.
            (1_741_064_527_000, now / 1000 + 300),
            // Sent 2 minutes ago: 3 minutes left, counted from when it was sent.
            (1_741_064_647_000, 1_741_064_647 + 300),
        ];
        for (sent_at, expires_at) in cases {
            let step = open_step(&strategies::token_keys(), 300, &info, sent_at, now).unwrap();
            assert_eq!(step.expires_at.timestamp(), expires_at, "sent at {sent_at}");
        }
    }

    #[test]
    fn no_step_for_an_amount_that_is_not_positive() {
        for amount_cents in [0, -1, i64::MIN] {
            let info = InfoGenerated {
                order_id: "o-1".to_owned(),
                supplier: "s".to_owned(),
                payment_methods: vec![],
                amount_cents,
            };
            let error = open_step(&strategies::token_keys(), 300, &info, 0, 0).unwrap_err();
            assert!(
                error.to_string().contains("not a positive amount"),
                "{error}"
            );
        }
    }
}
