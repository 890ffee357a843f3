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
//! The dead-letter queues are read and replayed by `orderflow_ops::dlq`,
//! the same functions the order API's console calls.
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
use orderflow_ops::dlq;
use orderflow_shared::app::topology_for;
use orderflow_shared::bus::Broker;
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::{Context, DEAD_AFTER_REFUSALS, Db, DeadRow, StoreError};
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

pub async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List(args) => list(&args).await,
        DlqCommand::Replay(args) => replay(&args).await,
    }
}

pub(crate) fn broker(settings: &Settings) -> anyhow::Result<Broker> {
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
    Ok(orderflow_ops::services(broker, only)?)
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
    let listing = async {
        for service in services(&broker, args.service.as_deref())? {
            let dead = dlq::list(&broker, &service, args.limit).await?;
            if !args.json {
                println!(
                    "{service:<28} {:>6} dead letter(s)   {}",
                    dead.count, dead.queue
                );
            }
            for entry in dead.messages {
                if !args.json {
                    println!(
                        "    {}  {}  order {}  message {}\n      reason: {}",
                        entry.failed_at.as_deref().unwrap_or("-"),
                        entry.routing_key,
                        entry.order_id.as_deref().unwrap_or("-"),
                        entry.message_id.as_deref().unwrap_or("-"),
                        entry.reason,
                    );
                }
                listed.push(serde_json::to_value(entry)?);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    broker.close();
    listing
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
    let read = db.dead_outbox(limit).await;
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
    let request = dlq::Replay {
        message_id: args.message_id.clone(),
        limit: Some(args.limit),
        force: args.force,
        retention_days: settings.retention_days,
    };
    let report = dlq::replay(&broker, service, &request).await;
    broker.close();
    let report = report?;
    for why in &report.refused {
        eprintln!("not replayed: {why}");
    }
    for message in &report.replayed {
        if let Some(why) = &message.forced {
            eprintln!("warning: replayed anyway (--force): {why}");
        }
        println!(
            "replayed {} ({}) to {}",
            message
                .message_id
                .as_deref()
                .unwrap_or("a message without id"),
            message.routing_key,
            report.target
        );
    }
    println!("{}", report.summary());
    if !report.refused.is_empty() {
        bail!(
            "{} dead letter(s) older than the retention of {} day(s) not replayed and left \
             in {} (see above); check their orders, then replay with --force",
            report.refused.len(),
            settings.retention_days,
            report.queue
        );
    }
    if let Some(message_id) = &args.message_id
        && report.replayed.is_empty()
    {
        bail!(
            "no dead letter with message id {message_id} in {}",
            report.queue
        );
    }
    Ok(ExitCode::SUCCESS)
}
