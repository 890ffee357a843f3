//! Pausing a service's consumption from the console (the same
//! `orderflow_ops::pause` as `orderflow pause`): its queue fills, its orders
//! wait at its step while the saga's timers go on; resuming drains the
//! queue. The pause reaches every instance of the service, and a worker
//! started while its service is paused starts paused.

use std::time::Duration;

use orderflow_tests::api::element_with;
use orderflow_tests::eventually;
use orderflow_tests::system::{System, Worker};
use reqwest::Method;
use serde_json::Value;

const PROVIDER: &str = "payment-provider-zhifubao";

async fn pause(system: &System, service: &str) -> Value {
    let (status, body) = system
        .operator(Method::POST, &format!("/services/{service}/pause"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true, "{body}");
    body
}

async fn resume(system: &System, service: &str) {
    let (status, body) = system
        .operator(Method::POST, &format!("/services/{service}/resume"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], false, "{body}");
}

/// Places an order with haidilao and submits a zhifubao payment for it.
async fn place_and_pay(system: &System) -> String {
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    system.submit_payment(&order_id, "zhifubao").await;
    order_id
}

#[tokio::test]
async fn a_paused_service_queue_fills_its_orders_wait_and_their_timers_run_then_resume_drains_it() {
    // The payment step is settled once paid; the flow timer still runs
    // while the provider is paused.
    let system = System::start_pausable(|settings| settings.flow_timeout_secs = 8).await;
    let queue = system.env.queue(PROVIDER);
    let body = pause(&system, PROVIDER).await;
    assert_eq!(
        body["queue"],
        system.env.topology.names.pause_queue(PROVIDER)
    );
    // Idempotent.
    pause(&system, PROVIDER).await;
    eventually(
        Duration::from_secs(10),
        "the provider stops consuming",
        || async { system.env.consumer_count(&queue).await == 0 },
    )
    .await;

    let order_id = place_and_pay(&system).await;
    eventually(
        Duration::from_secs(10),
        "payment.selected waits in the paused provider's queue",
        || async { system.env.message_count(&queue).await >= 1 },
    )
    .await;
    let (status, saga) = system.get(&format!("/orders/{order_id}/saga")).await;
    assert_eq!(status, 200, "{saga}");
    assert_eq!(
        saga["step"], "paying",
        "the order waits at the paused step: {saga}"
    );
    assert!(
        saga["deadlines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["step"] == "flow"),
        "{saga}"
    );
    let (_, queues) = system.operator(Method::GET, "/queues", None).await;
    let provider = element_with(&queues["queues"], "service", PROVIDER);
    assert_eq!(provider["paused"], true, "{provider}");
    assert_eq!(provider["status"], "paused", "{provider}");
    assert_eq!(provider["consumers"], 0, "{provider}");

    // The flow timer fires while the provider is paused.
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "cancelled", "{order:#}");
    system
        .assert_in_history(&order_id, "timer", "saga.timed-out")
        .await;
    eventually(
        Duration::from_secs(10),
        "order.cancelled waits behind payment.selected",
        || async { system.env.message_count(&queue).await >= 2 },
    )
    .await;
    assert_eq!(system.gateway(&order_id).await, (0, 0), "nothing charged");

    resume(&system, PROVIDER).await;
    eventually(Duration::from_secs(20), "the queue drains", || async {
        system.env.message_count(&queue).await == 0 && system.env.consumer_count(&queue).await == 1
    })
    .await;
    // A cancelled order is never left charged.
    eventually(Duration::from_secs(20), "refunds equal charges", || async {
        let (charges, refunds) = system.gateway(&order_id).await;
        charges == refunds
    })
    .await;
    system.stop().await;
}

/// One payment provider instance of `system`, as its own worker (its own
/// connection), until it is stopped.
fn provider_instance(system: &System, name: &str) -> Worker {
    let mut settings = system.env.settings();
    settings.pause_check_ms = 100;
    settings.gateway_latency_ms = 1;
    let ctx = system.env.ctx_with(settings, name);
    Worker::spawn(|shutdown| payment_provider::run(ctx, "zhifubao".to_owned(), shutdown))
}

#[tokio::test]
async fn a_pause_reaches_every_instance_and_survives_a_restart_of_the_worker() {
    let system = System::start_without(|w| w.without_providers = vec!["zhifubao"]).await;
    let queue = system.env.queue(PROVIDER);
    let first = provider_instance(&system, "zhifubao-1");
    let second = provider_instance(&system, "zhifubao-2");
    eventually(Duration::from_secs(20), "two instances consume", || async {
        system.env.consumer_count(&queue).await == 2
    })
    .await;
    pause(&system, PROVIDER).await;
    eventually(Duration::from_secs(10), "both instances stop", || async {
        system.env.consumer_count(&queue).await == 0
    })
    .await;

    // Restart: the old instances stop, a new one starts while paused.
    first.stop().await;
    second.stop().await;
    let restarted = provider_instance(&system, "zhifubao-3");
    let order_id = place_and_pay(&system).await;
    eventually(
        Duration::from_secs(10),
        "payment.selected waits in the queue",
        || async { system.env.message_count(&queue).await == 1 },
    )
    .await;
    // Twenty pause checks later, the restarted worker still has not
    // consumed: it started paused.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(system.env.consumer_count(&queue).await, 0);
        assert_eq!(system.env.message_count(&queue).await, 1);
    }
    assert_eq!(system.get_order(&order_id, None).await["status"], "paying");

    resume(&system, PROVIDER).await;
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "completed", "{order:#}");
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    assert_eq!(system.env.message_count(&queue).await, 0);
    restarted.stop().await;
    system.stop().await;
}

#[tokio::test]
async fn pausing_an_unknown_service_is_a_404_that_names_the_services() {
    let system = System::start().await;
    let (status, body) = system
        .operator(Method::POST, "/services/no-such-service/pause", None)
        .await;
    assert_eq!(status, 404, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("no-such-service") && error.contains("generate-info"),
        "{error}"
    );
    system.stop().await;
}

#[tokio::test]
async fn a_paused_order_api_stays_healthy_and_says_it_is_paused() {
    let system = System::start_pausable(|_| {}).await;
    pause(&system, "order-api").await;
    eventually(Duration::from_secs(10), "/healthz says paused", || async {
        let (status, body) = system.get("/healthz").await;
        status == 200
            && body["checks"]["broker"]
                .as_str()
                .is_some_and(|broker| broker.contains("paused by an operator"))
    })
    .await;
    // The read model waits; the API answers.
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    assert_eq!(system.get_order(&order_id, None).await["status"], "started");
    resume(&system, "order-api").await;
    system.wait_for(&order_id, "awaiting_payment").await;
    let (status, body) = system.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["checks"]["broker"], "ok", "{body}");
    system.stop().await;
}
