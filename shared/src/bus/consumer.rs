//! The consumer runtime: manual ack, bounded prefetch, bounded concurrency,
//! graceful shutdown (stop taking, finish in-flight, then close), reconnection
//! with backoff, and the retry ladder of docs/design.md §4.5:
//!
//! 1. a transient error is retried in-process with exponential backoff (backon);
//!    a message that only waits for another one already on its way
//!    ([`HandleError::NotYet`]) sooner and for longer ([`NOT_YET_DELAYS`]);
//! 2. then the message goes through the delay tiers (`orderflow.<svc>.retry.*`,
//!    TTL queues that dead-letter back to the service queue through
//!    `orderflow.<svc>.redeliver`);
//! 3. then, or at once for a permanent error, it goes to `orderflow.<svc>.dead`
//!    with the reason and the service in headers.
//!
//! Delays and dead letters are published to the service's own fanout
//! exchanges with the routing key the message came with, never through
//! `amq.default`: the event type is always the delivery's routing key.
//!
//! A message is acked only after the handler returned (its effects committed)
//! or after its copy in a delay/dead-letter queue is confirmed. Nothing is
//! requeued forever: the service queue also has a broker-side delivery limit.
//!
//! # Pausing
//!
//! An operator may pause a service's consumption (`orderflow pause SERVICE`,
//! or the console): its queue fills, its orders wait at its step, and the
//! saga's timers go on running. The paused state lives on the broker, in the
//! service's pause queue `orderflow.<svc>.pause`, which holds a marker
//! message while the service is paused. Every consumer of the service, in
//! every process, looks at that queue's message count with a passive
//! declaration (which needs no permission: a service's broker user still
//! configures nothing and reads only its own queue) before it consumes, and
//! then every [`ConsumerOptions::pause_check`] while it consumes. When it
//! finds the marker, it cancels its consumer, handles what the broker had
//! already delivered to it (nothing is handed back, so no delivery count
//! rises), and waits, looking again at the same interval, until the marker
//! is gone. A worker started while its service is paused starts paused.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::message::Message;
use super::{Broker, BusError, PublishError, Publisher, reconnect_backoff};
use crate::Shutdown;
use crate::envelope::{Envelope, headers};
use crate::topology::{ExchangeRole, QueueRole};

/// How handling a message failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might work later (database or broker unavailable, a timeout).
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Will never work (invalid data, a broken invariant).
    #[error("permanent: {0:#}")]
    Permanent(anyhow::Error),
    /// Transient, and expected to pass within milliseconds: the message
    /// arrived before another one it depends on, which is already on its way
    /// (a payment submission before the coordinator applied the order's
    /// `payment.awaiting`). Retried in process at [`NOT_YET_DELAYS`] rather
    /// than the consumer's backoff, then through the delay tiers like any
    /// transient error.
    #[error("not yet: {0:#}")]
    NotYet(anyhow::Error),
}

impl HandleError {
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        Self::Transient(error.into())
    }

    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        Self::Permanent(error.into())
    }

    /// See [`HandleError::NotYet`].
    pub fn not_yet(error: impl Into<anyhow::Error>) -> Self {
        Self::NotYet(error.into())
    }

    /// Might work later ([`Transient`](Self::Transient) or
    /// [`NotYet`](Self::NotYet)).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::NotYet(_))
    }

    pub fn is_not_yet(&self) -> bool {
        matches!(self, Self::NotYet(_))
    }
}

/// The pauses before the in-process retries of a message that is
/// [`NotYet`](HandleError::NotYet) applicable: short at first (what it waits
/// for is usually a few milliseconds behind), doubling, ≈ 0.5 s in all, about
/// as long as the consumer's backoff waits in all for three retries. The
/// consumer's first backoff (50–100 ms) was what such a message cost before,
/// when most of them could have gone on after 2 ms.
pub const NOT_YET_DELAYS: [Duration; 8] = [
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
    Duration::from_millis(128),
    Duration::from_millis(256),
];

/// The in-process retries of one message: a transient error waits what the
/// consumer's backoff proposes, at most `transient_limit` times; a
/// [`NotYet`](HandleError::NotYet) error waits [`NOT_YET_DELAYS`] in turn.
/// Each kind has its own count, so a message that waited for another and
/// then met a transient error still gets every retry of the backoff.
#[derive(Debug)]
struct InProcessRetries {
    transient_limit: usize,
    transient: usize,
    not_yet: usize,
}

impl InProcessRetries {
    fn new(transient_limit: usize) -> Self {
        Self {
            transient_limit,
            transient: 0,
            not_yet: 0,
        }
    }

    /// The pause before the next retry after `error`, or `None` to stop
    /// retrying in process; `proposed` is the backoff's next pause.
    fn next(&mut self, error: &HandleError, proposed: Option<Duration>) -> Option<Duration> {
        if error.is_not_yet() {
            let pause = NOT_YET_DELAYS.get(self.not_yet).copied();
            self.not_yet += 1;
            return pause;
        }
        self.transient += 1;
        if self.transient > self.transient_limit {
            return None;
        }
        proposed
    }
}

/// The database refused a message's data itself: the same message would be
/// refused the same way every time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database cannot store this message's data ({detail}); it would be refused again, so \
     it is not retried"
)]
pub struct Unstorable {
    detail: String,
}

/// SQLSTATE classes that say the data is at fault, not the database:
/// 22 (data exception: a NUL character in a text, a date out of range, a
/// value too large) and 54 (program limit exceeded: a key too large for its
/// index).
const DATA_FAULT_CLASSES: [&str; 2] = ["22", "54"];

/// Database errors are transient (the database may come back), except those
/// that say the message's data cannot be stored ([`Unstorable`]: an SQLSTATE
/// of class 22 or 54, or a value sqlx cannot encode): those are permanent,
/// so the message is dead-lettered at once with the database's reason
/// instead of going through every delay tier first.
impl From<sqlx::Error> for HandleError {
    fn from(error: sqlx::Error) -> Self {
        let refused = match &error {
            sqlx::Error::Database(db) => db
                .code()
                .filter(|code| {
                    DATA_FAULT_CLASSES
                        .iter()
                        .any(|class| code.starts_with(class))
                })
                .map(|code| format!("SQLSTATE {code}: {}", db.message())),
            sqlx::Error::Encode(cause) => Some(format!("cannot encode a value: {cause}")),
            _ => None,
        };
        match refused {
            Some(detail) => Self::Permanent(Unstorable { detail }.into()),
            None => Self::Transient(error.into()),
        }
    }
}

/// Publishing fails transiently (the broker may come back, the topology be
/// declared), except for a message that cannot be put on the wire at all
/// ([`PublishError::Invalid`]), which is permanent.
impl From<PublishError> for HandleError {
    fn from(error: PublishError) -> Self {
        if error.is_permanent() {
            Self::Permanent(error.into())
        } else {
            Self::Transient(error.into())
        }
    }
}

/// What a worker implements: handle one decoded message; optionally, several
/// at once with one effect (one transaction).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: &Message) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Most deliveries the runtime hands to [`handle_batch`](Handler::handle_batch)
    /// at once: whatever is already waiting in the prefetch buffer, never
    /// waiting for more. 1 (the default) never batches.
    fn batch_size(&self) -> usize {
        1
    }

    /// Handles `messages` all or nothing (one transaction). On any error the
    /// runtime forgets the batch and handles each message on its own
    /// ([`handle`](Handler::handle), with the usual retries and dead
    /// letters), so an implementation must leave no effect when it fails.
    /// Only called when [`batch_size`](Handler::batch_size) is above 1.
    fn handle_batch(
        &self,
        messages: &[Message],
    ) -> impl Future<Output = Result<(), HandleError>> + Send {
        async move {
            let _ = messages;
            Err(HandleError::Permanent(anyhow::anyhow!(
                "this handler does not handle batches"
            )))
        }
    }
}

/// Deliveries every consumer of this process has received (redeliveries
/// included): what `orderflow bench` reports per order.
static DELIVERIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many deliveries the consumers of this process have received so far.
pub fn deliveries_received() -> u64 {
    DELIVERIES.load(std::sync::atomic::Ordering::Relaxed)
}

/// How a service consumes its queue.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// The service name; its queue is `orderflow.<service>`.
    pub service: String,
    /// Unacknowledged deliveries the broker may push to this consumer.
    pub prefetch: u16,
    /// Handler invocations in flight at once.
    pub concurrency: usize,
    /// In-process retries of a transient error before the delay tiers.
    pub in_process_retries: usize,
    /// First in-process retry delay (doubling, with jitter).
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    /// Raised while the consumer has a channel consuming its queue; lowered
    /// while it reconnects and once it stopped; "paused" while an operator
    /// paused the service. Clone it before starting the consumer to watch it
    /// (health checks).
    pub consuming: Consuming,
    /// How often a consumer looks at its service's pause queue (see the
    /// module's documentation): before it consumes, and this often while it
    /// consumes or is paused.
    pub pause_check: Duration,
}

/// Whether a consumer has a channel consuming its queue right now: a cheap
/// health signal. It drops as soon as the consumer notices its channel or
/// connection is gone (a closed connection at once, a silent one when the
/// AMQP heartbeat misses) and rises again once it consumes anew. While an
/// operator has paused the service, the consumer is connected but not
/// consuming: [`is_paused`](Self::is_paused).
#[derive(Clone, Debug, Default)]
pub struct Consuming(Arc<AtomicU8>);

const STOPPED: u8 = 0;
const CONSUMING: u8 = 1;
const PAUSED: u8 = 2;

impl Consuming {
    pub fn is_consuming(&self) -> bool {
        self.0.load(Ordering::Acquire) == CONSUMING
    }

    /// Connected to the broker, and not consuming because an operator
    /// paused the service.
    pub fn is_paused(&self) -> bool {
        self.0.load(Ordering::Acquire) == PAUSED
    }

    /// Sets `state` until the returned guard is dropped.
    fn set(&self, state: u8) -> ConsumingGuard<'_> {
        self.0.store(state, Ordering::Release);
        ConsumingGuard(self)
    }
}

/// Lowers the [`Consuming`] flag when a consuming session ends, however it ends.
struct ConsumingGuard<'a>(&'a Consuming);

impl Drop for ConsumingGuard<'_> {
    fn drop(&mut self) {
        self.0.0.store(STOPPED, Ordering::Release);
    }
}

/// How often a consumer looks whether its service is paused, by default.
pub const DEFAULT_PAUSE_CHECK: Duration = Duration::from_secs(1);

impl ConsumerOptions {
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            prefetch: 64,
            concurrency: 16,
            in_process_retries: 3,
            retry_min_delay: Duration::from_millis(50),
            retry_max_delay: Duration::from_secs(1),
            consuming: Consuming::default(),
            pause_check: DEFAULT_PAUSE_CHECK,
        }
    }
}

/// What every task of one consumer shares: its handler and options, and the
/// queues and exchanges of its service it takes from and parks messages on.
struct ConsumerState<H> {
    broker: Broker,
    options: ConsumerOptions,
    handler: Arc<H>,
    publisher: Publisher,
    queue: String,
    /// Where undeliverable messages are parked (fanout to the dead-letter queue).
    dead_exchange: String,
    /// Where parked messages come back from (only the broker and operators
    /// publish there).
    redeliver_exchange: String,
    /// The delay exchanges (fanout to the delay queues), in tier order.
    delay_exchanges: Vec<String>,
    /// Holds a marker while an operator has paused the service.
    pause_queue: String,
}

/// Consumes the service queue until `shutdown`, coming back by itself when the
/// broker connection drops. Returns once in-flight messages are finished.
pub async fn run_consumer<H: Handler>(
    broker: Broker,
    options: ConsumerOptions,
    handler: Arc<H>,
    shutdown: Shutdown,
) -> Result<(), BusError> {
    let topology = broker.topology();
    let service = options.service.clone();
    let queue_of = |role: &QueueRole| {
        topology
            .queue(&service, role)
            .map(|q| q.name.clone())
            .ok_or_else(|| BusError::UnknownService(service.clone()))
    };
    let exchange_of = |role: ExchangeRole| {
        topology
            .exchange(&service, role)
            .map(|e| e.name.clone())
            .ok_or_else(|| BusError::UnknownService(service.clone()))
    };
    let queue = queue_of(&QueueRole::Service)?;
    let pause_queue = queue_of(&QueueRole::Pause)?;
    let dead_exchange = exchange_of(ExchangeRole::DeadLetter)?;
    let redeliver_exchange = exchange_of(ExchangeRole::Redeliver)?;
    let delay_exchanges = topology
        .retry_tiers
        .iter()
        .map(|tier| exchange_of(ExchangeRole::Delay(*tier)))
        .collect::<Result<Vec<_>, _>>()?;
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let state = Arc::new(ConsumerState {
        publisher: broker.publisher(),
        broker,
        options,
        handler,
        queue,
        dead_exchange,
        redeliver_exchange,
        delay_exchanges,
        pause_queue,
    });
    let mut tasks = JoinSet::new();
    let mut delays = reconnect_backoff();
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        match session(&state, &permits, &mut tasks, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                if started.elapsed() > Duration::from_secs(30) {
                    delays = reconnect_backoff();
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(
                    service = %state.options.service,
                    %error,
                    ?delay,
                    "consumer lost its channel; reconnecting (unacked messages will be redelivered)"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!(service = %state.options.service, "consumer stopped");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer (queue deleted?)")]
    Cancelled,
    #[error(
        "cannot tell whether the service is paused: its pause queue {queue} cannot be read \
         ({cause}); declare the topology of this version (`orderflow topology declare`)"
    )]
    PauseQueue { queue: String, cause: lapin::Error },
}

/// Why a consuming stretch ended without an error.
enum Stop {
    Shutdown,
    Paused,
}

/// Whether an operator has paused the service: its pause queue holds a
/// marker (a passive declaration, which needs no permission).
async fn paused<H: Handler>(
    state: &ConsumerState<H>,
    channel: &Channel,
) -> Result<bool, SessionError> {
    let declared = channel
        .queue_declare(
            state.pause_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|cause| SessionError::PauseQueue {
            queue: state.pause_queue.clone(),
            cause,
        })?;
    Ok(declared.message_count() > 0)
}

/// One channel's life: consume until shutdown (Ok) or until the channel
/// dies; while the service is paused, wait instead of consuming.
async fn session<H: Handler>(
    state: &Arc<ConsumerState<H>>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    shutdown: &Shutdown,
) -> Result<(), SessionError> {
    let channel = state.broker.channel().await?;
    channel
        .basic_qos(state.options.prefetch, BasicQosOptions::default())
        .await?;
    loop {
        if !wait_while_paused(state, &channel, shutdown).await? {
            break;
        }
        match consume(state, &channel, permits, tasks, shutdown).await? {
            Stop::Shutdown => break,
            Stop::Paused => {}
        }
    }
    let _ = channel.close(200, "shutting down".into()).await;
    Ok(())
}

/// Returns `true` once the service is not paused (at once when it is not),
/// `false` on shutdown.
async fn wait_while_paused<H: Handler>(
    state: &ConsumerState<H>,
    channel: &Channel,
    shutdown: &Shutdown,
) -> Result<bool, SessionError> {
    let service = &state.options.service;
    let mut guard = None;
    while paused(state, channel).await? {
        if guard.is_none() {
            tracing::warn!(
                %service,
                queue = %state.queue,
                "paused by an operator: not consuming; messages wait in the queue, the saga's \
                 timers go on (`orderflow resume {service}` resumes)"
            );
            guard = Some(state.options.consuming.set(PAUSED));
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(state.options.pause_check) => {}
        }
    }
    if guard.is_some() {
        tracing::info!(%service, "resumed by an operator: consuming again");
    }
    Ok(!shutdown.is_cancelled())
}

/// Consumes on `channel` until shutdown or a pause; either way, returns once
/// what is in flight is finished (and, on a pause, what the broker had
/// already delivered is handled).
async fn consume<H: Handler>(
    state: &Arc<ConsumerState<H>>,
    channel: &Channel,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    shutdown: &Shutdown,
) -> Result<Stop, SessionError> {
    let tag = format!("{}-{}", state.options.service, uuid::Uuid::now_v7());
    let mut consumer = channel
        .basic_consume(
            state.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _consuming = state.options.consuming.set(CONSUMING);
    tracing::info!(service = %state.options.service, queue = %state.queue, "consuming");
    let period = state.options.pause_check;
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Cancelled for a pause: the stream yields what was delivered, then ends.
    let mut pausing = false;
    let stop = loop {
        while let Some(result) = tasks.try_join_next() {
            if let Err(error) = result {
                tracing::error!(%error, "message task failed to complete");
            }
        }
        let permit = tokio::select! {
            () = shutdown.cancelled() => break Stop::Shutdown,
            _ = checks.tick(), if !pausing => {
                pausing = pause_if_paused(state, channel, &tag).await?;
                continue;
            }
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break Stop::Shutdown,
            _ = checks.tick(), if !pausing => {
                pausing = pause_if_paused(state, channel, &tag).await?;
                continue;
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(error.into()),
                None if pausing => break Stop::Paused,
                None => return Err(SessionError::Cancelled),
            },
        };
        // Whatever else is already waiting joins the batch (never waits).
        let mut batch = vec![delivery];
        let mut ended = None;
        while batch.len() < state.handler.batch_size() {
            match consumer.next().now_or_never() {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(error))) => {
                    ended = Some(Err(error.into()));
                    break;
                }
                Some(None) if pausing => {
                    ended = Some(Ok(Stop::Paused));
                    break;
                }
                Some(None) => {
                    ended = Some(Err(SessionError::Cancelled));
                    break;
                }
                None => break,
            }
        }
        DELIVERIES.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let state = state.clone();
        tasks.spawn(async move {
            if batch.len() == 1 {
                process(&state, batch.swap_remove(0)).await;
            } else {
                process_batch(&state, batch).await;
            }
            drop(permit);
        });
        match ended {
            Some(Ok(stop)) => break stop,
            Some(Err(error)) => return Err(error),
            None => {}
        }
    };
    // Take nothing more (already done for a pause), finish what is in flight.
    if matches!(stop, Stop::Shutdown) && !pausing {
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(error) = result {
            tracing::error!(%error, "message task failed to complete");
        }
    }
    Ok(stop)
}

/// Cancels the consumer `tag` when the service is paused; whether it did.
async fn pause_if_paused<H: Handler>(
    state: &ConsumerState<H>,
    channel: &Channel,
    tag: &str,
) -> Result<bool, SessionError> {
    if !paused(state, channel).await? {
        return Ok(false);
    }
    tracing::info!(
        service = %state.options.service,
        "an operator paused the service: stopping consumption after what was delivered"
    );
    channel
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await?;
    Ok(true)
}

/// Calls the handler; a panic becomes a permanent error instead of a lost message.
async fn call_handler<H: Handler>(handler: &H, message: &Message) -> Result<(), HandleError> {
    match AssertUnwindSafe(handler.handle(message))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(HandleError::Permanent(anyhow::anyhow!(
                "handler panicked: {what}"
            )))
        }
    }
}

/// Several deliveries through [`Handler::handle_batch`]; acked together when
/// it succeeds, else each one goes through [`process`] on its own.
async fn process_batch<H: Handler>(state: &ConsumerState<H>, deliveries: Vec<Delivery>) {
    let mut messages = Vec::with_capacity(deliveries.len());
    let mut decoded = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match Message::decode(&delivery, &state.redeliver_exchange) {
            Ok(message) => {
                messages.push(message);
                decoded.push(delivery);
            }
            Err(undecodable) => {
                let reason = format!("undecodable message: {}", undecodable.error);
                dead_letter(state, &delivery, &undecodable.envelope, 0, &reason).await;
            }
        }
    }
    if messages.is_empty() {
        return;
    }
    let handled = AssertUnwindSafe(state.handler.handle_batch(&messages))
        .catch_unwind()
        .await;
    match handled {
        Ok(Ok(())) => {
            for (delivery, message) in decoded.iter().zip(&messages) {
                tracing::debug!(
                    service = %state.options.service,
                    order_id = %message.envelope.correlation_id,
                    message_id = %message.envelope.message_id,
                    kind = %message.envelope.kind,
                    batch = messages.len(),
                    "handled"
                );
                ack(delivery, &message.envelope).await;
            }
        }
        failed => {
            let error = match failed {
                Ok(Err(error)) => format!("{error}"),
                _ => "handler panicked".to_owned(),
            };
            tracing::debug!(
                service = %state.options.service,
                messages = messages.len(),
                %error,
                "batch failed as a whole; handling its messages one by one"
            );
            // Concurrently: one message may wait (a retry) for another of
            // the same batch to be applied first.
            futures::future::join_all(decoded.into_iter().map(|delivery| process(state, delivery)))
                .await;
        }
    }
}

async fn process<H: Handler>(state: &ConsumerState<H>, delivery: Delivery) {
    let service = &state.options.service;
    let message = match Message::decode(&delivery, &state.redeliver_exchange) {
        Ok(message) => message,
        Err(undecodable) => {
            let reason = format!("undecodable message: {}", undecodable.error);
            dead_letter(state, &delivery, &undecodable.envelope, 0, &reason).await;
            return;
        }
    };
    let envelope = &message.envelope;
    // The backoff proposes a pause for every retry of either kind;
    // `InProcessRetries` counts and stops them.
    let backoff = ExponentialBuilder::default()
        .with_min_delay(state.options.retry_min_delay)
        .with_max_delay(state.options.retry_max_delay)
        .with_max_times(state.options.in_process_retries + NOT_YET_DELAYS.len())
        .with_jitter();
    let mut retries = InProcessRetries::new(state.options.in_process_retries);
    let result = (|| call_handler(state.handler.as_ref(), &message))
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(HandleError::is_transient)
        .adjust(|error, proposed| retries.next(error, proposed))
        .notify(|error, delay| {
            // tracing's levels are static: one call per level, same fields.
            macro_rules! retrying {
                ($level:ident, $what:literal) => {
                    tracing::$level!(
                        %service,
                        order_id = %envelope.correlation_id,
                        message_id = %envelope.message_id,
                        kind = %envelope.kind,
                        %error,
                        ?delay,
                        $what
                    )
                };
            }
            if error.is_not_yet() {
                // Expected now and then, and usually over at the next try.
                retrying!(debug, "waits for another message, retrying in process");
            } else {
                retrying!(warn, "transient failure, retrying in process");
            }
        })
        .await;
    let reason = match result {
        Ok(()) => {
            tracing::debug!(
                %service,
                order_id = %envelope.correlation_id,
                message_id = %envelope.message_id,
                kind = %envelope.kind,
                "handled"
            );
            ack(&delivery, envelope).await;
            return;
        }
        Err(HandleError::Permanent(error)) => format!("permanent failure: {error:#}"),
        Err(HandleError::Transient(error) | HandleError::NotYet(error)) => {
            if let Some(delay_exchange) = state.delay_exchanges.get(message.retries as usize) {
                delay(state, &delivery, &message, delay_exchange, &error).await;
                return;
            }
            format!(
                "gave up after {} delayed retries: {error:#}",
                state.delay_exchanges.len()
            )
        }
    };
    dead_letter(state, &delivery, envelope, message.retries, &reason).await;
}

async fn ack(delivery: &Delivery, envelope: &Envelope) {
    if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(
            order_id = %envelope.correlation_id,
            message_id = %envelope.message_id,
            %error,
            "ack failed (channel gone); the broker will redeliver and the inbox will skip it"
        );
    }
}

/// Puts the message back on its queue after a pause, when its copy could not
/// be moved to a delay or dead-letter queue: the broker's delivery limit stops
/// this from going on forever.
async fn requeue(delivery: &Delivery) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

/// `properties` with `extra` added to (or replacing) its headers.
fn with_headers(properties: &BasicProperties, extra: &FieldTable) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        headers.insert(key.clone(), value.clone());
    }
    properties.clone().with_headers(headers)
}

fn runtime_headers(retries: u32) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        headers::RETRIES.into(),
        AMQPValue::LongLongInt(i64::from(retries)),
    );
    table
}

async fn delay<H: Handler>(
    state: &ConsumerState<H>,
    delivery: &Delivery,
    message: &Message,
    delay_exchange: &str,
    error: &anyhow::Error,
) {
    let properties = match message
        .envelope
        .to_properties(runtime_headers(message.retries.saturating_add(1)))
    {
        Ok(properties) => properties,
        Err(too_long) => {
            let reason = format!(
                "transient failure ({error:#}), but the message cannot be parked for a retry: \
                 {too_long}"
            );
            dead_letter(state, delivery, &message.envelope, message.retries, &reason).await;
            return;
        }
    };
    let envelope = &message.envelope;
    let parking = "park message in its delay queue";
    if move_delivery(
        state,
        delivery,
        envelope,
        delay_exchange,
        properties,
        parking,
    )
    .await
    {
        tracing::warn!(
            service = %state.options.service,
            order_id = %envelope.correlation_id,
            message_id = %envelope.message_id,
            delay_queue = %delay_exchange,
            error = %format!("{error:#}"),
            "transient failure persists; message parked in a delay queue"
        );
    }
}

/// Publishes `delivery` (its routing key and body, with `properties`) to
/// `exchange` and acks it once the broker confirmed; when the publish fails,
/// requeues it instead, so nothing is lost, and logs that it could not
/// `doing`. Whether it moved.
async fn move_delivery<H: Handler>(
    state: &ConsumerState<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    exchange: &str,
    properties: BasicProperties,
    doing: &str,
) -> bool {
    let routing_key = delivery.routing_key.as_str();
    let published = state
        .publisher
        .publish_raw(exchange, routing_key, &delivery.data, properties)
        .await;
    match published {
        Ok(()) => {
            ack(delivery, envelope).await;
            true
        }
        Err(publish_error) => {
            tracing::error!(
                order_id = %envelope.correlation_id,
                message_id = %envelope.message_id,
                %publish_error,
                "cannot {doing}; requeueing"
            );
            requeue(delivery).await;
            false
        }
    }
}

async fn dead_letter<H: Handler>(
    state: &ConsumerState<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    retries: u32,
    reason: &str,
) {
    let routing_key = delivery.routing_key.as_str();
    let mut extra = runtime_headers(retries);
    extra.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
    extra.insert(
        headers::SERVICE.into(),
        AMQPValue::LongString(state.options.service.as_str().into()),
    );
    extra.insert(
        headers::FAILED_AT.into(),
        AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
    );
    // An envelope AMQP cannot carry (decoding lets none through) keeps the
    // properties the message came with, which the wire did carry.
    let properties = envelope
        .to_properties(extra.clone())
        .unwrap_or_else(|_| with_headers(&delivery.properties, &extra));
    let dead = &state.dead_exchange;
    if move_delivery(
        state,
        delivery,
        envelope,
        dead,
        properties,
        "dead-letter message",
    )
    .await
    {
        tracing::error!(
            service = %state.options.service,
            order_id = %envelope.correlation_id,
            message_id = %envelope.message_id,
            routing_key,
            reason,
            dead_letter_queue = %dead,
            "message dead-lettered; inspect with `orderflow dlq list`, replay with `orderflow dlq replay`"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with the given SQLSTATE, as PostgreSQL reports one.
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Refused {
        code: &'static str,
        message: &'static str,
    }

    impl sqlx::error::DatabaseError for Refused {
        fn message(&self) -> &str {
            self.message
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.code))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn transient() -> HandleError {
        HandleError::transient(anyhow::anyhow!("database unavailable"))
    }

    fn not_yet() -> HandleError {
        HandleError::not_yet(anyhow::anyhow!("payment step not open yet"))
    }

    #[test]
    fn a_message_that_waits_for_another_is_retried_soon_and_often() {
        let mut retries = InProcessRetries::new(3);
        let proposed = Some(Duration::from_millis(70));
        let pauses: Vec<Option<Duration>> = (0..=NOT_YET_DELAYS.len())
            .map(|_| retries.next(&not_yet(), proposed))
            .collect();
        let expected: Vec<Option<Duration>> = NOT_YET_DELAYS
            .iter()
            .copied()
            .map(Some)
            .chain([None])
            .collect();
        assert_eq!(pauses, expected, "the backoff's pause is not used");
        assert!(
            NOT_YET_DELAYS.len() > 3,
            "more tries than a transient error"
        );
    }

    #[test]
    fn a_transient_error_takes_the_backoffs_pauses_as_often_as_configured() {
        let mut retries = InProcessRetries::new(3);
        for n in 1..=3 {
            let proposed = Some(Duration::from_millis(50 * n));
            assert_eq!(retries.next(&transient(), proposed), proposed, "retry {n}");
        }
        assert_eq!(
            retries.next(&transient(), Some(Duration::from_millis(400))),
            None,
            "then the delay tiers"
        );
        assert!(!database("23505", "duplicate").is_not_yet());
    }

    #[test]
    fn waiting_and_transient_retries_are_counted_apart() {
        let mut retries = InProcessRetries::new(1);
        let proposed = Some(Duration::from_millis(50));
        assert_eq!(retries.next(&not_yet(), proposed), Some(NOT_YET_DELAYS[0]));
        assert_eq!(retries.next(&transient(), proposed), proposed);
        assert_eq!(retries.next(&not_yet(), proposed), Some(NOT_YET_DELAYS[1]));
        assert_eq!(retries.next(&transient(), proposed), None);
        assert!(
            not_yet().is_transient(),
            "a waiting message is not dead-lettered"
        );
    }

    fn database(code: &'static str, message: &'static str) -> HandleError {
        HandleError::from(sqlx::Error::Database(Box::new(Refused { code, message })))
    }

    #[test]
    fn data_the_database_refuses_is_permanent_with_its_reason() {
        for (code, message) in [
            ("22021", "invalid byte sequence for encoding \"UTF8\": 0x00"),
            ("22008", "timestamp out of range"),
            (
                "54000",
                "index row size 8016 exceeds btree version 4 maximum 2704",
            ),
        ] {
            let error = database(code, message);
            assert!(!error.is_transient(), "{code}");
            let text = error.to_string();
            assert!(
                text.contains(code) && text.contains(message) && text.contains("not retried"),
                "{text}"
            );
        }
        let encode = HandleError::from(sqlx::Error::Encode("value out of range".into()));
        assert!(!encode.is_transient(), "{encode}");
    }

    #[test]
    fn an_unavailable_database_stays_transient() {
        assert!(database("40001", "could not serialize access").is_transient());
        assert!(database("57P01", "terminating connection").is_transient());
        assert!(HandleError::from(sqlx::Error::PoolTimedOut).is_transient());
    }

    #[test]
    fn a_message_that_cannot_be_published_is_permanent() {
        let invalid = HandleError::from(PublishError::Invalid {
            routing_key: "payment.selected.x".to_owned(),
            message_id: "m".to_owned(),
            detail: "the routing key is 300 bytes long".to_owned(),
        });
        assert!(!invalid.is_transient(), "{invalid}");
        let timeout = HandleError::from(PublishError::Timeout {
            routing_key: "order.started".to_owned(),
            message_id: "m".to_owned(),
            timeout: Duration::from_secs(1),
        });
        assert!(timeout.is_transient(), "{timeout}");
    }

    #[test]
    fn extra_headers_join_the_ones_a_message_came_with() {
        let mut came_with = FieldTable::default();
        came_with.insert("kept".into(), AMQPValue::Boolean(true));
        came_with.insert(headers::REASON.into(), AMQPValue::Boolean(false));
        let properties = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(came_with);
        let mut extra = FieldTable::default();
        extra.insert(headers::REASON.into(), AMQPValue::LongString("why".into()));
        let merged = with_headers(&properties, &extra);
        let table = merged.headers().clone().unwrap_or_default();
        assert_eq!(table.inner().get("kept"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(
            crate::envelope::header_str(&table, headers::REASON).as_deref(),
            Some("why")
        );
        assert_eq!(merged.message_id(), properties.message_id());
    }
}
