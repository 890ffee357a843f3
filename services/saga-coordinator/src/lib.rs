//! saga-coordinator: what choreography cannot do alone.
//!
//! - **Saga state**: running / completed / cancelled and the step each saga
//!   waits on, from the events it sees (it consumes every event).
//! - **Durable timers** ([`timers`]): generate-info and flow armed on
//!   `order.started` (counted from when it was sent, never from later than
//!   now: [`deadline`]), payment armed on `payment.awaiting` (at the token's
//!   expiry); a fired timer becomes `saga.timed-out`.
//! - **The payment step**: opened by the first genuine `payment.awaiting` of
//!   an order, which fixes its amount, methods and the one token it accepts
//!   (`payment_steps`); an order started again with other content, or a
//!   second step with another token, is recorded as a rejection and changes
//!   nothing. An order is priced once.
//! - **The payment decision**: a submitted token that is exactly the one the
//!   step was opened with, unexpired, unused, while the step is open and the
//!   saga running, becomes `payment.selected.<method>` for the step's amount
//!   (or `payment.rejected` when the merchant does not accept the method);
//!   anything else becomes `payment.submission-rejected` with the reason and
//!   changes nothing. What a token claims never decides an amount: a token
//!   re-signed for another amount is not the step's token. The accepted
//!   method is recorded on the step; payment providers charge only what is
//!   recorded there.
//! - **Execution history** ([`history`]) of every order.
//! - **Retention** ([`retention`]): finished sagas, with their timers,
//!   history, used tokens and payment step, are pruned once they ended
//!   longer ago than `ORDERFLOW_RETENTION_DAYS`.

pub mod history;
pub mod retention;
mod sagas;
pub mod timers;

pub use sagas::{SagaStatus, SagaStep};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, run_worker};
use orderflow_shared::bus::{HandleError, Handler, Message, Outgoing};
use orderflow_shared::events::{
    Event, PaymentRejected, PaymentSelected, PaymentSubmitted, Step, SubmissionRejected,
};
use orderflow_shared::store::{Context, Db, UnitOfWork};
use orderflow_shared::token::{self, TokenKeys};

use crate::retention::SagaRetention;
use crate::sagas::Sagas;
use crate::timers::{Settled, TimerLoop, TimerWake};

pub const SERVICE: &str = "saga-coordinator";

/// The step a payment token must be for.
const PAYMENT_STEP: Step = Step::Payment;

/// The reason of `payment.rejected` when the merchant does not accept the method.
pub const METHOD_NOT_ALLOWED: &str = "method not allowed";

/// The saga timeouts (docs/design.md §3.4), configurable.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub generate_info: Duration,
    pub flow: Duration,
}

pub struct CoordinatorHandler {
    db: Db,
    keys: TokenKeys,
    timeouts: Timeouts,
    /// Tells the timer loop about deadlines earlier than its next wake-up.
    wake: Arc<TimerWake>,
}

/// Not yet decidable: the step this submission is for was not opened yet
/// (the coordinator has not seen `payment.awaiting`); retried later.
#[derive(Debug, thiserror::Error)]
#[error("payment step of order {0} is not open yet; retrying until payment.awaiting arrives")]
struct StepNotOpenYet(String);

/// When a step armed by a message sent at `sent_millis` (milliseconds since
/// the epoch, [`Envelope::time_millis`]) is due: `timeout` after the message
/// was sent, so a message handled late keeps its deadline.
///
/// A message cannot have been sent after it is handled: a time later than
/// `now` (a clock ahead, or a publisher's absurd AMQP timestamp, anything up
/// to `u64::MAX` seconds) counts as `now`, so the deadline is at most
/// `now + timeout`, never a date so far ahead that the saga could not time
/// out, and never an overflow. A timeout no date can hold (settings are
/// validated to 365 days; only settings built in code can be larger) gives
/// the latest date there is: never.
///
/// [`Envelope::time_millis`]: orderflow_shared::envelope::Envelope::time_millis
pub fn deadline(sent_millis: u64, timeout: Duration, now: DateTime<Utc>) -> DateTime<Utc> {
    let sent = i64::try_from(sent_millis)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .filter(|sent| *sent <= now)
        .unwrap_or(now);
    chrono::Duration::from_std(timeout)
        .ok()
        .and_then(|timeout| sent.checked_add_signed(timeout))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The payment step of an order, as the coordinator opened it, and whether
/// the token being judged was used before.
#[derive(Debug, sqlx::FromRow)]
struct PaymentStep {
    token_digest: String,
    amount_cents: i64,
    methods: Vec<String>,
    used: bool,
}

/// Why a `payment.awaiting` does not open (or reopen) the payment step;
/// `None` when it is the step's own.
fn awaiting_mismatch(
    keys: &TokenKeys,
    awaiting: &orderflow_shared::events::PaymentAwaiting,
) -> Option<String> {
    // Signature and claims, whatever the time: an awaiting handled late still
    // opens its step (whose timer then fires at once).
    let claims = match keys.verify(&awaiting.token, i64::MIN) {
        Ok(claims) => claims,
        Err(error) => return Some(format!("its token is not genuine: {error}")),
    };
    if claims.order_id != awaiting.order_id
        || claims.step != PAYMENT_STEP.as_str()
        || claims.amount_cents != awaiting.amount_cents
        || claims.methods != awaiting.payment_methods
        || claims.expires_at != awaiting.expires_at.timestamp()
    {
        return Some(
            "its token does not match the order, amount, methods or deadline it carries".to_owned(),
        );
    }
    if awaiting.amount_cents <= 0 {
        return Some(format!(
            "amount {} is not a positive amount; nothing can be charged",
            awaiting.amount_cents
        ));
    }
    None
}

impl CoordinatorHandler {
    pub fn new(db: Db, keys: TokenKeys, timeouts: Timeouts, wake: Arc<TimerWake>) -> Self {
        Self {
            db,
            keys,
            timeouts,
            wake,
        }
    }

    /// Opens the payment step with `awaiting` unless one is open, and arms
    /// its timer with it (one statement; the timer only for the step's own
    /// token, never moved once armed): `Ok(())` when this is the step's
    /// token (newly or already), else why not.
    async fn open_payment_step(
        &self,
        unit: &mut UnitOfWork,
        awaiting: &orderflow_shared::events::PaymentAwaiting,
    ) -> Result<Result<(), String>, sqlx::Error> {
        if let Some(reason) = awaiting_mismatch(&self.keys, awaiting) {
            return Ok(Err(format!("payment.awaiting ignored: {reason}")));
        }
        let digest = token::digest(&awaiting.token);
        let recorded: String = sqlx::query_scalar(
            "WITH step AS ( \
               INSERT INTO payment_steps (order_id, token_digest, amount_cents, methods, \
                 expires_at) VALUES ($1, $2, $3, $4, $5) \
               ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id \
               RETURNING token_digest), \
             armed AS ( \
               INSERT INTO timers (order_id, step, due_at) \
               SELECT $1, $6, $5 FROM step WHERE step.token_digest = $2 \
               ON CONFLICT (order_id, step) DO NOTHING) \
             SELECT token_digest FROM step",
        )
        .bind(&awaiting.order_id)
        .bind(&digest)
        .bind(awaiting.amount_cents)
        .bind(&awaiting.payment_methods)
        .bind(awaiting.expires_at)
        .bind(Step::Payment)
        .fetch_one(unit.conn())
        .await?;
        if recorded == digest {
            Ok(Ok(()))
        } else {
            Ok(Err(
                "payment.awaiting ignored: the payment step of this order is already open with \
                 another token (an order is priced once)"
                    .to_owned(),
            ))
        }
    }

    /// The decision on a submission, within `unit`, which closes the payment
    /// step and records the token when it is accepted.
    async fn decide(
        &self,
        unit: &mut UnitOfWork,
        submitted: &PaymentSubmitted,
        status: SagaStatus,
    ) -> Result<Event, HandleError> {
        let reject = |reason: String| {
            Ok(Event::SubmissionRejected(SubmissionRejected {
                order_id: submitted.order_id.clone(),
                reason,
            }))
        };
        let now = Utc::now().timestamp();
        let claims = match self.keys.verify(&submitted.token, now) {
            Ok(claims) => claims,
            Err(error) => return reject(error.to_string()),
        };
        if claims.order_id != submitted.order_id {
            return reject("token belongs to another order".to_owned());
        }
        if claims.step != PAYMENT_STEP.as_str() {
            return reject(format!(
                "token is for step `{}`, not `{PAYMENT_STEP}`",
                claims.step
            ));
        }
        let digest = token::digest(&submitted.token);
        let step: Option<PaymentStep> = sqlx::query_as(
            "SELECT token_digest, amount_cents, methods, \
               EXISTS (SELECT 1 FROM used_tokens WHERE token_digest = $2) AS used \
             FROM payment_steps WHERE order_id = $1",
        )
        .bind(&submitted.order_id)
        .bind(&digest)
        .fetch_optional(unit.conn())
        .await?;
        let Some(step) = step else {
            if status != SagaStatus::Running {
                return reject(format!("order is already {status}"));
            }
            // A genuine token whose payment.awaiting we have not seen yet.
            return Err(HandleError::not_yet(StepNotOpenYet(
                submitted.order_id.clone(),
            )));
        };
        if step.token_digest != digest {
            // Genuine signature, other claims (an amount re-signed with a
            // leaked key, a token of another attempt): not this step's token.
            return reject("token is not the one issued for this order's payment step".to_owned());
        }
        if step.used {
            return reject("token already used".to_owned());
        }
        if status != SagaStatus::Running {
            return reject(format!("order is already {status}"));
        }
        match timers::settle(unit.conn(), &submitted.order_id, Step::Payment).await? {
            Settled::Won => {}
            Settled::TimedOut => return reject("payment step timed out".to_owned()),
            Settled::NotOpen => return reject("payment step is not open".to_owned()),
        }
        // The token is used either way; what the providers will charge for
        // (the step's amount, this method) is recorded only for a method the
        // merchant accepts. One statement.
        let allowed = step.methods.contains(&submitted.method);
        sqlx::query(
            "WITH used AS ( \
               INSERT INTO used_tokens (token_digest, order_id, method) VALUES ($1, $2, $3)) \
             UPDATE payment_steps SET accepted_method = $3, accepted_at = now() \
             WHERE order_id = $2 AND $4",
        )
        .bind(&digest)
        .bind(&submitted.order_id)
        .bind(&submitted.method)
        .bind(allowed)
        .execute(unit.conn())
        .await?;
        if !allowed {
            return Ok(Event::PaymentRejected(PaymentRejected {
                order_id: submitted.order_id.clone(),
                method: submitted.method.clone(),
                reason: METHOD_NOT_ALLOWED.to_owned(),
            }));
        }
        Ok(Event::PaymentSelected(PaymentSelected {
            order_id: submitted.order_id.clone(),
            method: submitted.method.clone(),
            amount_cents: step.amount_cents,
        }))
    }

    /// Applies one event to its saga (locked in `sagas`) within `unit`,
    /// recording it (and what the coordinator sends because of it) in
    /// `history`; the earliest deadline it armed, if any.
    async fn apply(
        &self,
        unit: &mut UnitOfWork,
        sagas: &mut Sagas,
        history: &mut history::Pending,
        settling: &mut timers::Settling,
        message: &Message,
    ) -> Result<Option<DateTime<Utc>>, HandleError> {
        let order_id = message.order_id();
        let Some(saga) = sagas.get(order_id) else {
            return Err(HandleError::transient(anyhow::anyhow!(
                "the saga of order {order_id} was not locked with its unit of work"
            )));
        };
        let status = saga.status;
        let first_digest = saga.started_digest.clone();
        let running = status == SagaStatus::Running;
        let sent = message.envelope.time_millis();
        let now = Utc::now();
        let mut armed = None;
        let mut rejected = None;
        let mut decided = None;
        match &message.event {
            Event::OrderStarted(started)
                if first_digest.as_deref() != Some(started.content_digest().as_str()) =>
            {
                rejected = Some(
                    "order.started ignored: this order was already started with other content \
                     (supplier, products or address); an order is priced once"
                        .to_owned(),
                );
                tracing::warn!(%order_id, message_id = %message.envelope.message_id, "order started again with other content; ignored");
            }
            Event::OrderStarted(_) if running => {
                let conn = unit.conn();
                let info_due = deadline(sent, self.timeouts.generate_info, now);
                let flow_due = deadline(sent, self.timeouts.flow, now);
                timers::arm(
                    conn,
                    order_id,
                    &[(Step::GenerateInfo, info_due), (Step::Flow, flow_due)],
                )
                .await?;
                sagas.progress(order_id, Some(SagaStep::GenerateInfo));
                armed = Some(info_due.min(flow_due));
            }
            Event::InfoGenerated(_) | Event::InfoRejected(_) => {
                settling.complete(order_id, Step::GenerateInfo);
                sagas.progress(order_id, Some(SagaStep::PaymentWait));
            }
            Event::PaymentAwaiting(awaiting) if running => {
                match self.open_payment_step(unit, awaiting).await? {
                    Ok(()) => {
                        sagas.progress(order_id, Some(SagaStep::Payment));
                        armed = Some(awaiting.expires_at);
                    }
                    Err(reason) => {
                        tracing::warn!(%order_id, message_id = %message.envelope.message_id, %reason, "payment step not opened");
                        rejected = Some(reason);
                    }
                }
            }
            Event::PaymentSubmitted(submitted) => {
                let decision = self.decide(unit, submitted, status).await?;
                match &decision {
                    Event::PaymentSelected(s) => {
                        tracing::info!(%order_id, method = %s.method, amount_cents = s.amount_cents, "payment accepted");
                        sagas.progress(order_id, Some(SagaStep::Paying));
                    }
                    Event::PaymentRejected(r) => {
                        tracing::info!(%order_id, method = %r.method, reason = %r.reason, "payment method rejected");
                    }
                    Event::SubmissionRejected(r) => {
                        tracing::warn!(%order_id, reason = %r.reason, "payment submission rejected");
                    }
                    _ => {}
                }
                decided = Some(decision);
            }
            Event::OrderCompleted(_) | Event::OrderCancelled(_) => {
                let ended = if matches!(message.event, Event::OrderCompleted(_)) {
                    SagaStatus::Completed
                } else {
                    SagaStatus::Cancelled
                };
                if sagas.end(order_id, ended) {
                    settling.end(order_id);
                }
            }
            _ => sagas.progress(order_id, None),
        }
        history.push(
            &message.envelope,
            &message.event,
            history::classify(&message.event, Some(status)),
            rejected.as_deref(),
        );
        if let Some(decision) = decided {
            // The coordinator does not consume its own decisions: they go
            // into the history here, with the message id they are sent with.
            let outgoing = Outgoing::event(&decision, Some(&message.envelope));
            let kind = history::classify(&decision, Some(status));
            history.push(&outgoing.envelope, &decision, kind, None);
            unit.emit(outgoing);
        }
        Ok(armed)
    }

    /// Applies `messages` in one unit of work: their inbox rows, their sagas
    /// locked together, each message in turn (in order-id order, an order's
    /// messages in delivery order), the sagas and the history written back
    /// together; then tells the timer loop about the earliest new deadline.
    async fn apply_all(&self, messages: &[&Message]) -> Result<(), HandleError> {
        let mut sorted: Vec<&Message> = messages.to_vec();
        sorted.sort_by(|a, b| a.order_id().cmp(b.order_id()));
        let mut unit = self.db.begin_unit_without_inbox().await?;
        let inputs: Vec<(&str, &str, Option<String>)> = sorted
            .iter()
            .map(|m| {
                let digest = match &m.event {
                    Event::OrderStarted(started) => Some(started.content_digest()),
                    _ => None,
                };
                (m.envelope.message_id.as_str(), m.order_id(), digest)
            })
            .collect();
        let (admitted, mut sagas) = Sagas::admit_and_lock(unit.conn(), SERVICE, &inputs).await?;
        let fresh: Vec<&Message> = sorted
            .into_iter()
            .zip(admitted)
            .filter_map(|(message, admitted)| admitted.then_some(message))
            .collect();
        if fresh.is_empty() {
            return Ok(()); // every one applied before: nothing to write
        }
        let mut history = history::Pending::default();
        let mut settling = timers::Settling::default();
        let mut armed: Option<DateTime<Utc>> = None;
        for message in fresh {
            if let Some(due) = self
                .apply(&mut unit, &mut sagas, &mut history, &mut settling, message)
                .await?
            {
                armed = Some(armed.map_or(due, |earlier| earlier.min(due)));
            }
        }
        sagas.write_and_commit(&history, &settling, unit).await?;
        if let Some(due) = armed {
            self.wake.armed(due);
        }
        Ok(())
    }
}

impl Handler for CoordinatorHandler {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        self.apply_all(&[message]).await
    }

    fn batch_size(&self) -> usize {
        BATCH_SIZE
    }

    /// The batch in one transaction. Sagas are locked in order-id order, so
    /// two concurrent batches never wait for each other in a cycle; the
    /// events of one order keep their delivery order.
    async fn handle_batch(&self, messages: &[Message]) -> Result<(), HandleError> {
        let messages: Vec<&Message> = messages.iter().collect();
        self.apply_all(&messages).await
    }
}

/// Deliveries applied in one transaction at most (whatever already waits).
const BATCH_SIZE: usize = 32;

/// Runs the coordinator (consumer, timer loop, outbox relay, retention of
/// finished sagas and of the inbox) until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let db = ctx.db(Context::Coordinator).await?;
    let wake = Arc::new(TimerWake::default());
    let timeouts = Timeouts {
        generate_info: Duration::from_secs(ctx.settings.generate_info_timeout_secs),
        flow: Duration::from_secs(ctx.settings.flow_timeout_secs),
    };
    let handler = Arc::new(CoordinatorHandler::new(
        db.clone(),
        ctx.require_token_keys()?.clone(),
        timeouts,
        wake.clone(),
    ));
    let timer_loop = tokio::spawn(TimerLoop::new(db.clone(), wake).run(shutdown.clone()));
    let retention = tokio::spawn(
        SagaRetention::new(db.clone(), ctx.settings.retention()).run(shutdown.clone()),
    );
    run_worker(&ctx, SERVICE, handler, Some(db), shutdown).await?;
    timer_loop.await?;
    retention.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use orderflow_shared::events::PaymentAwaiting;
    use orderflow_shared::strategies;
    use orderflow_shared::token::Claims;
    use proptest::prelude::*;

    use super::*;

    fn timeout() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_mins(5)),
            Just(Duration::from_secs(
                orderflow_shared::config::MAX_TIMEOUT_SECS
            )),
            Just(Duration::MAX),
            (any::<u64>(), 0..1_000_000_000_u32).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    /// An awaiting as payment-wait makes it (its token minted from its own
    /// fields), then perhaps with one field changed afterwards.
    fn awaiting() -> impl Strategy<Value = (PaymentAwaiting, bool)> {
        (
            strategies::text(),
            prop::collection::vec(strategies::text(), 0..3),
            strategies::extreme_i64(),
            strategies::date(),
            0..6_u8,
            strategies::text(),
            strategies::extreme_i64(),
        )
            .prop_map(
                |(order_id, methods, amount, expires_at, change, text, number)| {
                    let claims = Claims {
                        order_id: order_id.clone(),
                        step: PAYMENT_STEP.as_str().to_owned(),
                        attempt: 1,
                        methods: methods.clone(),
                        amount_cents: amount,
                        expires_at: expires_at.timestamp(),
                        kid: "test".to_owned(),
                    };
                    let mut awaiting = PaymentAwaiting {
                        order_id,
                        token: strategies::token_keys().mint(&claims).unwrap(),
                        payment_methods: methods,
                        amount_cents: amount,
                        expires_at,
                    };
                    let changed = match change {
                        0 => std::mem::replace(&mut awaiting.order_id, text.clone()) != text,
                        1 => std::mem::replace(&mut awaiting.token, text.clone()) != text,
                        2 => std::mem::replace(&mut awaiting.amount_cents, number) != number,
                        3 => {
                            let later = expires_at
                                .checked_add_signed(chrono::Duration::seconds(1))
                                .unwrap_or(DateTime::<Utc>::MIN_UTC);
                            std::mem::replace(&mut awaiting.expires_at, later) != later
                        }
                        _ => false,
                    };
                    (awaiting, changed)
                },
            )
    }

    proptest! {
        /// Any message time, any timeout, any now: a deadline, never a
        /// panic; `timeout` after the message was sent when it was sent by
        /// now, never later than `now + timeout`.
        #[test]
        fn deadlines_never_overflow(
            sent in strategies::extreme_u64(),
            timeout in timeout(),
            now in prop_oneof![strategies::date(), Just(Utc::now())],
        ) {
            let due = deadline(sent, timeout, now);
            let timeout = chrono::Duration::from_std(timeout).ok();
            if let Some(latest) = timeout.and_then(|t| now.checked_add_signed(t)) {
                prop_assert!(due <= latest, "{due} after {latest}");
            }
            let sent_at = i64::try_from(sent)
                .ok()
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .filter(|at| *at <= now);
            if let Some(expected) = sent_at
                .zip(timeout)
                .and_then(|(at, t)| at.checked_add_signed(t))
            {
                prop_assert_eq!(due, expected);
            }
        }

        /// Any awaiting: a reason or none, never a panic; none exactly when
        /// its token was minted from what it carries and the amount is
        /// positive.
        #[test]
        fn an_awaiting_opens_the_step_only_with_its_own_token((awaiting, changed) in awaiting()) {
            let mismatch = awaiting_mismatch(&strategies::token_keys(), &awaiting);
            prop_assert_eq!(mismatch.is_none(), !changed && awaiting.amount_cents > 0, "{:?}", mismatch);
        }

        /// Any awaiting at all (a token of anything): never a panic.
        #[test]
        fn any_awaiting_is_judged(event in strategies::event()) {
            if let Event::PaymentAwaiting(awaiting) = event {
                prop_assert!(awaiting_mismatch(&strategies::token_keys(), &awaiting).is_some());
            }
        }
    }

    #[test]
    fn a_message_sent_in_the_future_counts_from_now() {
        let now = DateTime::parse_from_rfc3339("2025-03-04T05:06:07Z")
            .unwrap()
            .with_timezone(&Utc);
        let five_minutes = Duration::from_mins(5);
        let expected = now + chrono::Duration::minutes(5);
        // u64::MAX, 8e12 s (year 255 479), chrono's latest second.
        for sent_secs in [u64::MAX / 1000, 8_000_000_000_000, 8_210_266_876_799] {
            assert_eq!(deadline(sent_secs * 1000, five_minutes, now), expected);
        }
        assert_eq!(deadline(u64::MAX, five_minutes, now), expected);
        // A message sent a minute ago keeps its deadline.
        let sent = u64::try_from((now - chrono::Duration::minutes(1)).timestamp_millis()).unwrap();
        assert_eq!(
            deadline(sent, five_minutes, now),
            now + chrono::Duration::minutes(4)
        );
        assert_eq!(deadline(sent, Duration::MAX, now), DateTime::<Utc>::MAX_UTC);
    }
}
