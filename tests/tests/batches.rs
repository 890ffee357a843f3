//! Batches: a handler that can take several deliveries at once gets what is
//! already waiting (up to its batch size) in one call, every message is
//! applied once, and a batch that fails as a whole falls back to one message
//! at a time, so only the bad message is dead-lettered.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orderflow_shared::bus::{ConsumerOptions, HandleError, Handler, Message, Outgoing};
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::{TestEnv, eventually, sample_event};

/// Counts applications per order; an order id containing "poison" fails,
/// alone or in a batch (then the whole batch has no effect).
#[derive(Default)]
struct Batching {
    batch_sizes: Mutex<Vec<usize>>,
    applied: Mutex<HashMap<String, usize>>,
}

impl Batching {
    fn apply(&self, message: &Message) {
        *self
            .applied
            .lock()
            .unwrap()
            .entry(message.order_id().to_owned())
            .or_default() += 1;
    }
}

impl Handler for Batching {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        if message.order_id().contains("poison") {
            return Err(HandleError::permanent(anyhow::anyhow!("bad order")));
        }
        self.apply(message);
        Ok(())
    }

    fn batch_size(&self) -> usize {
        16
    }

    async fn handle_batch(&self, messages: &[Message]) -> Result<(), HandleError> {
        if messages.iter().any(|m| m.order_id().contains("poison")) {
            return Err(HandleError::permanent(anyhow::anyhow!(
                "bad order in batch"
            )));
        }
        self.batch_sizes.lock().unwrap().push(messages.len());
        for message in messages {
            self.apply(message);
        }
        Ok(())
    }
}

#[tokio::test]
async fn waiting_deliveries_are_handled_in_batches_and_a_bad_one_falls_back_alone() {
    let env = TestEnv::new(&[ServiceSpec::new("worker", &["order.cancelled"])]).await;
    let publisher = env.broker.publisher();
    // Everything is queued before the consumer starts: its prefetch buffer
    // fills at once, so batches form.
    for i in 0..60 {
        let order_id = if i == 30 {
            "order-poison".to_owned()
        } else {
            format!("order-{i}")
        };
        publisher
            .publish(&Outgoing::event(&sample_event(&order_id), None))
            .await
            .unwrap();
    }
    let handler = Arc::new(Batching::default());
    let (stop, consumer) = env.spawn_consumer(ConsumerOptions::new("worker"), handler.clone());
    let dead = env.dead_letter_queue("worker");
    eventually(
        Duration::from_secs(20),
        "59 applied, 1 dead-lettered",
        || async {
            handler.applied.lock().unwrap().len() == 59 && env.message_count(&dead).await == 1
        },
    )
    .await;
    stop.cancel();
    consumer.await.unwrap();
    let applied = handler.applied.lock().unwrap().clone();
    assert!(applied.values().all(|&n| n == 1), "{applied:?}");
    assert!(!applied.contains_key("order-poison"));
    let sizes = handler.batch_sizes.lock().unwrap().clone();
    assert!(sizes.iter().any(|&n| n > 1), "no batch formed: {sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 16), "{sizes:?}");
    env.cleanup().await;
}
