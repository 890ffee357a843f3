//! The retry ladder: transient failures are retried in process with backoff,
//! then through the delay queues; permanent failures and poison messages land
//! in the service's dead-letter queue once, with the reason, the original
//! routing key and the service in headers, and the worker keeps serving.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use orderflow_shared::Shutdown;
use orderflow_shared::bus::{ConsumerOptions, HandleError, Handler, Message};
use orderflow_shared::envelope::{header_int, header_str, headers};
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::{TestEnv, eventually};
use tokio::task::JoinHandle;

/// Fails transiently `failures` times per message, then succeeds (an order
/// id containing "early" fails as a message waiting for another one,
/// [`HandleError::NotYet`]); an order id containing "poison" is a permanent
/// failure, "panic" panics.
struct Flaky {
    failures: usize,
    calls: AtomicUsize,
    handled: Mutex<Vec<Message>>,
}

impl Flaky {
    fn new(failures: usize) -> Arc<Self> {
        Arc::new(Self {
            failures,
            calls: AtomicUsize::new(0),
            handled: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn handled(&self) -> Vec<Message> {
        self.handled.lock().unwrap().clone()
    }
}

impl Handler for Flaky {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        if message.order_id().contains("poison") {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "order total is negative"
            )));
        }
        assert!(!message.order_id().contains("panic"), "handler bug");
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.failures && message.order_id().contains("early") {
            return Err(HandleError::not_yet(anyhow::anyhow!(
                "the step this message is for is not open yet"
            )));
        }
        if call < self.failures {
            return Err(HandleError::transient(anyhow::anyhow!(
                "database unavailable"
            )));
        }
        self.handled.lock().unwrap().push(message.clone());
        Ok(())
    }
}

/// A fresh environment whose `worker` service (reading `order.cancelled`
/// and `order.started`) consumes through `Flaky::new(failures)` with short
/// in-process retry delays; the stop token and task of that consumer.
async fn start_worker(failures: usize) -> (TestEnv, Arc<Flaky>, Shutdown, JoinHandle<()>) {
    let env = TestEnv::new(&[ServiceSpec::new(
        "worker",
        &["order.cancelled", "order.started"],
    )])
    .await;
    let handler = Flaky::new(failures);
    let options = ConsumerOptions {
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(50),
        ..ConsumerOptions::new("worker")
    };
    let (stop, consumer) = env.spawn_consumer(options, handler.clone());
    (env, handler, stop, consumer)
}

/// Stops the consumer, waits for its end, and checks that the worker's
/// dead-letter queue is empty.
async fn stop_with_no_dead_letter(env: &TestEnv, stop: Shutdown, consumer: JoinHandle<()>) {
    stop.cancel();
    consumer.await.unwrap();
    assert_eq!(env.message_count(&env.dead_letter_queue("worker")).await, 0);
}

/// A message for `order_id` that fails `failures` times is handled in
/// process: `failures + 1` calls, no delay queue, no dead letter.
async fn handled_in_process_after(failures: usize, order_id: &str) {
    let (env, handler, stop, consumer) = start_worker(failures).await;
    env.publish_sample(order_id).await;
    eventually(Duration::from_secs(10), "handled after retries", || async {
        !handler.handled().is_empty()
    })
    .await;
    assert_eq!(
        handler.calls(),
        failures + 1,
        "{failures} failures, then success"
    );
    assert_eq!(handler.handled()[0].retries, 0, "no delay queue needed");
    stop_with_no_dead_letter(&env, stop, consumer).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_transient_failure_is_retried_in_process_and_then_succeeds() {
    handled_in_process_after(2, "order-1").await;
}

#[tokio::test]
async fn a_message_waiting_for_another_is_retried_in_process_more_often_than_a_transient_failure() {
    // Six failures: a transient error would have gone to the first delay
    // tier after three in-process retries; a waiting message is retried
    // in process up to eight times, the first after 2 ms.
    handled_in_process_after(6, "early-1").await;
}

#[tokio::test]
async fn a_longer_transient_failure_goes_through_a_delay_queue_and_then_succeeds() {
    // 1 try + 3 in-process retries fail, the copy from the first delay tier succeeds.
    let (env, handler, stop, consumer) = start_worker(4).await;
    env.publish_sample("order-2").await;
    eventually(
        Duration::from_secs(15),
        "handled after a delay tier",
        || async { !handler.handled().is_empty() },
    )
    .await;
    let messages = handler.handled();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].retries, 1,
        "came back from the first delay tier"
    );
    assert_eq!(
        messages[0].envelope.kind, "order.cancelled",
        "original routing key kept"
    );
    assert_eq!(messages[0].order_id(), "order-2");
    stop_with_no_dead_letter(&env, stop, consumer).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_failure_that_never_heals_ends_in_the_dead_letter_queue_once() {
    let (env, handler, stop, consumer) = start_worker(usize::MAX).await;
    env.publish_sample("order-3").await;
    let dead = env.dead_letter_queue("worker");
    eventually(Duration::from_secs(20), "dead-lettered", || async {
        env.message_count(&dead).await == 1
    })
    .await;
    // 3 rounds (first delivery + 2 delay tiers) of 1 try + 3 retries.
    assert_eq!(handler.calls(), 12);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handler.calls(), 12, "nothing requeues forever");
    stop.cancel();
    consumer.await.unwrap();
    let messages = env.drain(&dead).await;
    assert_eq!(messages.len(), 1);
    let headers_table = messages[0].delivery.properties.headers().clone().unwrap();
    let reason = header_str(&headers_table, headers::REASON).unwrap();
    assert!(
        reason.contains("gave up after 2 delayed retries"),
        "{reason}"
    );
    assert!(reason.contains("database unavailable"), "{reason}");
    assert_eq!(header_int(&headers_table, headers::RETRIES), Some(2));
    env.cleanup().await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_once_with_their_reason_and_the_worker_keeps_serving() {
    let (env, handler, stop, consumer) = start_worker(0).await;

    env.publish_bare("order.cancelled", b"{not json", BasicProperties::default())
        .await;
    env.publish_bare(
        "order.started",
        br#"{"order_id":"o","supplier":"s","products":[{"sku":"x","quantity":-3}],"address":"a"}"#,
        BasicProperties::default(),
    )
    .await;
    env.publish_sample("poison-order").await;
    env.publish_sample("panic-order").await;
    env.publish_sample("good-order").await;

    let dead = env.dead_letter_queue("worker");
    eventually(
        Duration::from_secs(10),
        "four dead letters and one success",
        || async { env.message_count(&dead).await == 4 && handler.handled().len() == 1 },
    )
    .await;
    assert_eq!(handler.handled()[0].order_id(), "good-order");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    consumer.await.unwrap();

    let mut reasons: Vec<(String, String, String)> = env
        .drain(&dead)
        .await
        .iter()
        .map(|m| {
            let h = m.delivery.properties.headers().clone().unwrap();
            (
                // Dead-lettering keeps the routing key the message came with.
                m.delivery.routing_key.as_str().to_owned(),
                header_str(&h, headers::REASON).unwrap(),
                header_str(&h, headers::SERVICE).unwrap(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "each poison message once: {reasons:?}");
    assert!(reasons.iter().all(|(_, _, service)| service == "worker"));
    let find = |needle: &str| {
        reasons
            .iter()
            .find(|(_, reason, _)| reason.contains(needle))
            .unwrap_or_else(|| panic!("no dead letter mentions `{needle}`: {reasons:?}"))
    };
    assert_eq!(find("not valid JSON").0, "order.cancelled");
    assert_eq!(find("does not fit `order.started`").0, "order.started");
    assert!(
        find("order total is negative")
            .1
            .starts_with("permanent failure")
    );
    assert!(find("handler panicked").1.contains("handler bug"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_that_cannot_be_dead_lettered_is_requeued_and_the_others_are_still_acked() {
    let (env, handler, stop, consumer) = start_worker(0).await;
    // Without its dead-letter exchange, a poison message cannot be moved
    // there: the worker puts it back on its queue (nack, requeue) instead.
    let (connection, channel) = env.raw_channel().await;
    channel
        .exchange_delete(
            env.dead_letter_queue("worker").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    env.publish_sample("poison-kept").await;
    env.publish_sample("order-after-it").await;
    eventually(
        Duration::from_secs(10),
        "the later message handled",
        || async { handler.handled().len() == 1 },
    )
    .await;
    // Stopping finishes both: the poison one goes back to the queue once
    // more, the handled one stays acked.
    stop.cancel();
    consumer.await.unwrap();
    let queue = env.queue("worker");
    eventually(
        Duration::from_secs(5),
        "the poison message back",
        || async { env.message_count(&queue).await >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.message_count(&queue).await,
        1,
        "only the poison message is left; the handled one was acked"
    );
    assert_eq!(handler.handled()[0].order_id(), "order-after-it");
    connection.close(200, "done".into()).await.unwrap();
    env.cleanup().await;
}
