//! Publish → consume round trip: every envelope field arrives intact, and a
//! bare message (as typed into the RabbitMQ UI) gets a deterministic envelope.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::ShortString;
use orderflow_shared::bus::{ConsumerOptions, HandleError, Handler, Message, Outgoing};
use orderflow_shared::envelope::{Envelope, derive_order_id};
use orderflow_shared::events::{Event, OrderStarted, ProductLine};
use orderflow_shared::topology::ServiceSpec;
use orderflow_tests::{TestEnv, eventually};

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Message>>,
}

impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Result<(), HandleError> {
        self.seen.lock().unwrap().push(message.clone());
        Ok(())
    }
}

fn order_started(order_id: &str) -> Event {
    Event::OrderStarted(OrderStarted {
        order_id: order_id.into(),
        supplier: "haidilao".into(),
        products: vec![ProductLine {
            sku: "hotpot-set".into(),
            quantity: 2,
        }],
        address: "1 Harbour Road".into(),
    })
}

#[tokio::test]
async fn every_envelope_field_survives_the_round_trip() {
    let env = TestEnv::new(&[ServiceSpec::new("probe", &["order.*"])]).await;
    let recorder = Arc::new(Recorder::default());
    let (stop, consumer) = env.spawn_consumer(ConsumerOptions::new("probe"), recorder.clone());

    let cause = Envelope::new("order.started", "order-1");
    let event = order_started("order-1");
    let outgoing = Outgoing::event(&event, Some(&cause));
    env.broker.publisher().publish(&outgoing).await.unwrap();

    eventually(
        Duration::from_secs(10),
        "the message is consumed",
        || async { !recorder.seen.lock().unwrap().is_empty() },
    )
    .await;
    let seen = recorder.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.envelope, outgoing.envelope);
    assert_eq!(
        seen.envelope.causation_id.as_deref(),
        Some(cause.message_id.as_str())
    );
    assert_eq!(seen.envelope.correlation_id, "order-1");
    assert_eq!(seen.envelope.kind, "order.started");
    assert_eq!(seen.event, event);
    assert_eq!(seen.retries, 0);
    stop.cancel();
    consumer.await.unwrap();

    // The raw AMQP properties, as the management UI shows them.
    env.broker.publisher().publish(&outgoing).await.unwrap();
    let raw = env.drain(&env.queue("probe")).await;
    assert_eq!(raw.len(), 1);
    let properties = &raw[0].delivery.properties;
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    assert_eq!(
        text(properties.message_id()),
        Some(outgoing.envelope.message_id.clone())
    );
    assert_eq!(
        text(properties.correlation_id()),
        Some("order-1".to_owned())
    );
    assert_eq!(text(properties.kind()), Some("order.started".to_owned()));
    assert_eq!(
        text(properties.content_type()),
        Some("application/json".to_owned())
    );
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert_eq!(properties.timestamp(), &Some(outgoing.envelope.timestamp));
    let headers = properties.headers().as_ref().unwrap();
    assert!(headers.contains_key("causation_id"));
    assert!(headers.contains_key("traceparent"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_bare_message_from_the_ui_gets_a_deterministic_envelope() {
    let env = TestEnv::new(&[ServiceSpec::new("probe", &["order.*"])]).await;
    let recorder = Arc::new(Recorder::default());
    let (stop, consumer) = env.spawn_consumer(ConsumerOptions::new("probe"), recorder.clone());

    // No message_id, no content type, delivery mode 1, no order_id in the body.
    let body = br#"{"supplier":"haidilao","products":[{"sku":"hotpot-set","quantity":1}],"address":"2 Lane"}"#;
    let bare = BasicProperties::default().with_delivery_mode(1);
    env.publish_bare("order.started", body, bare.clone()).await;
    env.publish_bare("order.started", body, bare).await;

    eventually(
        Duration::from_secs(10),
        "both copies are consumed",
        || async { recorder.seen.lock().unwrap().len() == 2 },
    )
    .await;
    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen[0].envelope.message_id, seen[1].envelope.message_id);
    let order_id = derive_order_id(body);
    assert_eq!(seen[0].envelope.correlation_id, order_id);
    assert_eq!(seen[0].event.order_id(), order_id);
    assert_eq!(seen[0].envelope.kind, "order.started");
    stop.cancel();
    consumer.await.unwrap();
    env.cleanup().await;
}
