//! `orderflow dlq list|replay`: the dead-letter queues of the services, and
//! the dead outbox rows of the schemas, for operators: what is there and
//! why, and putting messages back on their service's queue (or rows back
//! into their outbox) once the cause is fixed.
//!
//! Dead outbox rows (`outbox_dead`, one table per context schema) are events
//! a service committed that the broker kept refusing as unroutable; the
//! relay moved them aside (`shared/src/store/outbox.rs`). They are read with
//! a read-only pool per schema, as `orderflow saga` reads the coordinator's;
//! a schema no service ever ran on simply has none. In `--json` output both
//! kinds are entries of one array, told apart by `"source"` (`"queue"` or
//! `"outbox"`), so existing readers of the queue entries keep working.
//!
//! Retention: services prune inbox rows (and finished sagas) older than
//! `ORDERFLOW_RETENTION_DAYS`. A dead letter first published longer ago
//! than that may be one a service had already applied, whose inbox row is
//! gone: replayed, it would be applied twice (or start its pruned order
//! again). `dlq replay` refuses such messages unless `--force` is given. A
//! dead outbox row was never delivered anywhere, so it is replayed whatever
//! its age.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use orderflow_shared::app::topology_for;
use orderflow_shared::bus::Broker;
use orderflow_shared::config::Settings;
use orderflow_shared::envelope::{header_int, header_str, headers};
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::{Context, DEAD_AFTER_REFUSALS, Db, StoreError};
use orderflow_shared::topology::QueueRole;
use serde_json::{Value, json};

use crate::cli::{DlqCommand, DlqListArgs, DlqReplayArgs};

/// The schemas that have an outbox (and so an `outbox_dead`), in listing order.
const SCHEMAS: [Context; 4] = [
    Context::Orders,
    Context::Coordinator,
    Context::Payments,
    Context::Pricing,
];

/// SQLSTATEs that mean "no such thing here yet": `undefined_table`,
/// `invalid_schema_name`, `invalid_catalog_name` (no such database).
const ABSENT: [&str; 3] = ["42P01", "3F000", "3D000"];

pub fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        match command {
            DlqCommand::List(args) => list(&args).await,
            DlqCommand::Replay(args) => replay(&args).await,
        }
    })
}

fn broker(settings: &Settings) -> anyhow::Result<Broker> {
    let metadata = Metadata::from_env()?;
    let topology = topology_for(settings, &metadata);
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
        "source": "queue",
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
    let settings = Settings::load(None)?;
    let mut listed = Vec::new();
    // --service alone: its queue only; --schema alone: its outbox only.
    if args.service.is_some() || args.schema.is_none() {
        list_queues(&settings, args, &mut listed).await?;
    }
    if args.schema.is_some() || args.service.is_none() {
        list_outboxes(&settings, args, &mut listed).await?;
    }
    if args.json {
        println!("{}", Value::Array(listed));
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_queues(
    settings: &Settings,
    args: &DlqListArgs,
    listed: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let broker = broker(settings)?;
    let channel = broker.channel().await?;
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
    broker.close();
    Ok(())
}

/// The schemas to look at: one, or all of them.
fn schemas(only: Option<&str>) -> anyhow::Result<Vec<&'static str>> {
    let all: Vec<&'static str> = SCHEMAS.iter().map(|context| context.schema()).collect();
    match only {
        None => Ok(all),
        Some(schema) => match all.iter().find(|s| **s == schema) {
            Some(found) => Ok(vec![*found]),
            None => bail!("unknown schema `{schema}`; schemas: {}", all.join(", ")),
        },
    }
}

fn absent(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(sqlx::error::DatabaseError::code)
        .is_some_and(|code| ABSENT.contains(&code.as_ref()))
}

/// A schema's pool for an operator command: nothing created or migrated.
/// `None` when the database does not exist (no service ever ran on it).
async fn open(settings: &Settings, schema: &str) -> anyhow::Result<Option<Db>> {
    match Db::open(&settings.database_url, schema, 1).await {
        Ok(db) => Ok(Some(db)),
        Err(StoreError::Connect { cause, .. }) if absent(&cause) => Ok(None),
        Err(error) => Err(error).with_context(|| format!("opening the `{schema}` schema")),
    }
}

/// A row of `outbox_dead`, as listed.
#[derive(Debug, sqlx::FromRow)]
struct DeadRow {
    id: i64,
    message_id: String,
    routing_key: String,
    correlation_id: String,
    attempts: i32,
    last_error: Option<String>,
    reason: String,
    created_at: DateTime<Utc>,
    failed_at: DateTime<Utc>,
    body: Vec<u8>,
}

/// How many dead rows `schema` has, and the first `limit`; `None` when it
/// has no `outbox_dead` table (no service ran on it, or an older version).
async fn dead_rows(
    settings: &Settings,
    schema: &str,
    limit: usize,
) -> anyhow::Result<Option<(i64, Vec<DeadRow>)>> {
    let Some(db) = open(settings, schema).await? else {
        return Ok(None);
    };
    let read = async {
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_dead")
            .fetch_one(db.pool())
            .await?;
        let rows: Vec<DeadRow> = sqlx::query_as(
            "SELECT id, message_id, routing_key, correlation_id, attempts, last_error, reason, \
             created_at, failed_at, body FROM outbox_dead ORDER BY id LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(db.pool())
        .await?;
        Ok::<_, sqlx::Error>((total, rows))
    }
    .await;
    db.close().await;
    match read {
        Ok(found) => Ok(Some(found)),
        Err(error) if absent(&error) => Ok(None),
        Err(error) => Err(anyhow::Error::new(error).context(format!(
            "reading the dead outbox rows of schema `{schema}` from {}",
            settings.database_url_redacted()
        ))),
    }
}

async fn list_outboxes(
    settings: &Settings,
    args: &DlqListArgs,
    listed: &mut Vec<Value>,
) -> anyhow::Result<()> {
    for schema in schemas(args.schema.as_deref())? {
        let place = format!("{schema}.outbox_dead");
        let Some((total, rows)) = dead_rows(settings, schema, args.limit).await? else {
            if !args.json {
                println!(
                    "{:<28} {:>6} dead outbox row(s)   {place} (no such table: no service ran on it)",
                    format!("outbox of {schema}"),
                    0
                );
            }
            continue;
        };
        if !args.json {
            println!(
                "{:<28} {total:>6} dead outbox row(s)   {place}",
                format!("outbox of {schema}")
            );
        }
        for row in rows {
            if !args.json {
                println!(
                    "    {}  {}  order {}  message {}  id {}  refused {} time(s)\n      reason: {}\n      \
                     replay: orderflow dlq replay --outbox --schema {schema} --id {}",
                    row.failed_at.to_rfc3339(),
                    row.routing_key,
                    row.correlation_id,
                    row.message_id,
                    row.id,
                    row.attempts,
                    row.reason,
                    row.id,
                );
            }
            listed.push(json!({
                "source": "outbox",
                "schema": schema,
                "id": row.id,
                "routing_key": row.routing_key,
                "order_id": row.correlation_id,
                "message_id": row.message_id,
                "reason": row.reason,
                "last_error": row.last_error,
                "attempts": row.attempts,
                "created_at": row.created_at.to_rfc3339(),
                "failed_at": row.failed_at.to_rfc3339(),
                "body": String::from_utf8_lossy(&row.body),
            }));
        }
    }
    Ok(())
}

fn dead_queue(broker: &Broker, service: &str) -> anyhow::Result<String> {
    broker
        .topology()
        .queue(service, &QueueRole::DeadLetter)
        .map(|q| q.name.clone())
        .with_context(|| format!("service `{service}` has no dead-letter queue"))
}

/// Moves dead outbox row `$1` back into the outbox, in one statement: a
/// fresh row for the relay (no refusals, committed now) with the same id,
/// message id and body.
const REPLAY_OUTBOX_ROW: &str = "\
WITH back AS (
    DELETE FROM outbox_dead WHERE id = $1
    RETURNING id, message_id, routing_key, correlation_id, causation_id, traceparent,
              occurred_at, body
)
INSERT INTO outbox (id, message_id, routing_key, correlation_id, causation_id, traceparent,
                    occurred_at, body)
SELECT id, message_id, routing_key, correlation_id, causation_id, traceparent, occurred_at, body
FROM back
RETURNING routing_key, correlation_id, message_id";

async fn replay_outbox_row(settings: &Settings, schema: &str, id: i64) -> anyhow::Result<ExitCode> {
    let schema = schemas(Some(schema))?[0];
    let Some(db) = open(settings, schema).await? else {
        bail!(
            "the database {} does not exist: no service ran on it, so it has no dead outbox rows; \
             check ORDERFLOW_DATABASE_URL",
            settings.database_url_redacted()
        );
    };
    let moved: Result<Option<(String, String, String)>, sqlx::Error> =
        sqlx::query_as(REPLAY_OUTBOX_ROW)
            .bind(id)
            .fetch_optional(db.pool())
            .await;
    db.close().await;
    let (routing_key, order_id, message_id) = match moved {
        Ok(Some(moved)) => moved,
        Ok(None) => bail!(
            "no dead outbox row with id {id} in schema `{schema}`; `orderflow dlq list --schema \
             {schema}` shows them"
        ),
        Err(error) if absent(&error) => bail!(
            "schema `{schema}` of {} has no outbox_dead table: no service of this version ran on \
             it, so it has no dead outbox rows",
            settings.database_url_redacted()
        ),
        Err(error) => {
            return Err(anyhow::Error::new(error).context(format!(
                "putting dead outbox row {id} back into the outbox of schema `{schema}` (the \
                 database role needs to write both tables)"
            )));
        }
    };
    println!(
        "put dead outbox row {id} ({routing_key}, order {order_id}, message {message_id}) back \
         into the outbox of schema `{schema}`; the relay of a running service of that schema \
         publishes it at its next sweep. If no queue is bound to {routing_key} yet, it goes dead \
         again after {DEAD_AFTER_REFUSALS} refusals."
    );
    Ok(ExitCode::SUCCESS)
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

/// Why `delivery`, first published `age` ago, is not replayed without --force.
fn too_old(
    delivery: &lapin::message::Delivery,
    routing_key: &str,
    age: chrono::Duration,
    retention_days: u32,
) -> String {
    fn text(value: Option<&lapin::types::ShortString>) -> &str {
        value.map_or("-", lapin::types::ShortString::as_str)
    }
    let order_id = text(delivery.properties.correlation_id().as_ref());
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
        text(delivery.properties.message_id().as_ref()),
    )
}

async fn replay(args: &DlqReplayArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(None)?;
    if args.outbox {
        let (Some(schema), Some(id)) = (args.schema.as_deref(), args.id) else {
            bail!("--outbox needs --schema and --id (see `orderflow dlq list`)");
        };
        return replay_outbox_row(&settings, schema, id).await;
    }
    let Some(service) = args.service.as_deref() else {
        bail!("--service is needed (or --outbox with --schema and --id)");
    };
    let broker = broker(&settings)?;
    services(&broker, Some(service))?;
    let retention =
        chrono::Duration::from_std(settings.retention()).unwrap_or(chrono::Duration::MAX);
    let dead = dead_queue(&broker, service)?;
    // Back into the service's queue through its redeliver exchange, with the
    // routing key it was first published with.
    let target = broker.names().redeliver_exchange(service);
    let channel = broker.channel().await?;
    let publisher = broker.publisher();
    let waiting = count(&channel, &dead).await? as usize;
    let mut replayed = 0;
    let mut refused = 0;
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
        if let Some(age) = first_published(&delivery)
            .map(|at| Utc::now() - at)
            .filter(|age| *age > retention)
        {
            let why = too_old(&delivery, &routing_key, age, settings.retention_days);
            if !args.force {
                eprintln!("not replayed: {why}");
                refused += 1;
                continue; // left unacked: back in the queue when the channel closes
            }
            eprintln!("warning: replayed anyway (--force): {why}");
        }
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
    if refused > 0 {
        bail!(
            "{refused} dead letter(s) older than the retention of {} day(s) not replayed and left \
             in {dead} (see above); check their orders, then replay with --force",
            settings.retention_days
        );
    }
    if args.message_id.is_some() && replayed == 0 {
        bail!(
            "no dead letter with message id {} in {dead}",
            args.message_id.as_deref().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
