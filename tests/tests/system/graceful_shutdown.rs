//! Graceful shutdown of a consumer: it stops taking messages, finishes (and
//! acks) the ones in flight, then closes.

use std::time::Duration;

use orderflow_shared::bus::ConsumerOptions;
use orderflow_tests::{TestEnv, eventually, publish_samples};

#[tokio::test]
async fn shutdown_finishes_in_flight_messages_and_takes_no_more() {
    let env = TestEnv::with_service("worker").await;
    let options = ConsumerOptions {
        prefetch: 5,
        concurrency: 5,
        ..ConsumerOptions::new("worker")
    };
    let (effects, stop, consumer) = env.spawn_effects(options, Duration::from_millis(300)).await;
    let publisher = env.broker.publisher();
    publish_samples(&publisher, (0..5).map(|i| format!("order-{i}"))).await;
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

    publish_samples(&publisher, (5..8).map(|i| format!("order-{i}"))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.message_count(&queue).await,
        3,
        "a stopped consumer takes nothing"
    );
    assert_eq!(effects.started(), 5);
    env.cleanup().await;
}
