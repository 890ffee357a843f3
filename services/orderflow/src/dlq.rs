//! `orderflow dlq list|replay`: the dead-letter queues of the services, for
//! operators: what is there and why, and putting messages back on their
//! service's queue once the cause is fixed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use orderflow_shared::app::topology_for;
use orderflow_shared::bus::Broker;
use orderflow_shared::config::Settings;
use orderflow_shared::envelope::{header_int, header_str, headers};
use orderflow_shared::metadata::Metadata;
use orderflow_shared::topology::QueueRole;
use serde_json::{Value, json};

use crate::cli::{DlqCommand, DlqListArgs, DlqReplayArgs};

pub fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        match command {
            DlqCommand::List(args) => list(&args).await,
            DlqCommand::Replay(args) => replay(&args).await,
        }
    })
}

fn broker() -> anyhow::Result<Broker> {
    let settings = Settings::load(None)?;
    let metadata = Metadata::from_env()?;
    let topology = topology_for(&settings, &metadata);
    Ok(Broker::new(
        &settings.amqp_url,
        "orderflow-dlq",
        topology,
        Duration::from_millis(settings.publish_timeout_ms),
    )?)
}

/// The services to look at: one, or all of the topology's.
fn services(broker: &Broker, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let all: Vec<String> = broker
        .topology()
        .services()
        .into_iter()
        .map(str::to_owned)
        .collect();
    match only {
        None => Ok(all),
        Some(service) if all.iter().any(|s| s == service) => Ok(vec![service.to_owned()]),
        Some(service) => bail!("unknown service `{service}`; services: {}", all.join(", ")),
    }
}

async fn count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("queue {queue} does not exist; has orderflow declared its topology here (ORDERFLOW_NAMESPACE)?"))?;
    Ok(declared.message_count())
}

/// The header in which orderflow versions before the per-service exchanges
/// kept a dead letter's routing key (their dead letters went through
/// `amq.default`, which replaced it with the queue name).
const LEGACY_ROUTING_KEY: &str = "x-orderflow-routing-key";

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

fn describe(service: &str, dead_queue: &str, delivery: &lapin::message::Delivery) -> Value {
    let properties = &delivery.properties;
    let table = properties.headers().clone().unwrap_or_default();
    let text =
        |value: &Option<lapin::types::ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    let reason = header_str(&table, headers::REASON).unwrap_or_else(|| {
        if table.contains_key("x-death") {
            "dead-lettered by the broker: delivered too often without an ack (a consumer crashed on it?)".to_owned()
        } else {
            "unknown".to_owned()
        }
    });
    json!({
        "service": service,
        "routing_key": original_routing_key(delivery, dead_queue),
        "order_id": text(properties.correlation_id()),
        "message_id": text(properties.message_id()),
        "reason": reason,
        "failed_at": header_str(&table, headers::FAILED_AT),
        "retries": header_int(&table, headers::RETRIES),
        "body": String::from_utf8_lossy(&delivery.data),
    })
}

async fn list(args: &DlqListArgs) -> anyhow::Result<ExitCode> {
    let broker = broker()?;
    let channel = broker.channel().await?;
    let mut listed = Vec::new();
    for service in services(&broker, args.service.as_deref())? {
        let queue = dead_queue(&broker, &service)?;
        let waiting = count(&channel, &queue).await?;
        if !args.json {
            println!("{service:<28} {waiting:>6} dead letter(s)   {queue}");
        }
        // Peek: take without acking, then close the channel: the broker
        // puts them back.
        let mut taken = 0;
        while taken < args.limit.min(waiting as usize) {
            let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await?
            else {
                break;
            };
            taken += 1;
            let entry = describe(&service, &queue, &message.delivery);
            if !args.json {
                println!(
                    "    {}  {}  order {}  message {}\n      reason: {}",
                    entry["failed_at"].as_str().unwrap_or("-"),
                    entry["routing_key"].as_str().unwrap_or("-"),
                    entry["order_id"].as_str().unwrap_or("-"),
                    entry["message_id"].as_str().unwrap_or("-"),
                    entry["reason"].as_str().unwrap_or("-"),
                );
            }
            listed.push(entry);
        }
    }
    let _ = channel.close(200, "peeked".into()).await;
    if args.json {
        println!("{}", Value::Array(listed));
    }
    broker.close();
    Ok(ExitCode::SUCCESS)
}

fn dead_queue(broker: &Broker, service: &str) -> anyhow::Result<String> {
    broker
        .topology()
        .queue(service, &QueueRole::DeadLetter)
        .map(|q| q.name.clone())
        .with_context(|| format!("service `{service}` has no dead-letter queue"))
}

async fn replay(args: &DlqReplayArgs) -> anyhow::Result<ExitCode> {
    let broker = broker()?;
    let service = args.service.as_str();
    services(&broker, Some(service))?;
    let dead = dead_queue(&broker, service)?;
    // Back into the service's queue through its redeliver exchange, with the
    // routing key it was first published with.
    let target = broker.names().redeliver_exchange(service);
    let channel = broker.channel().await?;
    let publisher = broker.publisher();
    let waiting = count(&channel, &dead).await? as usize;
    let mut replayed = 0;
    for _ in 0..waiting {
        if replayed >= args.limit {
            break;
        }
        let Some(message) = channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        if args.message_id.is_some() && args.message_id != message_id {
            continue; // left unacked: back in the queue when the channel closes
        }
        let routing_key = original_routing_key(&delivery, &dead);
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
        let properties = delivery.properties.clone().with_headers(table);
        publisher
            .publish_raw(&target, &routing_key, &delivery.data, properties)
            .await
            .with_context(|| {
                format!(
                    "replaying {} to {target}",
                    message_id.as_deref().unwrap_or("a message")
                )
            })?;
        delivery.ack(BasicAckOptions::default()).await?;
        replayed += 1;
        println!(
            "replayed {} ({routing_key}) to {target}",
            message_id.as_deref().unwrap_or("a message without id")
        );
    }
    let _ = channel.close(200, "replayed".into()).await;
    broker.close();
    println!(
        "{replayed} message(s) replayed to {target}; {} left in {dead}",
        waiting - replayed
    );
    if args.message_id.is_some() && replayed == 0 {
        bail!(
            "no dead letter with message id {} in {dead}",
            args.message_id.as_deref().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
