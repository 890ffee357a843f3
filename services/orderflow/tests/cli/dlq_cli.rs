//! `orderflow dlq list|replay` against a running system: dead letters are
//! listed with their reasons, and a replayed one is handled by its service;
//! one older than the retention is replayed only with `--force`; dead
//! outbox rows are listed per schema and put back into their outbox.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::bus::Outgoing;
use orderflow_shared::envelope::headers;
use orderflow_shared::events::{Event, OrderStarted, ProductLine};
use orderflow_shared::store::{DEAD_AFTER_REFUSALS, Relay};
use orderflow_tests::system::System;
use orderflow_tests::{eventually, run_to_end, sample_event};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::process::Command;

async fn dlq(system: &System, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .arg("dlq")
            .args(args)
            .env("ORDERFLOW_AMQP_URL", system.env.amqp_url.expose_secret())
            .env(
                "ORDERFLOW_DATABASE_URL",
                system.env.database_url.expose_secret(),
            )
            .env("ORDERFLOW_NAMESPACE", &system.env.namespace),
    )
    .await
}

/// An `order.started` for `order_id`, as generate-info receives it.
fn order(order_id: &str) -> Outgoing {
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

/// Headers of a dead letter with `text` as its reason.
fn reason(text: &str) -> FieldTable {
    let mut extra = FieldTable::default();
    extra.insert(headers::REASON.into(), AMQPValue::LongString(text.into()));
    extra
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

#[tokio::test]
async fn a_dead_letter_older_than_the_retention_is_replayed_only_with_force() {
    let system = System::start().await;
    let dead = system.env.dead_letter_queue("generate-info");
    // First published 40 days ago: longer than the default retention of 30.
    let mut old = order("replay-old");
    old.envelope.timestamp -= 40 * 86_400;
    system
        .ctx
        .broker
        .publisher()
        .publish_raw(
            &dead,
            "order.started",
            &old.body,
            old.envelope
                .to_properties(reason("catalogue unavailable"))
                .unwrap(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the dead letter", || async {
        system.env.message_count(&dead).await == 1
    })
    .await;
    let message_id = old.envelope.message_id.as_str();
    let replay = [
        "replay",
        "--service",
        "generate-info",
        "--message-id",
        message_id,
    ];

    let (code, _, err) = dlq(&system, &replay).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("retention of 30 day(s)")
            && err.contains("ORDERFLOW_RETENTION_DAYS")
            && err.contains("replay-old")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        system.env.message_count(&dead).await,
        1,
        "a refused dead letter stays where it was"
    );

    let (code, out, err) = dlq(&system, &[&replay[..], &["--force"]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("replayed anyway (--force)"), "{err}");
    assert!(out.contains("1 message(s) replayed"), "{out}");
    system.wait_for("replay-old", "awaiting_payment").await;
    assert_eq!(system.env.message_count(&dead).await, 0);
    system.stop().await;
}

#[tokio::test]
async fn dead_outbox_rows_are_listed_per_schema_and_replayed_into_their_outbox() {
    // The coordinator (the only relay of its schema) starts later, for the replay.
    let system = System::start_without(|w| w.coordinator = false).await;
    // A binding is missing: the coordinator's queue, the only one that takes
    // every routing key, is not bound, so `order.cancelled.nowhere` has no route.
    let (_connection, channel) = system.env.raw_channel().await;
    let events = system.ctx.broker.names().events_exchange();
    let coordinator_queue = system.env.queue("saga-coordinator");
    channel
        .queue_unbind(
            coordinator_queue.as_str().into(),
            events.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // An event the coordinator's schema committed for that key a while ago,
    // swept as often as it takes: the broker refuses it every time.
    let coordinator = system.db("coordinator").await;
    let mut stray = Outgoing::event(&sample_event("order-stray"), None);
    "order.cancelled.nowhere".clone_into(&mut stray.routing_key);
    let mut unit = coordinator.begin_unit_without_inbox().await.unwrap();
    unit.emit(stray.clone());
    unit.commit().await.unwrap();
    sqlx::query("UPDATE outbox SET created_at = now() - interval '1 hour'")
        .execute(coordinator.pool())
        .await
        .unwrap();
    let sweeper =
        Relay::new(coordinator.clone(), system.ctx.broker.publisher()).with_grace(Duration::ZERO);
    for _ in 0..DEAD_AFTER_REFUSALS {
        sweeper.relay_batch().await.unwrap_err();
    }
    let dead_rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_dead")
            .fetch_one(coordinator.pool())
            .await
            .unwrap()
    };
    assert_eq!(dead_rows().await, 1);

    let (code, out, err) = dlq(&system, &["list", "--schema", "coordinator", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "only the outbox of the schema: {out}");
    let row = &listed[0];
    assert_eq!(row["source"], "outbox");
    assert_eq!(row["schema"], "coordinator");
    assert_eq!(row["routing_key"], "order.cancelled.nowhere");
    assert_eq!(row["order_id"], "order-stray");
    assert_eq!(row["message_id"], stray.envelope.message_id.as_str());
    assert!(row["attempts"].as_i64().unwrap() >= 5, "{row}");
    assert!(
        row["reason"].as_str().unwrap().contains("unroutable"),
        "{row}"
    );
    let id = row["id"].as_i64().unwrap().to_string();

    // Without filters: queues and every schema's outbox, in text.
    let (code, out, err) = dlq(&system, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    for expected in [
        "generate-info",
        "outbox of orders",
        "coordinator.outbox_dead",
        "order.cancelled.nowhere",
        "outbox of payments",
        "outbox of pricing",
        &format!("orderflow dlq replay --outbox --schema coordinator --id {id}"),
    ] {
        assert!(out.contains(expected), "{expected} in: {out}");
    }
    let (code, out, err) = dlq(&system, &["list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed.iter().filter(|e| e["source"] == "outbox").count(),
        1,
        "{out}"
    );

    // The binding is back (and a queue of the test's own watches the key);
    // the row goes back into the outbox, and the coordinator's relay
    // publishes it.
    channel
        .queue_bind(
            coordinator_queue.as_str().into(),
            events.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let catcher = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    channel
        .queue_bind(
            catcher.as_str().into(),
            events.as_str().into(),
            "order.cancelled.nowhere".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let replay = ["replay", "--outbox", "--schema", "coordinator", "--id", &id];
    let (code, out, err) = dlq(&system, &replay).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("put dead outbox row {id}")) && out.contains("order-stray"),
        "{out}"
    );
    assert_eq!(dead_rows().await, 0);
    let (stop_coordinator, coordinator_task) = system.start_coordinator();
    // The catcher is exclusive to this connection: look through it.
    let waiting = || async {
        channel
            .queue_declare(
                catcher.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    };
    eventually(
        Duration::from_secs(30),
        "the replayed row published",
        || async { waiting().await == 1 },
    )
    .await;
    let delivered = channel
        .basic_get(catcher.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        delivered
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        stray.envelope.message_id,
        "the same message, same id"
    );

    let (code, _, err) = dlq(&system, &replay).await;
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("no dead outbox row with id {id}")),
        "{err}"
    );
    let (code, _, err) = dlq(
        &system,
        &["replay", "--outbox", "--schema", "nowhere", "--id", "1"],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("unknown schema"), "{err}");
    stop_coordinator.cancel();
    coordinator_task.await.unwrap().unwrap();
    coordinator.close().await;
    system.stop().await;
}
