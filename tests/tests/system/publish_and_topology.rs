//! Publishing errors the caller must see (an unroutable message), and the
//! topology declaration being idempotent.

use std::time::Duration;

use orderflow_shared::bus::{BusError, Outgoing, PublishError};
use orderflow_shared::events::{Event, PaymentSelected};
use orderflow_shared::topology::{Names, ServiceSpec, Topology};
use orderflow_tests::proxy::StallingProxy;
use orderflow_tests::{TestEnv, sample_event};
use secrecy::SecretString;

/// The topology of the one service `svc` (reading `order.cancelled`) in
/// `namespace`, with the tests' delay tiers.
fn svc_topology(namespace: impl Into<String>) -> Topology {
    Topology::build(
        Names::new(namespace),
        &[ServiceSpec::new("svc", &["order.cancelled"])],
        &orderflow_tests::TEST_RETRY_TIERS,
    )
}

#[tokio::test]
async fn an_unroutable_publish_is_reported_as_an_error() {
    let env = TestEnv::with_service("only-cancellations").await;
    // No queue is bound to payment.selected.weixin in this namespace.
    let event = Event::PaymentSelected(PaymentSelected {
        order_id: "order-1".into(),
        method: "weixin".into(),
        amount_cents: 100,
    });
    let error = env
        .broker
        .publisher()
        .publish(&Outgoing::event(&event, None))
        .await
        .unwrap_err();
    assert!(matches!(error, PublishError::Unroutable { .. }), "{error}");
    assert!(
        error.to_string().contains("payment.selected.weixin"),
        "{error}"
    );
    // A routable one on the same publisher still goes through.
    env.publish_sample("order-1").await;
    assert_eq!(env.message_count(&env.queue("only-cancellations")).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn declaring_the_topology_twice_is_a_no_op() {
    let env = TestEnv::with_service("svc").await;
    env.publish_sample("order-1").await;
    // Second declaration (another worker starting): no error, nothing lost.
    env.broker
        .declare_topology(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(env.message_count(&env.queue("svc")).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_checks_its_part_of_the_topology_and_says_how_to_declare_a_missing_one() {
    let env = TestEnv::with_service("svc").await;
    env.broker
        .check_topology("svc", Duration::from_secs(5))
        .await
        .unwrap();
    // The same service in a namespace nobody declared: the worker does not
    // declare it (it may not), it says what to do.
    let undeclared = env.broker_with(
        &env.amqp_url,
        svc_topology(format!("{}-undeclared", env.namespace)),
        Duration::from_secs(5),
    );
    let error = undeclared
        .check_topology("svc", Duration::from_millis(300))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("orderflow topology declare"), "{error}");
    assert!(error.contains("-undeclared.orderflow.svc"), "{error}");
    assert!(error.contains("NOT_FOUND"), "{error}");
    // Nothing was created by checking.
    let error = undeclared
        .check_topology("svc", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("NOT_FOUND"), "{error}");
    let unknown = env
        .broker
        .check_topology("no-such-service", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(unknown, BusError::UnknownService(_)), "{unknown}");
    undeclared.close();
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_is_a_clear_error() {
    let env = TestEnv::with_service("svc").await;
    // The same topology, but the service queue now asks for another delivery
    // limit (what an upgrade that changed an argument would do).
    let mut changed = svc_topology(&env.namespace);
    for queue in &mut changed.queues {
        if queue.name == env.queue("svc") {
            queue.arguments.insert(
                "x-delivery-limit".into(),
                orderflow_shared::topology::ArgValue::Int(3),
            );
        }
    }
    let other = env.broker_with(&env.amqp_url, changed, Duration::from_secs(5));
    let error = other
        .declare_topology(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(error, BusError::Declare(_)), "{error}");
    let text = error.to_string();
    assert!(text.contains(&env.queue("svc")), "{text}");
    assert!(text.contains("PRECONDITION"), "{text}");
    other.close();
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_that_keeps_crashing_its_consumer_is_dead_lettered_by_the_broker() {
    let env = TestEnv::with_service("svc").await;
    env.publish_sample("order-1").await;
    // A consumer that dies before acking hands the message back every time,
    // as a nack with requeue does.
    let (connection, channel) = env.raw_channel().await;
    let mut returned = 0;
    while let Some(message) = channel
        .basic_get(
            env.queue("svc").as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
    {
        message
            .delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        returned += 1;
        assert!(returned <= 50, "the broker never gave up on the message");
    }
    let _ = connection.close(200, "done".into()).await;
    assert_eq!(
        returned,
        orderflow_shared::topology::DEFAULT_DELIVERY_LIMIT + 1
    );
    let dead = env.dead_letter_queue("svc");
    orderflow_tests::eventually(Duration::from_secs(10), "dead-lettered", || async {
        env.message_count(&dead).await == 1
    })
    .await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_publish_without_a_confirm_in_time_is_reported_as_a_timeout() {
    let env = TestEnv::with_service("svc").await;
    let proxy = StallingProxy::start("127.0.0.1:5672").await;
    let through_proxy = env.broker_with(
        &SecretString::from(proxy.amqp_url()),
        env.topology.clone(),
        Duration::from_millis(300),
    );
    let publisher = through_proxy.publisher();
    let message = Outgoing::event(&sample_event("order-1"), None);
    publisher.publish(&message).await.unwrap();

    // The broker stops answering: no confirm, not even a new channel.
    proxy.stall();
    let error = publisher.publish(&message).await.unwrap_err();
    assert!(matches!(error, PublishError::Timeout { .. }), "{error}");
    assert!(error.to_string().contains("no confirm"), "{error}");

    // When it answers again, publishing works again.
    proxy.resume();
    publisher.publish(&message).await.unwrap();
    through_proxy.close();
    env.cleanup().await;
}
