//! The order API on the real broker and database: creating an order emits
//! `order.started` through the outbox (never a client's price), the same
//! request again gets the same answer, another body a 409; bad input is a
//! JSON 400/413/415/422 that starts nothing; the read model follows events in
//! any order and never leaves a terminal status; long polls wake on the
//! API's own changes and, through their batched NOTIFY, on other instances';
//! payment submissions reach the coordinator;
//! merchants, health and metrics. The bounds of the HTTP side: the waiter
//! cap, the concurrency limit, the request timeout, history pages, a health
//! check that names what is down, and event handling that goes on while
//! requests hold every HTTP connection.

use std::time::{Duration, Instant};

use lapin::message::BasicGetMessage;
use lapin::types::ShortString;
use orderflow_shared::Shutdown;
use orderflow_shared::store::Db;
use orderflow_tests::api::{Api, get_json, status_and_json};
use orderflow_tests::proxy::StallingProxy;
use orderflow_tests::{TestEnv, eventually};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An error answer: `{"error": "<non-empty message>"}`, nothing else.
fn error_message(body: &Value) -> &str {
    let object = body.as_object().unwrap();
    assert_eq!(object.len(), 1, "{body}");
    let message = object["error"].as_str().unwrap();
    assert!(!message.is_empty());
    message
}

fn short(value: Option<&ShortString>) -> Option<&str> {
    value.map(ShortString::as_str)
}

/// The one message of `routing_key` among `messages`, with its body.
fn only<'a>(messages: &'a [BasicGetMessage], routing_key: &str) -> (&'a BasicGetMessage, Value) {
    let matching: Vec<_> = messages
        .iter()
        .filter(|m| m.delivery.routing_key.as_str() == routing_key)
        .collect();
    assert_eq!(matching.len(), 1, "one {routing_key} message");
    let body = serde_json::from_slice(&matching[0].delivery.data).unwrap();
    (matching[0], body)
}

fn hotpot_order() -> Value {
    json!({
        "supplier": "haidilao",
        "products": [{"sku": "hotpot-set", "quantity": 2}, {"sku": "tea", "quantity": 1}],
        "address": "1 Harbour Road",
    })
}

/// [`hotpot_order`] with the client's `order_id`.
fn hotpot_order_with_id(order_id: &str) -> Value {
    let mut order = hotpot_order();
    order["order_id"] = json!(order_id);
    order
}

/// Creates the [`hotpot_order_with_id`] `order_id` through `api` (202).
async fn create(api: &Api, order_id: &str) {
    let body = hotpot_order_with_id(order_id);
    assert_eq!(api.post("/orders", &body).await.0, StatusCode::ACCEPTED);
}

/// The body of a `payment.awaiting` of 265.00 for `order_id`.
fn payment_awaiting(order_id: &str, token: &str, methods: &[&str], expires_at: &str) -> Value {
    json!({
        "order_id": order_id, "token": token, "payment_methods": methods,
        "amount_cents": 26_500, "expires_at": expires_at,
    })
}

/// Publishes each event (kind, body) in turn, each applied by the API before
/// the next.
async fn publish_all_applied<const N: usize>(api: &Api, events: [(&str, Value); N]) {
    for (kind, body) in events {
        api.publish_applied(kind, body).await;
    }
}

/// Publishes that `order_id` completed (132.50 paid with weixin) and waits
/// until the API applied it.
async fn complete(api: &Api, order_id: &str) {
    api.publish_applied(
        "order.completed",
        json!({"order_id": order_id, "method": "weixin", "charged_cents": 13_250}),
    )
    .await;
}

/// A GET of `url` in flight on its own task: its answer and how long it took.
fn spawn_timed_get(api: &Api, url: String) -> JoinHandle<((StatusCode, Value), Duration)> {
    let http = api.http.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let answer = get_json(&http, &url).await;
        (answer, started.elapsed())
    })
}

/// What `task` returns, within `secs` seconds (else panics with `what`).
async fn within<T>(secs: u64, task: JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(secs), task)
        .await
        .expect(what)
        .unwrap()
}

#[tokio::test]
async fn a_new_order_is_accepted_and_started_without_the_client_price() {
    let api = Api::start().await;
    let body = json!({
        "supplier": "haidilao",
        "products": [
            {"sku": "hotpot-set", "quantity": 2, "price_cents": 1},
            {"sku": "tea", "quantity": 1, "price": 0.01},
        ],
        "address": "1 Harbour Road",
        "amount_cents": 1,
    });
    let (status, answer) = api.post("/orders", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let order_id = answer["order_id"].as_str().unwrap().to_owned();
    assert_eq!(answer, json!({"order_id": order_id, "status": "started"}));
    assert_eq!(
        uuid::Uuid::parse_str(&order_id).unwrap().get_version_num(),
        7,
        "the default order id is a UUID v7"
    );

    let messages = api.take("generate-info", 1).await;
    assert_eq!(messages.len(), 1);
    let (message, started) = only(&messages, "order.started");
    assert_eq!(
        started,
        json!({
            "order_id": order_id,
            "supplier": "haidilao",
            "products": [{"sku": "hotpot-set", "quantity": 2}, {"sku": "tea", "quantity": 1}],
            "address": "1 Harbour Road",
        }),
        "exactly the order, no client price"
    );
    let properties = &message.delivery.properties;
    assert_eq!(short(properties.kind().as_ref()), Some("order.started"));
    assert_eq!(
        short(properties.correlation_id().as_ref()),
        Some(order_id.as_str())
    );
    assert_eq!(
        short(properties.content_type().as_ref()),
        Some("application/json")
    );
    assert_eq!(properties.delivery_mode(), &Some(2));
    let message_id = short(properties.message_id().as_ref()).unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(message_id).unwrap().get_version_num(),
        7
    );

    let order = api.order(&order_id).await;
    assert_eq!(order["status"], "started");
    assert_eq!(order["supplier"], "haidilao");
    assert_eq!(order["address"], "1 Harbour Road");
    assert_eq!(order["products"], started["products"]);
    assert_eq!(order["payment_token"], Value::Null);
    assert_eq!(order["amount_cents"], Value::Null);
    assert!(order["created_at"].is_string() && order["updated_at"].is_string());
    api.stop().await;
}

#[tokio::test]
async fn the_same_request_again_gets_the_same_answer_and_another_body_a_conflict() {
    let api = Api::start().await;
    let body = hotpot_order_with_id("order-same-1");
    let (status, first) = api.post("/orders", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(
        first,
        json!({"order_id": "order-same-1", "status": "started"})
    );

    // The same request, fields in another order and a price that is ignored.
    let again = json!({
        "address": "1 Harbour Road",
        "products": [{"quantity": 2, "sku": "hotpot-set", "price": 5}, {"quantity": 1, "sku": "tea"}],
        "supplier": "haidilao",
        "order_id": "order-same-1",
    });
    let (status, second) = api.post("/orders", &again).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_eq!(second, first);
    assert_eq!(api.outbox_count("order.started").await, 1);
    assert_eq!(api.order_count().await, 1);

    // Same id, other body: a conflict, and still one order.started.
    let mut other = body.clone();
    other["products"][0]["quantity"] = json!(3);
    let (status, conflict) = api.post("/orders", &other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert!(
        error_message(&conflict).contains("order-same-1"),
        "{conflict}"
    );
    assert_eq!(api.outbox_count("order.started").await, 1);
    let messages = api.take("generate-info", 1).await;
    assert_eq!(messages.len(), 1, "one order.started was published");

    // Asked again once the saga moved on, the answer shows where it is now.
    api.publish_applied(
        "payment.awaiting",
        payment_awaiting("order-same-1", "tok", &["zhifubao"], "2100-01-01T00:00:00Z"),
    )
    .await;
    let (status, third) = api.post("/orders", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{third}");
    assert_eq!(
        third,
        json!({"order_id": "order-same-1", "status": "awaiting_payment"})
    );

    // An order that arrived as an event has no request to compare with.
    let from_event = hotpot_order_with_id("order-from-event");
    api.publish_applied("order.started", from_event.clone())
        .await;
    let (status, conflict) = api.post("/orders", &from_event).await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    error_message(&conflict);
    assert_eq!(api.outbox_count("order.started").await, 1);
    api.stop().await;
}

#[tokio::test]
async fn bad_input_is_a_json_error_and_starts_nothing() {
    let api = Api::start().await;
    let with = |field: &str, value: Value| {
        let mut body = hotpot_order();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = hotpot_order();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        (
            "missing address",
            without("address"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing products",
            without("products"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "quantity as text",
            with("products", json!([{"sku": "tea", "quantity": "two"}])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "quantity 0",
            with("products", json!([{"sku": "tea", "quantity": 0}])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative quantity",
            with("products", json!([{"sku": "tea", "quantity": -2}])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "quantity over 10000",
            with("products", json!([{"sku": "tea", "quantity": 10_001}])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "no products",
            with("products", json!([])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty supplier",
            with("supplier", json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "long supplier",
            with("supplier", json!("s".repeat(101))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "long address",
            with("address", json!("a".repeat(501))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "order id with a space",
            with("order_id", json!("order 1")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "order id with a slash",
            with("order_id", json!("a/b")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "long order id",
            with("order_id", json!("o".repeat(101))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "numeric order id",
            with("order_id", json!(7)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "oversized body",
            with("address", json!("a".repeat(70 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (what, body, expected) in cases {
        let (status, answer) = api.post("/orders", &body).await;
        assert_eq!(status, expected, "{what}: {answer}");
        error_message(&answer);
    }

    let (status, answer) = api
        .post(
            "/orders",
            &with("products", json!([{"sku": "caviar", "quantity": 1}])),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(error_message(&answer), "unknown sku `caviar`");

    let (status, answer) = api
        .post_raw(
            "/orders",
            Some("application/json"),
            br#"{"supplier": "haidilao", "products": ["#.to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "malformed JSON: {answer}");
    error_message(&answer);

    let (status, answer) = api
        .post_raw("/orders", None, hotpot_order().to_string().into_bytes())
        .await;
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "no content type: {answer}"
    );
    error_message(&answer);

    assert_eq!(api.order_count().await, 0, "no order was created");
    assert_eq!(api.outbox_count("order.started").await, 0);

    // Reading: unknown order, unknown route, unknown status to wait for.
    let (status, answer) = api.get("/orders/no-such-order").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(answer, json!({"error": "order no-such-order not found"}));
    let (status, answer) = api.get("/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_message(&answer);
    let (status, answer) = api.get("/orders/x?wait_for=shipped").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&answer).contains("shipped"), "{answer}");
    let (status, answer) = api
        .get("/orders/x?wait_for=completed&timeout_ms=soon")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error_message(&answer);
    let response = api.http.delete(api.url("/orders")).send().await.unwrap();
    let (status, answer) = status_and_json(response).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error_message(&answer);
    api.stop().await;
}

#[tokio::test]
async fn the_read_model_follows_events_in_any_order_and_keeps_the_first_terminal_status() {
    let api = Api::start().await;
    let id = "order-scrambled";

    // The payment step opens before the order itself is known.
    api.publish_applied(
        "payment.awaiting",
        payment_awaiting(id, "tok-1", &["zhifubao", "weixin"], "2100-01-01T00:00:00Z"),
    )
    .await;
    let order = api.order(id).await;
    assert_eq!(order["status"], "awaiting_payment");
    assert_eq!(order["payment_token"], "tok-1");
    assert_eq!(order["amount_cents"], 26_500);
    assert_eq!(order["supplier"], Value::Null);

    api.publish_applied("order.started", hotpot_order_with_id(id))
        .await;
    api.publish_applied(
        "order.info-generated",
        json!({"order_id": id, "supplier": "haidilao", "payment_methods": ["zhifubao", "weixin"], "amount_cents": 26_500}),
    )
    .await;
    let order = api.order(id).await;
    assert_eq!(order["status"], "awaiting_payment", "never back to started");
    assert_eq!(order["supplier"], "haidilao");
    assert_eq!(order["address"], "1 Harbour Road");
    assert_eq!(order["payment_methods"], json!(["zhifubao", "weixin"]));

    // An older token arriving late does not replace the newer one.
    api.publish_applied(
        "payment.awaiting",
        payment_awaiting(id, "tok-0", &["zhifubao", "weixin"], "2099-01-01T00:00:00Z"),
    )
    .await;
    assert_eq!(api.order(id).await["payment_token"], "tok-1");

    api.publish_applied(
        "payment.submission-rejected",
        json!({"order_id": id, "reason": "token expired"}),
    )
    .await;
    assert_eq!(api.order(id).await["last_rejection"], "token expired");

    api.publish_applied(
        "payment.selected.zhifubao",
        json!({"order_id": id, "method": "zhifubao", "amount_cents": 26_500}),
    )
    .await;
    let order = api.order(id).await;
    assert_eq!(order["status"], "paying");
    assert_eq!(order["method"], "zhifubao");
    assert_eq!(
        order["payment_token"],
        Value::Null,
        "the token only shows while awaiting"
    );

    publish_all_applied(
        &api,
        [
            (
                "order.completed",
                json!({"order_id": id, "method": "zhifubao", "charged_cents": 21_200}),
            ),
            (
                "payment.captured",
                json!({"order_id": id, "provider": "zhifubao", "charged_cents": 21_200, "capture_id": "cap-1"}),
            ),
            // Late and stray messages leave a completed order completed.
            (
                "payment.selected.weixin",
                json!({"order_id": id, "method": "weixin", "amount_cents": 26_500}),
            ),
            (
                "payment.awaiting",
                payment_awaiting(id, "tok-2", &["zhifubao"], "2101-01-01T00:00:00Z"),
            ),
            (
                "order.cancelled",
                json!({"order_id": id, "reason": "too late"}),
            ),
            ("saga.timed-out", json!({"order_id": id, "step": "flow"})),
        ],
    )
    .await;
    let order = api.order(id).await;
    assert_eq!(order["status"], "completed", "{order}");
    assert_eq!(order["method"], "zhifubao");
    assert_eq!(order["charged_cents"], 21_200);
    assert_eq!(order["capture_id"], "cap-1");
    assert_eq!(order["cancel_reason"], Value::Null);
    assert_eq!(order["payment_token"], Value::Null);

    // The other way round: cancelled first, and a completion cannot undo it.
    let other = "order-cancelled-first";
    publish_all_applied(
        &api,
        [
            (
                "order.cancelled",
                json!({"order_id": other, "reason": "payment timed out"}),
            ),
            (
                "order.completed",
                json!({"order_id": other, "method": "weixin", "charged_cents": 100}),
            ),
            ("order.started", hotpot_order_with_id(other)),
            (
                "payment.rejected",
                json!({"order_id": other, "method": "unionpay", "reason": "method not allowed"}),
            ),
            (
                "payment.refunded",
                json!({"order_id": other, "provider": "weixin", "refunded_cents": 100}),
            ),
        ],
    )
    .await;
    let order = api.order(other).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(order["cancel_reason"], "payment timed out");
    assert_eq!(order["charged_cents"], Value::Null);
    assert_eq!(order["supplier"], "haidilao");
    assert_eq!(order["last_rejection"], "method not allowed");
    assert_eq!(order["refunded_cents"], 100);
    api.stop().await;
}

#[tokio::test]
async fn a_long_poll_answers_when_the_status_arrives_or_when_its_time_is_up() {
    let api = Api::start().await;
    create(&api, "order-wait").await;

    // Waiting for an order that will complete.
    let waiter = spawn_timed_get(
        &api,
        api.url("/orders/order-wait?wait_for=completed&timeout_ms=30000"),
    );
    api.wait_for_waiters(1).await;
    assert!(!waiter.is_finished(), "a started order is not completed");
    complete(&api, "order-wait").await;
    let ((status, order), elapsed) =
        within(10, waiter, "the long poll answers once the order completed").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], 13_250);
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    assert!(
        api.metrics()
            .await
            .contains("orderflow_long_poll_waiters 0\n")
    );

    // A status already passed answers at once.
    let started = Instant::now();
    let (status, order) = api
        .get("/orders/order-wait?wait_for=awaiting_payment&timeout_ms=30000")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(order["status"], "completed");
    assert!(started.elapsed() < Duration::from_secs(10));

    // An order that never changes: its current state once the time is up.
    create(&api, "order-idle").await;
    let started = Instant::now();
    let (status, order) = api
        .get("/orders/order-idle?wait_for=completed&timeout_ms=400")
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "started");
    assert!(started.elapsed() >= Duration::from_millis(400));

    // An order that does not exist yet is waited for too…
    let waiter = api.spawn_get("/orders/order-later?wait_for=started&timeout_ms=30000");
    api.wait_for_waiters(1).await;
    api.publish_applied("order.started", hotpot_order_with_id("order-later"))
        .await;
    let (status, order) = within(10, waiter, "the long poll answers once the order exists").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["order_id"], "order-later");

    // …and is a 404 only when the time is up.
    let started = Instant::now();
    let (status, answer) = api
        .get("/orders/order-never?wait_for=started&timeout_ms=300")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Shutting down answers the waiters at once instead of holding the
    // server up for their timeouts.
    let waiter = api.spawn_get("/orders/order-idle?wait_for=completed&timeout_ms=60000");
    api.wait_for_waiters(1).await;
    api.instance.shutdown.cancel();
    let (status, order) = within(10, waiter, "a long poll ends with the server").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "started");
    api.stop().await;
}

/// `orderflow_long_poll_reads_total` of `api`'s metrics.
async fn long_poll_reads(api: &Api) -> u64 {
    let metrics = api.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("orderflow_long_poll_reads_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no long poll reads in {metrics}"))
}

#[tokio::test]
async fn a_long_poll_answered_by_the_read_model_takes_the_row_its_upsert_returned() {
    let api = Api::start().await;
    create(&api, "order-row").await;
    let before = long_poll_reads(&api).await;
    let waiter = api.spawn_get("/orders/order-row?wait_for=awaiting_payment&timeout_ms=30000");
    api.wait_for_waiters(1).await;
    api.publish_applied(
        "payment.awaiting",
        payment_awaiting("order-row", "v1.row", &["weixin"], "2030-01-01T00:00:00Z"),
    )
    .await;
    let (status, answered) = within(10, waiter, "the long poll answers").await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    assert_eq!(answered["status"], "awaiting_payment");
    assert_eq!(answered["payment_token"], "v1.row");
    assert_eq!(
        long_poll_reads(&api).await - before,
        1,
        "only the first read: the change brought its row along"
    );
    // The row it answered with is the order as it is.
    assert_eq!(api.get("/orders/order-row").await.1, answered);

    // A change without its row (a terminal worker's, through NOTIFY) is
    // still read: the first read, and one when the order completed.
    let before = long_poll_reads(&api).await;
    let waiter = api.spawn_get("/orders/order-row?wait_for=completed&timeout_ms=30000");
    api.wait_for_waiters(1).await;
    complete(&api, "order-row").await;
    let (_, answered) = within(10, waiter, "the long poll answers the completion").await;
    assert_eq!(answered["status"], "completed");
    assert_eq!(answered["payment_token"], Value::Null, "no token once paid");
    assert_eq!(long_poll_reads(&api).await - before, 2);
    api.stop().await;
}

#[tokio::test]
async fn a_change_made_through_one_api_instance_wakes_long_polls_on_another() {
    let api = Api::start().await;
    // A second instance of the API on the same database and broker.
    let other = api.start_other(api.env.settings(), "order-api-2").await;

    let waiter = spawn_timed_get(
        &api,
        other.url("/orders/order-elsewhere?wait_for=started&timeout_ms=30000"),
    );
    // Give the waiter time to subscribe on the other instance.
    tokio::time::sleep(Duration::from_millis(300)).await;
    create(&api, "order-elsewhere").await;
    let ((status, order), elapsed) = within(20, waiter, "the other instance answers").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["order_id"], "order-elsewhere");
    assert!(
        elapsed < Duration::from_secs(10),
        "woken by the notification, not by its 30 s timeout: {elapsed:?}"
    );
    other.stop().await;
    api.stop().await;
}

/// Whether `order_id` is announced on the long polls' channel within `patience`.
async fn announced(
    listener: &mut sqlx::postgres::PgListener,
    order_id: &str,
    patience: Duration,
) -> bool {
    let deadline = Instant::now() + patience;
    while let Ok(Ok(notification)) = tokio::time::timeout_at(deadline.into(), listener.recv()).await
    {
        if notification.payload().ends_with(&format!("/{order_id}")) {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn an_api_instance_announces_its_changes_only_while_another_one_listens() {
    let api = Api::start().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(api.orders.pool())
        .await
        .unwrap();
    listener.listen("orderflow_orders").await.unwrap();
    // Alone, once settled (its listener up for a window, its hellos out):
    // its changes wake its own waiters only.
    tokio::time::sleep(order_api::PEER_WINDOW + order_api::HELLO_EVERY).await;
    create(&api, "order-alone").await;
    let (status, order) = api.get("/orders/order-alone?wait_for=started").await;
    assert_eq!(
        (status, &order["status"]),
        (StatusCode::OK, &json!("started"))
    );
    assert!(
        !announced(&mut listener, "order-alone", Duration::from_secs(1)).await,
        "announced with no other instance listening"
    );
    // Another instance starts and says hello: the first announces again.
    let other = api.start_other(api.env.settings(), "order-api-2").await;
    tokio::time::sleep(2 * order_api::HELLO_EVERY).await;
    create(&api, "order-together").await;
    assert!(
        announced(&mut listener, "order-together", Duration::from_secs(10)).await,
        "not announced with another instance listening"
    );
    drop(listener); // its connection is the pool's: closing waits for it
    other.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_payment_submission_reaches_the_coordinator() {
    let api = Api::start().await;
    create(&api, "order-pay").await;
    // The coordinator reads every event: order.started first.
    let messages = api.take("saga-coordinator", 1).await;
    only(&messages, "order.started");

    let token = "v1.claims.mac";
    let payment = json!({"token": token, "method": "weixin"});
    let (status, answer) = api.post("/orders/order-pay/payment", &payment).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        answer,
        json!({"order_id": "order-pay", "status": "payment_submitted"})
    );
    let messages = api.take("saga-coordinator", 1).await;
    let (message, submitted) = only(&messages, "payment.submitted");
    assert_eq!(
        submitted,
        json!({"order_id": "order-pay", "token": token, "method": "weixin"})
    );
    assert_eq!(
        short(message.delivery.properties.correlation_id().as_ref()),
        Some("order-pay")
    );

    let bad: Vec<(&str, Value, StatusCode)> = vec![
        (
            "/orders/order-pay/payment",
            json!({"token": "", "method": "weixin"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/orders/order-pay/payment",
            json!({"token": token, "method": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/orders/order-pay/payment",
            json!({"token": "t".repeat(4097), "method": "weixin"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/orders/order-pay/payment",
            json!({"token": token, "method": "m".repeat(51)}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/orders/order-pay/payment",
            json!({"method": "weixin"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/orders/no-such-order/payment",
            json!({"token": token, "method": "weixin"}),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (path, body, expected) in bad {
        let (status, answer) = api.post(path, &body).await;
        assert_eq!(status, expected, "{path} {body}: {answer}");
        error_message(&answer);
    }

    // A finished order takes no more payments.
    complete(&api, "order-pay").await;
    let (status, answer) = api.post("/orders/order-pay/payment", &payment).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(error_message(&answer).contains("completed"), "{answer}");
    assert_eq!(api.outbox_count("payment.submitted").await, 1);
    api.stop().await;
}

#[tokio::test]
async fn merchants_health_and_metrics() {
    let api = Api::start().await;
    let (status, haidilao) = api.get("/merchants/haidilao/payment-methods").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        haidilao,
        json!({
            "supplier": "haidilao",
            "payment_methods": [
                {"method": "zhifubao", "display_name": "Zhifubao (Alipay)", "discount_percent": 80},
                {"method": "weixin", "display_name": "Weixin Pay", "discount_percent": 50},
            ],
        })
    );
    let (status, other) = api.get("/merchants/noodle-bar/payment-methods").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(other["supplier"], "noodle-bar");
    let methods: Vec<&str> = other["payment_methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["zhifubao", "weixin", "unionpay"]);

    let (status, health) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        health,
        json!({"status": "ok", "checks": {"database": "ok", "broker": "ok"}})
    );

    assert_eq!(
        api.post("/orders", &hotpot_order()).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(api.get("/orders/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/nope").await.0, StatusCode::NOT_FOUND);
    let text = api.metrics().await;
    for expected in [
        "orderflow_http_requests_total{method=\"POST\",route=\"/orders\",status=\"202\"} 1\n",
        "orderflow_http_requests_total{method=\"GET\",route=\"/orders/{id}\",status=\"404\"} 1\n",
        "orderflow_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1\n",
        "orderflow_http_requests_total{method=\"GET\",route=\"/merchants/{supplier}/payment-methods\",status=\"200\"} 2\n",
        "orderflow_orders_created_total 1\n",
        "orderflow_long_poll_waiters 0\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    api.stop().await;
}

/// A payment submission any unfinished order accepts.
fn a_payment() -> Value {
    json!({"token": "v1.claims.mac", "method": "weixin"})
}

/// Two payment submissions of an order waiting for its row, which an open
/// transaction holds: each holds a request slot and a connection of the
/// HTTP pool until [`release`](HeldPayments::release).
struct HeldPayments {
    lock: Transaction<'static, Postgres>,
    submissions: [JoinHandle<(StatusCode, Value)>; 2],
}

impl HeldPayments {
    /// Makes `order_id` known from its event (no event of it is left for the
    /// read model to apply to the locked row), locks its row and submits two
    /// payments; returns once both wait for the row.
    async fn hold(api: &Api, order_id: &str) -> Self {
        api.publish_applied("order.started", hotpot_order_with_id(order_id))
            .await;
        let lock = api.lock_order(order_id).await;
        let path = format!("/orders/{order_id}/payment");
        let submissions = [
            api.spawn_post(&path, &a_payment()),
            api.spawn_post(&path, &a_payment()),
        ];
        api.wait_for_lock_waits("FOR SHARE", 2).await;
        Self { lock, submissions }
    }

    /// Ends the lock: both submissions are accepted.
    async fn release(self) {
        self.lock.commit().await.unwrap();
        for submission in self.submissions {
            let (status, answer) = submission.await.unwrap();
            assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        }
    }
}

/// The `orderflow_http_requests_total` line of (method, route, status) with `count`.
fn requests_line(method: &str, route: &str, status: u16, count: u32) -> String {
    format!(
        "orderflow_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}\n"
    )
}

#[tokio::test]
async fn long_polls_beyond_the_waiter_cap_are_turned_away_until_a_waiter_ends() {
    let api = Api::start_with(|settings| settings.http_max_waiters = 2).await;
    create(&api, "order-waited").await;
    let long_poll = "/orders/order-waited?wait_for=completed&timeout_ms=30000";
    let first = api.spawn_get(long_poll);
    let second = api.spawn_get(long_poll);
    api.wait_for_waiters(2).await;

    // One more is turned away at once, and told when to come back.
    let (status, retry_after, answer) = api.get_retry_after(long_poll).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        error_message(&answer),
        "too many clients are waiting for orders (2 at most); retry later"
    );
    // Waiters take no request slot: reads and writes go on.
    assert_eq!(api.order("order-waited").await["status"], "started");
    assert!(!first.is_finished() && !second.is_finished());

    // A client that hangs up gives its place back…
    first.abort();
    api.wait_for_waiters(1).await;
    // …which the next long poll takes, and gives back when its time is up.
    let (status, order) = api
        .get("/orders/order-waited?wait_for=completed&timeout_ms=300")
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "started");
    api.wait_for_waiters(1).await;

    // The change a waiter waits for answers it and frees its place.
    complete(&api, "order-waited").await;
    let (status, order) = within(10, second, "the waiter answers once the order completed").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "completed");
    api.wait_for_waiters(0).await;
    let (status, order) = api.get(long_poll).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "completed");
    assert!(
        api.metrics()
            .await
            .contains(&requests_line("GET", "/orders/{id}", 503, 1))
    );
    api.stop().await;
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_shed_at_once_but_long_polls_are_not_counted() {
    let api = Api::start_with(|settings| settings.http_max_concurrency = 2).await;
    // Two submissions wait for the order's row: both request slots are taken.
    let held = HeldPayments::hold(&api, "order-held").await;

    // One more request is shed at once, even one that needs no database.
    let (status, retry_after, answer) = api
        .get_retry_after("/merchants/haidilao/payment-methods")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        error_message(&answer),
        "the order API is busy (2 requests in progress, its limit); retry later"
    );
    // A long poll is not counted against the request slots.
    let (status, order) = api
        .get("/orders/order-held?wait_for=completed&timeout_ms=200")
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "started");

    held.release().await;
    // The slots are back.
    let (status, answer) = api.get("/merchants/haidilao/payment-methods").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = api.metrics().await;
    let shed = requests_line("GET", "/merchants/{supplier}/payment-methods", 503, 1);
    assert!(text.contains(&shed), "missing {shed:?} in:\n{text}");
    api.stop().await;
}

#[tokio::test]
async fn a_request_past_the_timeout_is_answered_503_naming_its_route_but_long_polls_wait_their_time()
 {
    let api = Api::start_with(|settings| settings.http_request_timeout_ms = 500).await;
    create(&api, "order-slow").await;

    // A long poll waits its own time, past the request timeout.
    let (status, order) = api
        .get("/orders/order-slow?wait_for=completed&timeout_ms=1500")
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "started");

    // The orders table locked: every statement on it waits.
    let lock = api.lock_orders_table().await;
    let (status, answer) = api.get("/orders/order-slow").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(
        answer,
        json!({"error": "GET /orders/{id} did not finish within 500 ms; try again later"})
    );
    let cut = hotpot_order_with_id("order-cut");
    let (status, answer) = api.post("/orders", &cut).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(
        answer,
        json!({"error": "POST /orders did not finish within 500 ms; try again later"})
    );
    // A long poll's reads are bounded by the request timeout.
    let (status, answer) = api
        .get("/orders/order-slow?wait_for=completed&timeout_ms=30000")
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        error_message(&answer).contains("reading order order-slow took longer than 500 ms"),
        "{answer}"
    );
    lock.rollback().await.unwrap();

    // The cut request left nothing behind: sent again, it is a new order.
    let (status, answer) = api.post("/orders", &cut).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        answer,
        json!({"order_id": "order-cut", "status": "started"})
    );
    assert_eq!(api.outbox_count("order.started").await, 2);
    assert_eq!(api.order("order-slow").await["status"], "started");
    let text = api.metrics().await;
    for expected in [
        requests_line("GET", "/orders/{id}", 503, 2),
        requests_line("POST", "/orders", 503, 1),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    api.stop().await;
}

#[tokio::test]
async fn the_read_model_keeps_applying_events_while_requests_hold_every_http_connection() {
    // As few connections for events as for requests: were they one pool,
    // the held requests would starve the read model.
    let api = Api::start_with(|settings| {
        settings.db_pool_size = 2;
        settings.http_db_pool_size = 2;
    })
    .await;
    // Both connections of the HTTP pool wait for the row.
    let held = HeldPayments::hold(&api, "order-blocker").await;

    // Events are applied all the same.
    api.publish_applied(
        "payment.awaiting",
        payment_awaiting("order-flowing", "tok", &["weixin"], "2100-01-01T00:00:00Z"),
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
        .bind("order-flowing")
        .fetch_one(api.orders.pool())
        .await
        .unwrap();
    assert_eq!(status, "awaiting_payment");
    assert_eq!(
        api.lock_waits("FOR SHARE").await,
        2,
        "the requests held their connections throughout"
    );

    held.release().await;
    assert_eq!(
        api.order("order-flowing").await["status"],
        "awaiting_payment"
    );
    api.stop().await;
}

/// Records entries of `order_id`'s history as the coordinator would: (message
/// id, causing message id), in this order (ids ascending).
async fn record_history(coordinator: &Db, order_id: &str, entries: &[(&str, Option<&str>)]) {
    for (message_id, cause) in entries {
        sqlx::query(
            "INSERT INTO history (order_id, kind, name, message_id, causation_id) \
             VALUES ($1, 'event', $2, $2, $3)",
        )
        .bind(order_id)
        .bind(message_id)
        .bind(cause)
        .execute(coordinator.pool())
        .await
        .unwrap();
    }
}

/// The names of a history page's entries, in the page's order.
fn names(page: &Value) -> Vec<&str> {
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn the_history_comes_in_pages_cut_by_id_each_in_causal_order() {
    let api = Api::start().await;
    let coordinator = api.env.db("coordinator").await;
    // As recorded when `awaiting` was handled before the `info` that caused it.
    record_history(
        &coordinator,
        "order-paged",
        &[
            ("started", None),
            ("awaiting", Some("info")),
            ("info", Some("started")),
            ("submitted", None),
            ("selected", Some("submitted")),
            ("captured", Some("selected")),
            ("completed", Some("captured")),
        ],
    )
    .await;
    coordinator.close().await;

    // One page (the default limit, 100) holds it all, in causal order.
    let (status, whole) = api.get("/orders/order-paged/history").await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["order_id"], "order-paged");
    assert_eq!(
        names(&whole),
        [
            "started",
            "info",
            "awaiting",
            "submitted",
            "selected",
            "captured",
            "completed"
        ]
    );
    assert_eq!(whole["next"], Value::Null);

    // Pages of three: cut by id, each in causal order, `next` the highest
    // id of its page, null on the last.
    let mut pages = Vec::new();
    let mut path = "/orders/order-paged/history?limit=3".to_owned();
    loop {
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let ids = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry["id"].as_i64().unwrap());
        let highest = ids.max().unwrap();
        pages.push(names(&page).join(" "));
        match page["next"].as_i64() {
            Some(next) => {
                assert_eq!(next, highest, "{page}");
                path = format!("/orders/order-paged/history?limit=3&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(
        pages,
        [
            "started info awaiting",
            "submitted selected captured",
            "completed"
        ]
    );

    // A page that ends between an effect and its earlier-recorded cause
    // keeps the effect, by its id; its cause comes on the next page.
    let (status, page) = api.get("/orders/order-paged/history?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(names(&page), ["started", "awaiting"]);
    let next = page["next"].as_i64().unwrap();
    let (_, page) = api
        .get(&format!("/orders/order-paged/history?limit=2&after={next}"))
        .await;
    assert_eq!(names(&page), ["info", "submitted"]);

    // Exactly what is left: the last page, no empty one after it.
    let (_, page) = api.get("/orders/order-paged/history?limit=7").await;
    assert_eq!(page["next"], Value::Null, "{page}");
    // Past the end: an empty last page, not a 404.
    let last = whole["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["id"].as_i64().unwrap())
        .max()
        .unwrap();
    let (status, page) = api
        .get(&format!("/orders/order-paged/history?after={last}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        page,
        json!({"order_id": "order-paged", "entries": [], "next": null})
    );

    for query in [
        "limit=0",
        "limit=1001",
        "limit=-3",
        "limit=many",
        "after=-1",
        "after=first",
    ] {
        let (status, answer) = api
            .get(&format!("/orders/order-paged/history?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        error_message(&answer);
    }
    let (status, answer) = api.get("/orders/order-paged/history?limit=1000").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = api.get("/orders/no-such-order/history").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(
        answer,
        json!({"error": "no history for order no-such-order"})
    );
    api.stop().await;
}

/// `url`'s `host:port` (the port its scheme implies when it has none).
fn upstream(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let authority = rest.split(['/', '?']).next().unwrap();
    let host = authority.rsplit('@').next().unwrap();
    if host.contains(':') {
        host.to_owned()
    } else {
        let port = if scheme.starts_with("amqp") {
            5672
        } else {
            5432
        };
        format!("{host}:{port}")
    }
}

#[tokio::test]
async fn health_names_what_is_down_without_driver_text() {
    let api = Api::start().await;
    let (status, health) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(
        health,
        json!({"status": "ok", "checks": {"database": "ok", "broker": "ok"}})
    );

    // Another instance that reaches its database and broker through proxies.
    let database_url = api.env.database_url.expose_secret().to_owned();
    let amqp_url = api.env.amqp_url.expose_secret().to_owned();
    let database = StallingProxy::start(&upstream(&database_url)).await;
    let broker = StallingProxy::start(&upstream(&amqp_url)).await;
    let mut settings = api.env.settings();
    settings.database_url = SecretString::from(database.url_through(&database_url));
    settings.amqp_url = SecretString::from(broker.url_through(&amqp_url));
    let other = api.start_other(settings, "order-api-proxied").await;
    let other_health = other.url("/healthz");
    let health_of_other = || get_json(&api.http, &other_health);

    // The database hangs.
    database.stall();
    let (status, health) = health_of_other().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(
        health,
        json!({
            "status": "degraded",
            "checks": {"database": "unavailable: no answer within 2 s", "broker": "ok"},
        })
    );
    database.resume();
    other.wait_healthy(&api.http).await;

    // The database goes away: a short reason of our own, no driver text.
    database.cut();
    let (status, health) = health_of_other().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    let reason = health["checks"]["database"].as_str().unwrap().to_owned();
    assert!(
        [
            "unavailable: connection lost",
            "unavailable: connection refused",
            "unavailable: cannot connect",
            "unavailable: unexpected answer from the server",
            "unavailable: no answer within 2 s",
        ]
        .contains(&reason.as_str()),
        "{health}"
    );
    assert_eq!(
        health,
        json!({"status": "degraded", "checks": {"database": reason, "broker": "ok"}})
    );
    database.resume();
    other.wait_healthy(&api.http).await;

    // The broker goes away: the read-model consumer loses its channel.
    broker.cut();
    let down = json!({
        "status": "degraded",
        "checks": {
            "database": "ok",
            "broker": "unavailable: the read-model consumer has no channel (reconnecting)",
        },
    });
    eventually(
        Duration::from_secs(15),
        "the broker shows as down",
        || async { health_of_other().await == (StatusCode::SERVICE_UNAVAILABLE, down.clone()) },
    )
    .await;
    broker.resume();
    other.wait_healthy(&api.http).await;
    let (status, health) = health_of_other().await;
    assert_eq!(status, StatusCode::OK, "{health}");

    other.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_zero_bound_stops_the_api_at_start_with_a_clear_error() {
    let env = TestEnv::orderflow().await;
    let mut settings = env.settings();
    settings.http_max_concurrency = 0;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = order_api::serve(
        env.ctx_with(settings, "order-api"),
        listener,
        Shutdown::new(),
    )
    .await
    .unwrap_err();
    let text = format!("{error:#}");
    assert!(
        text.contains("ORDERFLOW_HTTP_MAX_CONCURRENCY") && text.contains("at least 1"),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_order_posted_at_once_many_times_is_created_once() {
    // Creation is one statement (`INSERT … ON CONFLICT DO NOTHING` and the
    // outbox row with it); a request that loses the race reads the winner's
    // row in a statement of its own and answers as for a repeat.
    let api = Api::start().await;
    let body = hotpot_order_with_id("order-raced");
    let answers = futures::future::join_all((0..12).map(|_| api.post("/orders", &body))).await;
    for (status, answer) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(answer["order_id"], "order-raced");
    }
    assert_eq!(api.outbox_count("order.started").await, 1);
    // And a payment submitted many times at once for it: each is handed on
    // (the coordinator's ledger decides), none lost.
    let payment = json!({"token": "v1.x.y", "method": "zhifubao"});
    let answers = futures::future::join_all(
        (0..6).map(|_| api.post("/orders/order-raced/payment", &payment)),
    )
    .await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::ACCEPTED),
        "{answers:?}"
    );
    assert_eq!(api.outbox_count("payment.submitted").await, 6);
    api.stop().await;
}
