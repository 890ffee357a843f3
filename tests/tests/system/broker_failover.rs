//! Failover between broker nodes: `ORDERFLOW_AMQP_URL` lists a private
//! RabbitMQ node first and the machine's broker second. The publisher and a
//! consumer work on the private node until it is killed with SIGKILL in the
//! middle of the stream; then both carry on on the other node, by themselves,
//! and every message published takes effect exactly once.

use std::sync::Arc;
use std::time::Duration;

use orderflow_shared::Shutdown;
use orderflow_shared::bus::{Broker, ConsumerOptions, Outgoing, run_consumer};
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::private_broker::PrivateNode;
use orderflow_tests::{Effects, TestEnv, eventually, sample_event};
use secrecy::{ExposeSecret, SecretString};

const BATCH: usize = 50;

#[tokio::test(flavor = "multi_thread")]
async fn publishers_and_consumers_fail_over_to_the_next_node_when_theirs_is_killed() {
    // The topology on the machine's broker (the second node of the list).
    let env = TestEnv::new(&[ServiceSpec::new("sink", &["order.cancelled"])]).await;
    let mut node = PrivateNode::start().await;
    let nodes = SecretString::from(format!(
        "{},{}",
        node.amqp_url(),
        env.amqp_url.expose_secret()
    ));
    let broker = Broker::new(
        &nodes,
        &format!("{}-failover", env.namespace),
        env.topology.clone(),
        Duration::from_secs(10),
    )
    .unwrap();
    // Declared on the first node that answers: the private one.
    broker
        .declare_topology(Duration::from_secs(30))
        .await
        .unwrap();

    let effects = Arc::new(Effects::new(env.db("sink").await, "sink").await);
    let shutdown = Shutdown::new();
    let consumer = tokio::spawn(run_consumer(
        broker.clone(),
        ConsumerOptions::new("sink"),
        effects.clone(),
        shutdown.clone(),
    ));
    let publisher = broker.publisher();
    let publish = |from: usize| {
        let publisher = publisher.clone();
        async move {
            for i in from..from + BATCH {
                let message = Outgoing::event(&sample_event(&format!("order-{i}")), None);
                publisher
                    .publish(&message)
                    .await
                    .unwrap_or_else(|e| panic!("message {i} not published: {e}"));
            }
        }
    };

    publish(0).await;
    eventually(
        Duration::from_secs(30),
        "the first messages applied",
        || async { effects.counts().await.0 >= BATCH as i64 },
    )
    .await;
    let queue = env.queue("sink");
    assert_eq!(
        env.consumer_count(&queue).await,
        0,
        "before the kill, the consumer is on the private node, not on the machine's broker"
    );
    assert_eq!(env.message_count(&queue).await, 0);

    // SIGKILL (and its directory removed): no goodbye to its clients.
    tokio::task::spawn_blocking(move || {
        node.kill();
        drop(node);
    })
    .await
    .unwrap();

    // The publisher's connection is gone: it publishes on the next node.
    tokio::time::timeout(Duration::from_mins(1), publish(BATCH))
        .await
        .expect("publishing resumed on the surviving node within a minute");
    eventually(
        Duration::from_mins(1),
        "the consumer re-subscribed on the surviving node and applied the rest",
        || async { effects.counts().await.0 >= 2 * BATCH as i64 },
    )
    .await;
    assert_eq!(
        env.consumer_count(&queue).await,
        1,
        "the consumer is on the machine's broker now"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        effects.counts().await,
        (2 * BATCH as i64, 2 * BATCH as i64),
        "every message exactly once"
    );
    assert!(!consumer.is_finished(), "the consumer never gave up");

    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    broker.close();
    env.cleanup().await;
}
