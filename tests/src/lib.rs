//! Helpers for the end-to-end tests: every test gets its own broker namespace
//! and its own PostgreSQL database on the real local services, and removes
//! both when it ends (also when it fails).

pub mod api;
pub mod private_broker;
pub mod proxy;
pub mod system;

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use orderflow_shared::app::Ctx;
use orderflow_shared::bus::{Broker, ConsumerOptions, Handler, Outgoing, Publisher, run_consumer};
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::{self, Db};
use orderflow_shared::topology::{Names, ServiceSpec, Topology, orderflow_services};
use orderflow_shared::{Shutdown, telemetry};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

/// The token keys the tests sign with.
pub const TEST_TOKEN_KEYS: &str = "test:orderflow-test-signing-key";

/// The console's operator token in the tests.
pub const TEST_OPERATOR_TOKEN: &str = "orderflow-test-operator-token";

/// Short delay tiers so that tests of the retry ladder take a second, not minutes.
pub const TEST_RETRY_TIERS: [Duration; 2] =
    [Duration::from_millis(300), Duration::from_millis(600)];

pub fn amqp_url() -> String {
    std::env::var("ORDERFLOW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The server the per-test databases are created on (its `postgres` database).
pub fn admin_database_url() -> String {
    std::env::var("ORDERFLOW_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// One test's private slice of the broker and the database server.
pub struct TestEnv {
    pub namespace: String,
    pub database: String,
    pub database_url: SecretString,
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub broker: Broker,
    cleaned: bool,
}

impl TestEnv {
    /// A fresh namespace with `services`' queues declared, and a fresh database.
    pub async fn new(services: &[ServiceSpec]) -> Self {
        Self::with_tiers(services, &TEST_RETRY_TIERS).await
    }

    /// The whole orderflow topology with the deployment's delay tiers, as
    /// `orderflow up` declares it (for tests that run the real binary).
    pub async fn deployment() -> Self {
        let metadata = Metadata::embedded().expect("repository metadata");
        Self::with_tiers(
            &orderflow_services(&metadata.methods()),
            &orderflow_shared::topology::DEFAULT_RETRY_TIERS,
        )
        .await
    }

    /// [`new`](Self::new) with other delay tiers.
    pub async fn with_tiers(services: &[ServiceSpec], tiers: &[Duration]) -> Self {
        let _ = telemetry::init(
            &std::env::var("ORDERFLOW_LOG").unwrap_or_else(|_| "off".to_owned()),
            orderflow_shared::config::LogFormat::Text,
        );
        let id = uuid::Uuid::now_v7().simple().to_string();
        // The random tail of a v7 UUID, so parallel tests never collide.
        let namespace = format!("t{}", &id[16..]);
        let database = format!("orderflow_{namespace}");
        let database_url =
            store::url_with_database(&SecretString::from(admin_database_url()), &database)
                .expect("a test database URL");
        store::ensure_database(&database_url)
            .await
            .unwrap_or_else(|error| {
                panic!("creating {database}: {error}; is PostgreSQL running (see README)?")
            });
        let topology = Topology::build(Names::new(&namespace), services, tiers);
        let amqp_url = SecretString::from(amqp_url());
        let broker = Broker::new(
            &amqp_url,
            &namespace,
            topology.clone(),
            Duration::from_secs(10),
        )
        .expect("broker handle");
        broker
            .declare_topology(Duration::from_secs(30))
            .await
            .expect("declare test topology");
        Self {
            namespace,
            database,
            database_url,
            amqp_url,
            topology,
            broker,
            cleaned: false,
        }
    }

    /// A fresh namespace whose one service, `service`, reads
    /// `order.cancelled` (the event of [`sample_event`]), and a fresh database.
    pub async fn with_service(service: &str) -> Self {
        Self::new(&[ServiceSpec::new(service, &["order.cancelled"])]).await
    }

    /// The whole orderflow topology (every service, the configured payment
    /// methods) in a fresh namespace, and a fresh database.
    pub async fn orderflow() -> Self {
        let metadata = Metadata::embedded().expect("repository metadata");
        Self::new(&orderflow_services(&metadata.methods())).await
    }

    /// Settings pointing at this test's namespace and database; token keys
    /// set to a test key, the console's operator token to
    /// [`TEST_OPERATOR_TOKEN`].
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::defaults().expect("default settings");
        settings.amqp_url = self.amqp_url.clone();
        settings.database_url = self.database_url.clone();
        settings.namespace.clone_from(&self.namespace);
        settings.token_keys = Some(SecretString::from(TEST_TOKEN_KEYS.to_owned()));
        settings.operator_token = Some(SecretString::from(TEST_OPERATOR_TOKEN.to_owned()));
        "off".clone_into(&mut settings.log);
        settings
    }

    /// A service context on this test's topology, as `orderflow up` builds one.
    pub fn ctx(&self, connection_name: &str) -> Ctx {
        self.ctx_with(self.settings(), connection_name)
    }

    /// A service context with other settings (timeouts, keys).
    pub fn ctx_with(&self, settings: Settings, connection_name: &str) -> Ctx {
        Ctx::new(
            settings,
            Metadata::embedded().expect("repository metadata"),
            self.topology.clone(),
            &format!("{}-{connection_name}", self.namespace),
        )
        .expect("service context")
    }

    /// A migrated store for `schema` in this test's database.
    pub async fn db(&self, schema: &str) -> Db {
        let db = Db::connect(&self.database_url, schema, 10)
            .await
            .expect("connect test database");
        db.migrate(None).await.expect("migrate");
        db
    }

    pub fn queue(&self, service: &str) -> String {
        self.topology.names.service_queue(service)
    }

    pub fn dead_letter_queue(&self, service: &str) -> String {
        self.topology.names.dead_letter_queue(service)
    }

    /// Another broker handle named after this test's namespace, for
    /// `topology`, reaching the broker at `amqp_url` (through a proxy, say)
    /// and giving up on a publish after `publish_timeout`.
    pub fn broker_with(
        &self,
        amqp_url: &SecretString,
        topology: Topology,
        publish_timeout: Duration,
    ) -> Broker {
        Broker::new(amqp_url, &self.namespace, topology, publish_timeout).expect("broker handle")
    }

    /// Publishes [`sample_event`] of `order_id` on a new publisher of this
    /// test's broker handle, and waits for the broker's confirm.
    pub async fn publish_sample(&self, order_id: &str) {
        publish_samples(&self.broker.publisher(), [order_id]).await;
    }

    /// A plain channel on its own connection, for poking at the broker the way
    /// a user of the management UI would.
    pub async fn raw_channel(&self) -> (Connection, Channel) {
        let connection = Connection::connect(
            self.amqp_url.expose_secret(),
            ConnectionProperties::default()
                .with_connection_name(format!("{}-raw", self.namespace).into()),
        )
        .await
        .expect("raw connection");
        let channel = connection.create_channel().await.expect("raw channel");
        (connection, channel)
    }

    /// Publishes `body` on the events exchange with `properties` exactly as
    /// given (no envelope added), like a message typed into the RabbitMQ UI.
    pub async fn publish_bare(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let (connection, channel) = self.raw_channel().await;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let confirm = channel
            .basic_publish(
                self.topology.names.events_exchange().into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
        let _ = connection.close(200, "done".into()).await;
    }

    /// Publishes `body` as JSON on the events exchange, bare (no envelope),
    /// as a client typing into the RabbitMQ UI would.
    pub async fn publish_json(&self, routing_key: &str, body: &serde_json::Value) {
        self.publish_bare(
            routing_key,
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }

    /// Number of ready messages in `queue`.
    pub async fn message_count(&self, queue: &str) -> u32 {
        self.queue_counts(queue).await.0
    }

    /// Number of consumers of `queue`.
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.queue_counts(queue).await.1
    }

    /// (ready messages, consumers) of `queue`.
    async fn queue_counts(&self, queue: &str) -> (u32, u32) {
        let (connection, channel) = self.raw_channel().await;
        let declared = orderflow_topology::inspect_queue(&channel, queue)
            .await
            .expect("queue exists");
        let _ = connection.close(200, "done".into()).await;
        (declared.message_count(), declared.consumer_count())
    }

    /// Takes every message currently in `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let (connection, channel) = self.raw_channel().await;
        let mut messages = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            messages.push(message);
        }
        let _ = connection.close(200, "done".into()).await;
        messages
    }

    /// Starts a consumer for `service` with `handler`; stop it with the token.
    pub fn spawn_consumer<H: Handler>(
        &self,
        options: ConsumerOptions,
        handler: Arc<H>,
    ) -> (Shutdown, JoinHandle<()>) {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(run_consumer(
            self.broker.clone(),
            options,
            handler,
            shutdown.clone(),
        ));
        let handle = tokio::spawn(async move {
            task.await
                .expect("consumer task panicked")
                .expect("consumer failed");
        });
        (shutdown, handle)
    }

    /// Starts a consumer with `options` whose handler is an [`Effects`] on
    /// the schema named after the service, lingering `linger` after each
    /// commit; stop it with the token.
    pub async fn spawn_effects(
        &self,
        options: ConsumerOptions,
        linger: Duration,
    ) -> (Arc<Effects>, Shutdown, JoinHandle<()>) {
        let service = options.service.clone();
        let effects = Arc::new(Effects {
            linger,
            ..Effects::new(self.db(&service).await, &service).await
        });
        let (stop, consumer) = self.spawn_consumer(options, effects.clone());
        (effects, stop, consumer)
    }

    /// Closes, on the broker side, every connection of this test's broker
    /// handle (as `rabbitmqctl close_connection` does for an operator).
    /// Blocking: call it from `spawn_blocking`. Panics when none was found.
    pub fn close_broker_connections(&self) -> usize {
        // The plain (tab-separated) listing prints pids in the form
        // `close_connection` accepts; the JSON one does not.
        let output = Command::new("rabbitmqctl")
            .args(["list_connections", "pid", "client_properties", "-q"])
            .output()
            .expect("rabbitmqctl is installed");
        assert!(
            output.status.success(),
            "rabbitmqctl list_connections failed"
        );
        let listing = String::from_utf8_lossy(&output.stdout);
        let marker = format!("\"{}\"", self.namespace);
        let mut closed = 0;
        for line in listing.lines().filter(|line| line.contains(&marker)) {
            let pid = line.split('\t').next().expect("pid column");
            let status = Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test closes the connection"])
                .status()
                .expect("rabbitmqctl close_connection");
            if status.success() {
                closed += 1;
            }
        }
        assert!(
            closed > 0,
            "no connection named {} could be closed among: {listing}",
            self.namespace
        );
        closed
    }

    /// Deletes this test's queues and exchange and drops its database.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        self.broker.close();
        cleanup(&self.topology, &self.amqp_url, &self.database_url).await;
    }
}

async fn cleanup(topology: &Topology, amqp_url: &SecretString, database_url: &SecretString) {
    if let Ok(connection) =
        Connection::connect(amqp_url.expose_secret(), ConnectionProperties::default()).await
        && let Ok(channel) = connection.create_channel().await
    {
        let _ = orderflow_shared::topology::delete(&channel, topology).await;
        let _ = connection.close(200, "cleanup".into()).await;
    }
    let _ = store::drop_database(database_url).await;
}

impl Drop for TestEnv {
    /// A test that failed before `cleanup` still leaves nothing behind.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        self.broker.close();
        let topology = self.topology.clone();
        let amqp_url = self.amqp_url.clone();
        let database_url = self.database_url.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Runtime::new() {
                runtime.block_on(cleanup(&topology, &amqp_url, &database_url));
            }
        })
        .join();
    }
}

/// Polls `condition` until it holds or `patience` runs out (then panics with
/// `what`). For eventual outcomes only, never to assert speed.
pub async fn eventually<F, Fut>(patience: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stateful handler for the tests: applies each message once through the
/// inbox (one row in `effects` per applied message) and counts deliveries.
/// `effects` has no unique constraint, so without the inbox a duplicate
/// delivery would show as a second row.
pub struct Effects {
    pub db: Db,
    pub consumer: String,
    /// Handler calls that began.
    pub started: std::sync::atomic::AtomicUsize,
    /// Handler calls that returned (their transaction committed or skipped).
    pub deliveries: std::sync::atomic::AtomicUsize,
    /// Pause after the commit, before the ack: the window in which a lost
    /// connection makes the broker deliver an applied message again.
    pub linger: Duration,
}

impl Effects {
    pub async fn new(db: Db, consumer: &str) -> Self {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS effects (message_id TEXT NOT NULL, order_id TEXT NOT NULL)",
        )
        .execute(db.pool())
        .await
        .expect("create effects table");
        Self {
            db,
            consumer: consumer.to_owned(),
            started: std::sync::atomic::AtomicUsize::new(0),
            deliveries: std::sync::atomic::AtomicUsize::new(0),
            linger: Duration::ZERO,
        }
    }

    /// (rows, distinct message ids) in `effects`.
    pub async fn counts(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM effects")
            .fetch_one(self.db.pool())
            .await
            .expect("count effects")
    }

    pub fn started(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Deliveries fully handled (duplicates included).
    pub fn deliveries(&self) -> usize {
        self.deliveries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Handler for Effects {
    async fn handle(
        &self,
        message: &orderflow_shared::bus::Message,
    ) -> Result<(), orderflow_shared::bus::HandleError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let result = self.apply(message).await;
        self.deliveries
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        result
    }
}

impl Effects {
    async fn apply(
        &self,
        message: &orderflow_shared::bus::Message,
    ) -> Result<(), orderflow_shared::bus::HandleError> {
        let Some(mut unit) = self
            .db
            .begin_unit(&self.consumer, &message.envelope)
            .await?
        else {
            return Ok(());
        };
        sqlx::query("INSERT INTO effects (message_id, order_id) VALUES ($1, $2)")
            .bind(&message.envelope.message_id)
            .bind(message.order_id())
            .execute(unit.conn())
            .await?;
        unit.commit().await?;
        tokio::time::sleep(self.linger).await;
        Ok(())
    }
}

/// A small valid event for tests that do not care which event it is.
pub fn sample_event(order_id: &str) -> orderflow_shared::events::Event {
    orderflow_shared::events::Event::OrderCancelled(orderflow_shared::events::OrderCancelled {
        order_id: order_id.to_owned(),
        reason: "test".to_owned(),
    })
}

/// Publishes one [`sample_event`] per order id on `publisher`, in order,
/// each confirmed by the broker.
pub async fn publish_samples<I>(publisher: &Publisher, order_ids: I)
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    for order_id in order_ids {
        let order_id = order_id.as_ref();
        publisher
            .publish(&Outgoing::event(&sample_event(order_id), None))
            .await
            .unwrap_or_else(|error| panic!("publishing the event of {order_id}: {error}"));
    }
}

/// The one number `sql` selects in `db` (a `count(*)`, mostly).
pub async fn count(db: &Db, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(db.pool())
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// The one number `sql` selects in `db` with `$1` bound to `param`.
pub async fn count_with<'q, P>(db: &Db, sql: &'static str, param: P) -> i64
where
    P: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + 'q,
{
    sqlx::query_scalar(sql)
        .bind(param)
        .fetch_one(db.pool())
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
}

/// Runs a command to its end: (exit code, stdout, stderr), for tests of
/// command-line programs.
pub async fn run_to_end(command: &mut tokio::process::Command) -> (i32, String, String) {
    let output = command.output().await.expect("the command starts");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
