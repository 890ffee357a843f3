//! Graceful shutdown of a consumer: it stops taking messages, finishes (and
//! acks) the ones in flight, then closes.

use std::sync::Arc;
use std::time::Duration;

use orderflow_shared::bus::{ConsumerOptions, Outgoing};
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::{Effects, TestEnv, eventually, sample_event};

#[tokio::test]
async fn shutdown_finishes_in_flight_messages_and_takes_no_more() {
    let env = TestEnv::new(&[ServiceSpec::new("worker", &["order.cancelled"])]).await;
    let effects = Arc::new(Effects {
        linger: Duration::from_millis(300),
        ..Effects::new(env.db("worker").await, "worker").await
    });
    let (stop, consumer) = env.spawn_consumer(
        ConsumerOptions {
            prefetch: 5,
            concurrency: 5,
            ..ConsumerOptions::new("worker")
        },
        effects.clone(),
    );
    let publisher = env.broker.publisher();
    for i in 0..5 {
        publisher
            .publish(&Outgoing::event(&sample_event(&format!("order-{i}")), None))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "five messages in flight",
        || async { effects.started() == 5 },
    )
    .await;
    stop.cancel();
    consumer.await.unwrap();
    assert_eq!(effects.counts().await, (5, 5));
    let queue = env.queue("worker");
    assert_eq!(
        env.message_count(&queue).await,
        0,
        "in-flight messages were acked, not handed back"
    );

    for i in 5..8 {
        publisher
            .publish(&Outgoing::event(&sample_event(&format!("order-{i}")), None))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.message_count(&queue).await,
        3,
        "a stopped consumer takes nothing"
    );
    assert_eq!(effects.started(), 5);
    env.cleanup().await;
}
