//! A late cause opens a payment step the customer can still use (found by
//! the chaos run): an order priced long after it started (generate-info was
//! away longer than the payment timeout) used to open its payment step with
//! a deadline counted from the order's time, already past: the token was
//! born expired and the order timed out though the customer paid at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_tests::system::{System, Workers};

const PAYMENT_TIMEOUT_SECS: u64 = 8;

#[tokio::test]
async fn an_order_priced_after_the_payment_timeout_can_still_be_paid() {
    let system = System::start_with(
        |settings| settings.payment_timeout_secs = PAYMENT_TIMEOUT_SECS,
        Workers {
            generate_info: false,
            ..Workers::default()
        },
    )
    .await;
    let order_id = system.place("haidilao", &[("tea", 2)]).await;
    // generate-info is away for longer than the payment timeout.
    tokio::time::sleep(Duration::from_secs(PAYMENT_TIMEOUT_SECS + 2)).await;
    let shutdown = Shutdown::new();
    let pricing = tokio::spawn(generate_info::run(
        system
            .env
            .ctx_with(system.ctx.settings.as_ref().clone(), "generate-info"),
        shutdown.clone(),
    ));

    let order = system.wait_for(&order_id, "awaiting_payment").await;
    let expires_at: DateTime<Utc> = order["token_expires_at"]
        .as_str()
        .unwrap_or_else(|| panic!("no token deadline: {order:#}"))
        .parse()
        .unwrap();
    assert!(
        expires_at > Utc::now() + chrono::Duration::seconds(1),
        "the payment step opened with its deadline {expires_at} (nearly) past"
    );
    let token = order["payment_token"].as_str().unwrap();
    assert_eq!(system.submit(&order_id, token, "zhifubao").await, 202);
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "completed", "{order:#}");
    assert_eq!(system.gateway(&order_id).await, (1, 0));

    shutdown.cancel();
    pricing.await.unwrap().unwrap();
    system.stop().await;
}
