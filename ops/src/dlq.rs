//! A service's dead letters (`orderflow.<svc>.dead`): listing them with
//! their reasons ([`list`], a peek that leaves them where they are) and
//! replaying them ([`replay`]) onto the service's own queue, through its
//! redeliver exchange and with the routing key they were first published
//! with, so no other service sees them twice (docs/design.md §4.5).
//!
//! Retention: services prune inbox rows (and finished sagas) older than
//! `ORDERFLOW_RETENTION_DAYS`. A dead letter first published longer ago
//! than that may be one a service had already applied, whose inbox row is
//! gone: replayed, it would be applied twice (or start its pruned order
//! again). [`replay`] refuses such messages unless forced.

use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use orderflow_shared::bus::Broker;
use orderflow_shared::envelope::{header_int, header_str, headers};
use orderflow_shared::topology::QueueRole;
use serde::Serialize;

use crate::OpsError;

/// The header in which orderflow versions before the per-service exchanges
/// kept a dead letter's routing key (their dead letters went through
/// `amq.default`, which replaced it with the queue name).
pub const LEGACY_ROUTING_KEY: &str = "x-orderflow-routing-key";

/// One dead letter, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Always `"queue"` (the CLI lists dead outbox rows beside them).
    pub source: &'static str,
    pub service: String,
    pub routing_key: String,
    pub order_id: Option<String>,
    pub message_id: Option<String>,
    pub reason: String,
    pub failed_at: Option<String>,
    pub retries: Option<i64>,
    /// The body as text (lossy for non-UTF-8 bytes).
    pub body: String,
}

/// A service's dead-letter queue: how many wait there, and the first few.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetters {
    pub service: String,
    pub queue: String,
    pub count: u32,
    pub messages: Vec<DeadLetter>,
}

/// The dead-letter queue of `service`.
pub fn dead_queue(broker: &Broker, service: &str) -> Result<String, OpsError> {
    crate::queue_of(broker, service, &QueueRole::DeadLetter)
}

/// How many messages `queue` holds (a passive declaration).
pub(crate) async fn count(channel: &Channel, queue: &str) -> Result<u32, OpsError> {
    Ok(crate::inspect(channel, queue).await?.message_count())
}

/// The routing key a dead letter was first published with: the delivery's own
/// (every hop keeps it), or, for a dead letter left by an older version (whose
/// routing key is the dead-letter queue's name), its legacy header.
fn original_routing_key(delivery: &lapin::message::Delivery, dead_queue: &str) -> String {
    let key = delivery.routing_key.as_str();
    if key != dead_queue {
        return key.to_owned();
    }
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|table| header_str(table, LEGACY_ROUTING_KEY))
        .unwrap_or_else(|| key.to_owned())
}

fn text(value: Option<&lapin::types::ShortString>) -> Option<String> {
    value.map(|v| v.as_str().to_owned())
}

fn describe(service: &str, dead_queue: &str, delivery: &lapin::message::Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let table = properties.headers().clone().unwrap_or_default();
    let reason = header_str(&table, headers::REASON).unwrap_or_else(|| {
        if table.contains_key("x-death") {
            "dead-lettered by the broker: delivered too often without an ack (a consumer crashed \
             on it?)"
                .to_owned()
        } else {
            "unknown".to_owned()
        }
    });
    DeadLetter {
        source: "queue",
        service: service.to_owned(),
        routing_key: original_routing_key(delivery, dead_queue),
        order_id: text(properties.correlation_id().as_ref()),
        message_id: text(properties.message_id().as_ref()),
        reason,
        failed_at: header_str(&table, headers::FAILED_AT),
        retries: header_int(&table, headers::RETRIES),
        body: String::from_utf8_lossy(&delivery.data).into_owned(),
    }
}

/// The next message of `queue`, taken without an ack: it goes back to the
/// queue unless acked before the channel closes. `None` when it is empty.
async fn take(channel: &Channel, queue: &str) -> Result<Option<Delivery>, OpsError> {
    let message = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|cause| OpsError::amqp(format!("taking a message from {queue}"), cause))?;
    Ok(message.map(|message| message.delivery))
}

/// The dead letters of `service`: their count and the first `limit`, with
/// their reasons. A peek: the messages are taken without an ack and the
/// channel closed, so the broker puts them back.
pub async fn list(broker: &Broker, service: &str, limit: usize) -> Result<DeadLetters, OpsError> {
    let queue = dead_queue(broker, service)?;
    let channel = broker.channel().await?;
    let listed = async {
        let waiting = count(&channel, &queue).await?;
        let mut messages = Vec::new();
        while messages.len() < limit.min(waiting as usize) {
            let Some(delivery) = take(&channel, &queue).await? else {
                break;
            };
            messages.push(describe(service, &queue, &delivery));
        }
        Ok::<_, OpsError>(DeadLetters {
            service: service.to_owned(),
            queue: queue.clone(),
            count: waiting,
            messages,
        })
    }
    .await;
    let _ = channel.close(200, "peeked".into()).await;
    listed
}

/// What to replay.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Only the message with this id.
    pub message_id: Option<String>,
    /// At most this many (`None`: all).
    pub limit: Option<usize>,
    /// Also messages first published longer ago than the retention.
    pub force: bool,
    /// `ORDERFLOW_RETENTION_DAYS` of the deployment.
    pub retention_days: u32,
}

/// One replayed dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replayed {
    pub message_id: Option<String>,
    pub routing_key: String,
    pub order_id: Option<String>,
    /// Why it would have been refused, when it was replayed because forced.
    pub forced: Option<String>,
}

/// What [`replay`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub service: String,
    /// The dead-letter queue.
    pub queue: String,
    /// Where they went: the service's redeliver exchange.
    pub target: String,
    pub replayed: Vec<Replayed>,
    /// Why each dead letter older than the retention was left (not forced).
    pub refused: Vec<String>,
    /// Dead letters left in the queue.
    pub left: usize,
}

impl ReplayReport {
    /// The one-line summary the CLI prints and the console shows.
    pub fn summary(&self) -> String {
        format!(
            "{} message(s) replayed to {}; {} left in {}",
            self.replayed.len(),
            self.target,
            self.left,
            self.queue
        )
    }
}

/// When a dead letter was first published: its timestamp, else the time in
/// its (version 7) message id, else when it was dead-lettered.
fn first_published(delivery: &lapin::message::Delivery) -> Option<DateTime<Utc>> {
    let properties = &delivery.properties;
    let stamped = properties
        .timestamp()
        .filter(|secs| *secs > 0)
        .and_then(|secs| DateTime::from_timestamp(i64::try_from(secs).ok()?, 0));
    let from_id = || {
        let id = uuid::Uuid::parse_str(properties.message_id().as_ref()?.as_str()).ok()?;
        let (secs, nanos) = id.get_timestamp()?.to_unix();
        DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
    };
    let failed_at = || {
        let table = properties.headers().as_ref()?;
        let text = header_str(table, headers::FAILED_AT)?;
        DateTime::parse_from_rfc3339(&text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    };
    stamped.or_else(from_id).or_else(failed_at)
}

/// Why `delivery`, first published `age` ago, is not replayed without force.
fn too_old(
    delivery: &lapin::message::Delivery,
    routing_key: &str,
    age: chrono::Duration,
    retention_days: u32,
) -> String {
    fn shown(value: Option<&lapin::types::ShortString>) -> &str {
        value.map_or("-", lapin::types::ShortString::as_str)
    }
    let order_id = shown(delivery.properties.correlation_id().as_ref());
    let age = humantime::format_duration(std::time::Duration::from_secs(
        u64::try_from(age.num_seconds()).unwrap_or_default() / 3600 * 3600,
    ));
    format!(
        "dead letter {} ({routing_key}, order {order_id}) was first published {age} ago, longer \
         than the retention of {retention_days} day(s) (ORDERFLOW_RETENTION_DAYS): the inbox rows \
         that make a service skip a message it already applied, and the saga of the order, may \
         have been pruned, so replaying it could apply it twice or start the order again. Check \
         the order first (`orderflow saga history {order_id}`), then replay it with --force if \
         it must be applied",
        shown(delivery.properties.message_id().as_ref()),
    )
}

/// The headers a replayed message keeps: its own, without what the runtime
/// and the broker added when it was dead-lettered.
fn replayed_headers(delivery: &lapin::message::Delivery) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
    {
        if ![
            headers::REASON,
            headers::SERVICE,
            headers::FAILED_AT,
            headers::RETRIES,
            LEGACY_ROUTING_KEY,
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-delivery-count",
        ]
        .contains(&key.as_str())
        {
            table.insert(key.clone(), value.clone());
        }
    }
    table
}

/// Moves dead letters of `service` back onto its queue, through its
/// redeliver exchange, with the routing key they were first published with
/// (each acked in the dead-letter queue only once its copy is confirmed).
/// Messages older than the retention stay unless `request.force`; with a
/// `message_id`, only that one moves (the others stay). The report says what
/// moved, what was refused and why, and how many are left.
pub async fn replay(
    broker: &Broker,
    service: &str,
    request: &Replay,
) -> Result<ReplayReport, OpsError> {
    let dead = dead_queue(broker, service)?;
    let retention = chrono::Duration::days(i64::from(request.retention_days));
    let target = broker.names().redeliver_exchange(service);
    let channel = broker.channel().await?;
    let publisher = broker.publisher();
    let mut report = ReplayReport {
        service: service.to_owned(),
        queue: dead.clone(),
        target: target.clone(),
        replayed: Vec::new(),
        refused: Vec::new(),
        left: 0,
    };
    let moved = async {
        let waiting = count(&channel, &dead).await? as usize;
        for _ in 0..waiting {
            if request
                .limit
                .is_some_and(|limit| report.replayed.len() >= limit)
            {
                break;
            }
            let Some(delivery) = take(&channel, &dead).await? else {
                break;
            };
            let message_id = text(delivery.properties.message_id().as_ref());
            if request.message_id.is_some() && request.message_id != message_id {
                continue; // left unacked: back in the queue when the channel closes
            }
            let routing_key = original_routing_key(&delivery, &dead);
            let mut forced = None;
            if let Some(age) = first_published(&delivery)
                .map(|at| Utc::now() - at)
                .filter(|age| *age > retention)
            {
                let why = too_old(&delivery, &routing_key, age, request.retention_days);
                if !request.force {
                    report.refused.push(why);
                    continue; // left unacked: back in the queue when the channel closes
                }
                forced = Some(why);
            }
            let properties = delivery
                .properties
                .clone()
                .with_headers(replayed_headers(&delivery));
            publisher
                .publish_raw(&target, &routing_key, &delivery.data, properties)
                .await
                .map_err(|cause| OpsError::Publish {
                    what: format!(
                        "replaying {} to {target}",
                        message_id.as_deref().unwrap_or("a message")
                    ),
                    cause: Box::new(cause),
                })?;
            delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(|cause| {
                    OpsError::amqp(format!("acking a replayed message in {dead}"), cause)
                })?;
            report.replayed.push(Replayed {
                order_id: text(delivery.properties.correlation_id().as_ref()),
                message_id,
                routing_key,
                forced,
            });
        }
        report.left = waiting.saturating_sub(report.replayed.len());
        Ok::<_, OpsError>(())
    }
    .await;
    let _ = channel.close(200, "replayed".into()).await;
    moved?;
    if !report.replayed.is_empty() {
        tracing::info!(
            service,
            replayed = report.replayed.len(),
            left = report.left,
            "dead letters replayed"
        );
    }
    Ok(report)
}
