//! Proptest strategies for what a publisher can send: strings of any size
//! and content, integers at their extremes, dates at chrono's limits,
//! arbitrary JSON, objects shaped like each event of the catalogue (fields
//! right, wrong, extreme or missing), typed events, and AMQP properties with
//! headers of every AMQP type. Built for this crate's tests and, with the
//! `proptest` feature, for the property tests of the services.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, ShortString};
use proptest::prelude::*;
use serde_json::{Map, Value};

use crate::envelope::{MAX_SHORT_STRING, headers};
use crate::events::{
    Event, InfoGenerated, InfoRejected, OrderCancelled, OrderCompleted, OrderStarted,
    PaymentAwaiting, PaymentCaptured, PaymentFailed, PaymentRefunded, PaymentRejected,
    PaymentSelected, PaymentSubmitted, ProductLine, SagaTimedOut, Step, SubmissionRejected,
};

/// The event names of the catalogue (`payment.selected.<method>` with the
/// methods of `config/providers.toml`).
pub const CATALOGUE: [&str; 16] = [
    "order.started",
    "order.info-generated",
    "order.info-rejected",
    "payment.awaiting",
    "payment.submitted",
    "payment.selected.zhifubao",
    "payment.selected.weixin",
    "payment.selected.unionpay",
    "payment.rejected",
    "payment.submission-rejected",
    "payment.captured",
    "payment.failed",
    "payment.refunded",
    "saga.timed-out",
    "order.completed",
    "order.cancelled",
];

/// The token keys the property tests sign and verify with (kid `test`).
pub fn token_keys() -> crate::token::TokenKeys {
    crate::token::TokenKeys::parse(&secrecy::SecretString::from(
        "test:orderflow-test-signing-key",
    ))
    .expect("the test keys parse")
}

/// Strings of any content: empty, NUL and control characters, any Unicode,
/// id-like, and long (up to 16 KiB).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        2 => "[a-z0-9.:_-]{1,40}",
        1 => Just(String::new()),
        1 => Just("\u{0}".to_owned()),
        1 => "[\u{0}-\u{1f}\u{7f}\u{202e}\u{feff}]{1,8}",
        1 => (0..=8192_usize).prop_map(|n| "é".repeat(n)),
        1 => Just("payment.selected.#".to_owned()),
    ]
}

/// `text` cut to at most [`MAX_SHORT_STRING`] bytes (on a character
/// boundary): what an AMQP short string can hold.
pub fn short(text: &str) -> String {
    let mut end = text.len().min(MAX_SHORT_STRING);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Strings an AMQP short string can hold (at most 255 bytes).
pub fn short_text() -> impl Strategy<Value = String> {
    text().prop_map(|text| short(&text))
}

/// `i64`s, the extremes often.
pub fn extreme_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(0),
        Just(-1),
        Just(1),
        any::<i64>(),
    ]
}

/// `u64`s, the extremes often (and the times near chrono's limits).
pub fn extreme_u64() -> impl Strategy<Value = u64> {
    let chrono_max = u64::try_from(DateTime::<Utc>::MAX_UTC.timestamp()).unwrap_or(u64::MAX);
    prop_oneof![
        Just(0),
        Just(u64::MAX),
        Just(u64::MAX / 1000),
        Just(u64::from(u32::MAX)),
        Just(8_000_000_000_000),
        Just(chrono_max),
        Just(chrono_max.saturating_mul(1000)),
        Just(chrono_max - 1),
        1_600_000_000_u64..2_000_000_000,
        1_600_000_000_000_u64..2_000_000_000_000,
        any::<u64>(),
    ]
}

/// Any instant chrono can represent, its limits often.
pub fn date() -> impl Strategy<Value = DateTime<Utc>> {
    let min = DateTime::<Utc>::MIN_UTC.timestamp();
    let max = DateTime::<Utc>::MAX_UTC.timestamp();
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(DateTime::<Utc>::UNIX_EPOCH),
        (min..=max, 0..1_000_000_000_u32).prop_map(|(secs, nanos)| {
            DateTime::from_timestamp(secs, nanos).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        }),
    ]
}

/// A JSON number: integers at the extremes of `i64` and `u64`, and floats.
pub fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        extreme_i64().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        any::<f64>().prop_map(Value::from),
        Just(Value::from(1e300)),
    ]
}

/// Any JSON value, a few levels deep.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(short_text(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A date as a body carries it: RFC 3339 at chrono's limits and anywhere
/// between, or garbage.
pub fn json_date() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => date().prop_map(|date| Value::String(date.to_rfc3339())),
        1 => Just(Value::String("+262143-01-01T00:00:00Z".to_owned())),
        1 => Just(Value::String("-262144-12-31T23:59:59Z".to_owned())),
        1 => json_value(),
    ]
}

/// What a field of an event holds.
#[derive(Clone, Copy, Debug)]
enum Field {
    Text,
    Amount,
    Methods,
    Date,
    Step,
    Products,
}

/// The fields of the event `kind` (the same for any `payment.selected.*`).
fn fields(kind: &str) -> &'static [(&'static str, Field)] {
    use Field::{Amount, Date, Methods, Products, Step, Text};
    match kind {
        "order.started" => &[
            ("order_id", Text),
            ("supplier", Text),
            ("products", Products),
            ("address", Text),
        ],
        "order.info-generated" => &[
            ("order_id", Text),
            ("supplier", Text),
            ("payment_methods", Methods),
            ("amount_cents", Amount),
        ],
        "payment.awaiting" => &[
            ("order_id", Text),
            ("token", Text),
            ("payment_methods", Methods),
            ("amount_cents", Amount),
            ("expires_at", Date),
        ],
        "payment.submitted" => &[("order_id", Text), ("token", Text), ("method", Text)],
        "payment.rejected" => &[("order_id", Text), ("method", Text), ("reason", Text)],
        "payment.captured" => &[
            ("order_id", Text),
            ("provider", Text),
            ("charged_cents", Amount),
            ("capture_id", Text),
        ],
        "payment.failed" => &[("order_id", Text), ("provider", Text), ("reason", Text)],
        "payment.refunded" => &[
            ("order_id", Text),
            ("provider", Text),
            ("refunded_cents", Amount),
        ],
        "saga.timed-out" => &[("order_id", Text), ("step", Step)],
        "order.completed" => &[
            ("order_id", Text),
            ("method", Text),
            ("charged_cents", Amount),
        ],
        kind if kind.starts_with("payment.selected.") => &[
            ("order_id", Text),
            ("method", Text),
            ("amount_cents", Amount),
        ],
        // order.info-rejected, payment.submission-rejected, order.cancelled
        _ => &[("order_id", Text), ("reason", Text)],
    }
}

/// A value of the right type for `field`, extreme values often.
fn right_value(field: Field) -> BoxedStrategy<Value> {
    match field {
        Field::Text => text().prop_map(Value::String).boxed(),
        Field::Amount => prop_oneof![
            4 => extreme_i64().prop_map(Value::from),
            1 => Just(Value::from(u64::MAX)),
        ]
        .boxed(),
        Field::Methods => prop::collection::vec(text().prop_map(Value::String), 0..4)
            .prop_map(Value::Array)
            .boxed(),
        Field::Date => json_date().boxed(),
        Field::Step => prop_oneof![
            Just(Value::from("generate-info")),
            Just(Value::from("payment")),
            Just(Value::from("flow")),
            text().prop_map(Value::String),
        ]
        .boxed(),
        Field::Products => {
            let sku = prop_oneof![
                Just("hotpot-set".to_owned()),
                Just("tea".to_owned()),
                text()
            ];
            let quantity = prop_oneof![
                Just(Value::from(u32::MAX)),
                Just(Value::from(0)),
                Just(Value::from(1)),
                Just(Value::from(-1)),
                Just(Value::from(u64::MAX)),
                any::<u32>().prop_map(Value::from),
            ];
            prop::collection::vec(
                (sku, quantity).prop_map(
                    |(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}),
                ),
                0..5,
            )
            .prop_map(Value::Array)
            .boxed()
        }
    }
}

/// A field's value: mostly of the right type, sometimes of any type or
/// missing (`None`).
fn field_value(field: Field) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        8 => right_value(field).prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// A JSON object shaped like the event `kind`: its fields mostly of the
/// right type with extreme values, sometimes of another type or missing,
/// and sometimes fields the event does not have.
pub fn event_object(kind: &str) -> impl Strategy<Value = Map<String, Value>> + use<> {
    let names: Vec<&'static str> = fields(kind).iter().map(|(name, _)| *name).collect();
    let values: Vec<BoxedStrategy<Option<Value>>> = fields(kind)
        .iter()
        .map(|(_, field)| field_value(*field))
        .collect();
    let extra = prop::collection::btree_map(short_text(), json_value(), 0..3);
    (values, extra).prop_map(move |(values, extra)| {
        let mut object: Map<String, Value> = extra.into_iter().collect();
        for (name, value) in names.iter().zip(values) {
            if let Some(value) = value {
                object.insert((*name).to_owned(), value);
            }
        }
        object
    })
}

/// A routing key: one of the catalogue (often), `payment.selected.` with any
/// method, or anything at all (at most 255 bytes, as AMQP carries it).
pub fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(CATALOGUE.to_vec()).prop_map(str::to_owned),
        1 => short_text().prop_map(|method| short(&format!("payment.selected.{method}"))),
        1 => short_text(),
    ]
}

/// A routing key and an object shaped like its event.
pub fn keyed_event_object() -> impl Strategy<Value = (String, Map<String, Value>)> {
    routing_key().prop_flat_map(|key| {
        let object = event_object(&key);
        (Just(key), object)
    })
}

/// A message body: arbitrary bytes, arbitrary JSON, or an object shaped
/// like the event `routing_key` names.
pub fn body(routing_key: &str) -> impl Strategy<Value = Vec<u8>> + use<> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => json_value().prop_map(|value| value.to_string().into_bytes()),
        4 => event_object(routing_key).prop_map(|object| Value::Object(object).to_string().into_bytes()),
    ]
}

fn product_line() -> impl Strategy<Value = ProductLine> {
    let quantity = prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>()];
    (text(), quantity).prop_map(|(sku, quantity)| ProductLine { sku, quantity })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::GenerateInfo),
        Just(Step::Payment),
        Just(Step::Flow)
    ]
}

fn methods() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

/// Any event of the catalogue, with strings of any content and integers and
/// dates at their extremes.
pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (
            text(),
            text(),
            prop::collection::vec(product_line(), 0..4),
            text()
        )
            .prop_map(
                |(order_id, supplier, products, address)| Event::OrderStarted(OrderStarted {
                    order_id,
                    supplier,
                    products,
                    address
                })
            ),
        (text(), text(), methods(), extreme_i64()).prop_map(
            |(order_id, supplier, payment_methods, amount_cents)| {
                Event::InfoGenerated(InfoGenerated {
                    order_id,
                    supplier,
                    payment_methods,
                    amount_cents,
                })
            }
        ),
        (text(), text())
            .prop_map(|(order_id, reason)| Event::InfoRejected(InfoRejected { order_id, reason })),
        (text(), text(), methods(), extreme_i64(), date()).prop_map(
            |(order_id, token, payment_methods, amount_cents, expires_at)| {
                Event::PaymentAwaiting(PaymentAwaiting {
                    order_id,
                    token,
                    payment_methods,
                    amount_cents,
                    expires_at,
                })
            }
        ),
        (text(), text(), text()).prop_map(|(order_id, token, method)| {
            Event::PaymentSubmitted(PaymentSubmitted {
                order_id,
                token,
                method,
            })
        }),
        (text(), text(), extreme_i64()).prop_map(|(order_id, method, amount_cents)| {
            Event::PaymentSelected(PaymentSelected {
                order_id,
                method,
                amount_cents,
            })
        }),
        (text(), text(), text()).prop_map(|(order_id, method, reason)| {
            Event::PaymentRejected(PaymentRejected {
                order_id,
                method,
                reason,
            })
        }),
        (text(), text()).prop_map(|(order_id, reason)| {
            Event::SubmissionRejected(SubmissionRejected { order_id, reason })
        }),
        (text(), text(), extreme_i64(), text()).prop_map(
            |(order_id, provider, charged_cents, capture_id)| {
                Event::PaymentCaptured(PaymentCaptured {
                    order_id,
                    provider,
                    charged_cents,
                    capture_id,
                })
            }
        ),
        (text(), text(), text()).prop_map(|(order_id, provider, reason)| {
            Event::PaymentFailed(PaymentFailed {
                order_id,
                provider,
                reason,
            })
        }),
        (text(), text(), extreme_i64()).prop_map(|(order_id, provider, refunded_cents)| {
            Event::PaymentRefunded(PaymentRefunded {
                order_id,
                provider,
                refunded_cents,
            })
        }),
        (text(), step())
            .prop_map(|(order_id, step)| Event::SagaTimedOut(SagaTimedOut { order_id, step })),
        (text(), text(), extreme_i64()).prop_map(|(order_id, method, charged_cents)| {
            Event::OrderCompleted(OrderCompleted {
                order_id,
                method,
                charged_cents,
            })
        }),
        (text(), text()).prop_map(|(order_id, reason)| Event::OrderCancelled(OrderCancelled {
            order_id,
            reason
        })),
    ]
}

/// Any AMQP field value, nested tables and arrays included.
pub fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        extreme_i64().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        short_text().prop_map(|text| AMQPValue::ShortString(ShortString::from(text))),
        text().prop_map(|text| AMQPValue::LongString(text.into())),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|bytes| AMQPValue::LongString(bytes.into())),
        extreme_u64().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|bytes| AMQPValue::ByteArray(ByteArray::from(bytes))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| AMQPValue::FieldArray(FieldArray::from(values))),
            prop::collection::vec((short_text(), inner), 0..4)
                .prop_map(|entries| AMQPValue::FieldTable(table(entries))),
        ]
    })
}

fn table(entries: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

/// Headers: the runtime's own (`causation_id`, `traceparent`,
/// `x-orderflow-retries`, `x-death`, ...) with values of any type, and others.
pub fn amqp_headers() -> impl Strategy<Value = FieldTable> {
    let key = prop_oneof![
        prop::sample::select(vec![
            headers::CAUSATION_ID,
            headers::TRACEPARENT,
            headers::RETRIES,
            headers::REASON,
            headers::SERVICE,
            headers::FAILED_AT,
            "x-death",
            "x-orderflow-routing-key",
        ])
        .prop_map(str::to_owned),
        short_text(),
    ];
    prop::collection::vec((key, amqp_value()), 0..6).prop_map(table)
}

/// AMQP properties as any publisher may set them: each of the envelope's
/// properties absent or of any content, timestamps at the extremes, headers
/// of any type.
pub fn properties() -> impl Strategy<Value = BasicProperties> {
    (
        proptest::option::of(short_text()),
        proptest::option::of(short_text()),
        proptest::option::of(short_text()),
        proptest::option::of(extreme_u64()),
        proptest::option::of(amqp_headers()),
    )
        .prop_map(|(message_id, correlation_id, kind, timestamp, headers)| {
            let mut properties = BasicProperties::default();
            if let Some(id) = message_id {
                properties = properties.with_message_id(ShortString::from(id));
            }
            if let Some(id) = correlation_id {
                properties = properties.with_correlation_id(ShortString::from(id));
            }
            if let Some(kind) = kind {
                properties = properties.with_type(ShortString::from(kind));
            }
            if let Some(timestamp) = timestamp {
                properties = properties.with_timestamp(timestamp);
            }
            if let Some(headers) = headers {
                properties = properties.with_headers(headers);
            }
            properties
        })
}
