//! The ceiling for `orderflow bench --baseline`: what the RabbitMQ broker and
//! the PostgreSQL server the system runs on allow with no orderflow code in
//! the way, so the bench can report the system's orders/s as a fraction of it.
//!
//! Broker part: a chain of `hops` quorum queues (declared with the arguments
//! of the system's service queues) on a private topic exchange; one relay per
//! queue does what a service does with each delivery — publish the next
//! message (persistent, mandatory, confirmed), then ack — and the driver
//! keeps `concurrency` orders in flight and times each one from the first
//! publish to the ack on the last queue.
//!
//! Database part: `transactions` durable commits per order (an inbox row and
//! an outbox row each, in a private schema with the runtime's own migrations),
//! `concurrency` orders at once, but never fewer than `db_connections`, over
//! `db_connections` connections: the server's commit capacity for this
//! transaction mix, which the system's consumers use concurrently (several
//! services work on one order at the same time) even when few orders are in
//! flight.
//!
//! Everything is named `orderflow-baseline-<id>` / `orderflow_baseline_<id>`
//! and removed at the end, also when a step fails.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use orderflow_shared::bus::MANDATORY;
use orderflow_shared::config::redact_url;
use orderflow_shared::store::Db;
use orderflow_shared::topology::{ArgValue, Names, QueueRole, ServiceSpec, Topology, field_table};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Uuid;
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::stats::percentile;

/// The database part runs at most this many orders: its rate is steady long
/// before that, and every order costs `transactions` fsyncs.
pub const DB_ORDERS_CAP: usize = 2000;

/// With no order completing for this long, a message is taken as lost (or
/// the broker or database as stalled) and the measurement fails.
const STALL_TIMEOUT: Duration = Duration::from_mins(1);

/// Limit on declaring and deleting the baseline's own topology and schema.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Body size of every message and outbox row, about an orderflow event's.
const BODY_BYTES: usize = 300;

/// What to push through the infrastructure.
#[derive(Debug, Clone)]
pub struct BaselineSpec {
    /// How many "orders" to push through (the database part caps them at
    /// [`DB_ORDERS_CAP`]).
    pub orders: usize,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// Persistent confirmed messages per order (the system publishes 7 per
    /// completed order).
    pub hops: usize,
    /// Committed database transactions per order.
    pub transactions: usize,
    /// Consumer prefetch, the same as the system's.
    pub prefetch: u16,
    /// Connections for the commit-rate part.
    pub db_connections: u32,
}

/// What the infrastructure alone allows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baseline {
    pub broker_orders_per_s: f64,
    pub broker_p50_ms: f64,
    pub broker_p99_ms: f64,
    pub db_commits_per_s: f64,
    pub db_orders_per_s: f64,
    /// The lower of `broker_orders_per_s` and `db_orders_per_s`.
    pub ceiling_orders_per_s: f64,
}

/// Measures the broker part, then the database part, and returns both with
/// the ceiling (the lower of the two order rates).
pub async fn measure(
    amqp_url: &str,
    database_url: &str,
    spec: &BaselineSpec,
) -> anyhow::Result<Baseline> {
    measure_as(
        amqp_url,
        database_url,
        spec,
        &Uuid::now_v7().simple().to_string(),
    )
    .await
}

/// [`measure`] with the broker names `orderflow-baseline-<id>.*` and the
/// schema `orderflow_baseline_<id>` (`id`: lowercase letters and digits).
async fn measure_as(
    amqp_url: &str,
    database_url: &str,
    spec: &BaselineSpec,
    id: &str,
) -> anyhow::Result<Baseline> {
    ensure!(spec.orders > 0, "the baseline needs at least one order");
    ensure!(
        spec.concurrency > 0,
        "the baseline needs a concurrency of at least 1"
    );
    ensure!(spec.hops > 0, "the baseline needs at least one hop");
    ensure!(
        spec.transactions > 0,
        "the baseline needs at least one transaction per order"
    );
    ensure!(
        spec.prefetch > 0,
        "the baseline needs a prefetch of at least 1"
    );
    ensure!(
        spec.db_connections > 0,
        "the baseline needs at least one database connection"
    );
    let broker = measure_broker(amqp_url, id, spec)
        .await
        .context("measuring the broker baseline")?;
    let db = measure_db(database_url, id, spec)
        .await
        .context("measuring the database baseline")?;
    Ok(Baseline {
        broker_orders_per_s: broker.orders_per_s,
        broker_p50_ms: broker.p50_ms,
        broker_p99_ms: broker.p99_ms,
        db_commits_per_s: db.commits_per_s,
        db_orders_per_s: db.orders_per_s,
        ceiling_orders_per_s: broker.orders_per_s.min(db.orders_per_s),
    })
}

/// `result` of a step, and of the cleanup that ran after it: the step's
/// error wins, the cleanup's is reported too.
fn with_cleanup<T>(result: anyhow::Result<T>, cleanup: anyhow::Result<()>) -> anyhow::Result<T> {
    match (result, cleanup) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(cleanup)) => Err(cleanup),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(cleanup)) => Err(error.context(format!("and then {cleanup:#}"))),
    }
}

/// A ~300-byte JSON body carrying the order number.
fn body(order: u64, hop: usize) -> Vec<u8> {
    let head = format!(r#"{{"order":{order},"hop":{hop},"padding":""#);
    let padding = BODY_BYTES.saturating_sub(head.len() + 2);
    let mut body = head.into_bytes();
    body.resize(body.len() + padding, b'x');
    body.extend_from_slice(b"\"}");
    body
}

#[derive(serde::Deserialize)]
struct Body {
    order: u64,
}

// The broker part.

struct BrokerFigures {
    orders_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Names of the baseline's own exchange and queues.
struct BrokerNames {
    prefix: String,
    hops: usize,
}

impl BrokerNames {
    fn exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    fn queue(&self, hop: usize) -> String {
        format!("{}.hop-{hop}", self.prefix)
    }

    fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    fn queues(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.hops)
            .map(|hop| self.queue(hop))
            .chain(std::iter::once(self.dead_queue()))
    }
}

fn routing_key(hop: usize) -> String {
    format!("hop.{hop}")
}

/// The arguments the system declares its service queues and dead-letter
/// queues with (taken from the topology model, so they stay the same), with
/// the dead letters pointed at the baseline's own dead-letter queue.
fn queue_arguments(dead_queue: &str) -> anyhow::Result<(FieldTable, FieldTable)> {
    let service = ServiceSpec::new("baseline", &[]);
    let topology = Topology::build(Names::default(), std::slice::from_ref(&service), &[]);
    let arguments_of = |role: QueueRole| {
        topology
            .queues
            .iter()
            .find(|q| q.service == service.name && q.role == role)
            .map(|q| q.arguments.clone())
            .with_context(|| format!("the topology model has no {role:?} queue"))
    };
    let mut service_arguments = arguments_of(QueueRole::Service)?;
    // The system dead-letters through a per-service fanout exchange; the
    // baseline declares no exchanges of its own, so it dead-letters straight
    // to its queue (the same work for the broker).
    service_arguments.insert(
        "x-dead-letter-exchange".to_owned(),
        ArgValue::Str(String::new()),
    );
    service_arguments.insert(
        "x-dead-letter-routing-key".to_owned(),
        ArgValue::Str(dead_queue.to_owned()),
    );
    let dead_arguments = arguments_of(QueueRole::DeadLetter)?;
    Ok((
        field_table(&service_arguments),
        field_table(&dead_arguments),
    ))
}

async fn connect_broker(url: &str, name: &str) -> anyhow::Result<Connection> {
    let connect = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.into()),
    );
    let connected = match tokio::time::timeout(SETUP_TIMEOUT, connect).await {
        Ok(connected) => connected.map_err(anyhow::Error::from),
        Err(_) => Err(anyhow!("no answer within {SETUP_TIMEOUT:?}")),
    };
    connected.with_context(|| {
        format!(
            "cannot reach RabbitMQ at {}; is it running there, and is the URL right?",
            redact_url(url)
        )
    })
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("RabbitMQ refused to open a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("RabbitMQ refused publisher confirms on a channel")?;
    Ok(channel)
}

/// Publishes one persistent, mandatory message to the exchange and waits for
/// its confirm; a nack or a return is an error.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    order: u64,
    hop: usize,
    causation_id: Option<&ShortString>,
) -> anyhow::Result<()> {
    let mut headers = FieldTable::default();
    // The headers a real envelope carries (docs/design.md §4.1).
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-00000000000000000000000000000000-0000000000000000-00".into()),
    );
    if let Some(causation_id) = causation_id {
        headers.insert(
            "causation_id".into(),
            AMQPValue::LongString(causation_id.as_str().into()),
        );
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let properties = BasicProperties::default()
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_correlation_id(order.to_string().into())
        .with_type(routing_key.into())
        .with_timestamp(timestamp)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            MANDATORY,
            &body(order, hop),
            properties,
        )
        .await
        .with_context(|| format!("publishing order {order}'s {routing_key}"))?
        .await
        .with_context(|| format!("waiting for the confirm of order {order}'s {routing_key}"))?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => bail!(
            "order {order}'s {routing_key} was returned as unroutable ({} {}): \
             was the baseline's queue deleted meanwhile?",
            returned.reply_code,
            returned.reply_text
        ),
        Confirmation::Nack(None) | Confirmation::NotRequested => {
            bail!(
                "RabbitMQ refused (nack) order {order}'s {routing_key}; is a disk or memory alarm on?"
            )
        }
    }
}

/// Orders waiting for their last hop, by order number.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// What one queue's consumer does with a delivery: on every hop but the last,
/// publish the next message and ack after its confirm; on the last, ack and
/// tell the driver.
#[derive(Clone)]
struct Relay {
    hop: usize,
    /// The confirm channel and exchange to publish the next hop to; `None`
    /// on the last hop.
    next: Option<(Channel, Arc<str>)>,
    waiting: Waiting,
}

impl Relay {
    async fn handle(&self, delivery: lapin::message::Delivery) -> anyhow::Result<()> {
        let Body { order } = serde_json::from_slice(&delivery.data)
            .with_context(|| format!("hop {}: a message without an order number", self.hop))?;
        if let Some((channel, exchange)) = &self.next {
            let next = self.hop + 1;
            publish_confirmed(
                channel,
                exchange,
                &routing_key(next),
                order,
                next,
                delivery.properties.message_id().as_ref(),
            )
            .await?;
        }
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .with_context(|| format!("hop {}: acking order {order}", self.hop))?;
        if self.next.is_none() {
            let sender = self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&order);
            // No sender: a redelivery of an order already seen; nothing to do.
            if let Some(sender) = sender {
                let _ = sender.send(());
            }
        }
        Ok(())
    }

    /// Handles the consumer's deliveries concurrently until something fails
    /// (it never ends otherwise).
    async fn run(self, mut consumer: Consumer) -> anyhow::Result<()> {
        let mut handling = JoinSet::new();
        loop {
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let relay = self.clone();
                        handling.spawn(async move { relay.handle(delivery).await });
                    }
                    Some(Err(error)) => {
                        return Err(anyhow!(error).context(format!("hop {}: consuming", self.hop)));
                    }
                    None => bail!("hop {}: RabbitMQ cancelled the consumer (queue deleted?)", self.hop),
                },
                Some(handled) = handling.join_next() => {
                    handled.with_context(|| format!("hop {}: a handler panicked", self.hop))??;
                }
            }
        }
    }
}

/// The broker connections and relay tasks of one run; [`BrokerRun::close`]
/// stops and closes them all.
struct BrokerRun {
    connections: Vec<Connection>,
    relays: JoinSet<anyhow::Result<()>>,
}

impl BrokerRun {
    /// A new connection, closed with the run.
    async fn connect(&mut self, url: &str, name: &str) -> anyhow::Result<&Connection> {
        let connection = connect_broker(url, name).await?;
        self.connections.push(connection);
        Ok(&self.connections[self.connections.len() - 1])
    }

    /// Stops the relays and closes the connections; bounded, so that a
    /// stuck broker cannot keep the queues from being deleted afterwards.
    async fn close(mut self) {
        let closing = async {
            self.relays.shutdown().await;
            for connection in self.connections {
                let _ = connection.close(200, "baseline done".into()).await;
            }
        };
        let _ = tokio::time::timeout(SETUP_TIMEOUT, closing).await;
    }
}

async fn measure_broker(url: &str, id: &str, spec: &BaselineSpec) -> anyhow::Result<BrokerFigures> {
    let names = BrokerNames {
        prefix: format!("orderflow-baseline-{id}"),
        hops: spec.hops,
    };
    let admin = connect_broker(url, &format!("{}-admin", names.prefix)).await?;
    let mut run = BrokerRun {
        connections: Vec::new(),
        relays: JoinSet::new(),
    };
    let result = async {
        tokio::time::timeout(SETUP_TIMEOUT, declare(&admin, &names))
            .await
            .map_err(|_| {
                anyhow!("declaring the baseline's queues took over {SETUP_TIMEOUT:?}")
            })??;
        drive(url, &names, spec, &mut run).await
    }
    .await;
    run.close().await;
    let cleanup = tokio::time::timeout(SETUP_TIMEOUT, delete(&admin, &names))
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {SETUP_TIMEOUT:?}")))
        .with_context(|| {
            format!(
                "deleting the baseline's exchange and queues `{}*` failed; \
                 delete them by hand (rabbitmqctl delete_queue <name>)",
                names.prefix
            )
        });
    let _ = tokio::time::timeout(SETUP_TIMEOUT, admin.close(200, "baseline done".into())).await;
    with_cleanup(result, cleanup)
}

/// Declares the exchange, the hop queues (and their dead-letter queue) and
/// the bindings.
async fn declare(admin: &Connection, names: &BrokerNames) -> anyhow::Result<()> {
    let channel = admin
        .create_channel()
        .await
        .context("RabbitMQ refused to open a channel")?;
    let exchange = names.exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange `{exchange}`"))?;
    let dead = names.dead_queue();
    let (service_arguments, dead_arguments) = queue_arguments(&dead)?;
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            dead_arguments,
        )
        .await
        .with_context(|| format!("declaring queue `{dead}`"))?;
    for hop in 0..names.hops {
        let queue = names.queue(hop);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                service_arguments.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "declaring quorum queue `{queue}`; does this RabbitMQ support quorum queues?"
                )
            })?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                routing_key(hop).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding `{queue}` to `{exchange}`"))?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Deletes every queue and the exchange, each on a fresh channel (a failed
/// delete closes its channel); reports the first failure after trying all.
async fn delete(admin: &Connection, names: &BrokerNames) -> anyhow::Result<()> {
    let mut first_error = None;
    let mut record = |error: anyhow::Error| {
        first_error.get_or_insert(error);
    };
    for queue in names.queues() {
        let deleted = on_own_channel(admin, async |channel| {
            let options = QueueDeleteOptions::default();
            channel
                .queue_delete(queue.as_str().into(), options)
                .await
                .map(drop)
        });
        if let Err(error) = deleted.await {
            record(anyhow!(error).context(format!("deleting queue `{queue}`")));
        }
    }
    let exchange = names.exchange();
    let deleted = on_own_channel(admin, async |channel| {
        let options = ExchangeDeleteOptions::default();
        channel
            .exchange_delete(exchange.as_str().into(), options)
            .await
    });
    if let Err(error) = deleted.await {
        record(anyhow!(error).context(format!("deleting exchange `{exchange}`")));
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs `work` on a channel of its own on `connection`, then closes it.
async fn on_own_channel(
    connection: &Connection,
    work: impl AsyncFnOnce(&Channel) -> Result<(), lapin::Error>,
) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    work(&channel).await?;
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Starts one relay per queue (each on its own connection, like a service),
/// then pushes the orders through and measures them.
async fn drive(
    url: &str,
    names: &BrokerNames,
    spec: &BaselineSpec,
    run: &mut BrokerRun,
) -> anyhow::Result<BrokerFigures> {
    let waiting: Waiting = Arc::new(Mutex::new(HashMap::new()));
    let exchange: Arc<str> = names.exchange().into();
    let setup = async {
        for hop in 0..spec.hops {
            let connection = run
                .connect(url, &format!("{}-hop-{hop}", names.prefix))
                .await?;
            let consuming = connection
                .create_channel()
                .await
                .context("RabbitMQ refused to open a channel")?;
            consuming
                .basic_qos(spec.prefetch, BasicQosOptions::default())
                .await
                .context("setting the consumer prefetch")?;
            let next = if hop + 1 < spec.hops {
                Some((confirm_channel(connection).await?, exchange.clone()))
            } else {
                None
            };
            let queue = names.queue(hop);
            let consumer = consuming
                .basic_consume(
                    queue.as_str().into(),
                    format!("{}-hop-{hop}", names.prefix).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("consuming `{queue}`"))?;
            let relay = Relay {
                hop,
                next,
                waiting: waiting.clone(),
            };
            run.relays.spawn(relay.run(consumer));
        }
        let driver = run
            .connect(url, &format!("{}-driver", names.prefix))
            .await?;
        confirm_channel(driver).await
    };
    let channel = tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| {
            anyhow!("setting up the baseline's consumers took over {SETUP_TIMEOUT:?}")
        })??;
    let first_key = routing_key(0);
    let one_order = |order: u64| {
        let (channel, waiting, exchange, first_key) = (&channel, &waiting, &exchange, &first_key);
        async move {
            let (done, finished) = oneshot::channel();
            waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(order, done);
            let started = Instant::now();
            publish_confirmed(channel, exchange, first_key, order, 0, None).await?;
            finished
                .await
                .with_context(|| format!("order {order} was dropped before its last hop"))?;
            Ok::<_, anyhow::Error>(started.elapsed())
        }
    };

    let started = Instant::now();
    let mut orders = futures::stream::iter(0..spec.orders as u64)
        .map(one_order)
        .buffer_unordered(spec.concurrency);
    let mut latencies_ms = Vec::with_capacity(spec.orders);
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(STALL_TIMEOUT, orders.next()) => next,
            Some(stopped) = run.relays.join_next() => {
                let error = match stopped {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => anyhow!("a relay stopped"),
                    Err(join) => anyhow!(join).context("a relay panicked"),
                };
                return Err(error);
            }
        };
        match next {
            Err(_) => bail!(
                "no order got through the broker within {STALL_TIMEOUT:?} \
                 ({} of {} done): a message was lost or RabbitMQ is stalled \
                 (a memory or disk alarm? see `rabbitmqctl status`)",
                latencies_ms.len(),
                spec.orders
            ),
            Ok(None) => break,
            Ok(Some(latency)) => latencies_ms.push(latency?.as_secs_f64() * 1000.0),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(BrokerFigures {
        orders_per_s: spec.orders as f64 / wall,
        p50_ms: percentile(&latencies_ms, 50.0),
        p99_ms: percentile(&latencies_ms, 99.0),
    })
}

// The database part.

struct DbFigures {
    commits_per_s: f64,
    orders_per_s: f64,
}

async fn measure_db(url: &str, id: &str, spec: &BaselineSpec) -> anyhow::Result<DbFigures> {
    let schema = format!("orderflow_baseline_{id}");
    let cannot_reach = || {
        format!(
            "cannot reach PostgreSQL at {}; is it running there, and is the URL right?",
            redact_url(url)
        )
    };
    let options = PgConnectOptions::from_str(url)
        .with_context(|| format!("database URL `{}` is invalid", redact_url(url)))?;
    let mut admin = match tokio::time::timeout(SETUP_TIMEOUT, options.connect()).await {
        Ok(connected) => connected.map_err(anyhow::Error::from),
        Err(_) => Err(anyhow!("no answer within {SETUP_TIMEOUT:?}")),
    }
    .with_context(cannot_reach)?;
    let created = sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating schema `{schema}`; may this user create schemas?"));
    let result = match created {
        Ok(_) => run_db(url, &schema, spec).await,
        Err(error) => Err(error),
    };
    let cleanup = drop_schema(&mut admin, &schema).await;
    let _ = admin.close().await;
    with_cleanup(result, cleanup)
}

async fn drop_schema(admin: &mut PgConnection, schema: &str) -> anyhow::Result<()> {
    let dropped = tokio::time::timeout(
        SETUP_TIMEOUT,
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(admin),
    )
    .await;
    match dropped {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(anyhow!(error)),
        Err(_) => Err(anyhow!("no answer within {SETUP_TIMEOUT:?}")),
    }
    .with_context(|| {
        format!(
            "dropping schema `{schema}` failed; drop it by hand: DROP SCHEMA \"{schema}\" CASCADE"
        )
    })
}

async fn run_db(url: &str, schema: &str, spec: &BaselineSpec) -> anyhow::Result<DbFigures> {
    let db = Db::open(&SecretString::from(url), schema, spec.db_connections).await?;
    let result = async {
        db.migrate(None).await?;
        let orders = spec.orders.min(DB_ORDERS_CAP);
        let started = Instant::now();
        let mut running = futures::stream::iter(0..orders as u64)
            .map(|order| db_order(&db, order, spec.transactions))
            .buffer_unordered(spec.concurrency.max(spec.db_connections as usize));
        let mut done = 0_usize;
        loop {
            match tokio::time::timeout(STALL_TIMEOUT, running.next()).await {
                Err(_) => bail!(
                    "no order committed within {STALL_TIMEOUT:?} ({done} of {orders} done): \
                     is PostgreSQL stalled (locks, a full disk)?"
                ),
                Ok(None) => break,
                Ok(Some(order)) => {
                    order?;
                    done += 1;
                }
            }
        }
        let wall = started.elapsed().as_secs_f64();
        Ok(DbFigures {
            commits_per_s: (orders * spec.transactions) as f64 / wall,
            orders_per_s: orders as f64 / wall,
        })
    }
    .await;
    db.close().await;
    result
}

/// One order's transactions, one after the other, each an inbox row and an
/// outbox row committed durably — what a stateful handler commits.
async fn db_order(db: &Db, order: u64, transactions: usize) -> anyhow::Result<()> {
    let correlation_id = order.to_string();
    for step in 0..transactions {
        let message_id = Uuid::now_v7().to_string();
        let routing_key = routing_key(step);
        let mut tx = db.pool().begin().await.context("beginning a transaction")?;
        sqlx::query(
            "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind("baseline")
        .bind(&message_id)
        .execute(&mut *tx)
        .await
        .context("inserting an inbox row")?;
        sqlx::query(
            "INSERT INTO outbox (message_id, routing_key, correlation_id, causation_id, \
             traceparent, occurred_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(&routing_key)
        .bind(&correlation_id)
        .bind(&message_id)
        .bind("00-00000000000000000000000000000000-0000000000000000-00")
        .bind(0_i64)
        .bind(body(order, step))
        .execute(&mut *tx)
        .await
        .context("inserting an outbox row")?;
        tx.commit().await.context("committing")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_about_an_event_long_and_carry_the_order() {
        let body = body(123_456, 3);
        assert_eq!(body.len(), BODY_BYTES);
        let parsed: Body = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.order, 123_456);
    }

    #[test]
    fn queues_get_the_service_queue_arguments() {
        let (service, dead) = queue_arguments("x.dead").unwrap();
        let service = service.inner();
        assert!(matches!(
            service.get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.to_string() == "quorum"
        ));
        assert!(matches!(
            service.get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString(key)) if key.to_string() == "x.dead"
        ));
        assert!(service.contains_key("x-delivery-limit"));
        assert!(dead.inner().contains_key("x-queue-type"));
    }

    /// Fails unless neither the baseline `id`'s exchange and queues nor its
    /// schema exist any more.
    async fn assert_nothing_left(id: &str, hops: usize) {
        let names = BrokerNames {
            prefix: format!("orderflow-baseline-{id}"),
            hops,
        };
        let connection = Connection::connect(
            &orderflow_tests::amqp_url(),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        for queue in names.queues() {
            let channel = connection.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let found = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await;
            assert!(found.is_err(), "queue `{queue}` was left behind");
        }
        let channel = connection.create_channel().await.unwrap();
        let exchange = names.exchange();
        let found = channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(found.is_err(), "exchange `{exchange}` was left behind");
        let _ = connection.close(200, "checked".into()).await;

        let mut db = PgConnection::connect(&orderflow_tests::admin_database_url())
            .await
            .unwrap();
        let schemas: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
        )
        .bind(format!("orderflow_baseline_{id}"))
        .fetch_one(&mut db)
        .await
        .unwrap();
        assert_eq!(schemas, 0, "schema orderflow_baseline_{id} was left behind");
        db.close().await.unwrap();
    }

    fn test_id() -> String {
        Uuid::now_v7().simple().to_string()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn baseline_measures_broker_and_database_and_leaves_nothing_behind() {
        let spec = BaselineSpec {
            orders: 30,
            concurrency: 5,
            hops: 3,
            transactions: 4,
            prefetch: 64,
            db_connections: 4,
        };
        let id = test_id();
        let baseline = measure_as(
            &orderflow_tests::amqp_url(),
            &orderflow_tests::admin_database_url(),
            &spec,
            &id,
        )
        .await
        .unwrap();
        println!("{}", serde_json::to_string(&baseline).unwrap());
        assert!(baseline.broker_orders_per_s > 0.0, "{baseline:?}");
        assert!(baseline.broker_p50_ms > 0.0, "{baseline:?}");
        assert!(
            baseline.broker_p99_ms >= baseline.broker_p50_ms,
            "{baseline:?}"
        );
        assert!(baseline.db_commits_per_s > 0.0, "{baseline:?}");
        assert!(baseline.db_orders_per_s > 0.0, "{baseline:?}");
        assert!(
            (baseline.db_commits_per_s / baseline.db_orders_per_s - 4.0).abs() < 1e-6,
            "{baseline:?}"
        );
        assert!(
            (baseline.ceiling_orders_per_s
                - baseline.broker_orders_per_s.min(baseline.db_orders_per_s))
            .abs()
                < f64::EPSILON,
            "{baseline:?}"
        );
        assert_nothing_left(&id, spec.hops).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn baseline_cleans_the_broker_up_when_the_database_part_fails() {
        let spec = BaselineSpec {
            orders: 5,
            concurrency: 2,
            hops: 2,
            transactions: 1,
            prefetch: 8,
            db_connections: 1,
        };
        let id = test_id();
        // A database that does not exist: the broker part runs, the database part fails.
        let url = format!(
            "{}_baseline_missing_{id}",
            orderflow_tests::admin_database_url()
        );
        let error = measure_as(&orderflow_tests::amqp_url(), &url, &spec, &id)
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("cannot reach PostgreSQL"),
            "{error:#}"
        );
        assert_nothing_left(&id, spec.hops).await;
    }

    /// Makes the baseline's declaration of `id` fail by declaring, first,
    /// its exchange (`exchange: true`) or its second hop queue with other
    /// arguments; the baseline must fail and still remove everything.
    async fn declaration_fails_and_is_cleaned_up(exchange: bool) {
        let id = test_id();
        let names = BrokerNames {
            prefix: format!("orderflow-baseline-{id}"),
            hops: 3,
        };
        let connection = Connection::connect(
            &orderflow_tests::amqp_url(),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = connection.create_channel().await.unwrap();
        if exchange {
            channel
                .exchange_declare(
                    names.exchange().as_str().into(),
                    lapin::ExchangeKind::Fanout,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        } else {
            channel
                .queue_declare(
                    names.queue(1).as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let _ = connection.close(200, "conflict set up".into()).await;
        let spec = BaselineSpec {
            orders: 5,
            concurrency: 2,
            hops: names.hops,
            transactions: 1,
            prefetch: 8,
            db_connections: 1,
        };
        let error = measure_as(
            &orderflow_tests::amqp_url(),
            &orderflow_tests::admin_database_url(),
            &spec,
            &id,
        )
        .await
        .unwrap_err();
        let expected = if exchange {
            format!("declaring exchange `{}`", names.exchange())
        } else {
            format!("declaring quorum queue `{}`", names.queue(1))
        };
        assert!(format!("{error:#}").contains(&expected), "{error:#}");
        // Deleting what was never declared is no error of its own.
        assert!(!format!("{error:#}").contains("deleting"), "{error:#}");
        assert_nothing_left(&id, names.hops).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn baseline_cleans_up_when_declaring_its_exchange_fails() {
        declaration_fails_and_is_cleaned_up(true).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn baseline_cleans_up_when_declaring_a_queue_fails() {
        declaration_fails_and_is_cleaned_up(false).await;
    }

    #[tokio::test]
    async fn a_spec_without_orders_is_refused() {
        let spec = BaselineSpec {
            orders: 0,
            concurrency: 1,
            hops: 1,
            transactions: 1,
            prefetch: 1,
            db_connections: 1,
        };
        let error = measure("amqp://nowhere", "postgres://nowhere", &spec)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("at least one order"), "{error}");
    }
}
