//! A payment provider killed with SIGKILL between the gateway's charge and
//! the commit of its outcome, while the order's flow deadline passes: the
//! cancellation finds the open charge, asks the gateway what it charged, and
//! refunds it. Exactly one charge, exactly one refund; nothing charged stays
//! with an order that was cancelled.

use std::process::Stdio;
use std::time::Duration;

use orderflow_shared::Shutdown;
use orderflow_tests::eventually;
use orderflow_tests::system::{System, Workers};
use tokio::process::Child;

use crate::support::{WaitForQueue, orderflow_in, spawn_logging_warnings};

/// `orderflow worker payment-provider-zhifubao` as its own process, whose
/// gateway answers a minute after it charged, taking one message at a time.
fn provider_process(system: &System) -> Child {
    spawn_logging_warnings(
        orderflow_in(&system.env)
            .args(["worker", "payment-provider-zhifubao"])
            .env("ORDERFLOW_GATEWAY_LATENCY_MS", "60000")
            .env("ORDERFLOW_PREFETCH", "1")
            .env("ORDERFLOW_CONCURRENCY", "1"),
        Stdio::null(),
    )
}

#[tokio::test]
async fn a_provider_killed_between_charge_and_commit_is_refunded_once_when_the_order_times_out() {
    let workers = Workers {
        without_providers: vec!["zhifubao"],
        deployment_tiers: true,
        ..Workers::default()
    };
    let system = System::start_with(|s| s.flow_timeout_secs = 6, workers).await;
    let queue = system.env.queue("payment-provider-zhifubao");
    let mut first = provider_process(&system);
    let patience = Duration::from_secs(30);
    system
        .env
        .wait_for_consumers(&queue, 1, patience, "the provider process consumes")
        .await;

    let order_id = system.place("noodle-bar", &[("noodles", 1)]).await;
    let order = system.wait_for(&order_id, "awaiting_payment").await;
    let token = order["payment_token"].as_str().unwrap();
    assert_eq!(system.submit(&order_id, token, "zhifubao").await, 202);
    // The gateway has charged; its answer is a minute away.
    eventually(Duration::from_secs(10), "the gateway charges", || async {
        system.gateway(&order_id).await == (1, 0)
    })
    .await;

    // A second instance of the provider (a replica, or the restarted one)
    // takes what the first, busy with its one message, cannot.
    let second = Shutdown::new();
    let replica = tokio::spawn(payment_provider::run(
        system.ctx.clone(),
        "zhifubao".to_owned(),
        second.clone(),
    ));
    // The flow deadline passes while the first is still between the charge
    // and its commit; then it is killed there.
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "cancelled", "{order:#}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    eventually(
        Duration::from_secs(30),
        "the charge is refunded",
        || async { system.gateway(&order_id).await == (1, 1) },
    )
    .await;
    // The killed provider's message comes back to the replica: nothing more.
    system
        .env
        .wait_for_messages(&queue, 0, patience, "the provider queue drains")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        system.gateway(&order_id).await,
        (1, 1),
        "one charge, one refund"
    );
    let payments = system.db("payments").await;
    let (status, charged, refunded): (String, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT status, charged_cents, refunded_cents FROM captures WHERE order_id = $1",
    )
    .bind(&order_id)
    .fetch_one(payments.pool())
    .await
    .unwrap();
    payments.close().await;
    assert_eq!(status, "refunded");
    assert_eq!(charged, refunded);
    assert_eq!(
        system
            .env
            .message_count(&system.env.dead_letter_queue("payment-provider-zhifubao"))
            .await,
        0
    );
    second.cancel();
    replica.await.unwrap().unwrap();
    system.stop().await;
}
