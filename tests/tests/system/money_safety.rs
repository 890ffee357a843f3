//! Doors an attacker or a careless client might try, each driven from the
//! outside (the HTTP API and the events exchange) against the whole system:
//! a header that claims another event type, a token re-signed for another
//! amount, an order started again at a lower price, a forged decision on the
//! bus. None of them may change what a customer pays.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::token::TokenKeys;
use orderflow_tests::system::{System, dead_letter_reason};
use orderflow_tests::{TEST_TOKEN_KEYS, eventually};
use secrecy::SecretString;
use serde_json::json;

/// 1 × hotpot-set from config/catalogue.toml.
const HOTPOT: i64 = 12_800;

/// Pays `order_id` with `method` as its customer would: the order completes,
/// `charged` cents charged once.
async fn pay_genuinely(system: &System, order_id: &str, method: &str, charged: i64) {
    let order = system.pay(order_id, method).await;
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], charged);
    assert_eq!(system.gateway(order_id).await, (1, 0));
}

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
    system
        .wait_for_depth(&dead, 1, "the forgery is dead-lettered")
        .await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["status"], "awaiting_payment", "{order:#}");
    pay_genuinely(&system, &order_id, "zhifubao", HOTPOT * 80 / 100).await;
    system.stop().await;
}

#[tokio::test]
async fn a_token_re_signed_for_another_amount_is_not_the_steps_token() {
    let system = System::start().await;
    let order_id = system.place("haidilao", &[("hotpot-set", 10)]).await;
    let token = system.payment_token(&order_id).await;
    // Someone holding a signing key (the public development key of a demo
    // deployment, a leaked one) changes the amount and signs again.
    let keys = TokenKeys::parse(&SecretString::from(TEST_TOKEN_KEYS.to_owned())).unwrap();
    let mut claims = keys.verify(&token, 0).unwrap();
    assert_eq!(claims.amount_cents, 10 * HOTPOT);
    claims.amount_cents = 1;
    let forged = keys.mint(&claims).unwrap();
    assert_eq!(system.submit(&order_id, &forged, "zhifubao").await, 202);
    system
        .wait_for_rejection(
            &order_id,
            "the forgery is rejected",
            "token is not the one issued for this order's payment step",
        )
        .await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["status"], "awaiting_payment", "{order:#}");
    assert_eq!(system.gateway(&order_id).await, (0, 0), "nothing charged");
    // The genuine token still pays the real amount.
    pay_genuinely(&system, &order_id, "zhifubao", 10 * HOTPOT * 80 / 100).await;
    system.stop().await;
}

#[tokio::test]
async fn an_order_started_again_with_cheaper_content_is_not_priced_again() {
    let system = System::start().await;
    let order_id = system.place("haidilao", &[("hotpot-set", 10)]).await;
    let order = system.wait_for(&order_id, "awaiting_payment").await;
    let token = order["payment_token"].as_str().unwrap().to_owned();
    assert_eq!(order["amount_cents"], 10 * HOTPOT);
    // As anyone with the RabbitMQ UI can: the same order id, one tea.
    let cheaper = json!({
        "order_id": order_id, "supplier": "haidilao",
        "products": [{"sku": "tea", "quantity": 1}], "address": "1 Road",
    });
    system.env.publish_json("order.started", &cheaper).await;
    let dead = system.env.dead_letter_queue("generate-info");
    system
        .wait_for_depth(&dead, 1, "the re-pricing is refused")
        .await;
    let refused = system.env.drain(&dead).await;
    let reason = dead_letter_reason(&refused[0]);
    assert!(reason.contains("an order is priced once"), "{reason}");
    eventually(
        Duration::from_secs(10),
        "the coordinator records the rejection",
        || async {
            system
                .history_count(&order_id, "rejection", "order.started")
                .await
                > 0
        },
    )
    .await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["amount_cents"], 10 * HOTPOT);
    assert_eq!(order["payment_token"], token.as_str(), "no new token");
    // The same content again (a client retrying) is a duplicate, not a refusal.
    let same = json!({
        "order_id": order_id, "supplier": "haidilao",
        "products": [{"sku": "hotpot-set", "quantity": 10}], "address": "1 Road",
    });
    system.env.publish_json("order.started", &same).await;
    pay_genuinely(&system, &order_id, "weixin", 10 * HOTPOT / 2).await;
    assert_eq!(system.env.message_count(&dead).await, 0);
    system.stop().await;
}

#[tokio::test]
async fn a_payment_decision_the_coordinator_did_not_make_charges_nothing() {
    let system = System::start().await;
    let order_id = system.place("noodle-bar", &[("noodles", 2)]).await;
    let token = system.payment_token(&order_id).await;
    for amount in [1, 0, -5] {
        let forged = json!({"order_id": order_id, "method": "zhifubao", "amount_cents": amount});
        system
            .env
            .publish_json("payment.selected.zhifubao", &forged)
            .await;
    }
    let dead = system.env.dead_letter_queue("payment-provider-zhifubao");
    system
        .wait_for_depth(&dead, 3, "every forgery refused")
        .await;
    for refused in system.env.drain(&dead).await {
        let reason = dead_letter_reason(&refused);
        assert!(
            reason.contains("accepted no zhifubao payment for this order"),
            "{reason}"
        );
    }
    assert_eq!(system.gateway(&order_id).await, (0, 0), "nothing charged");
    // (The order API's read model shows `paying` after a forged decision:
    // its status is a view; who may publish decisions is the broker's
    // permissions' business.) Once the coordinator accepted a payment, a
    // second decision with another amount is refused too.
    assert_eq!(system.submit(&order_id, &token, "zhifubao").await, 202);
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "completed");
    let amount = order["amount_cents"].as_i64().unwrap();
    let forged = json!({"order_id": order_id, "method": "zhifubao", "amount_cents": amount / 2});
    system
        .env
        .publish_json("payment.selected.zhifubao", &forged)
        .await;
    system
        .wait_for_depth(&dead, 1, "the second forgery refused")
        .await;
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    system.stop().await;
}

#[tokio::test]
async fn a_method_the_merchant_refused_is_not_recorded_for_a_forged_decision_to_charge() {
    let system = System::start().await;
    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let order = system.pay(&order_id, "unionpay").await;
    assert_eq!(order["cancel_reason"], "method not allowed");
    // The coordinator used the token but accepted no unionpay payment: a
    // decision for it, published by anyone, is refused and charges nothing.
    let amount = order["amount_cents"].as_i64().unwrap();
    let forged = json!({"order_id": order_id, "method": "unionpay", "amount_cents": amount});
    system
        .env
        .publish_json("payment.selected.unionpay", &forged)
        .await;
    let dead = system.env.dead_letter_queue("payment-provider-unionpay");
    system.wait_for_depth(&dead, 1, "the forgery refused").await;
    let refused = system.env.drain(&dead).await;
    let reason = dead_letter_reason(&refused[0]);
    assert!(
        reason.contains("accepted no unionpay payment for this order"),
        "{reason}"
    );
    assert_eq!(system.gateway(&order_id).await, (0, 0), "nothing charged");
    system.stop().await;
}
