//! The whole orderflow system in-process, as `orderflow up` runs it, on one
//! test's namespace and database, with an HTTP client for its API and the
//! steps tests share: placing and paying orders, operator calls, publishing
//! events and dead letters, waiting on queues, reading the history; and
//! [`Worker`], one more worker a test starts and stops itself.

use std::future::Future;
use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::Shutdown;
use orderflow_shared::app::Ctx;
use orderflow_shared::bus::Outgoing;
use orderflow_shared::config::Settings;
use orderflow_shared::envelope::{header_str, headers};
use orderflow_shared::events::{Event, OrderStarted, ProductLine};
use orderflow_shared::store::Db;
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};

use crate::{TestEnv, eventually};

/// Settings of one service (by name) adjusted before it starts: a test of
/// least privilege gives each its own broker user and database role.
pub type PerService = std::sync::Arc<dyn Fn(&str, &mut Settings) + Send + Sync>;

/// Which workers run; tests of a missing worker leave one out.
#[derive(Clone)]
pub struct Workers {
    pub generate_info: bool,
    /// Leave it out to start (and stop) coordinators yourself with
    /// [`System::start_coordinator`].
    pub coordinator: bool,
    /// Payment methods whose provider does not run in-process (a test runs
    /// it itself, e.g. as a separate process).
    pub without_providers: Vec<&'static str>,
    /// The deployment's delay tiers (1 s, 10 s, 1 min) instead of the tests'
    /// short ones: for workers run as separate processes, which build the
    /// deployment's topology.
    pub deployment_tiers: bool,
    /// Adjusts each service's settings (after the system-wide ones).
    pub per_service: Option<PerService>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("generate_info", &self.generate_info)
            .field("coordinator", &self.coordinator)
            .field("without_providers", &self.without_providers)
            .field("deployment_tiers", &self.deployment_tiers)
            .field("per_service", &self.per_service.is_some())
            .finish()
    }
}

impl Workers {
    /// Every worker but those `leave_out` turns off:
    /// `Workers::all_but(|w| w.generate_info = false)`.
    pub fn all_but(leave_out: impl FnOnce(&mut Workers)) -> Self {
        let mut workers = Self::default();
        leave_out(&mut workers);
        workers
    }

    /// Whether the worker `name` runs in-process.
    pub fn runs(&self, name: &str) -> bool {
        (self.generate_info || name != generate_info::SERVICE)
            && (self.coordinator || name != saga_coordinator::SERVICE)
            && !self
                .without_providers
                .iter()
                .any(|method| payment_provider::service_name(method) == name)
    }
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            generate_info: true,
            coordinator: true,
            without_providers: Vec::new(),
            deployment_tiers: false,
            per_service: None,
        }
    }
}

pub struct System {
    pub env: TestEnv,
    pub ctx: Ctx,
    pub api: String,
    pub client: reqwest::Client,
    shutdown: Shutdown,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl System {
    /// Every worker and the API with the default test settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}, Workers::default()).await
    }

    /// Every worker and the API with `adjust`ed test settings.
    pub async fn start_adjusted(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::start_with(adjust, Workers::default()).await
    }

    /// Every worker and the API, each checking every 100 ms (not every
    /// second) whether an operator paused its service, with `adjust`ed test
    /// settings besides.
    pub async fn start_pausable(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::start_adjusted(|settings| {
            settings.pause_check_ms = 100;
            adjust(settings);
        })
        .await
    }

    /// Every worker but those `leave_out` turns off, and the API, with the
    /// default test settings: `System::start_without(|w| w.coordinator = false)`.
    pub async fn start_without(leave_out: impl FnOnce(&mut Workers)) -> Self {
        Self::start_with(|_| {}, Workers::all_but(leave_out)).await
    }

    /// Every worker in `workers` and the API, with `adjust`ed settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings), workers: Workers) -> Self {
        let env = if workers.deployment_tiers {
            TestEnv::deployment().await
        } else {
            TestEnv::orderflow().await
        };
        Self::start_in(env, adjust, workers).await
    }

    /// [`start_with`](Self::start_with) in an environment the test prepared
    /// (users and roles provisioned before the workers start).
    pub async fn start_in(
        env: TestEnv,
        adjust: impl FnOnce(&mut Settings),
        workers: Workers,
    ) -> Self {
        let mut settings = env.settings();
        settings.gateway_latency_ms = 1;
        adjust(&mut settings);
        // As `orderflow up` (or `orderflow db init` in a deployment) does
        // before any worker starts.
        orderflow_shared::store::Db::migrate_all(&env.database_url)
            .await
            .expect("migrate every context");
        let ctx = env.ctx_with(settings.clone(), "system");
        // Each service's own context (its own connection name, and the
        // settings `per_service` gives it).
        let ctx_of = |service: &str| {
            let mut settings = settings.clone();
            if let Some(adjust) = &workers.per_service {
                adjust(service, &mut settings);
            }
            env.ctx_with(settings, service)
        };
        let shutdown = Shutdown::new();
        let mut tasks = JoinSet::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API");
        let api = format!("http://{}", listener.local_addr().expect("address"));
        let running = orderflow_workers::start_all(
            &ctx.metadata,
            ctx_of,
            |name| workers.runs(name),
            listener,
            &shutdown,
        );
        for (_, task) in running {
            tasks.spawn(task);
        }
        let system = Self {
            env,
            ctx,
            api,
            client: reqwest::Client::new(),
            shutdown,
            tasks,
        };
        crate::api::wait_healthy(&system.client, &system.api).await;
        system
    }

    /// GET `path` of the API; (status, body: `null` unless JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.get_response(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GET `path` of the API, the response as it came (headers, text).
    pub async fn get_response(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .expect("GET")
    }

    /// Starts one more coordinator instance; stop it with the returned token.
    pub fn start_coordinator(&self) -> (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(saga_coordinator::run(self.ctx.clone(), shutdown.clone()));
        (shutdown, task)
    }

    /// How many history entries of `order_id` are of `kind` and named `name`.
    pub async fn history_count(&self, order_id: &str, kind: &str, name: &str) -> usize {
        self.history(order_id)
            .await
            .iter()
            .filter(|(k, n)| k == kind && n == name)
            .count()
    }

    /// Asserts that the history of `order_id` has an entry of `kind` named
    /// `name`.
    pub async fn assert_in_history(&self, order_id: &str, kind: &str, name: &str) {
        let history = self.history(order_id).await;
        assert!(
            history.iter().any(|(k, n)| k == kind && n == name),
            "no {kind} {name} in the history of {order_id}: {history:?}"
        );
    }

    /// The (kind, name) of each history entry of `order_id`, in order.
    pub async fn history(&self, order_id: &str) -> Vec<(String, String)> {
        self.with_db("coordinator", async |db| {
            sqlx::query_as("SELECT kind, name FROM history WHERE order_id = $1 ORDER BY id")
                .bind(order_id)
                .fetch_all(db.pool())
                .await
                .expect("history")
        })
        .await
    }

    /// POST /orders; (status, body).
    pub async fn post_order(&self, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}/orders", self.api))
            .json(body)
            .send()
            .await
            .expect("POST /orders");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Places an order and returns its id.
    pub async fn place(&self, supplier: &str, products: &[(&str, u32)]) -> String {
        let products: Vec<Value> = products
            .iter()
            .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
            .collect();
        let (status, body) = self
            .post_order(&json!({"supplier": supplier, "products": products, "address": "1 Road"}))
            .await;
        assert_eq!(status, 202, "{body}");
        body["order_id"].as_str().expect("order_id").to_owned()
    }

    /// GET /orders/{id}?wait_for=status; panics unless it reached `status`
    /// (or, with `or_terminal`, ended).
    pub async fn wait_for(&self, order_id: &str, status: &str) -> Value {
        let order = self.get_order(order_id, Some(status)).await;
        assert_eq!(order["status"], status, "order {order_id}: {order:#}");
        order
    }

    /// GET /orders/{id}, long-polling for `wait_for` up to 20 s.
    pub async fn get_order(&self, order_id: &str, wait_for: Option<&str>) -> Value {
        let mut request = self.client.get(format!("{}/orders/{order_id}", self.api));
        if let Some(status) = wait_for {
            request = request.query(&[("wait_for", status), ("timeout_ms", "20000")]);
        }
        let response = request.send().await.expect("GET /orders/{id}");
        assert!(
            response.status().is_success(),
            "GET {order_id}: {}",
            response.status()
        );
        response.json().await.expect("order JSON")
    }

    /// POST /orders/{id}/payment with `token`.
    pub async fn submit(&self, order_id: &str, token: &str, method: &str) -> u16 {
        self.client
            .post(format!("{}/orders/{order_id}/payment", self.api))
            .json(&json!({"token": token, "method": method}))
            .send()
            .await
            .expect("POST payment")
            .status()
            .as_u16()
    }

    /// Waits until `order_id` awaits its payment; its payment token.
    pub async fn payment_token(&self, order_id: &str) -> String {
        let order = self.wait_for(order_id, "awaiting_payment").await;
        order["payment_token"]
            .as_str()
            .expect("payment token")
            .to_owned()
    }

    /// Waits for the token and submits a payment with `method` (202), without
    /// waiting for what comes of it.
    pub async fn submit_payment(&self, order_id: &str, method: &str) {
        let token = self.payment_token(order_id).await;
        assert_eq!(self.submit(order_id, &token, method).await, 202);
    }

    /// Waits for the token, pays with `method`, returns the ended order.
    pub async fn pay(&self, order_id: &str, method: &str) -> Value {
        self.submit_payment(order_id, method).await;
        self.ended(order_id).await
    }

    /// Places an order and pays it with `method`; (its id, the ended order).
    pub async fn place_and_pay(
        &self,
        supplier: &str,
        products: &[(&str, u32)],
        method: &str,
    ) -> (String, Value) {
        let order_id = self.place(supplier, products).await;
        let order = self.pay(&order_id, method).await;
        (order_id, order)
    }

    /// Waits up to 10 s until the last rejection of `order_id` is `reason`.
    pub async fn wait_for_rejection(&self, order_id: &str, what: &str, reason: &str) {
        eventually(Duration::from_secs(10), what, || async {
            self.get_order(order_id, None).await["last_rejection"] == reason
        })
        .await;
    }

    /// The order once it is completed or cancelled.
    pub async fn ended(&self, order_id: &str) -> Value {
        let order = self.get_order(order_id, Some("completed")).await;
        assert!(
            order["status"] == "completed" || order["status"] == "cancelled",
            "order {order_id} did not end: {order:#}"
        );
        order
    }

    /// A console operator call: `method` on `/console/api{path}` with the
    /// test operator token (and `body` as JSON); (status, body).
    pub async fn operator(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}/console/api{path}", self.api))
            .bearer_auth(crate::TEST_OPERATOR_TOKEN);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("console API call");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The operator's replay of `service`'s dead letters (`body` chooses
    /// which); (status, body).
    pub async fn replay(&self, service: &str, body: &Value) -> (u16, Value) {
        self.operator(
            reqwest::Method::POST,
            &format!("/dead-letters/{service}/replay"),
            Some(body),
        )
        .await
    }

    /// Publishes `event` onto the events exchange, as its service would.
    pub async fn publish_event(&self, event: &Event) {
        self.ctx
            .broker
            .publisher()
            .publish(&Outgoing::event(event, None))
            .await
            .expect("publish the event");
    }

    /// Leaves `message` in `service`'s dead letters with `reason`, as the
    /// runtime does with a message that failed: through the dead-letter
    /// exchange, with the routing key it came with.
    pub async fn publish_dead_letter(&self, service: &str, message: &Outgoing, reason: &str) {
        let mut extra = FieldTable::default();
        extra.insert(headers::REASON.into(), AMQPValue::LongString(reason.into()));
        self.ctx
            .broker
            .publisher()
            .publish_raw(
                &self.env.dead_letter_queue(service),
                &message.routing_key,
                &message.body,
                message
                    .envelope
                    .to_properties(extra)
                    .expect("dead letter properties"),
            )
            .await
            .expect("publish the dead letter");
    }

    /// Leaves an `order.started` of `order_id` in generate-info's dead
    /// letters (failed with "catalogue unavailable") that was first published
    /// 40 days ago: longer than the default retention of 30.
    pub async fn publish_expired_dead_letter(&self, order_id: &str) {
        let mut old = order_started(order_id);
        old.envelope.timestamp -= 40 * 86_400;
        self.publish_dead_letter("generate-info", &old, "catalogue unavailable")
            .await;
    }

    /// Waits up to 10 s until `queue` holds exactly `n` messages.
    pub async fn wait_for_depth(&self, queue: &str, n: u32, what: &str) {
        eventually(Duration::from_secs(10), what, || async {
            self.env.message_count(queue).await == n
        })
        .await;
    }

    /// A store on `schema` of this system's database.
    pub async fn db(&self, schema: &str) -> Db {
        self.env.db(schema).await
    }

    /// (charges, refunds) the simulated gateway made for `order_id`.
    pub async fn gateway(&self, order_id: &str) -> (i64, i64) {
        self.with_db("payments", async |db| {
            sqlx::query_as(
                "SELECT count(*) FILTER (WHERE kind = 'charge'), count(*) FILTER (WHERE kind = 'refund') \
                 FROM gateway_ledger WHERE order_id = $1",
            )
            .bind(order_id)
            .fetch_one(db.pool())
            .await
            .expect("gateway ledger")
        })
        .await
    }

    /// The number `sql` (a `SELECT count(*) …`) selects on `schema` of this
    /// system's database.
    pub async fn count(&self, schema: &str, sql: &'static str) -> i64 {
        self.with_db(schema, async |db| crate::count(db, sql).await)
            .await
    }

    /// What `read` reads with a store on `schema`, closed after.
    async fn with_db<T>(&self, schema: &str, read: impl AsyncFnOnce(&Db) -> T) -> T {
        let db = self.db(schema).await;
        let value = read(&db).await;
        db.close().await;
        value
    }

    /// Stops every worker (gracefully) and removes the test's broker and database objects.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            result.expect("worker panicked").expect("worker failed");
        }
        self.ctx.broker.close();
        self.env.cleanup().await;
    }
}

/// An `order.started` of one tea for haidilao with `order_id`, as
/// generate-info receives it.
pub fn order_started(order_id: &str) -> Outgoing {
    Outgoing::event(
        &Event::OrderStarted(OrderStarted {
            order_id: order_id.into(),
            supplier: "haidilao".into(),
            products: vec![ProductLine {
                sku: "tea".into(),
                quantity: 1,
            }],
            address: "6 Dock".into(),
        }),
        None,
    )
}

/// The reason a dead letter was dead-lettered with (its header).
pub fn dead_letter_reason(message: &BasicGetMessage) -> String {
    header_str(
        message
            .delivery
            .properties
            .headers()
            .as_ref()
            .expect("dead letter headers"),
        headers::REASON,
    )
    .expect("a reason")
}

/// One more worker a test runs itself, until [`stop`](Worker::stop).
pub struct Worker {
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Spawns `run` with a shutdown token of its own.
    pub fn spawn<F>(run: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(run(shutdown.clone()));
        Self { shutdown, task }
    }

    /// Whether it has ended (by itself, unless stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops it gracefully; panics unless it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("worker panicked")
            .expect("worker failed");
    }
}
