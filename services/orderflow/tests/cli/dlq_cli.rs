//! `orderflow dlq list|replay` against a running system: dead letters are
//! listed with their reasons, and a replayed one is handled by its service;
//! one older than the retention is replayed only with `--force`; dead
//! outbox rows are listed per schema and put back into their outbox.

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use orderflow_shared::bus::Outgoing;
use orderflow_shared::envelope::headers;
use orderflow_shared::store::{DEAD_AFTER_REFUSALS, Relay};
use orderflow_tests::system::{System, order_started};
use orderflow_tests::{eventually, sample_event};
use serde_json::Value;

use crate::support::{Ended, orderflow_in, run};

/// Runs `orderflow dlq <args>` on `system`'s broker, namespace and database.
async fn dlq(system: &System, args: &[&str]) -> Ended {
    run(orderflow_in(&system.env).arg("dlq").args(args)).await
}

/// The arguments of `orderflow dlq` that replay generate-info's dead letter
/// `message_id`.
fn replay_of(message_id: &str) -> [&str; 5] {
    [
        "replay",
        "--service",
        "generate-info",
        "--message-id",
        message_id,
    ]
}

/// Binds `queue` to `exchange` with `routing_key`.
async fn bind(channel: &Channel, queue: &str, exchange: &str, routing_key: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
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
    let good = order_started("replay-me");
    system
        .publish_dead_letter("generate-info", &good, "catalogue unavailable")
        .await;
    // One left by an older version: straight into the queue, its routing key
    // in a header.
    let legacy = order_started("replay-legacy");
    let mut extra = FieldTable::default();
    extra.insert(
        headers::REASON.into(),
        AMQPValue::LongString("left by an older orderflow".into()),
    );
    extra.insert(
        "x-orderflow-routing-key".into(),
        AMQPValue::LongString("order.started".into()),
    );
    system
        .ctx
        .broker
        .publisher()
        .publish_raw(
            "",
            &dead,
            &legacy.body,
            legacy.envelope.to_properties(extra).unwrap(),
        )
        .await
        .unwrap();
    system.wait_for_depth(&dead, 3, "three dead letters").await;

    let out = dlq(&system, &["list", "--service", "generate-info", "--json"])
        .await
        .succeeded();
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    assert!(
        listed
            .iter()
            .any(|m| m["reason"].as_str().unwrap().contains("not valid JSON"))
    );
    let listed_for = |order_id: &str| {
        listed
            .iter()
            .find(|m| m["order_id"] == order_id)
            .unwrap_or_else(|| panic!("{order_id} not listed: {out}"))
    };
    let good = listed_for("replay-me");
    assert_eq!(good["reason"], "catalogue unavailable");
    assert_eq!(good["routing_key"], "order.started");
    let legacy = listed_for("replay-legacy");
    assert_eq!(legacy["routing_key"], "order.started", "{legacy}");
    assert_eq!(
        system.env.message_count(&dead).await,
        3,
        "listing takes nothing away"
    );

    let out = dlq(&system, &["list"]).await.succeeded();
    assert!(
        out.contains("generate-info") && out.contains("saga-coordinator"),
        "{out}"
    );

    let message_id = good["message_id"].as_str().unwrap();
    let out = dlq(&system, &replay_of(message_id)).await.succeeded();
    assert!(out.contains("1 message(s) replayed"), "{out}");
    let order = system.wait_for("replay-me", "awaiting_payment").await;
    assert_eq!(order["amount_cents"], 900);
    assert_eq!(system.env.message_count(&dead).await, 2, "the others stay");
    let legacy_id = legacy["message_id"].as_str().unwrap();
    dlq(&system, &replay_of(legacy_id)).await.succeeded();
    system.wait_for("replay-legacy", "awaiting_payment").await;
    assert_eq!(
        system.env.message_count(&dead).await,
        1,
        "the poison message stays"
    );

    dlq(&system, &["replay", "--service", "no-such-service"])
        .await
        .failed_saying(&["unknown service"]);
    system.stop().await;
}

#[tokio::test]
async fn a_dead_letter_older_than_the_retention_is_replayed_only_with_force() {
    let system = System::start().await;
    let dead = system.env.dead_letter_queue("generate-info");
    // First published 40 days ago: longer than the default retention of 30.
    let mut old = order_started("replay-old");
    old.envelope.timestamp -= 40 * 86_400;
    system
        .publish_dead_letter("generate-info", &old, "catalogue unavailable")
        .await;
    system.wait_for_depth(&dead, 1, "the dead letter").await;
    let replay = replay_of(old.envelope.message_id.as_str());

    dlq(&system, &replay).await.failed_saying(&[
        "retention of 30 day(s)",
        "ORDERFLOW_RETENTION_DAYS",
        "replay-old",
        "--force",
    ]);
    assert_eq!(
        system.env.message_count(&dead).await,
        1,
        "a refused dead letter stays where it was"
    );

    let Ended { code, out, err, .. } = dlq(&system, &[&replay[..], &["--force"]].concat()).await;
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

    let out = dlq(&system, &["list", "--schema", "coordinator", "--json"])
        .await
        .succeeded();
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
    let out = dlq(&system, &["list"]).await.succeeded();
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
    let out = dlq(&system, &["list", "--json"]).await.succeeded();
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed.iter().filter(|e| e["source"] == "outbox").count(),
        1,
        "{out}"
    );

    // The binding is back (and a queue of the test's own watches the key);
    // the row goes back into the outbox, and the coordinator's relay
    // publishes it.
    bind(&channel, &coordinator_queue, &events, "#").await;
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
    bind(&channel, &catcher, &events, "order.cancelled.nowhere").await;
    let replay = ["replay", "--outbox", "--schema", "coordinator", "--id", &id];
    let out = dlq(&system, &replay).await.succeeded();
    assert!(
        out.contains(&format!("put dead outbox row {id}")) && out.contains("order-stray"),
        "{out}"
    );
    assert_eq!(dead_rows().await, 0);
    let (stop_coordinator, coordinator_task) = system.start_coordinator();
    // The catcher is exclusive to this connection: look through it.
    let waiting = || async {
        orderflow_topology::inspect_queue(&channel, &catcher)
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

    dlq(&system, &replay)
        .await
        .failed_saying(&[format!("no dead outbox row with id {id}").as_str()]);
    dlq(
        &system,
        &["replay", "--outbox", "--schema", "nowhere", "--id", "1"],
    )
    .await
    .failed_saying(&["unknown schema"]);
    stop_coordinator.cancel();
    coordinator_task.await.unwrap().unwrap();
    coordinator.close().await;
    system.stop().await;
}
