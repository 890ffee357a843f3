//! Reconnection: the broker closes every connection of a service in the middle
//! of a stream of 1,000 messages (what `rabbitmqctl close_connection` or a
//! broker restart does); publisher and consumer come back by themselves and
//! all 1,000 messages take effect exactly once.

use std::sync::Arc;
use std::time::Duration;

use orderflow_shared::bus::{ConsumerOptions, Outgoing};
use orderflow_tests::{TestEnv, eventually, sample_event};

const MESSAGES: usize = 1000;

#[tokio::test]
async fn closing_all_connections_mid_stream_loses_nothing_and_duplicates_nothing() {
    let env = TestEnv::with_service("sink").await;
    let options = ConsumerOptions {
        prefetch: 50,
        concurrency: 4,
        ..ConsumerOptions::new("sink")
    };
    let (effects, stop, consumer) = env.spawn_effects(options, Duration::from_millis(20)).await;

    // The producer publishes a little faster than the consumer applies (about
    // 250/s against 200/s), so the connections are cut while both are busy.
    let publisher = env.broker.publisher();
    let producer = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let message = Outgoing::event(&sample_event(&format!("order-{i}")), None);
            publisher
                .publish(&message)
                .await
                .unwrap_or_else(|e| panic!("message {i} not published: {e}"));
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });

    eventually(
        Duration::from_secs(30),
        "a fifth of the stream applied",
        || async { effects.counts().await.0 >= (MESSAGES / 5) as i64 },
    )
    .await;
    let env = Arc::new(env);
    tokio::task::spawn_blocking({
        let env = env.clone();
        move || env.close_broker_connections()
    })
    .await
    .unwrap();
    assert!(
        !producer.is_finished(),
        "the cut came in the middle of the stream"
    );

    producer.await.unwrap();
    eventually(Duration::from_mins(1), "all messages applied", || async {
        effects.counts().await.0 >= MESSAGES as i64
    })
    .await;
    // Give late redeliveries a moment to show up as duplicates, if any.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        effects.counts().await,
        (MESSAGES as i64, MESSAGES as i64),
        "every message exactly once"
    );
    assert!(
        effects.deliveries() > MESSAGES,
        "messages in flight when the connections closed were delivered again"
    );
    stop.cancel();
    consumer.await.unwrap();
    Arc::into_inner(env).unwrap().cleanup().await;
}
