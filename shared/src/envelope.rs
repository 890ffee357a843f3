//! The message envelope of docs/design.md §4.1, carried in AMQP properties:
//! `message_id` (UUID v7), `correlation_id` (= order id), `type` (= routing key),
//! `timestamp`, `content_type`, `delivery_mode` 2, and the headers
//! `causation_id` and `traceparent`.
//!
//! Messages typed into the RabbitMQ UI may carry none of it; the missing parts
//! are derived deterministically from the body, so a redelivery of such a
//! message is still recognised as a duplicate.

use std::fmt::Write as _;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Header names of the envelope and of the runtime.
pub mod headers {
    pub const CAUSATION_ID: &str = "causation_id";
    pub const TRACEPARENT: &str = "traceparent";
    /// How many delay tiers the message has been through (trusted only on
    /// messages that come back through the service's redeliver exchange).
    pub const RETRIES: &str = "x-orderflow-retries";
    /// Why a message was dead-lettered.
    pub const REASON: &str = "x-orderflow-reason";
    /// The service that dead-lettered it.
    pub const SERVICE: &str = "x-orderflow-service";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "x-orderflow-failed-at";
}

/// The longest AMQP short string, in bytes: the most a `message_id`, a
/// `correlation_id` (so an order id), a `type`, a routing key or a broker
/// name can hold. lapin panics on a longer one, so everything that becomes
/// one is checked first.
pub const MAX_SHORT_STRING: usize = 255;

/// The latest time a UUID v7 can carry: 48 bits of milliseconds (the year
/// 10889).
pub const MAX_V7_MILLIS: u64 = (1 << 48) - 1;

/// An envelope field too long for the AMQP property that carries it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the {field} of message {message_id} is {len} bytes long, and AMQP carries at most \
     {MAX_SHORT_STRING} there"
)]
pub struct TooLong {
    /// `message_id`, `correlation_id` or `type`.
    pub field: &'static str,
    pub len: usize,
    /// The message's id, abbreviated (it may be the long one).
    pub message_id: String,
}

/// How many characters of an id [`abbreviate`] keeps for an error message.
pub const ID_CHARS: usize = 64;

/// At most the first `max` characters of `text`, `…` marking a cut: enough
/// to tell a value in a log line or an error, never a megabyte of it.
pub fn abbreviate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// `value` as the short string of `field`, or why it cannot be one.
fn short_string(
    field: &'static str,
    value: &str,
    message_id: &str,
) -> Result<ShortString, TooLong> {
    ShortString::try_new(value).map_err(|_| TooLong {
        field,
        len: value.len(),
        message_id: abbreviate(message_id, ID_CHARS),
    })
}

/// Fixed UUID v5 namespaces for derived identifiers (any constant would do; these
/// must never change, or redeliveries of old messages stop being duplicates).
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_772d_6d73_6769_6401);
const ORDER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_772d_6f72_6465_7201);

/// Envelope of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: String,
    /// The order id.
    pub correlation_id: String,
    /// The event name (= routing key).
    pub kind: String,
    /// Seconds since the Unix epoch, as AMQP carries it.
    pub timestamp: u64,
    /// The `message_id` of the message that caused this one.
    pub causation_id: Option<String>,
    /// W3C trace context: `00-<trace id>-<parent id>-01`.
    pub traceparent: String,
}

fn now_secs() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default()
}

fn span_id(id: Uuid) -> String {
    // The last 8 bytes of a v7 UUID are random.
    let bytes = id.as_bytes();
    bytes[8..]
        .iter()
        .fold(String::with_capacity(16), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

impl Envelope {
    /// A new message that starts a trace (an order placed by a client).
    pub fn new(kind: impl Into<String>, order_id: impl Into<String>) -> Self {
        let message_id = Uuid::now_v7();
        let trace_id = Uuid::now_v7().simple().to_string();
        Self {
            message_id: message_id.to_string(),
            correlation_id: order_id.into(),
            kind: kind.into(),
            timestamp: now_secs(),
            causation_id: None,
            traceparent: format!("00-{trace_id}-{}-01", span_id(message_id)),
        }
    }

    /// A new message caused by `cause`: same trace, `causation_id` = its id.
    pub fn caused_by(kind: impl Into<String>, order_id: impl Into<String>, cause: &Self) -> Self {
        let mut envelope = Self::new(kind, order_id);
        envelope.causation_id = Some(cause.message_id.clone());
        if let Some(trace_id) = cause.traceparent.split('-').nth(1) {
            envelope.traceparent = format!(
                "00-{trace_id}-{}-01",
                span_id(Uuid::parse_str(&envelope.message_id).unwrap_or_default())
            );
        }
        envelope
    }

    /// When the message was created, in milliseconds since the epoch: from its
    /// UUID v7 `message_id` when it has one (millisecond precision), else its
    /// `timestamp` (seconds).
    pub fn time_millis(&self) -> u64 {
        Uuid::parse_str(&self.message_id)
            .ok()
            .filter(|id| id.get_version_num() == 7)
            .and_then(|id| id.get_timestamp())
            .map_or(self.timestamp.saturating_mul(1000), |ts| {
                let (secs, nanos) = ts.to_unix();
                secs.saturating_mul(1000)
                    .saturating_add(u64::from(nanos / 1_000_000))
            })
    }

    /// AMQP properties carrying this envelope, persistent, JSON, plus `extra`
    /// headers; an error (never a panic) when an id or the type is longer than
    /// an AMQP short string holds ([`MAX_SHORT_STRING`]).
    pub fn to_properties(&self, extra: FieldTable) -> Result<BasicProperties, TooLong> {
        let message_id = short_string("message_id", &self.message_id, &self.message_id)?;
        let correlation_id =
            short_string("correlation_id", &self.correlation_id, &self.message_id)?;
        let kind = short_string("type", &self.kind, &self.message_id)?;
        let mut headers = extra;
        if let Some(causation_id) = &self.causation_id {
            headers.insert(
                headers::CAUSATION_ID.into(),
                AMQPValue::LongString(causation_id.as_str().into()),
            );
        }
        headers.insert(
            headers::TRACEPARENT.into(),
            AMQPValue::LongString(self.traceparent.as_str().into()),
        );
        Ok(BasicProperties::default()
            .with_message_id(message_id)
            .with_correlation_id(correlation_id)
            .with_type(kind)
            .with_timestamp(self.timestamp)
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers))
    }

    /// The envelope of a received message. `routing_key` is the event name it
    /// was published with; `body_order_id` the `order_id` found in the body.
    /// Missing parts are derived from the body, deterministically.
    pub fn from_properties(
        properties: &BasicProperties,
        routing_key: &str,
        body: &[u8],
        body_order_id: Option<&str>,
    ) -> Self {
        let headers = properties.headers().as_ref();
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| derive_message_id(routing_key, body));
        let correlation_id = body_order_id
            .map(str::to_owned)
            .or_else(|| {
                properties
                    .correlation_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .filter(|id| !id.is_empty())
            })
            .unwrap_or_else(|| derive_order_id(body));
        let traceparent = headers
            .and_then(|h| header_str(h, headers::TRACEPARENT))
            .unwrap_or_else(|| {
                let id = Uuid::parse_str(&message_id)
                    .unwrap_or_else(|_| Uuid::new_v5(&MESSAGE_ID_NAMESPACE, message_id.as_bytes()));
                format!("00-{}-{}-01", id.simple(), span_id(id))
            });
        Self {
            message_id,
            correlation_id,
            kind: routing_key.to_owned(),
            timestamp: properties.timestamp().unwrap_or_else(now_secs),
            causation_id: headers.and_then(|h| header_str(h, headers::CAUSATION_ID)),
            traceparent,
        }
    }
}

/// A deterministic UUID v7 for the message with `routing_key` caused by
/// `cause`: the cause's time (from its v7 id, else its timestamp) and 74 bits
/// of a hash of the cause's id and the routing key. A cause timestamped later
/// than a v7 UUID can carry (a publisher's AMQP timestamp of `u64::MAX`)
/// gives the latest time one can ([`MAX_V7_MILLIS`]), not one wrapped around
/// to some arbitrary year.
pub fn derive_caused_message_id(cause: &Envelope, routing_key: &str) -> String {
    let millis = cause.time_millis().min(MAX_V7_MILLIS);
    let mut hasher = Sha256::new();
    hasher.update(cause.message_id.as_bytes());
    hasher.update([0]);
    hasher.update(routing_key.as_bytes());
    let digest = hasher.finalize();
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

/// The `message_id` of a message that came without one: a UUID v5 of its
/// routing key and body, so the same message delivered again has the same id.
pub fn derive_message_id(routing_key: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(routing_key.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &hasher.finalize()).to_string()
}

/// The order id of an `order.started` that came without one (typed into the
/// RabbitMQ UI): a UUID v5 of the body.
pub fn derive_order_id(body: &[u8]) -> String {
    Uuid::new_v5(&ORDER_ID_NAMESPACE, &Sha256::digest(body)).to_string()
}

/// A header as a string (long or short string, or bytes that are UTF-8).
pub fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => String::from_utf8(b.as_slice().to_vec()).ok(),
        _ => None,
    }
}

/// A header as an integer, whatever integer width the publisher chose.
pub fn header_int(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::strategies;

    /// A message id as publishers send them: UUID v7s from any time a v7 can
    /// hold (its limits often), other UUIDs, anything else.
    fn message_id() -> impl Strategy<Value = String> {
        prop_oneof![
            (
                prop_oneof![Just(0), Just(MAX_V7_MILLIS), 0..=MAX_V7_MILLIS],
                any::<[u8; 10]>()
            )
                .prop_map(|(millis, random)| {
                    uuid::Builder::from_unix_timestamp_millis(millis, &random)
                        .into_uuid()
                        .to_string()
                }),
            Just(Uuid::max().to_string()),
            Just(Uuid::nil().to_string()),
            any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
            strategies::short_text(),
        ]
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            message_id(),
            strategies::short_text(),
            strategies::short_text(),
            strategies::extreme_u64(),
            proptest::option::of(strategies::text()),
            strategies::text(),
        )
            .prop_map(
                |(message_id, correlation_id, kind, timestamp, causation_id, traceparent)| {
                    Envelope {
                        message_id,
                        correlation_id,
                        kind,
                        timestamp,
                        causation_id,
                        traceparent,
                    }
                },
            )
    }

    proptest! {
        /// The time of any envelope: from a v7 id, else the timestamp
        /// (saturating); the id derived from it is a v7 of that time, or of
        /// the latest a v7 holds.
        #[test]
        fn time_and_derived_ids_never_panic(envelope in envelope(), key in strategies::short_text()) {
            let millis = envelope.time_millis();
            let from_id = Uuid::parse_str(&envelope.message_id)
                .ok()
                .filter(|id| id.get_version_num() == 7);
            if from_id.is_none() {
                prop_assert_eq!(millis, envelope.timestamp.saturating_mul(1000));
            }
            let derived = Uuid::parse_str(&derive_caused_message_id(&envelope, &key)).unwrap();
            prop_assert_eq!(derived.get_version_num(), 7);
            let (secs, nanos) = derived.get_timestamp().unwrap().to_unix();
            prop_assert_eq!(secs * 1000 + u64::from(nanos / 1_000_000), millis.min(MAX_V7_MILLIS));
        }

        /// A valid envelope (ids and type that AMQP carries, a message id)
        /// survives properties and back; any other is an error, not a panic.
        #[test]
        fn envelopes_survive_properties_or_are_refused(
            envelope in envelope(),
            long in proptest::option::of((0..3_usize, MAX_SHORT_STRING + 1..2000)),
        ) {
            let mut envelope = envelope;
            if let Some((field, len)) = long {
                let value = "x".repeat(len);
                match field {
                    0 => envelope.message_id = value,
                    1 => envelope.correlation_id = value,
                    _ => envelope.kind = value,
                }
            }
            match envelope.to_properties(FieldTable::default()) {
                Ok(properties) => {
                    prop_assert!(long.is_none());
                    prop_assume!(!envelope.message_id.is_empty());
                    let back = Envelope::from_properties(
                        &properties,
                        &envelope.kind,
                        b"{}",
                        Some(&envelope.correlation_id),
                    );
                    prop_assert_eq!(back, envelope);
                }
                Err(error) => {
                    prop_assert!(long.is_some());
                    prop_assert!(error.to_string().len() < 300, "{}", error);
                }
            }
        }
    }

    #[test]
    fn a_cause_beyond_what_a_v7_holds_gives_the_latest_v7_time_not_a_wrapped_one() {
        let mut cause = Envelope::new("order.started", "o-1");
        cause.message_id = "not-a-uuid".to_owned();
        cause.timestamp = u64::MAX;
        let derived =
            Uuid::parse_str(&derive_caused_message_id(&cause, "order.info-generated")).unwrap();
        let (secs, _) = derived.get_timestamp().unwrap().to_unix();
        assert_eq!(secs, MAX_V7_MILLIS / 1000);
    }

    #[test]
    fn envelope_survives_amqp_properties() {
        let cause = Envelope::new("order.started", "o-1");
        let envelope = Envelope::caused_by("order.info-generated", "o-1", &cause);
        let properties = envelope.to_properties(FieldTable::default()).unwrap();
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let back =
            Envelope::from_properties(&properties, "order.info-generated", b"{}", Some("o-1"));
        assert_eq!(back, envelope);
        assert_eq!(
            back.causation_id.as_deref(),
            Some(cause.message_id.as_str())
        );
        // Same trace, new span.
        assert_eq!(
            back.traceparent.split('-').nth(1),
            cause.traceparent.split('-').nth(1)
        );
        assert_ne!(back.traceparent, cause.traceparent);
        assert_eq!(
            Uuid::parse_str(&back.message_id).unwrap().get_version_num(),
            7
        );
    }

    #[test]
    fn derived_ids_are_deterministic_v7_and_distinct_per_event() {
        let cause = Envelope::new("order.started", "o-1");
        let a = derive_caused_message_id(&cause, "order.info-generated");
        assert_eq!(a, derive_caused_message_id(&cause, "order.info-generated"));
        assert_ne!(a, derive_caused_message_id(&cause, "order.cancelled"));
        let id = Uuid::parse_str(&a).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(
            id.get_timestamp().unwrap().to_unix().0,
            Uuid::parse_str(&cause.message_id)
                .unwrap()
                .get_timestamp()
                .unwrap()
                .to_unix()
                .0
        );
    }

    #[test]
    fn a_bare_message_gets_a_deterministic_envelope() {
        let body = br#"{"supplier":"s","products":[],"address":"a"}"#;
        let bare = BasicProperties::default();
        let first = Envelope::from_properties(&bare, "order.started", body, None);
        let again = Envelope::from_properties(&bare, "order.started", body, None);
        assert_eq!(first.message_id, again.message_id);
        assert_eq!(first.correlation_id, again.correlation_id);
        assert_eq!(first.correlation_id, derive_order_id(body));
        let other = Envelope::from_properties(&bare, "order.started", b"{}", None);
        assert_ne!(first.message_id, other.message_id);
        assert_eq!(first.kind, "order.started");
    }
}
