//! Batches: a handler that can take several deliveries at once gets what is
//! already waiting (up to its batch size) in one call, every message is
//! applied once, and a batch that fails as a whole falls back to one message
//! at a time, so only the bad message is dead-lettered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orderflow_shared::bus::{ConsumerOptions, HandleError, Handler, Message, Outgoing};
use orderflow_tests::{TestEnv, count, eventually, publish_samples};

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
    let env = TestEnv::with_service("worker").await;
    // Everything is queued before the consumer starts: its prefetch buffer
    // fills at once, so batches form.
    let order_ids = (0..60).map(|i| {
        if i == 30 {
            "order-poison".to_owned()
        } else {
            format!("order-{i}")
        }
    });
    publish_samples(&env.broker.publisher(), order_ids).await;
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

/// The orders context's database of `env`, migrated, with `connections`.
async fn orders_db(env: &TestEnv, connections: u32) -> orderflow_shared::store::Db {
    orderflow_shared::store::Db::for_context(
        &env.database_url,
        orderflow_shared::store::Context::Orders,
        connections,
    )
    .await
    .unwrap()
}

/// A message as the consumer hands it over, for driving a handler directly.
fn message(event: orderflow_shared::events::Event, envelope: Option<&Outgoing>) -> Message {
    let outgoing = Outgoing::event(&event, None);
    Message {
        envelope: envelope.map_or(outgoing.envelope, |e| e.envelope.clone()),
        event,
        redelivered: false,
        retries: 0,
    }
}

/// A coordinator on the coordinator's schema of `env`'s database.
async fn coordinator(
    env: &TestEnv,
) -> (
    orderflow_shared::store::Db,
    saga_coordinator::CoordinatorHandler,
) {
    let db = orderflow_shared::store::Db::for_context(
        &env.database_url,
        orderflow_shared::store::Context::Coordinator,
        4,
    )
    .await
    .unwrap();
    let keys = orderflow_shared::token::TokenKeys::parse(&secrecy::SecretString::from(
        orderflow_tests::TEST_TOKEN_KEYS.to_owned(),
    ))
    .unwrap();
    let coordinator = saga_coordinator::CoordinatorHandler::new(
        db.clone(),
        keys,
        saga_coordinator::Timeouts {
            generate_info: Duration::from_mins(5),
            flow: Duration::from_hours(1),
        },
        Arc::new(saga_coordinator::timers::TimerWake::default()),
    );
    (db, coordinator)
}

fn started(order_id: &str, sku: &str) -> orderflow_shared::events::Event {
    use orderflow_shared::events::{Event, OrderStarted, ProductLine};
    Event::OrderStarted(OrderStarted {
        order_id: order_id.into(),
        supplier: "haidilao".into(),
        products: vec![ProductLine {
            sku: sku.into(),
            quantity: 1,
        }],
        address: "1 Road".into(),
    })
}

fn info(order_id: &str) -> orderflow_shared::events::Event {
    use orderflow_shared::events::{Event, InfoGenerated};
    Event::InfoGenerated(InfoGenerated {
        order_id: order_id.into(),
        supplier: "haidilao".into(),
        payment_methods: vec!["zhifubao".into()],
        amount_cents: 900,
    })
}

fn completed(order_id: &str) -> orderflow_shared::events::Event {
    use orderflow_shared::events::{Event, OrderCompleted};
    Event::OrderCompleted(OrderCompleted {
        order_id: order_id.into(),
        method: "zhifubao".into(),
        charged_cents: 900,
    })
}

/// (kind, name) of each history entry of `order_id`, in order.
async fn history_of(db: &orderflow_shared::store::Db, order_id: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, name FROM history WHERE order_id = $1 ORDER BY id")
        .bind(order_id)
        .fetch_all(db.pool())
        .await
        .unwrap()
}

fn pair(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

#[tokio::test]
async fn a_coordinator_batch_applies_two_events_of_one_order_in_order_and_a_duplicate_once() {
    let env = TestEnv::orderflow().await;
    let (db, coordinator) = coordinator(&env).await;
    let b_started = message(started("b", "tea"), None);
    let batch = vec![
        message(started("c", "tea"), None),
        b_started.clone(),
        message(info("b"), None),
        // The same message again inside the batch, and the same order with
        // other content: applied once, refused once.
        b_started.clone(),
        message(started("b", "hotpot-set"), None),
    ];
    coordinator.handle_batch(&batch).await.unwrap();
    // And the whole batch delivered again: nothing more.
    coordinator.handle_batch(&batch).await.unwrap();

    assert_eq!(
        history_of(&db, "b").await,
        [
            pair("event", "order.started"),
            pair("event", "order.info-generated"),
            pair("rejection", "order.started"),
        ]
    );
    assert_eq!(history_of(&db, "c").await, [pair("event", "order.started")]);
    let steps: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT order_id, step FROM sagas ORDER BY order_id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        steps,
        [
            ("b".to_owned(), Some("payment-wait".to_owned())),
            ("c".to_owned(), Some("generate-info".to_owned())),
        ]
    );
    let timers = count(&db, "SELECT count(*) FROM timers WHERE state = 'armed'").await;
    assert_eq!(timers, 3, "b: flow; c: generate-info and flow");
    db.close().await;
    env.cleanup().await;
}

/// A genuine payment submission that reaches the coordinator before the
/// order's `payment.awaiting` (the customer, answered by the order API, was
/// quicker) is not decided, and not recorded as applied: the coordinator
/// says it waits for another message ([`HandleError::NotYet`], retried in
/// process soon), and once the step is open the same message is decided.
#[tokio::test]
async fn a_submission_before_its_payment_step_waits_for_it_and_is_then_decided() {
    use orderflow_shared::events::{Event, InfoGenerated, PaymentSubmitted};
    let env = TestEnv::orderflow().await;
    let (db, coordinator) = coordinator(&env).await;
    let keys = orderflow_shared::token::TokenKeys::parse(&secrecy::SecretString::from(
        orderflow_tests::TEST_TOKEN_KEYS.to_owned(),
    ))
    .unwrap();
    let info = InfoGenerated {
        order_id: "e".into(),
        supplier: "haidilao".into(),
        payment_methods: vec!["zhifubao".into()],
        amount_cents: 900,
    };
    let now = chrono::Utc::now().timestamp_millis();
    let awaiting = payment_wait::open_step(&keys, 300, &info, now as u64, now).unwrap();
    let submitted = message(
        Event::PaymentSubmitted(PaymentSubmitted {
            order_id: "e".into(),
            token: awaiting.token.clone(),
            method: "zhifubao".into(),
        }),
        None,
    );
    coordinator
        .handle_batch(&[
            message(started("e", "tea"), None),
            message(Event::InfoGenerated(info), None),
        ])
        .await
        .unwrap();

    let early = coordinator.handle(&submitted).await.unwrap_err();
    assert!(early.is_not_yet(), "{early}");
    assert!(early.to_string().contains("not open yet"), "{early}");
    let names = |history: Vec<(String, String)>| -> Vec<String> {
        history.into_iter().map(|(_, name)| name).collect()
    };
    assert_eq!(
        names(history_of(&db, "e").await),
        ["order.started", "order.info-generated"],
        "nothing of the early submission is kept"
    );

    coordinator
        .handle(&message(Event::PaymentAwaiting(awaiting), None))
        .await
        .unwrap();
    coordinator.handle(&submitted).await.unwrap();
    assert_eq!(
        names(history_of(&db, "e").await),
        [
            "order.started",
            "order.info-generated",
            "payment.awaiting",
            "payment.submitted",
            "payment.selected.zhifubao"
        ]
    );
    let accepted: Option<String> =
        sqlx::query_scalar("SELECT accepted_method FROM payment_steps WHERE order_id = 'e'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(accepted.as_deref(), Some("zhifubao"));
    db.close().await;
    env.cleanup().await;
}

/// The timers a coordinator unit completes or ends are written with its
/// sagas, in one statement: a completion before the arming leaves a settled
/// row, an ending disarms everything, and an order whose step completes and
/// whose saga ends in the same batch is disarmed once (one statement must
/// not change a row twice).
#[tokio::test]
async fn a_coordinator_batch_settles_its_timers_with_its_sagas() {
    let env = TestEnv::orderflow().await;
    let (db, coordinator) = coordinator(&env).await;
    let completed = |order_id: &str| message(completed(order_id), None);
    // a: started, priced and completed in one batch; b: priced before it
    // is started; c: started, then completed in a later batch.
    let first = vec![
        message(started("a", "tea"), None),
        message(info("a"), None),
        completed("a"),
        message(info("b"), None),
        message(started("c", "tea"), None),
    ];
    coordinator.handle_batch(&first).await.unwrap();
    coordinator
        .handle_batch(&[message(started("b", "tea"), None), completed("c")])
        .await
        .unwrap();
    let timers = |order_id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (String, String)>(
                "SELECT step, state FROM timers WHERE order_id = $1 ORDER BY step",
            )
            .bind(order_id)
            .fetch_all(db.pool())
            .await
            .unwrap()
        }
    };
    let row = |step: &str, state: &str| (step.to_owned(), state.to_owned());
    assert_eq!(
        timers("a").await,
        [row("flow", "disarmed"), row("generate-info", "disarmed")]
    );
    assert_eq!(
        timers("b").await,
        [row("flow", "armed"), row("generate-info", "disarmed")],
        "the late arming left the completed step settled"
    );
    assert_eq!(
        timers("c").await,
        [row("flow", "disarmed"), row("generate-info", "disarmed")]
    );
    db.close().await;
    env.cleanup().await;
}

/// The coordinator admits a batch and locks its sagas in one statement, and
/// writes the sagas back with the history in another: what was applied
/// before is neither applied nor locked again, a new saga takes its digest
/// from the batch's `order.started` even behind another event of the order,
/// and a batch that changes no saga still records its history.
#[tokio::test]
async fn a_coordinator_batch_of_old_and_new_messages_applies_the_new_ones_only() {
    use orderflow_shared::events::Event;
    let env = TestEnv::orderflow().await;
    let (db, coordinator) = coordinator(&env).await;
    let d_started = message(started("d", "tea"), None);
    // The order's info before its start, in one batch: the saga's digest is
    // the start's, so the same content again is no conflict.
    coordinator
        .handle_batch(&[message(info("d"), None), d_started.clone()])
        .await
        .unwrap();
    let digest: Option<String> =
        sqlx::query_scalar("SELECT started_digest FROM sagas WHERE order_id = 'd'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let Event::OrderStarted(d) = started("d", "tea") else {
        unreachable!()
    };
    assert_eq!(digest, Some(d.content_digest()));
    // One message applied before, one with other content, one of a new order.
    coordinator
        .handle_batch(&[
            d_started.clone(),
            message(started("d", "hotpot-set"), None),
            message(started("e", "tea"), None),
        ])
        .await
        .unwrap();
    assert_eq!(
        history_of(&db, "d").await,
        [
            pair("event", "order.info-generated"),
            pair("event", "order.started"),
            pair("rejection", "order.started"),
        ]
    );
    let inbox = count(&db, "SELECT count(*) FROM inbox").await;
    assert_eq!(inbox, 4, "each message once");
    // e ends; then a late event changes no saga and is still recorded.
    coordinator
        .handle_batch(&[message(completed("e"), None), message(info("e"), None)])
        .await
        .unwrap();
    coordinator
        .handle_batch(&[message(info("e"), None), message(info("e"), None)])
        .await
        .unwrap();
    let e: (String, Option<String>) =
        sqlx::query_as("SELECT status, step FROM sagas WHERE order_id = 'e'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(e, ("completed".to_owned(), None));
    assert_eq!(
        history_of(&db, "e").await.len(),
        5,
        "{:?}",
        history_of(&db, "e").await
    );
    db.close().await;
    env.cleanup().await;
}

/// A terminal worker handles a message on its own in one statement (inbox
/// row, transition, announcing event): the first ending wins and is
/// announced once, a redelivery changes nothing, an order that ended
/// otherwise stays as it is (the message is still recorded as handled),
/// and a message already in the inbox changes nothing at all.
#[tokio::test]
async fn a_terminal_transition_on_its_own_is_applied_once_and_only_by_the_first_ending() {
    use orderflow_shared::events::{Event, PaymentCaptured};
    use orderflow_shared::store::orders::{Announcer, TerminalHandler};
    let env = TestEnv::orderflow().await;
    let db = orders_db(&env, 4).await;
    let announcer = Announcer::unsent();
    let worker = TerminalHandler::new(
        order_completed::SERVICE,
        db.clone(),
        announcer.clone(),
        order_completed::transition,
    );
    let captured = |order_id: &str| {
        message(
            Event::PaymentCaptured(PaymentCaptured {
                order_id: order_id.into(),
                provider: "weixin".into(),
                charged_cents: 700,
                capture_id: format!("cap-{order_id}"),
            }),
            None,
        )
    };
    let status = |order_id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(db.pool())
                .await
                .unwrap()
        }
    };
    let completions = |order_id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox WHERE correlation_id = $1 \
                 AND routing_key = 'order.completed'",
            )
            .bind(order_id)
            .fetch_one(db.pool())
            .await
            .unwrap()
        }
    };
    // The first ending wins, once.
    let won = captured("won");
    worker.handle(&won).await.unwrap();
    worker.handle(&won).await.unwrap();
    assert_eq!(status("won").await.as_deref(), Some("completed"));
    assert_eq!(completions("won").await, 1);
    assert_eq!(announcer.queued(), ["won"]);
    // Cancelled first: it stays cancelled, nothing is announced, and the
    // capture is recorded as handled.
    sqlx::query(
        "INSERT INTO orders (order_id, status, cancel_reason) VALUES ('lost', 'cancelled', 'x')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let lost = captured("lost");
    worker.handle(&lost).await.unwrap();
    assert_eq!(status("lost").await.as_deref(), Some("cancelled"));
    assert_eq!(completions("lost").await, 0);
    let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(&lost.envelope.message_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(handled, 1);
    // Applied before (its inbox row is there): no transition at all.
    let seen = captured("seen");
    sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ('order-completed', $1)")
        .bind(&seen.envelope.message_id)
        .execute(db.pool())
        .await
        .unwrap();
    worker.handle(&seen).await.unwrap();
    assert_eq!(status("seen").await, None);
    assert_eq!(completions("seen").await, 0);
    assert_eq!(announcer.queued(), ["won"]);
    db.close().await;
    env.cleanup().await;
}

/// A system without the weixin provider, with one order per sku that the
/// coordinator accepted for weixin (order id, amount) and nobody charged;
/// the payments schema, and a weixin provider on it to drive by hand.
async fn weixin_decisions(
    adjust: impl FnOnce(&mut orderflow_shared::config::Settings),
    skus: &[&str],
) -> (
    orderflow_tests::system::System,
    Vec<(String, i64)>,
    orderflow_shared::store::Db,
    payment_provider::ProviderHandler,
) {
    let workers = orderflow_tests::system::Workers {
        without_providers: vec!["weixin"],
        ..orderflow_tests::system::Workers::default()
    };
    let system = orderflow_tests::system::System::start_with(adjust, workers).await;
    let mut decisions = Vec::new();
    for sku in skus {
        let order_id = system.place("noodle-bar", &[(sku, 1)]).await;
        let order = system.wait_for(&order_id, "awaiting_payment").await;
        let token = order["payment_token"].as_str().unwrap();
        assert_eq!(system.submit(&order_id, token, "weixin").await, 202);
        let order = system.wait_for(&order_id, "paying").await;
        decisions.push((order_id, order["amount_cents"].as_i64().unwrap()));
    }
    let payments = orderflow_shared::store::Db::for_context(
        &system.env.database_url,
        orderflow_shared::store::Context::Payments,
        4,
    )
    .await
    .unwrap();
    let provider = payment_provider::ProviderHandler::new(
        &system.ctx,
        "weixin",
        payments.clone(),
        payments.clone(),
    )
    .unwrap();
    (system, decisions, payments, provider)
}

#[tokio::test]
async fn a_provider_batch_charges_each_decision_once_and_a_forged_one_fails_alone() {
    use orderflow_shared::events::{Event, PaymentSelected};
    // Three orders the coordinator accepted for weixin; nobody charged them yet.
    let (system, decisions, payments, provider) =
        weixin_decisions(|_| {}, &["tea", "noodles", "tofu"]).await;
    let selected = |order_id: &str, amount: i64| {
        message(
            Event::PaymentSelected(PaymentSelected {
                order_id: order_id.to_owned(),
                method: "weixin".into(),
                amount_cents: amount,
            }),
            None,
        )
    };
    let first = selected(&decisions[0].0, decisions[0].1);
    let batch = vec![
        first.clone(),
        selected(&decisions[1].0, decisions[1].1),
        // Another copy of the first decision, and the first message again.
        selected(&decisions[0].0, decisions[0].1),
        first,
        selected(&decisions[2].0, decisions[2].1),
    ];
    provider.handle_batch(&batch).await.unwrap();
    provider.handle_batch(&batch).await.unwrap();
    for (order_id, amount) in &decisions {
        assert_eq!(system.gateway(order_id).await, (1, 0), "{order_id}");
        let (status, charged): (String, Option<i64>) =
            sqlx::query_as("SELECT status, charged_cents FROM captures WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(payments.pool())
                .await
                .unwrap();
        assert_eq!((status.as_str(), charged), ("captured", Some(amount / 2)));
    }
    let captured = count(
        &payments,
        "SELECT count(*) FROM outbox WHERE routing_key = 'payment.captured'",
    )
    .await;
    assert_eq!(captured, 3, "one payment.captured per order");
    // A decision the coordinator did not make fails the batch it is in; one
    // at a time (the runtime's fallback) it alone is refused.
    let forged = selected(&decisions[0].0, 1);
    let error = provider
        .handle_batch(std::slice::from_ref(&forged))
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("the coordinator accepted"),
        "{error}"
    );
    assert_eq!(system.gateway(&decisions[0].0).await, (1, 0));
    payments.close().await;
    system.stop().await;
}

#[tokio::test]
async fn a_provider_charge_on_its_own_is_recorded_once_and_never_over_the_cancellation_that_resolved_it()
 {
    use orderflow_shared::events::{Event, OrderCancelled, PaymentSelected};
    // The gateway takes 2 s: long enough for a cancellation to come in
    // while a charge is at the gateway, even with the suite loading the
    // machine (with 400 ms, a debug build under load sometimes took the
    // cancellation's lock after the charge had come back and been recorded,
    // which is the other, also correct, order of events).
    let (system, decisions, payments, provider) = weixin_decisions(
        |s| s.gateway_latency_ms = 2_000,
        &["tea", "tofu", "noodles"],
    )
    .await;
    let provider = Arc::new(provider);
    let selected = |(order_id, amount): &(String, i64)| {
        message(
            Event::PaymentSelected(PaymentSelected {
                order_id: order_id.clone(),
                method: "weixin".into(),
                amount_cents: *amount,
            }),
            None,
        )
    };
    let capture = |order_id: String| {
        let payments = payments.clone();
        async move {
            let (status, captured): (Option<String>, i64) = sqlx::query_as(
                "SELECT (SELECT status FROM captures WHERE order_id = $1), \
                 (SELECT count(*) FROM outbox WHERE correlation_id = $1 \
                   AND routing_key = 'payment.captured')",
            )
            .bind(order_id)
            .fetch_one(payments.pool())
            .await
            .unwrap();
            (status, captured)
        }
    };
    // Alone: charged and recorded once; the redelivery charges with the
    // same key (the gateway charges once) and records nothing more.
    let (paid, amount) = &decisions[0];
    let delivery = selected(&decisions[0]);
    provider.handle(&delivery).await.unwrap();
    provider.handle(&delivery).await.unwrap();
    assert_eq!(system.gateway(paid).await, (1, 0));
    assert_eq!(capture(paid.clone()).await, (Some("captured".into()), 1));
    let charged: Option<i64> =
        sqlx::query_scalar("SELECT charged_cents FROM captures WHERE order_id = $1")
            .bind(paid)
            .fetch_one(payments.pool())
            .await
            .unwrap();
    assert_eq!(charged, Some(amount / 2));
    // The order is cancelled while its charge is at the gateway: the
    // cancellation resolves the intent (refunds what was charged), and the
    // charge, coming back, records nothing and announces nothing.
    let (raced, _) = &decisions[1];
    let charging = tokio::spawn({
        let (provider, delivery) = (provider.clone(), selected(&decisions[1]));
        async move { provider.handle(&delivery).await }
    });
    eventually(Duration::from_secs(10), "the intent is open", || async {
        capture(raced.clone()).await.0.as_deref() == Some("charging")
    })
    .await;
    let cancelled = message(
        Event::OrderCancelled(OrderCancelled {
            order_id: raced.clone(),
            reason: "flow timed out".into(),
        }),
        None,
    );
    provider.handle(&cancelled).await.unwrap();
    charging.await.unwrap().unwrap();
    let (status, captured) = capture(raced.clone()).await;
    assert_eq!(captured, 0, "no payment.captured over a resolved intent");
    assert_ne!(status.as_deref(), Some("captured"));
    let (charged_times, refunded_times) = system.gateway(raced).await;
    assert_eq!(
        charged_times, refunded_times,
        "whatever was charged was refunded"
    );
    // Another delivery of the same message is applied while this one is at
    // the gateway: this one's end records nothing (its inbox row says so).
    let (twice, _) = &decisions[2];
    let delivery = selected(&decisions[2]);
    let charging = tokio::spawn({
        let (provider, delivery) = (provider.clone(), delivery.clone());
        async move { provider.handle(&delivery).await }
    });
    eventually(Duration::from_secs(10), "the intent is open", || async {
        capture(twice.clone()).await.0.as_deref() == Some("charging")
    })
    .await;
    sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ('payment-provider-weixin', $1)")
        .bind(&delivery.envelope.message_id)
        .execute(payments.pool())
        .await
        .unwrap();
    charging.await.unwrap().unwrap();
    assert_eq!(capture(twice.clone()).await, (Some("charging".into()), 0));
    payments.close().await;
    system.stop().await;
}

#[tokio::test]
async fn a_read_model_message_on_its_own_is_applied_once_and_not_at_all_when_applied_before() {
    use orderflow_shared::events::{
        Event, InfoGenerated, InfoRejected, OrderCancelled, OrderCompleted, OrderStarted,
        PaymentAwaiting, PaymentCaptured, PaymentRefunded, PaymentRejected, PaymentSelected,
        ProductLine, SubmissionRejected,
    };
    let env = TestEnv::orderflow().await;
    let db = orders_db(&env, 4).await;
    let shutdown = orderflow_shared::Shutdown::new();
    let (watcher, watching) = order_api::Watcher::spawn(db.pool().clone(), shutdown.clone());
    let read_model = order_api::ReadModelHandler::new(db.clone(), watcher);
    // Every event the read model shows, for order `id`; and what it writes.
    let events = |id: &str| -> Vec<(Event, &'static str, String)> {
        let id = id.to_owned();
        vec![
            (
                Event::OrderStarted(OrderStarted {
                    order_id: format!("{id}-started"),
                    supplier: "haidilao".into(),
                    products: vec![ProductLine {
                        sku: "hotpot".into(),
                        quantity: 2,
                    }],
                    address: "1 Road".into(),
                }),
                "address",
                "1 Road".into(),
            ),
            (
                Event::InfoGenerated(InfoGenerated {
                    order_id: format!("{id}-info"),
                    supplier: "haidilao".into(),
                    payment_methods: vec!["weixin".into()],
                    amount_cents: 1200,
                }),
                "amount_cents::text",
                "1200".into(),
            ),
            (
                Event::InfoRejected(InfoRejected {
                    order_id: format!("{id}-info-rejected"),
                    reason: "no price".into(),
                }),
                "last_rejection",
                "no price".into(),
            ),
            (
                Event::PaymentAwaiting(PaymentAwaiting {
                    order_id: format!("{id}-awaiting"),
                    token: "tok".into(),
                    payment_methods: vec!["weixin".into()],
                    amount_cents: 1200,
                    expires_at: chrono::Utc::now(),
                }),
                "status",
                "awaiting_payment".into(),
            ),
            (
                Event::PaymentSelected(PaymentSelected {
                    order_id: format!("{id}-selected"),
                    method: "weixin".into(),
                    amount_cents: 1200,
                }),
                "method",
                "weixin".into(),
            ),
            (
                Event::PaymentRejected(PaymentRejected {
                    order_id: format!("{id}-payment-rejected"),
                    method: "zhifubao".into(),
                    reason: "not taken".into(),
                }),
                "last_rejection",
                "not taken".into(),
            ),
            (
                Event::SubmissionRejected(SubmissionRejected {
                    order_id: format!("{id}-submission-rejected"),
                    reason: "bad token".into(),
                }),
                "last_rejection",
                "bad token".into(),
            ),
            (
                Event::PaymentCaptured(PaymentCaptured {
                    order_id: format!("{id}-captured"),
                    provider: "weixin".into(),
                    charged_cents: 1200,
                    capture_id: "cap-1".into(),
                }),
                "capture_id",
                "cap-1".into(),
            ),
            (
                Event::PaymentRefunded(PaymentRefunded {
                    order_id: format!("{id}-refunded"),
                    provider: "weixin".into(),
                    refunded_cents: 1200,
                }),
                "refunded_cents::text",
                "1200".into(),
            ),
            (
                Event::OrderCompleted(OrderCompleted {
                    order_id: format!("{id}-completed"),
                    method: "weixin".into(),
                    charged_cents: 1200,
                }),
                "status",
                "completed".into(),
            ),
            (
                Event::OrderCancelled(OrderCancelled {
                    order_id: format!("{id}-cancelled"),
                    reason: "timed out".into(),
                }),
                "status",
                "cancelled".into(),
            ),
        ]
    };
    let column = |order_id: String, column: &'static str| {
        let db = db.clone();
        async move {
            let sql = format!("SELECT {column} FROM orders WHERE order_id = $1");
            sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql))
                .bind(order_id)
                .fetch_optional(db.pool())
                .await
                .unwrap()
                .flatten()
        }
    };
    // New: applied, once. A redelivery leaves the row as it is (its
    // `updated_at` set back here would move again if it were re-applied).
    for (event, field, written) in events("new") {
        let order_id = event.order_id().to_owned();
        let delivery = message(event, None);
        read_model.handle(&delivery).await.unwrap();
        assert_eq!(
            column(order_id.clone(), field).await.as_deref(),
            Some(&*written),
            "{order_id}"
        );
        sqlx::query("UPDATE orders SET updated_at = 'epoch' WHERE order_id = $1")
            .bind(&order_id)
            .execute(db.pool())
            .await
            .unwrap();
        read_model.handle(&delivery).await.unwrap();
        assert_eq!(
            column(order_id.clone(), "updated_at::date::text")
                .await
                .as_deref(),
            Some("1970-01-01"),
            "{order_id} was applied twice"
        );
    }
    // Applied before (its inbox row is there): nothing at all.
    for (event, _, _) in events("seen") {
        let order_id = event.order_id().to_owned();
        let delivery = message(event, None);
        sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ('order-api', $1)")
            .bind(&delivery.envelope.message_id)
            .execute(db.pool())
            .await
            .unwrap();
        read_model.handle(&delivery).await.unwrap();
        assert_eq!(column(order_id.clone(), "status").await, None, "{order_id}");
    }
    // An event the read model does not show is still recorded as applied.
    let timed_out = message(
        Event::SagaTimedOut(orderflow_shared::events::SagaTimedOut {
            order_id: "timed-out".into(),
            step: orderflow_shared::events::Step::Flow,
        }),
        None,
    );
    read_model.handle(&timed_out).await.unwrap();
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox WHERE consumer = 'order-api' AND message_id = $1",
    )
    .bind(&timed_out.envelope.message_id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(recorded, 1);
    assert_eq!(column("timed-out".into(), "status").await, None);
    // In a batch, the same upserts apply unconditionally, once per message.
    let batch: Vec<Message> = events("batch")
        .into_iter()
        .map(|(event, _, _)| message(event, None))
        .collect();
    let twice: Vec<Message> = batch.iter().chain(&batch).cloned().collect();
    read_model.handle_batch(&twice).await.unwrap();
    for (event, field, written) in events("batch") {
        let order_id = event.order_id().to_owned();
        assert_eq!(
            column(order_id.clone(), field).await.as_deref(),
            Some(&*written),
            "{order_id}"
        );
    }
    shutdown.cancel();
    watching.await.unwrap();
    db.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_read_model_batch_wakes_a_long_poll_with_the_row_it_committed() {
    use orderflow_shared::events::{Event, PaymentAwaiting, PaymentSelected};
    let env = TestEnv::orderflow().await;
    let db = orders_db(&env, 2).await;
    let shutdown = orderflow_shared::Shutdown::new();
    let (watcher, watching) = order_api::Watcher::spawn(db.pool().clone(), shutdown.clone());
    let read_model = order_api::ReadModelHandler::new(db.clone(), watcher.clone());
    let mut waiter = watcher.subscribe("o");
    // Two changes of one order in one batch: the waiter hears of the last
    // one, with the row as the batch committed it.
    let awaiting = Event::PaymentAwaiting(PaymentAwaiting {
        order_id: "o".into(),
        token: "v1.o".into(),
        payment_methods: vec!["weixin".into()],
        amount_cents: 1200,
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
    });
    let selected = Event::PaymentSelected(PaymentSelected {
        order_id: "o".into(),
        method: "weixin".into(),
        amount_cents: 1200,
    });
    read_model
        .handle_batch(&[message(awaiting, None), message(selected, None)])
        .await
        .unwrap();
    // (A wake-up for everyone, as the listener comes up, carries nothing.)
    let known = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(known) = waiter.changed().await {
                break known;
            }
        }
    })
    .await
    .expect("one change since it looked, with what its maker knew");
    assert_eq!(known.status, order_api::Status::Paying);
    let row = known.row.expect("the upsert's row");
    assert_eq!(
        (row.status.as_str(), row.method.as_deref(), row.amount_cents),
        ("paying", Some("weixin"), Some(1200))
    );
    drop(waiter);
    shutdown.cancel();
    watching.await.unwrap();
    db.close().await;
    env.cleanup().await;
}
