//! The order API served alone, for tests of its HTTP side: [`Api`] (one
//! server on a fresh namespace and database, with an HTTP client and the
//! `orders` schema at hand) and [`Instance`] (one more server on the same
//! namespace and database); every answer read as (status, JSON), and
//! [`texts_of`] and [`element_with`] to look into the lists of an answer.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper fails loudly on the first surprise"
)]

use std::time::Duration;

use lapin::message::BasicGetMessage;
use orderflow_shared::Shutdown;
use orderflow_shared::bus::Outgoing;
use orderflow_shared::config::Settings;
use orderflow_shared::events::Event;
use orderflow_shared::store::Db;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{TestEnv, eventually};

/// One order API server (its consumer and relay included), until [`stop`].
///
/// [`stop`]: Instance::stop
pub struct Instance {
    pub base: String,
    pub shutdown: Shutdown,
    pub server: JoinHandle<anyhow::Result<()>>,
}

impl Instance {
    /// Serves `settings` on a free port of `env`'s topology; returns once
    /// `/healthz` says everything is up (schema migrated, consumer consuming).
    pub async fn start(
        env: &TestEnv,
        settings: Settings,
        name: &str,
        http: &reqwest::Client,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let server = tokio::spawn(order_api::serve(
            env.ctx_with(settings, name),
            listener,
            shutdown.clone(),
        ));
        let instance = Self {
            base,
            shutdown,
            server,
        };
        instance.wait_healthy(http).await;
        instance
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn wait_healthy(&self, http: &reqwest::Client) {
        wait_healthy(http, &self.base).await;
    }

    /// Graceful shutdown: `serve` returns Ok once everything has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .expect("serve ends after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// The order API on a fresh namespace and database, and an HTTP client for it.
pub struct Api {
    pub env: TestEnv,
    pub instance: Instance,
    pub http: reqwest::Client,
    /// The `orders` schema, to look at the outbox and the inbox.
    pub orders: Db,
}

impl Api {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// The API with `adjust`ed test settings (its bounds).
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let env = TestEnv::orderflow().await;
        // The coordinator's schema too (its history is read here), as an
        // operator provisions it before the services start.
        orderflow_shared::store::Db::migrate_all(&env.database_url)
            .await
            .unwrap();
        let mut settings = env.settings();
        adjust(&mut settings);
        let http = reqwest::Client::new();
        let instance = Instance::start(&env, settings, "order-api", &http).await;
        let orders = env.db("orders").await;
        Self {
            env,
            instance,
            http,
            orders,
        }
    }

    /// Another instance of the API on the same database and broker, with
    /// `settings` (from [`TestEnv::settings`]).
    pub async fn start_other(&self, settings: Settings, name: &str) -> Instance {
        Instance::start(&self.env, settings, name, &self.http).await
    }

    pub async fn stop(self) {
        self.instance.stop().await;
        self.orders.close().await;
        self.env.cleanup().await;
    }

    pub fn url(&self, path: &str) -> String {
        self.instance.url(path)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        get_json(&self.http, &self.url(path)).await
    }

    /// GET with the `Retry-After` header of the answer.
    pub async fn get_retry_after(&self, path: &str) -> (StatusCode, Option<String>, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|value| value.to_str().unwrap().to_owned());
        let (status, body) = status_and_json(response).await;
        (status, retry_after, body)
    }

    /// A GET in flight on its own task (abort it to hang up).
    pub fn spawn_get(&self, path: &str) -> JoinHandle<(StatusCode, Value)> {
        let http = self.http.clone();
        let url = self.url(path);
        tokio::spawn(async move { get_json(&http, &url).await })
    }

    /// A POST in flight on its own task.
    pub fn spawn_post(&self, path: &str, body: &Value) -> JoinHandle<(StatusCode, Value)> {
        let request = self.http.post(self.url(path)).json(body);
        tokio::spawn(async move { status_and_json(request.send().await.unwrap()).await })
    }

    /// Waits until exactly `n` long polls are waiting (the metrics' gauge).
    pub async fn wait_for_waiters(&self, n: usize) {
        let line = format!("orderflow_long_poll_waiters {n}\n");
        eventually(
            Duration::from_secs(10),
            &format!("{n} long-poll waiters"),
            || async { self.metrics().await.contains(&line) },
        )
        .await;
    }

    /// An open transaction holding `order_id`'s row `FOR UPDATE`: payment
    /// submissions for it wait (their `FOR SHARE`), plain reads do not.
    pub async fn lock_order(&self, order_id: &str) -> Transaction<'static, Postgres> {
        let mut lock = self.orders.pool().begin().await.unwrap();
        sqlx::query("SELECT 1 FROM orders WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_one(&mut *lock)
            .await
            .unwrap();
        lock
    }

    /// An open transaction holding the orders table in ACCESS EXCLUSIVE mode:
    /// every statement on it waits.
    pub async fn lock_orders_table(&self) -> Transaction<'static, Postgres> {
        let mut lock = self.orders.pool().begin().await.unwrap();
        sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *lock)
            .await
            .unwrap();
        lock
    }

    /// Waits until `n` sessions of this test's database wait for a lock in a
    /// statement containing `fragment`.
    pub async fn wait_for_lock_waits(&self, fragment: &str, n: i64) {
        eventually(
            Duration::from_secs(15),
            &format!("{n} statements with {fragment:?} waiting for a lock"),
            || async { self.lock_waits(fragment).await == n },
        )
        .await;
    }

    pub async fn lock_waits(&self, fragment: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%' \
             AND pid <> pg_backend_pid()",
        )
        .bind(fragment)
        .fetch_one(self.orders.pool())
        .await
        .unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// `POST` of raw bytes with a content type (or none).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        status_and_json(request.send().await.unwrap()).await
    }

    pub async fn order(&self, order_id: &str) -> Value {
        let (status, body) = self.get(&format!("/orders/{order_id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Publishes `kind` with `body` onto the events exchange, as another
    /// service would, and waits until the order API's consumer applied it.
    pub async fn publish_applied(&self, kind: &str, body: Value) {
        let event = Event::from_object(kind, body.as_object().unwrap().clone()).unwrap();
        let message = Outgoing::event(&event, None);
        self.env.broker.publisher().publish(&message).await.unwrap();
        let message_id = message.envelope.message_id;
        eventually(
            Duration::from_secs(15),
            &format!("order-api applied {kind} {message_id}"),
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM inbox \
                     WHERE consumer = 'order-api' AND message_id = $1)",
                )
                .bind(&message_id)
                .fetch_one(self.orders.pool())
                .await
                .unwrap()
            },
        )
        .await;
    }

    /// Outbox rows of `routing_key` (sent or not).
    pub async fn outbox_count(&self, routing_key: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE routing_key = $1")
            .bind(routing_key)
            .fetch_one(self.orders.pool())
            .await
            .unwrap()
    }

    pub async fn order_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(self.orders.pool())
            .await
            .unwrap()
    }

    /// Waits until `queue` holds `n` messages, then takes them all.
    pub async fn take(&self, service: &str, n: u32) -> Vec<BasicGetMessage> {
        let queue = self.env.queue(service);
        eventually(
            Duration::from_secs(15),
            &format!("{n} messages in {queue}"),
            || async { self.env.message_count(&queue).await >= n },
        )
        .await;
        self.env.drain(&queue).await
    }

    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        response.text().await.unwrap()
    }
}

/// Waits until the API at `base` answers `/healthz` with 200 (schema
/// migrated, consumer consuming, broker and database reachable).
pub async fn wait_healthy(http: &reqwest::Client, base: &str) {
    let url = format!("{base}/healthz");
    eventually(Duration::from_secs(30), "/healthz answers 200", || async {
        http.get(&url)
            .send()
            .await
            .is_ok_and(|response| response.status() == StatusCode::OK)
    })
    .await;
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    status_and_json(http.get(url).send().await.unwrap()).await
}

/// Every answer of the API is JSON, errors included.
pub async fn status_and_json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text:?}"));
    (status, body)
}

/// The text `field` of each element of the JSON array `list`, in order.
pub fn texts_of<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|element| element[field].as_str().unwrap())
        .collect()
}

/// The element of the JSON array `list` whose `field` is `value`.
pub fn element_with<'a>(list: &'a Value, field: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .find(|element| element[field] == value)
        .unwrap_or_else(|| panic!("no {field} {value:?} in {list}"))
}
