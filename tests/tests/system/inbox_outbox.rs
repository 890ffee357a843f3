//! Inbox and outbox: a message delivered twice has one effect; a relay that
//! crashes between publishing and marking sent publishes again, and the
//! downstream inbox keeps it to one effect; several relays never publish a
//! row twice; committed rows reach the broker by hand-over without any sweep,
//! and what the hand-over could not publish is swept later; while the broker
//! is away the hand-over holds a bounded number of rows, and every row is
//! published once when it is back; a row the broker keeps refusing as
//! unroutable goes to `outbox_dead` and stops blocking sweeps, while a row
//! the broker cannot take because it is away is never given up.

use std::sync::Arc;
use std::time::Duration;

use orderflow_shared::Shutdown;
use orderflow_shared::bus::PublishError;
use orderflow_shared::bus::{Broker, ConsumerOptions, Outgoing};
use orderflow_shared::store::{DEAD_AFTER_REFUSALS, Db, Relay, RelayError};
use orderflow_tests::proxy::StallingProxy;
use orderflow_tests::{Effects, TestEnv, count, eventually, sample_event};
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

#[tokio::test]
async fn the_same_message_delivered_twice_has_one_effect() {
    let env = TestEnv::with_service("downstream").await;
    let downstream = Downstream::start(&env).await;

    let message = Outgoing::event(&sample_event("order-7"), None);
    let publisher = env.broker.publisher();
    publisher.publish(&message).await.unwrap();
    publisher.publish(&message).await.unwrap();

    finish_with_one_effect_of_two(downstream, env, "both deliveries handled").await;
}

#[tokio::test]
async fn a_crash_between_publish_and_mark_sent_publishes_again_with_one_effect() {
    let (env, upstream) = downstream_and_upstream().await;
    let downstream = Downstream::start(&env).await;

    // The upstream handler's state change and event in one transaction.
    commit_events(&upstream, ["order-9"]).await;

    let relay = Relay::new(upstream.clone(), env.broker.publisher()).with_grace(Duration::ZERO);
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

    finish_with_one_effect_of_two(downstream, env, "both publishes delivered").await;
}

#[tokio::test]
async fn several_relays_publish_each_row_once() {
    let (env, upstream) = downstream_and_upstream().await;
    for batch in 0..4 {
        commit_events(&upstream, (0..100).map(|i| format!("order-{batch}-{i}"))).await;
    }
    let relays: Vec<Relay> = (0..3)
        .map(|_| Relay::new(upstream.clone(), env.broker.publisher()).with_grace(Duration::ZERO))
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
    let (_, distinct) = drain_message_ids(&env, &queue).await;
    assert_eq!(distinct, 400);
    env.cleanup().await;
}

#[tokio::test]
async fn a_running_relay_publishes_what_another_process_commits() {
    let (env, relay_side) = downstream_and_upstream().await;
    // A second handle on the same schema stands for another process (or one
    // that died after committing): no relay runs on it, so its rows reach
    // the running relay only through the database, by a sweep.
    let writer_side = env.db("upstream").await;
    let relay = RunningRelay::start(
        Relay::new(relay_side.clone(), env.broker.publisher())
            .with_grace(Duration::from_millis(300))
            .with_poll_interval(Duration::from_millis(100)),
    );
    for i in 0..5 {
        commit_events(&writer_side, [format!("order-{i}")]).await;
    }
    let queue = env.queue("downstream");
    eventually(Duration::from_secs(15), "5 messages relayed", || async {
        env.message_count(&queue).await == 5
    })
    .await;
    relay.stop().await;
    let unsent = count(
        &relay_side,
        "SELECT count(*) FROM outbox WHERE sent_at IS NULL",
    )
    .await;
    assert_eq!(unsent, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn committed_rows_are_handed_to_the_running_relay_without_a_sweep() {
    let (env, upstream) = downstream_and_upstream().await;
    // Sweeps never find anything young enough: only the hand-over can publish.
    let relay = RunningRelay::start(
        Relay::new(upstream.clone(), env.broker.publisher()).with_grace(Duration::from_hours(1)),
    );
    for i in 0..20 {
        commit_events(&upstream, [format!("order-{i}")]).await;
    }
    relayed_and_marked_sent(
        &env,
        &upstream,
        20,
        ("20 messages handed over", "all rows marked sent"),
    )
    .await;
    relay.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_message_the_broker_refused_stays_in_the_outbox_until_a_sweep_publishes_it() {
    let (env, upstream) = downstream_and_upstream().await;
    let relay = RunningRelay::start(
        Relay::new(upstream.clone(), env.broker.publisher())
            .with_grace(Duration::from_millis(200))
            .with_poll_interval(Duration::from_millis(100)),
    );
    // Nothing is bound to this key yet: the mandatory publish comes back.
    commit_row(&upstream, "order-late", "order.cancelled.late").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        outbox_counts(&upstream).await,
        (0, 1),
        "an unpublished row is neither lost nor marked sent"
    );
    // The route appears: the next sweep publishes the row.
    let (_connection, channel) = env.raw_channel().await;
    channel
        .queue_bind(
            env.queue("downstream").as_str().into(),
            env.broker.names().events_exchange().as_str().into(),
            "order.cancelled.late".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    relayed_and_marked_sent(
        &env,
        &upstream,
        1,
        ("the swept message", "the row marked sent"),
    )
    .await;
    relay.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn while_the_broker_is_away_the_hand_over_is_bounded_and_every_row_is_published_once_it_is_back()
 {
    const LIMIT: usize = 40;
    const UNITS: usize = 30;
    const ROWS_PER_UNIT: usize = 10;
    const ROWS: usize = UNITS * ROWS_PER_UNIT;
    let (env, upstream) = downstream_and_upstream().await;
    // The relay reaches the broker only through the proxy, which is cut
    // from the start: every publish fails (after the publisher's retries).
    let (proxy, broker) = broker_behind_a_cut_proxy(&env).await;
    let relay = RunningRelay::start(
        Relay::new(upstream.clone(), broker.publisher())
            .with_hand_over_limit(LIMIT)
            .with_grace(Duration::from_millis(200))
            .with_poll_interval(Duration::from_millis(100)),
    );
    let mut most_held = 0;
    for unit_number in 0..UNITS {
        commit_events(
            &upstream,
            (0..ROWS_PER_UNIT).map(|i| format!("order-{unit_number}-{i}")),
        )
        .await;
        most_held = most_held.max(upstream.pending_hand_over());
        assert!(
            upstream.pending_hand_over() <= LIMIT,
            "the relay holds {} rows in memory, more than its limit of {LIMIT}",
            upstream.pending_hand_over()
        );
    }
    assert!(most_held > 0, "rows were handed over at all");
    // Sweeps come and fail meanwhile: they never add to what is held.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(upstream.pending_hand_over() <= LIMIT);
    }
    assert_eq!(
        outbox_counts(&upstream).await,
        (0, ROWS as i64),
        "nothing reached the broker, nothing was lost"
    );

    // The broker is back: sweeps publish what the hand-over could not hold.
    proxy.resume();
    eventually(Duration::from_mins(1), "every row marked sent", || async {
        outbox_counts(&upstream).await == (ROWS as i64, ROWS as i64)
    })
    .await;
    relay.stop().await;
    assert_eq!(upstream.pending_hand_over(), 0);
    let queue = env.queue("downstream");
    assert_eq!(
        drain_message_ids(&env, &queue).await,
        (ROWS, ROWS),
        "every row published exactly once"
    );
    broker.close();
    env.cleanup().await;
}

/// Commits one row with `routing_key` for `order_id`, made old enough for
/// every sweep and for the dead table (as if committed an hour ago).
async fn commit_old_row(db: &Db, order_id: &str, routing_key: &str) -> i64 {
    commit_row(db, order_id, routing_key).await;
    sqlx::query_scalar(
        "UPDATE outbox SET created_at = now() - interval '1 hour' \
         WHERE correlation_id = $1 RETURNING id",
    )
    .bind(order_id)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// (attempts, last_error) of outbox row `id`, `None` when it left the outbox.
async fn refusals(db: &Db, id: i64) -> Option<(i32, Option<String>)> {
    sqlx::query_as("SELECT attempts, last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_row_refused_as_unroutable_again_and_again_goes_to_the_dead_table_and_stops_blocking_sweeps()
 {
    let (env, upstream) = downstream_and_upstream().await;
    let relay = Relay::new(upstream.clone(), env.broker.publisher()).with_grace(Duration::ZERO);
    // Nothing is bound to this key: every mandatory publish comes back.
    let stray = commit_old_row(&upstream, "order-stray", "order.cancelled.nowhere").await;
    let fine = commit_old_row(&upstream, "order-fine", "order.cancelled").await;

    for attempt in 1..=DEAD_AFTER_REFUSALS {
        let error = relay.relay_batch().await.unwrap_err();
        let RelayError::Publish { failed, first, .. } = &error else {
            panic!("sweep {attempt}: {error}");
        };
        assert_eq!(*failed, 1, "{error}");
        assert!(matches!(first, PublishError::Unroutable { .. }), "{error}");
        if attempt < DEAD_AFTER_REFUSALS {
            let (attempts, last_error) = refusals(&upstream, stray).await.unwrap();
            assert_eq!(attempts, attempt as i32);
            assert!(last_error.unwrap().contains("unroutable"));
        }
    }
    assert_eq!(
        refusals(&upstream, stray).await,
        None,
        "after {DEAD_AFTER_REFUSALS} refusals the row left the outbox"
    );
    let dead: (i64, String, String, i32, String, Vec<u8>) = sqlx::query_as(
        "SELECT id, correlation_id, routing_key, attempts, reason, body FROM outbox_dead",
    )
    .fetch_one(upstream.pool())
    .await
    .unwrap();
    assert_eq!(dead.0, stray, "the dead row keeps its id");
    assert_eq!(dead.1, "order-stray");
    assert_eq!(dead.2, "order.cancelled.nowhere");
    assert_eq!(dead.3, DEAD_AFTER_REFUSALS as i32);
    assert!(
        dead.4.contains("unroutable") && dead.4.contains("order.cancelled.nowhere"),
        "{}",
        dead.4
    );
    assert!(!dead.5.is_empty(), "the body is kept for a replay");
    // The routable row went out with the first sweep; what is left sweeps cleanly.
    let sent: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT sent_at FROM outbox WHERE id = $1")
            .bind(fine)
            .fetch_one(upstream.pool())
            .await
            .unwrap();
    assert!(sent.is_some());
    commit_old_row(&upstream, "order-later", "order.cancelled").await;
    assert_eq!(relay.relay_batch().await.unwrap(), 1);
    assert_eq!(relay.relay_batch().await.unwrap(), 0);
    assert_eq!(env.message_count(&env.queue("downstream")).await, 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_row_the_broker_cannot_take_because_it_is_away_is_never_given_up() {
    let (env, upstream) = downstream_and_upstream().await;
    let (proxy, broker) = broker_behind_a_cut_proxy(&env).await;
    let relay = Relay::new(upstream.clone(), broker.publisher()).with_grace(Duration::ZERO);
    let row = commit_old_row(&upstream, "order-patient", "order.cancelled").await;
    for sweep in 1..=DEAD_AFTER_REFUSALS {
        let error = relay.relay_batch().await.unwrap_err();
        let RelayError::Publish { first, .. } = &error else {
            panic!("sweep {sweep}: {error}");
        };
        assert!(!matches!(first, PublishError::Unroutable { .. }), "{error}");
    }
    assert_eq!(
        refusals(&upstream, row).await,
        Some((0, None)),
        "a broker away is no refusal"
    );
    assert_eq!(
        count(&upstream, "SELECT count(*) FROM outbox_dead").await,
        0
    );
    proxy.resume();
    assert_eq!(relay.relay_batch().await.unwrap(), 1);
    assert_eq!(env.message_count(&env.queue("downstream")).await, 1);
    broker.close();
    env.cleanup().await;
}

/// A fresh test environment whose `downstream` service reads
/// `order.cancelled`, and the migrated `upstream` schema whose outbox feeds it.
async fn downstream_and_upstream() -> (TestEnv, Db) {
    let env = TestEnv::with_service("downstream").await;
    let upstream = env.db("upstream").await;
    (env, upstream)
}

/// Commits one unit of work (without an inbox) into `db` that emits one
/// [`sample_event`] per order id, as a handler emits its events.
async fn commit_events<I>(db: &Db, order_ids: I)
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut unit = db.begin_unit_without_inbox().await.unwrap();
    for order_id in order_ids {
        unit.emit(Outgoing::event(&sample_event(order_id.as_ref()), None));
    }
    unit.commit().await.unwrap();
}

/// Commits one unit of work into `db` that emits the [`sample_event`] of
/// `order_id` with `routing_key` instead of its own.
async fn commit_row(db: &Db, order_id: &str, routing_key: &str) {
    let mut message = Outgoing::event(&sample_event(order_id), None);
    routing_key.clone_into(&mut message.routing_key);
    let mut unit = db.begin_unit_without_inbox().await.unwrap();
    unit.emit(message);
    unit.commit().await.unwrap();
}

/// Sent rows of the outbox, and all of them.
async fn outbox_counts(db: &Db) -> (i64, i64) {
    sqlx::query_as("SELECT count(sent_at), count(*) FROM outbox")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// Waits (10 s at most each) until the `downstream` queue holds `rows`
/// messages, then until `rows` outbox rows, all there are, are marked sent;
/// `what` names the two waits.
async fn relayed_and_marked_sent(env: &TestEnv, upstream: &Db, rows: u32, what: (&str, &str)) {
    let queue = env.queue("downstream");
    eventually(Duration::from_secs(10), what.0, || async {
        env.message_count(&queue).await == rows
    })
    .await;
    let rows = i64::from(rows);
    eventually(Duration::from_secs(10), what.1, || async {
        outbox_counts(upstream).await == (rows, rows)
    })
    .await;
}

/// The `downstream` service's consumer, applying through [`Effects`].
struct Downstream {
    effects: Arc<Effects>,
    stop: Shutdown,
    consumer: JoinHandle<()>,
}

impl Downstream {
    async fn start(env: &TestEnv) -> Self {
        let (effects, stop, consumer) = env
            .spawn_effects(ConsumerOptions::new("downstream"), Duration::ZERO)
            .await;
        Self {
            effects,
            stop,
            consumer,
        }
    }
}

/// The end of a test that delivers one message twice to `downstream`: waits
/// (10 s at most) until both deliveries were fully handled (`what`), checks
/// that they took effect once, stops the consumer and cleans `env` up.
async fn finish_with_one_effect_of_two(downstream: Downstream, env: TestEnv, what: &str) {
    let Downstream {
        effects,
        stop,
        consumer,
    } = downstream;
    eventually(Duration::from_secs(10), what, || async {
        effects.deliveries() == 2
    })
    .await;
    assert_eq!(effects.counts().await, (1, 1));
    stop.cancel();
    consumer.await.unwrap();
    env.cleanup().await;
}

/// Takes every message in `queue`: (how many, how many distinct message ids).
async fn drain_message_ids(env: &TestEnv, queue: &str) -> (usize, usize) {
    let messages = env.drain(queue).await;
    let ids: std::collections::HashSet<_> = messages
        .iter()
        .map(|m| m.delivery.properties.message_id().clone())
        .collect();
    (messages.len(), ids.len())
}

/// A proxy in front of the test's broker, already cut, and a broker handle
/// on the test's topology that goes through it (2 s publish timeout).
async fn broker_behind_a_cut_proxy(env: &TestEnv) -> (StallingProxy, Broker) {
    let proxy = StallingProxy::in_front_of(env.amqp_url.expose_secret()).await;
    proxy.cut();
    let broker = env.broker_with(
        &SecretString::from(proxy.url_through(env.amqp_url.expose_secret())),
        env.topology.clone(),
        Duration::from_secs(2),
    );
    (proxy, broker)
}

/// A relay running in its own task until [`stop`](Self::stop).
struct RunningRelay {
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl RunningRelay {
    fn start(relay: Relay) -> Self {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self { shutdown, task }
    }

    /// Asks the relay to stop and waits until it has.
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}
