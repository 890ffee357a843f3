//! `orderflow dlq list|replay` against a running system: dead letters are
//! listed with their reasons, and a replayed one is handled by its service.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::bus::Outgoing;
use orderflow_shared::envelope::headers;
use orderflow_shared::events::{Event, OrderStarted, ProductLine};
use orderflow_tests::system::System;
use orderflow_tests::{eventually, run_to_end};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::process::Command;

async fn dlq(system: &System, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .arg("dlq")
            .args(args)
            .env("ORDERFLOW_AMQP_URL", system.env.amqp_url.expose_secret())
            .env("ORDERFLOW_NAMESPACE", &system.env.namespace),
    )
    .await
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed_to_their_service() {
    let system = System::start().await;
    let dead = system.env.dead_letter_queue("generate-info");
    // A poison message, dead-lettered by the workers themselves.
    system
        .env
        .publish_bare("order.started", b"{broken", BasicProperties::default())
        .await;
    // A good order that failed earlier (say the catalogue was missing), as
    // the runtime leaves it: through the service's dead-letter exchange,
    // with the routing key it came with.
    let order = |order_id: &str| {
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
    };
    let reason = |text: &str| {
        let mut extra = FieldTable::default();
        extra.insert(headers::REASON.into(), AMQPValue::LongString(text.into()));
        extra
    };
    let publisher = system.ctx.broker.publisher();
    let good = order("replay-me");
    publisher
        .publish_raw(
            &dead,
            "order.started",
            &good.body,
            good.envelope
                .to_properties(reason("catalogue unavailable"))
                .unwrap(),
        )
        .await
        .unwrap();
    // One left by an older version: straight into the queue, its routing key
    // in a header.
    let legacy = order("replay-legacy");
    let mut extra = reason("left by an older orderflow");
    extra.insert(
        "x-orderflow-routing-key".into(),
        AMQPValue::LongString("order.started".into()),
    );
    publisher
        .publish_raw(
            "",
            &dead,
            &legacy.body,
            legacy.envelope.to_properties(extra).unwrap(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "three dead letters", || async {
        system.env.message_count(&dead).await == 3
    })
    .await;

    let (code, out, err) = dlq(&system, &["list", "--service", "generate-info", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    assert!(
        listed
            .iter()
            .any(|m| m["reason"].as_str().unwrap().contains("not valid JSON"))
    );
    let good = listed
        .iter()
        .find(|m| m["order_id"] == "replay-me")
        .unwrap();
    assert_eq!(good["reason"], "catalogue unavailable");
    assert_eq!(good["routing_key"], "order.started");
    let legacy = listed
        .iter()
        .find(|m| m["order_id"] == "replay-legacy")
        .unwrap();
    assert_eq!(legacy["routing_key"], "order.started", "{legacy}");
    assert_eq!(
        system.env.message_count(&dead).await,
        3,
        "listing takes nothing away"
    );

    let (code, out, err) = dlq(&system, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("generate-info") && out.contains("saga-coordinator"),
        "{out}"
    );

    let message_id = good["message_id"].as_str().unwrap();
    let (code, out, err) = dlq(
        &system,
        &[
            "replay",
            "--service",
            "generate-info",
            "--message-id",
            message_id,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 message(s) replayed"), "{out}");
    let order = system.wait_for("replay-me", "awaiting_payment").await;
    assert_eq!(order["amount_cents"], 900);
    assert_eq!(system.env.message_count(&dead).await, 2, "the others stay");
    let legacy_id = legacy["message_id"].as_str().unwrap();
    let (code, _, err) = dlq(
        &system,
        &[
            "replay",
            "--service",
            "generate-info",
            "--message-id",
            legacy_id,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    system.wait_for("replay-legacy", "awaiting_payment").await;
    assert_eq!(
        system.env.message_count(&dead).await,
        1,
        "the poison message stays"
    );

    let (code, _, err) = dlq(&system, &["replay", "--service", "no-such-service"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("unknown service"), "{err}");
    system.stop().await;
}
