//! Doors an attacker or a careless client might try, each driven from the
//! outside (the HTTP API and the events exchange) against the whole system:
//! a header that claims another event type, a token re-signed for another
//! amount, an order started again at a lower price, a forged decision on the
//! bus. None of them may change what a customer pays.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use orderflow_tests::eventually;
use orderflow_tests::system::System;
use serde_json::json;
use std::time::Duration;

/// 1 × hotpot-set from config/catalogue.toml.
const HOTPOT: i64 = 12_800;

#[tokio::test]
async fn a_header_cannot_turn_a_message_into_another_event() {
    let system = System::start().await;
    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    system.wait_for(&order_id, "awaiting_payment").await;
    // A client may publish `order.started`; older versions took the event
    // type from this header whenever it was there.
    let mut forged = FieldTable::default();
    forged.insert(
        "x-orderflow-routing-key".into(),
        AMQPValue::LongString("order.completed".into()),
    );
    let body = json!({"order_id": order_id, "method": "zhifubao", "charged_cents": 1});
    system
        .env
        .publish_bare(
            "order.started",
            body.to_string().as_bytes(),
            BasicProperties::default().with_headers(forged),
        )
        .await;
    // It is an `order.started` without supplier or products: dead-lettered
    // by its readers as such.
    let dead = system.env.dead_letter_queue("generate-info");
    eventually(
        Duration::from_secs(10),
        "the forgery is dead-lettered",
        || async { system.env.message_count(&dead).await == 1 },
    )
    .await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["status"], "awaiting_payment", "{order:#}");
    let order = system.pay(&order_id, "zhifubao").await;
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], HOTPOT * 80 / 100);
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    system.stop().await;
}
