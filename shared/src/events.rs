//! Typed events of the catalogue (docs/design.md §2). Decoding never panics: bad
//! JSON, an unknown event type or a body that does not fit the schema is a
//! [`DecodeError`], which the consumer runtime treats as permanent.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One product line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductLine {
    pub sku: String,
    pub quantity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStarted {
    pub order_id: String,
    pub supplier: String,
    pub products: Vec<ProductLine>,
    pub address: String,
}

impl OrderStarted {
    /// A digest of what the order is (supplier, products, address), not of
    /// how it was sent: the same order published twice has the same digest,
    /// and an order is priced from one content only.
    pub fn content_digest(&self) -> String {
        let content = serde_json::json!([self.supplier, self.products, self.address]);
        crate::token::hex_sha256(content.to_string().as_bytes())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoGenerated {
    pub order_id: String,
    pub supplier: String,
    pub payment_methods: Vec<String>,
    pub amount_cents: i64,
}

/// generate-info could not price the order (unknown sku, empty order): the
/// order is cancelled with this reason instead of waiting for a timeout.
/// Not in the demo the saga re-creates (docs/design.md §2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoRejected {
    pub order_id: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAwaiting {
    pub order_id: String,
    pub token: String,
    pub payment_methods: Vec<String>,
    pub amount_cents: i64,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSubmitted {
    pub order_id: String,
    pub token: String,
    pub method: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSelected {
    pub order_id: String,
    pub method: String,
    pub amount_cents: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRejected {
    pub order_id: String,
    pub method: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionRejected {
    pub order_id: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub provider: String,
    pub charged_cents: i64,
    pub capture_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub order_id: String,
    pub provider: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: String,
    pub provider: String,
    pub refunded_cents: i64,
}

crate::text_enum! {
    /// A saga step with a timer: the step whose timer fired in
    /// `saga.timed-out`, and the `step` of the coordinator's timers table
    /// (`generate-info`, `payment` or `flow`).
    pub enum Step {
        GenerateInfo,
        Payment,
        Flow,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaTimedOut {
    pub order_id: String,
    pub step: Step,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCompleted {
    pub order_id: String,
    pub method: String,
    pub charged_cents: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
}

/// Every event of the catalogue. The routing key is the event name, except
/// `payment.selected.<method>`, which carries the method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    OrderStarted(OrderStarted),
    InfoGenerated(InfoGenerated),
    InfoRejected(InfoRejected),
    PaymentAwaiting(PaymentAwaiting),
    PaymentSubmitted(PaymentSubmitted),
    PaymentSelected(PaymentSelected),
    PaymentRejected(PaymentRejected),
    SubmissionRejected(SubmissionRejected),
    PaymentCaptured(PaymentCaptured),
    PaymentFailed(PaymentFailed),
    PaymentRefunded(PaymentRefunded),
    SagaTimedOut(SagaTimedOut),
    OrderCompleted(OrderCompleted),
    OrderCancelled(OrderCancelled),
}

/// Why a message could not be turned into an [`Event`]. Always permanent:
/// delivering the same bytes again cannot help.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object")]
    NotAnObject,
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("body does not fit `{kind}`: {detail}")]
    Schema { kind: String, detail: String },
}

const SELECTED_PREFIX: &str = "payment.selected.";

/// Most characters of a decoding error's detail: serde quotes the offending
/// value, which may be a megabyte long, and the detail becomes a dead
/// letter's reason header.
const MAX_DETAIL_CHARS: usize = 500;

macro_rules! decode_as {
    ($variant:ident, $kind:expr, $value:expr) => {
        serde_json::from_value($value)
            .map(Event::$variant)
            .map_err(|e| DecodeError::Schema {
                kind: $kind.to_owned(),
                detail: crate::envelope::abbreviate(&e.to_string(), MAX_DETAIL_CHARS),
            })
    };
}

impl Event {
    /// The routing key (= AMQP `type`) this event is published with.
    pub fn routing_key(&self) -> String {
        match self {
            Self::PaymentSelected(e) => format!("{SELECTED_PREFIX}{}", e.method),
            other => other.fixed_kind().to_owned(),
        }
    }

    fn fixed_kind(&self) -> &'static str {
        match self {
            Self::OrderStarted(_) => "order.started",
            Self::InfoGenerated(_) => "order.info-generated",
            Self::InfoRejected(_) => "order.info-rejected",
            Self::PaymentAwaiting(_) => "payment.awaiting",
            Self::PaymentSubmitted(_) => "payment.submitted",
            Self::PaymentSelected(_) => "payment.selected",
            Self::PaymentRejected(_) => "payment.rejected",
            Self::SubmissionRejected(_) => "payment.submission-rejected",
            Self::PaymentCaptured(_) => "payment.captured",
            Self::PaymentFailed(_) => "payment.failed",
            Self::PaymentRefunded(_) => "payment.refunded",
            Self::SagaTimedOut(_) => "saga.timed-out",
            Self::OrderCompleted(_) => "order.completed",
            Self::OrderCancelled(_) => "order.cancelled",
        }
    }

    /// The order this event belongs to (= `correlation_id`).
    pub fn order_id(&self) -> &str {
        match self {
            Self::OrderStarted(e) => &e.order_id,
            Self::InfoGenerated(e) => &e.order_id,
            Self::InfoRejected(e) => &e.order_id,
            Self::PaymentAwaiting(e) => &e.order_id,
            Self::PaymentSubmitted(e) => &e.order_id,
            Self::PaymentSelected(e) => &e.order_id,
            Self::PaymentRejected(e) => &e.order_id,
            Self::SubmissionRejected(e) => &e.order_id,
            Self::PaymentCaptured(e) => &e.order_id,
            Self::PaymentFailed(e) => &e.order_id,
            Self::PaymentRefunded(e) => &e.order_id,
            Self::SagaTimedOut(e) => &e.order_id,
            Self::OrderCompleted(e) => &e.order_id,
            Self::OrderCancelled(e) => &e.order_id,
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        let result = match self {
            Self::OrderStarted(e) => serde_json::to_vec(e),
            Self::InfoGenerated(e) => serde_json::to_vec(e),
            Self::InfoRejected(e) => serde_json::to_vec(e),
            Self::PaymentAwaiting(e) => serde_json::to_vec(e),
            Self::PaymentSubmitted(e) => serde_json::to_vec(e),
            Self::PaymentSelected(e) => serde_json::to_vec(e),
            Self::PaymentRejected(e) => serde_json::to_vec(e),
            Self::SubmissionRejected(e) => serde_json::to_vec(e),
            Self::PaymentCaptured(e) => serde_json::to_vec(e),
            Self::PaymentFailed(e) => serde_json::to_vec(e),
            Self::PaymentRefunded(e) => serde_json::to_vec(e),
            Self::SagaTimedOut(e) => serde_json::to_vec(e),
            Self::OrderCompleted(e) => serde_json::to_vec(e),
            Self::OrderCancelled(e) => serde_json::to_vec(e),
        };
        // Serialising plain structs of strings and integers cannot fail.
        result.unwrap_or_default()
    }

    /// Decodes a JSON object already parsed from the body (see
    /// [`parse_object`]) as the event named `kind`.
    pub fn from_object(
        kind: &str,
        object: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, DecodeError> {
        let value = serde_json::Value::Object(object);
        match kind {
            "order.started" => decode_as!(OrderStarted, kind, value),
            "order.info-generated" => decode_as!(InfoGenerated, kind, value),
            "order.info-rejected" => decode_as!(InfoRejected, kind, value),
            "payment.awaiting" => decode_as!(PaymentAwaiting, kind, value),
            "payment.submitted" => decode_as!(PaymentSubmitted, kind, value),
            "payment.rejected" => decode_as!(PaymentRejected, kind, value),
            "payment.submission-rejected" => decode_as!(SubmissionRejected, kind, value),
            "payment.captured" => decode_as!(PaymentCaptured, kind, value),
            "payment.failed" => decode_as!(PaymentFailed, kind, value),
            "payment.refunded" => decode_as!(PaymentRefunded, kind, value),
            "saga.timed-out" => decode_as!(SagaTimedOut, kind, value),
            "order.completed" => decode_as!(OrderCompleted, kind, value),
            "order.cancelled" => decode_as!(OrderCancelled, kind, value),
            selected if selected.starts_with(SELECTED_PREFIX) => {
                let event: Self = decode_as!(PaymentSelected, kind, value)?;
                let method = &selected[SELECTED_PREFIX.len()..];
                match &event {
                    Self::PaymentSelected(e) if e.method != method => Err(DecodeError::Schema {
                        kind: kind.to_owned(),
                        detail: format!(
                            "method `{}` in the body differs from `{method}` in the routing key",
                            crate::envelope::abbreviate(&e.method, crate::envelope::ID_CHARS)
                        ),
                    }),
                    _ => Ok(event),
                }
            }
            other => Err(DecodeError::UnknownType(other.to_owned())),
        }
    }
}

/// Parses a message body into a JSON object.
pub fn parse_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, DecodeError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(_) => Err(DecodeError::NotAnObject),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::strategies;

    proptest! {
        /// Any object under any routing key: an event or an error, and an
        /// event decoded so goes back to JSON and decodes to itself.
        #[test]
        fn any_object_decodes_or_is_refused((kind, object) in strategies::keyed_event_object()) {
            if let Ok(event) = Event::from_object(&kind, object) {
                prop_assert_eq!(event.routing_key(), kind.as_str());
                let back = Event::from_object(&kind, parse_object(&event.to_json()).unwrap());
                prop_assert_eq!(back, Ok(event));
            }
        }

        /// Any event, with extreme values and strings of any content, goes
        /// to JSON and back under its routing key.
        #[test]
        fn every_event_round_trips(event in strategies::event()) {
            let back = Event::from_object(&event.routing_key(), parse_object(&event.to_json()).unwrap());
            prop_assert_eq!(back, Ok(event));
        }

        /// Any bytes: parsed or refused.
        #[test]
        fn any_body_parses_or_is_refused(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_object(&body);
        }
    }

    fn decode(kind: &str, body: &str) -> Result<Event, DecodeError> {
        Event::from_object(kind, parse_object(body.as_bytes())?)
    }

    #[test]
    fn every_event_round_trips_through_its_routing_key() {
        let events = vec![
            Event::OrderStarted(OrderStarted {
                order_id: "o1".into(),
                supplier: "haidilao".into(),
                products: vec![ProductLine {
                    sku: "hotpot".into(),
                    quantity: 2,
                }],
                address: "1 Road".into(),
            }),
            Event::PaymentSelected(PaymentSelected {
                order_id: "o1".into(),
                method: "weixin".into(),
                amount_cents: 1200,
            }),
            Event::SagaTimedOut(SagaTimedOut {
                order_id: "o1".into(),
                step: Step::GenerateInfo,
            }),
            Event::OrderCancelled(OrderCancelled {
                order_id: "o1".into(),
                reason: "method not allowed".into(),
            }),
        ];
        for event in events {
            let body = event.to_json();
            let back = decode(&event.routing_key(), std::str::from_utf8(&body).unwrap()).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn timed_out_step_uses_the_design_spelling() {
        let event = decode(
            "saga.timed-out",
            r#"{"order_id":"o","step":"generate-info"}"#,
        )
        .unwrap();
        assert_eq!(
            event,
            Event::SagaTimedOut(SagaTimedOut {
                order_id: "o".into(),
                step: Step::GenerateInfo
            })
        );
    }

    #[test]
    fn a_step_has_one_spelling_in_json_text_and_parse() {
        use strum::VariantArray as _;
        for step in Step::VARIANTS {
            let json = serde_json::to_value(step).unwrap();
            assert_eq!(json, serde_json::Value::from(step.as_str()));
            assert_eq!(step.as_str().parse::<Step>().unwrap(), *step);
            assert_eq!(step.to_string(), step.as_str());
        }
        assert_eq!(Step::GenerateInfo.as_str(), "generate-info");
        assert!("Payment".parse::<Step>().is_err());
        assert!("payment-wait".parse::<Step>().is_err());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert!(matches!(
            decode("order.started", "{not json"),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            decode("order.started", "[1,2]"),
            Err(DecodeError::NotAnObject)
        );
        assert_eq!(
            decode("order.exploded", "{}"),
            Err(DecodeError::UnknownType("order.exploded".into()))
        );
        let err = decode(
            "order.started",
            r#"{"order_id":"o","supplier":"s","products":[{"sku":"a","quantity":-1}],"address":"x"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Schema { .. }), "{err}");
        let err = decode(
            "payment.selected.weixin",
            r#"{"order_id":"o","method":"zhifubao","amount_cents":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
    }

    #[test]
    fn unknown_fields_such_as_a_client_price_are_ignored() {
        let event = decode(
            "order.started",
            r#"{"order_id":"o","supplier":"s","products":[{"sku":"a","quantity":1,"price":1}],"address":"x","amount_cents":1}"#,
        )
        .unwrap();
        assert_eq!(event.order_id(), "o");
    }
}
