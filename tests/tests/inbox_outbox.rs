//! Inbox and outbox: a message delivered twice has one effect; a relay that
//! crashes between publishing and marking sent publishes again, and the
//! downstream inbox keeps it to one effect; several relays never publish a
//! row twice.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::sync::Arc;
use std::time::Duration;

use orderflow_shared::bus::{ConsumerOptions, Outgoing};
use orderflow_shared::store::Relay;
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::{Effects, TestEnv, eventually, sample_event};

#[tokio::test]
async fn the_same_message_delivered_twice_has_one_effect() {
    let env = TestEnv::new(&[ServiceSpec::new("downstream", &["order.cancelled"])]).await;
    let effects = Arc::new(Effects::new(env.db("downstream").await, "downstream").await);
    let (stop, consumer) = env.spawn_consumer(ConsumerOptions::new("downstream"), effects.clone());

    let message = Outgoing::event(&sample_event("order-7"), None);
    let publisher = env.broker.publisher();
    publisher.publish(&message).await.unwrap();
    publisher.publish(&message).await.unwrap();

    eventually(
        Duration::from_secs(10),
        "both deliveries handled",
        || async { effects.deliveries() == 2 },
    )
    .await;
    assert_eq!(effects.counts().await, (1, 1));
    stop.cancel();
    consumer.await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_publish_and_mark_sent_publishes_again_with_one_effect() {
    let env = TestEnv::new(&[ServiceSpec::new("downstream", &["order.cancelled"])]).await;
    let upstream = env.db("upstream").await;
    let effects = Arc::new(Effects::new(env.db("downstream").await, "downstream").await);
    let (stop, consumer) = env.spawn_consumer(ConsumerOptions::new("downstream"), effects.clone());

    // The upstream handler's state change and event in one transaction.
    let mut unit = upstream.begin_unit_without_inbox().await.unwrap();
    unit.emit(Outgoing::event(&sample_event("order-9"), None));
    unit.commit().await.unwrap();

    let relay = Relay::new(upstream.clone(), env.broker.publisher());
    assert_eq!(relay.relay_batch().await.unwrap(), 1);
    assert_eq!(
        relay.relay_batch().await.unwrap(),
        0,
        "a sent row is not sent again"
    );

    // The relay "crashed" after the broker confirmed but before mark-sent
    // committed: the row is unsent again, exactly as that crash leaves it.
    sqlx::query("UPDATE outbox SET sent_at = NULL")
        .execute(upstream.pool())
        .await
        .unwrap();
    assert_eq!(relay.relay_batch().await.unwrap(), 1);

    eventually(
        Duration::from_secs(10),
        "both publishes delivered",
        || async { effects.deliveries() == 2 },
    )
    .await;
    assert_eq!(effects.counts().await, (1, 1));
    stop.cancel();
    consumer.await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn several_relays_publish_each_row_once() {
    let env = TestEnv::new(&[ServiceSpec::new("downstream", &["order.cancelled"])]).await;
    let upstream = env.db("upstream").await;
    for batch in 0..4 {
        let mut unit = upstream.begin_unit_without_inbox().await.unwrap();
        for i in 0..100 {
            unit.emit(Outgoing::event(
                &sample_event(&format!("order-{batch}-{i}")),
                None,
            ));
        }
        unit.commit().await.unwrap();
    }
    let relays: Vec<Relay> = (0..3)
        .map(|_| Relay::new(upstream.clone(), env.broker.publisher()))
        .collect();
    let published = futures::future::join_all(relays.iter().map(|relay| async move {
        let mut total = 0;
        loop {
            let n = relay.relay_batch().await.unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    }))
    .await;
    assert_eq!(published.iter().sum::<usize>(), 400, "{published:?}");
    let queue = env.queue("downstream");
    eventually(
        Duration::from_secs(10),
        "400 messages in the queue",
        || async { env.message_count(&queue).await == 400 },
    )
    .await;
    let messages = env.drain(&queue).await;
    let ids: std::collections::HashSet<_> = messages
        .iter()
        .map(|m| m.delivery.properties.message_id().clone())
        .collect();
    assert_eq!(ids.len(), 400);
    env.cleanup().await;
}

#[tokio::test]
async fn a_running_relay_publishes_what_another_process_commits() {
    let env = TestEnv::new(&[ServiceSpec::new("downstream", &["order.cancelled"])]).await;
    let relay_side = env.db("upstream").await;
    // A second handle on the same schema stands for another process: its
    // commits reach the relay only through the database.
    let writer_side = env.db("upstream").await;
    let shutdown = orderflow_shared::Shutdown::new();
    let relay =
        tokio::spawn(Relay::new(relay_side.clone(), env.broker.publisher()).run(shutdown.clone()));
    for i in 0..5 {
        let mut unit = writer_side.begin_unit_without_inbox().await.unwrap();
        unit.emit(Outgoing::event(&sample_event(&format!("order-{i}")), None));
        unit.commit().await.unwrap();
    }
    let queue = env.queue("downstream");
    eventually(Duration::from_secs(15), "5 messages relayed", || async {
        env.message_count(&queue).await == 5
    })
    .await;
    shutdown.cancel();
    relay.await.unwrap();
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(relay_side.pool())
        .await
        .unwrap();
    assert_eq!(unsent, 0);
    env.cleanup().await;
}
