//! The order saga end to end, every worker and the API running on the real
//! broker and database: each payment method completes with its discount and
//! one capture; not-allowed and unknown methods cancel; prices are the
//! server's; an order published straight onto the exchange completes; paying
//! twice charges once; malformed messages on any queue are dead-lettered while
//! the workers keep serving.

use std::time::Duration;

use lapin::BasicProperties;
use orderflow_shared::envelope::{derive_order_id, header_str, headers};
use orderflow_tests::eventually;
use orderflow_tests::system::{System, dead_letter_reason};
use serde_json::json;

/// 2 × hotpot-set (128.00) + 1 × tea (9.00), from config/catalogue.toml.
const AMOUNT: i64 = 2 * 12_800 + 900;

#[tokio::test]
async fn each_method_completes_charging_its_discount_exactly_once() {
    let system = System::start().await;
    for (method, percent) in [("zhifubao", 80), ("weixin", 50), ("unionpay", 70)] {
        let order_id = system
            .place("sichuan-kitchen", &[("hotpot-set", 2), ("tea", 1)])
            .await;
        let awaiting = system.wait_for(&order_id, "awaiting_payment").await;
        assert_eq!(awaiting["amount_cents"], AMOUNT);
        assert_eq!(
            awaiting["payment_methods"],
            json!(["zhifubao", "weixin", "unionpay"]),
            "an unknown merchant is offered every method"
        );
        let order = system.pay(&order_id, method).await;
        assert_eq!(order["status"], "completed", "{method}: {order:#}");
        assert_eq!(order["method"], method);
        assert_eq!(order["charged_cents"], AMOUNT * percent / 100, "{method}");
        assert_eq!(
            system.gateway(&order_id).await,
            (1, 0),
            "{method}: one capture"
        );
    }
    system.stop().await;
}

#[tokio::test]
async fn a_method_the_merchant_does_not_allow_or_does_not_exist_cancels_the_order() {
    let system = System::start().await;
    let haidilao = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let awaiting = system.wait_for(&haidilao, "awaiting_payment").await;
    assert_eq!(awaiting["payment_methods"], json!(["zhifubao", "weixin"]));
    let order = system.pay(&haidilao, "unionpay").await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["cancel_reason"], "method not allowed");

    let other = system.place("noodle-bar", &[("noodles", 3)]).await;
    let order = system.pay(&other, "bitcoin").await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["cancel_reason"], "method not allowed");

    assert_eq!(system.gateway(&haidilao).await, (0, 0), "nothing charged");
    assert_eq!(system.gateway(&other).await, (0, 0), "nothing charged");
    system.stop().await;
}

#[tokio::test]
async fn a_price_sent_by_the_client_has_no_effect() {
    let system = System::start().await;
    let (status, body) = system
        .post_order(&json!({
            "supplier": "noodle-bar",
            "products": [{"sku": "noodles", "quantity": 2, "price_cents": 1}],
            "address": "3 Lane",
            "amount_cents": 1,
            "price": 0.01
        }))
        .await;
    assert_eq!(status, 202, "{body}");
    let order_id = body["order_id"].as_str().unwrap();
    let order = system.pay(order_id, "weixin").await;
    assert_eq!(order["amount_cents"], 2 * 1_200);
    assert_eq!(order["charged_cents"], 1_200);
    system.stop().await;
}

#[tokio::test]
async fn an_order_published_straight_onto_the_exchange_completes() {
    let system = System::start().await;
    // What a user types into the RabbitMQ UI: no properties, no order id.
    let body = br#"{"supplier":"haidilao","products":[{"sku":"beef-slices","quantity":2}],"address":"4 Quay"}"#;
    system
        .env
        .publish_bare(
            "order.started",
            body,
            BasicProperties::default().with_delivery_mode(1),
        )
        .await;
    let order_id = derive_order_id(body);
    let order = system.pay(&order_id, "zhifubao").await;
    assert_eq!(order["status"], "completed", "{order:#}");
    assert_eq!(order["charged_cents"], 2 * 4_600 * 80 / 100);
    assert_eq!(order["supplier"], "haidilao");
    system.stop().await;
}

#[tokio::test]
async fn the_same_payment_submitted_twice_captures_once_and_the_same_order_posted_twice_is_one_order()
 {
    let system = System::start().await;
    let body = json!({
        "order_id": "twice-1",
        "supplier": "haidilao",
        "products": [{"sku": "tofu", "quantity": 1}],
        "address": "5 Pier"
    });
    let first = system.post_order(&body).await;
    let second = system.post_order(&body).await;
    assert_eq!(first.0, 202);
    assert_eq!(second.0, 202);
    assert_eq!(first.1["order_id"], second.1["order_id"]);

    let token = system.payment_token("twice-1").await;
    assert_eq!(system.submit("twice-1", &token, "weixin").await, 202);
    assert_eq!(system.submit("twice-1", &token, "weixin").await, 202);
    let order = system.ended("twice-1").await;
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], 1_800 / 2);
    // The second submission is turned down by the ledger, visibly.
    eventually(
        Duration::from_secs(10),
        "the replay is rejected",
        || async {
            let order = system.get_order("twice-1", None).await;
            order["last_rejection"]
                .as_str()
                .is_some_and(|r| r.contains("already"))
        },
    )
    .await;
    assert_eq!(system.gateway("twice-1").await, (1, 0));
    let sagas = system
        .count(
            "coordinator",
            "SELECT count(*) FROM sagas WHERE order_id = 'twice-1'",
        )
        .await;
    assert_eq!(sagas, 1, "one order, one saga");
    system.stop().await;
}

#[tokio::test]
async fn malformed_json_on_any_queue_is_dead_lettered_and_the_workers_keep_serving() {
    let system = System::start().await;
    let env = &system.env;
    // Between them these routing keys reach every service queue.
    for routing_key in [
        "order.started",
        "order.info-generated",
        "payment.selected.zhifubao",
        "payment.selected.weixin",
        "payment.selected.unionpay",
        "payment.captured",
        "payment.failed",
    ] {
        env.publish_bare(
            routing_key,
            b"{this is not json",
            BasicProperties::default(),
        )
        .await;
    }
    let services = env
        .topology
        .services()
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(services.len(), 9);
    for service in &services {
        let dead = env.dead_letter_queue(service);
        eventually(
            Duration::from_secs(20),
            &format!("{service} dead-letters"),
            || async { env.message_count(&dead).await >= 1 },
        )
        .await;
        for message in env.drain(&dead).await {
            let reason = dead_letter_reason(&message);
            assert!(reason.contains("not valid JSON"), "{service}: {reason}");
            let h = message.delivery.properties.headers().clone().unwrap();
            assert_eq!(
                header_str(&h, headers::SERVICE).as_deref(),
                Some(service.as_str())
            );
        }
    }
    // And the system still works.
    let (_, order) = system
        .place_and_pay("haidilao", &[("tea", 2)], "zhifubao")
        .await;
    assert_eq!(order["status"], "completed");
    system.stop().await;
}
