//! Nothing a publisher sends can panic a worker (issue 11, item 10): the
//! whole system gets, straight on its events exchange, messages with extreme
//! AMQP timestamps, dates at chrono's limits, amounts at the ends of `i64`,
//! quantities of `u32::MAX`, huge strings, NUL characters and headers of the
//! wrong types, on every routing key a worker consumes (and an unknown one).
//! Each one is either handled harmlessly or dead-lettered with its reason;
//! no worker panics, nothing bad is retried as if it could heal, no deadline
//! lands in the far future, and an order placed afterwards completes.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable};
use orderflow_shared::envelope::{header_str, headers};
use orderflow_shared::topology::QueueRole;
use orderflow_tests::system::System;
use serde_json::{Value, json};

/// The values one hostile body is made of.
struct Values {
    order_id: String,
    text: String,
    amount: i64,
    quantity: u64,
    expires_at: String,
}

impl Values {
    fn plain(order_id: String) -> Self {
        Self {
            order_id,
            text: "plain".to_owned(),
            amount: 1_000,
            quantity: 1,
            expires_at: (Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
        }
    }
}

/// Makes a body of [`Values`] shaped like one event.
type Shape = fn(&Values) -> Value;

/// The shape of the events that only say why (and of the unknown key): with
/// every field anyone might look for.
fn with_reason(v: &Values) -> Value {
    json!({
        "order_id": v.order_id, "reason": v.text, "amount_cents": v.amount,
        "expires_at": v.expires_at,
    })
}

/// Every routing key of the catalogue that some worker consumes, but the
/// payment methods' `payment.selected.<method>`, and one nobody knows, each
/// with the shape of its event.
const SHAPES: [(&str, Shape); 14] = [
    ("order.started", |v| {
        json!({
            "order_id": v.order_id, "supplier": v.text, "address": v.text,
            "products": [{"sku": "hotpot-set", "quantity": v.quantity}, {"sku": v.text, "quantity": v.quantity}],
        })
    }),
    ("order.info-generated", |v| {
        json!({
            "order_id": v.order_id, "supplier": v.text,
            "payment_methods": ["zhifubao", v.text], "amount_cents": v.amount,
        })
    }),
    ("order.info-rejected", with_reason),
    ("payment.awaiting", |v| {
        json!({
            "order_id": v.order_id, "token": v.text, "payment_methods": ["zhifubao", v.text],
            "amount_cents": v.amount, "expires_at": v.expires_at,
        })
    }),
    (
        "payment.submitted",
        |v| json!({"order_id": v.order_id, "token": v.text, "method": v.text}),
    ),
    (
        "payment.rejected",
        |v| json!({"order_id": v.order_id, "method": v.text, "reason": v.text}),
    ),
    ("payment.submission-rejected", with_reason),
    ("payment.captured", |v| {
        json!({
            "order_id": v.order_id, "provider": v.text, "charged_cents": v.amount, "capture_id": v.text,
        })
    }),
    (
        "payment.failed",
        |v| json!({"order_id": v.order_id, "provider": v.text, "reason": v.text}),
    ),
    ("payment.refunded", |v| {
        json!({
            "order_id": v.order_id, "provider": v.text, "refunded_cents": v.amount,
        })
    }),
    (
        "saga.timed-out",
        |v| json!({"order_id": v.order_id, "step": "flow"}),
    ),
    ("order.completed", |v| {
        json!({
            "order_id": v.order_id, "method": v.text, "charged_cents": v.amount,
        })
    }),
    ("order.cancelled", with_reason),
    ("order.exploded", with_reason),
];

/// Every routing key of [`SHAPES`], then the payment methods'
/// `payment.selected.<method>`.
fn routing_keys(methods: &[String]) -> Vec<String> {
    let mut keys: Vec<String> = SHAPES.iter().map(|(key, _)| (*key).to_owned()).collect();
    keys.extend(methods.iter().map(|m| format!("payment.selected.{m}")));
    keys
}

/// A body shaped like the event `routing_key` (one of [`routing_keys`])
/// names, made of `values`.
fn body(routing_key: &str, v: &Values) -> Value {
    if let Some(method) = routing_key.strip_prefix("payment.selected.") {
        return json!({
            "order_id": v.order_id, "method": method, "amount_cents": v.amount,
        });
    }
    let (_, shape) = SHAPES
        .iter()
        .find(|(key, _)| *key == routing_key)
        .unwrap_or_else(|| panic!("no shape for {routing_key}"));
    shape(v)
}

/// The latest second chrono can represent (+262142-12-31T23:59:59Z).
fn chrono_max_secs() -> u64 {
    u64::try_from(DateTime::<Utc>::MAX_UTC.timestamp()).unwrap()
}

/// Headers of every wrong type where the runtime looks for its own.
fn garbage_headers() -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(headers::CAUSATION_ID.into(), AMQPValue::LongLongInt(-1));
    table.insert(
        headers::TRACEPARENT.into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe, 0x00])),
    );
    table.insert(
        headers::RETRIES.into(),
        AMQPValue::LongString("99999999999999999999".into()),
    );
    table.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::Boolean(true),
            // (Not NaN: the broker itself cannot decode that and closes
            // the connection, so no worker ever sees one.)
            AMQPValue::Double(f64::MAX),
        ])),
    );
    table.insert(headers::REASON.into(), AMQPValue::Timestamp(u64::MAX));
    table
}

/// (properties, values) of every hostile variant for orders named after
/// `order_id` (each variant its own order, named after it).
fn cases(order_id: &str) -> Vec<(BasicProperties, Values)> {
    // Plain values for the order named after `order_id` and `variant`.
    let plain = |variant: &str| Values::plain(format!("{order_id}-{variant}"));
    let huge = "x".repeat(256 * 1024);
    vec![
        // timestamp u64::MAX
        (
            BasicProperties::default().with_timestamp(u64::MAX),
            plain("ts-u64max"),
        ),
        // timestamp 8e12
        (
            BasicProperties::default().with_timestamp(8_000_000_000_000),
            plain("ts-8e12"),
        ),
        // timestamp at chrono's max
        (
            BasicProperties::default().with_timestamp(chrono_max_secs()),
            plain("ts-chrono-max"),
        ),
        // maximal values
        (
            BasicProperties::default(),
            Values {
                order_id: format!("{order_id}-max"),
                text: "max".to_owned(),
                amount: i64::MAX,
                quantity: u64::from(u32::MAX),
                expires_at: DateTime::<Utc>::MAX_UTC.to_rfc3339(),
            },
        ),
        // minimal values
        (
            BasicProperties::default(),
            Values {
                order_id: format!("{order_id}-min"),
                text: String::new(),
                amount: i64::MIN,
                quantity: 0,
                expires_at: DateTime::<Utc>::MIN_UTC.to_rfc3339(),
            },
        ),
        // huge strings
        (
            BasicProperties::default(),
            Values {
                text: huge.clone(),
                ..plain("huge")
            },
        ),
        // huge order id
        (BasicProperties::default(), plain(&huge)),
        // NUL characters
        (
            BasicProperties::default(),
            Values {
                text: "a\u{0}b".to_owned(),
                ..plain("nul\u{0}")
            },
        ),
        // garbage headers and ids
        (
            BasicProperties::default()
                .with_message_id("".into())
                .with_correlation_id("not-a-uuid".into())
                .with_timestamp(0)
                .with_headers(garbage_headers()),
            Values::plain(String::new()),
        ),
    ]
}

/// A dead letter as the test looks at it.
#[derive(Debug)]
struct DeadLetter {
    service: String,
    routing_key: String,
    reason: String,
}

/// Messages of this test's service and delay queues that are ready or
/// delivered but not acknowledged, and the dead letters per queue, as
/// `rabbitmqctl` reports them (a delivery a worker dropped without an ack
/// stays unacknowledged: it counts as work never finished).
fn queue_state(system: &System) -> (u64, BTreeMap<String, u64>) {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "-q",
        ])
        .output()
        .expect("rabbitmqctl is installed");
    assert!(output.status.success(), "rabbitmqctl list_queues failed");
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut busy = 0;
    let mut dead = BTreeMap::new();
    for queue in &system.env.topology.queues {
        let counts = listing
            .lines()
            .map(|line| line.split('\t').collect::<Vec<_>>())
            .find(|columns| columns.first() == Some(&queue.name.as_str()))
            .unwrap_or_else(|| panic!("queue {} is not listed: {listing}", queue.name));
        let ready: u64 = counts[1].trim().parse().unwrap();
        let unacked: u64 = counts[2].trim().parse().unwrap();
        if queue.role == QueueRole::DeadLetter {
            dead.insert(queue.name.clone(), ready + unacked);
        } else {
            busy += ready + unacked;
        }
    }
    (busy, dead)
}

/// Waits until no queue holds work, not even unacknowledged, and the
/// dead-letter queues stopped growing for a while (the workers have dealt
/// with everything), at most 90 s. `Err` with what is left when they never
/// get there (a worker that dropped a delivery without an ack).
async fn settle(system: &System) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut quiet = 0;
    let mut last = None;
    while quiet < 4 {
        let (busy, dead) = tokio::task::block_in_place(|| queue_state(system));
        if busy == 0 && last.as_ref() == Some(&dead) {
            quiet += 1;
        } else {
            quiet = 0;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{busy} messages ready or unacknowledged; dead letters {dead:?}"
            ));
        }
        last = Some(dead);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn dead_letters(system: &System) -> Vec<DeadLetter> {
    let mut letters = Vec::new();
    for queue in &system.env.topology.queues {
        if queue.role != QueueRole::DeadLetter {
            continue;
        }
        for message in system.env.drain(&queue.name).await {
            let table = message.properties.headers().clone().unwrap_or_default();
            letters.push(DeadLetter {
                service: queue.service.clone(),
                routing_key: message.routing_key.as_str().to_owned(),
                reason: header_str(&table, headers::REASON).unwrap_or_default(),
            });
        }
    }
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_never_panic_a_worker_and_the_system_keeps_serving() {
    let system = System::start().await;
    let methods = system.ctx.metadata.methods();
    let started = Utc::now();
    let mut published = 0;
    for (index, key) in routing_keys(&methods).iter().enumerate() {
        for (properties, values) in cases(&format!("hostile-{index}")) {
            let body = body(key, &values).to_string();
            system
                .env
                .publish_bare(key, body.as_bytes(), properties)
                .await;
            published += 1;
        }
    }
    // Garbage that is not even a JSON object, on every key.
    for key in routing_keys(&methods) {
        for body in [&b"\xff\xfe not json"[..], b"[1,2,3]", b"{\"order_id\": 7}"] {
            system
                .env
                .publish_bare(&key, body, BasicProperties::default())
                .await;
            published += 1;
        }
    }
    let settled = settle(&system).await;

    let letters = dead_letters(&system).await;
    let panicked: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.reason.contains("handler panicked"))
        .collect();
    assert!(panicked.is_empty(), "workers panicked: {panicked:#?}");
    if let Err(left) = settled {
        panic!("the workers did not get through the hostile messages in 90 s: {left}");
    }
    assert!(
        !letters.is_empty(),
        "{published} hostile messages and not one dead letter?"
    );
    let retried: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| l.reason.is_empty() || l.reason.contains("gave up after"))
        .collect();
    assert!(
        retried.is_empty(),
        "dead letters without a reason, or retried as if they could heal: {retried:#?}"
    );
    // The coordinator reads every event but its own: under each of those
    // keys it refused the huge order id as such and the NUL characters as
    // data the database cannot store, without retrying either.
    let coordinator_reads: Vec<String> = system
        .env
        .topology
        .event_bindings("saga-coordinator")
        .map(|b| b.routing_key.clone())
        .collect();
    for key in routing_keys(&methods)
        .iter()
        .filter(|k| coordinator_reads.contains(k))
    {
        for expected in ["order_id `hostile-", "SQLSTATE 22021"] {
            assert!(
                letters.iter().any(|l| l.service == "saga-coordinator"
                    && &l.routing_key == key
                    && l.reason.contains(expected)),
                "no coordinator dead letter of {key} says {expected:?}: {letters:#?}"
            );
        }
    }
    // No deadline was put off into the far future by a message's time: the
    // latest is at most the flow timeout (or the payment timeout) from now.
    let db = system.db("coordinator").await;
    let latest: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT max(due_at) FROM timers")
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    let settings = &system.ctx.settings;
    let longest = settings
        .flow_timeout_secs
        .max(settings.payment_timeout_secs)
        .max(settings.generate_info_timeout_secs);
    let horizon = Utc::now() + chrono::Duration::seconds(i64::try_from(longest).unwrap() + 60);
    let latest = latest.unwrap();
    assert!(
        latest <= horizon && latest >= started,
        "a deadline at {latest}, beyond now + {longest} s"
    );

    // Every worker still serves: an order placed now completes.
    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let order = system.pay(&order_id, "zhifubao").await;
    assert_eq!(order["status"], "completed", "{order:#}");
    system.stop().await;
}
