//! Messages as handlers see them ([`Message`]: envelope + typed event) and as
//! publishers send them ([`Outgoing`]: routing key + envelope + body).

use lapin::message::Delivery;

use crate::envelope::{Envelope, ID_CHARS, MAX_SHORT_STRING, abbreviate, header_int, headers};
use crate::events::{DecodeError, Event, parse_object};

/// A received message, decoded.
#[derive(Clone, Debug)]
pub struct Message {
    pub envelope: Envelope,
    pub event: Event,
    /// The broker delivered it before (a previous consumer did not ack).
    pub redelivered: bool,
    /// How many delay tiers it went through already.
    pub retries: u32,
}

/// A delivery that could not be decoded, with what is known about it.
#[derive(Debug)]
pub(crate) struct Undecodable {
    pub envelope: Envelope,
    pub error: DecodeError,
}

impl Message {
    /// Decodes a delivery of the queue whose redeliver exchange is
    /// `redeliver_exchange`. The event type is the delivery's routing key:
    /// every hop of the topology (delay queues, redelivery, dead letters)
    /// keeps the key the message was first published with, and no header a
    /// publisher sets can change it. The retry count (a header the runtime
    /// itself writes when it parks a message in a delay queue) counts only
    /// on deliveries that came back through `redeliver_exchange`, which only
    /// the broker (expired delays) and operators (replays) can publish to;
    /// on anything published to the events exchange it is 0.
    ///
    /// Never panics, whatever the delivery holds. An `order_id` longer than
    /// an AMQP short string ([`MAX_SHORT_STRING`] bytes) is a schema error:
    /// the order id travels as the `correlation_id` of every message about
    /// the order, which could not be published (nor this one dead-lettered).
    pub(crate) fn decode(
        delivery: &Delivery,
        redeliver_exchange: &str,
    ) -> Result<Self, Box<Undecodable>> {
        let routing_key = delivery.routing_key.as_str().to_owned();
        let body = &delivery.data;
        let properties = &delivery.properties;
        let retries = if delivery.exchange.as_str() == redeliver_exchange {
            properties
                .headers()
                .as_ref()
                .and_then(|h| header_int(h, headers::RETRIES))
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or(0)
        } else {
            0
        };
        let fail = |envelope, error| Err(Box::new(Undecodable { envelope, error }));
        let mut object = match parse_object(body) {
            Ok(object) => object,
            Err(error) => {
                return fail(
                    Envelope::from_properties(properties, &routing_key, body, None),
                    error,
                );
            }
        };
        let body_order_id = match object.get("order_id") {
            Some(serde_json::Value::String(id)) if id.len() > MAX_SHORT_STRING => {
                return fail(
                    Envelope::from_properties(properties, &routing_key, body, None),
                    DecodeError::Schema {
                        kind: routing_key.clone(),
                        detail: format!(
                            "order_id `{}` is {} bytes long; an order id travels as the AMQP \
                             correlation_id, at most {MAX_SHORT_STRING} bytes",
                            abbreviate(id, ID_CHARS),
                            id.len()
                        ),
                    },
                );
            }
            Some(serde_json::Value::String(id)) if !id.is_empty() => Some(id.clone()),
            Some(serde_json::Value::String(_)) | None => None,
            Some(other) => {
                return fail(
                    Envelope::from_properties(properties, &routing_key, body, None),
                    DecodeError::Schema {
                        kind: routing_key.clone(),
                        detail: format!(
                            "order_id must be a string, found {}",
                            abbreviate(&other.to_string(), ID_CHARS)
                        ),
                    },
                );
            }
        };
        let envelope =
            Envelope::from_properties(properties, &routing_key, body, body_order_id.as_deref());
        if body_order_id.is_none() {
            // No order id in the body: the envelope's (sent or derived) one is the order id.
            object.insert(
                "order_id".to_owned(),
                serde_json::Value::String(envelope.correlation_id.clone()),
            );
        }
        match Event::from_object(&routing_key, object) {
            Ok(event) => Ok(Self {
                envelope,
                event,
                redelivered: delivery.redelivered,
                retries,
            }),
            Err(error) => fail(envelope, error),
        }
    }

    pub fn order_id(&self) -> &str {
        self.event.order_id()
    }
}

/// A message to publish on the events exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub routing_key: String,
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

impl Outgoing {
    /// `event` caused by `cause`, with a `message_id` derived from the cause:
    /// a handler without an inbox (one that only publishes) that handles the
    /// same message twice publishes the same message twice, and downstream
    /// inboxes see the duplicate. Still a UUID v7, timestamped like the cause.
    pub fn derived(event: &Event, cause: &Envelope) -> Self {
        let mut message = Self::event(event, Some(cause));
        message.envelope.message_id =
            crate::envelope::derive_caused_message_id(cause, &message.routing_key);
        message
    }

    /// `event` with a new envelope; caused by `cause` when given.
    pub fn event(event: &Event, cause: Option<&Envelope>) -> Self {
        let routing_key = event.routing_key();
        let envelope = match cause {
            Some(cause) => Envelope::caused_by(&routing_key, event.order_id(), cause),
            None => Envelope::new(&routing_key, event.order_id()),
        };
        Self {
            routing_key,
            envelope,
            body: event.to_json(),
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};
    use proptest::prelude::*;

    use super::*;
    use crate::envelope::{MAX_V7_MILLIS, derive_caused_message_id};
    use crate::strategies;

    const EVENTS: &str = "orderflow.events";
    const REDELIVER: &str = "orderflow.worker.redeliver";

    fn delivery(
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Delivery {
        let mut delivery = Delivery::mock(1, exchange.into(), routing_key.into(), false, body);
        delivery.properties = properties;
        delivery
    }

    /// A routing key, properties, a body and whether it came back through
    /// the redeliver exchange.
    fn any_delivery() -> impl Strategy<Value = (String, BasicProperties, Vec<u8>, bool)> {
        strategies::routing_key().prop_flat_map(|key| {
            let body = strategies::body(&key);
            (Just(key), strategies::properties(), body, any::<bool>())
        })
    }

    proptest! {
        /// Whatever a publisher sends: `decode` returns, and what it returns
        /// (a message, or the envelope of an undecodable one) can be
        /// published and dead-lettered; a derived reply is publishable too.
        #[test]
        fn decoding_never_panics_and_its_result_can_be_published(
            (key, properties, body, redelivered) in any_delivery()
        ) {
            let exchange = if redelivered { REDELIVER } else { EVENTS };
            match Message::decode(&delivery(exchange, &key, properties, body), REDELIVER) {
                Ok(message) => {
                    prop_assert_eq!(&message.envelope.kind, &key);
                    prop_assert_eq!(message.order_id(), message.envelope.correlation_id.as_str());
                    prop_assert!(!message.order_id().is_empty());
                    prop_assert!(message.order_id().len() <= MAX_SHORT_STRING);
                    if !redelivered {
                        prop_assert_eq!(message.retries, 0);
                    }
                    prop_assert!(message.envelope.to_properties(FieldTable::default()).is_ok());
                    let millis = message.envelope.time_millis();
                    let reply = Outgoing::derived(&message.event, &message.envelope);
                    prop_assert!(reply.envelope.to_properties(FieldTable::default()).is_ok());
                    let derived = uuid::Uuid::parse_str(&reply.envelope.message_id).unwrap();
                    prop_assert_eq!(derived.get_version_num(), 7);
                    let (secs, nanos) = derived.get_timestamp().unwrap().to_unix();
                    prop_assert_eq!(
                        secs * 1000 + u64::from(nanos / 1_000_000),
                        millis.min(MAX_V7_MILLIS)
                    );
                }
                Err(undecodable) => {
                    prop_assert!(undecodable.envelope.to_properties(FieldTable::default()).is_ok());
                    prop_assert!(!undecodable.error.to_string().is_empty());
                    let _ = undecodable.envelope.time_millis();
                    let _ = derive_caused_message_id(&undecodable.envelope, &key);
                }
            }
        }

        /// What the runtime publishes decodes to what it sent: the same
        /// event, the same envelope.
        #[test]
        fn a_published_event_decodes_to_itself(event in strategies::event(), retries in 0..5_i64) {
            let outgoing = Outgoing::event(&event, None);
            prop_assume!(!event.order_id().is_empty());
            prop_assume!(event.order_id().len() <= MAX_SHORT_STRING);
            prop_assume!(outgoing.routing_key.len() <= MAX_SHORT_STRING);
            let mut extra = FieldTable::default();
            extra.insert(headers::RETRIES.into(), AMQPValue::LongLongInt(retries));
            let properties = outgoing.envelope.to_properties(extra).unwrap();
            let from_events = delivery(EVENTS, &outgoing.routing_key, properties.clone(), outgoing.body.clone());
            let message = Message::decode(&from_events, REDELIVER).unwrap();
            prop_assert_eq!(&message.event, &event);
            prop_assert_eq!(&message.envelope, &outgoing.envelope);
            prop_assert_eq!(message.retries, 0);
            let replayed = delivery(REDELIVER, &outgoing.routing_key, properties, outgoing.body);
            let message = Message::decode(&replayed, REDELIVER).unwrap();
            prop_assert_eq!(i64::from(message.retries), retries);
        }
    }

    /// An `order.cancelled` for `order_id`, decoded as a consumer does.
    fn cancelled_for(order_id: &str) -> Result<Message, Box<Undecodable>> {
        let body = serde_json::json!({"order_id": order_id, "reason": "r"}).to_string();
        let properties = BasicProperties::default();
        let delivered = delivery(EVENTS, "order.cancelled", properties, body.into_bytes());
        Message::decode(&delivered, REDELIVER)
    }

    #[test]
    fn an_order_id_amqp_cannot_carry_is_a_schema_error_with_a_publishable_envelope() {
        let long = "o".repeat(MAX_SHORT_STRING + 1);
        let Err(undecodable) = cancelled_for(&long) else {
            panic!("a 256-byte order id decoded");
        };
        let text = undecodable.error.to_string();
        assert!(
            text.contains("order_id") && text.contains("256 bytes"),
            "{text}"
        );
        assert!(text.len() < 400, "the reason quotes the whole id: {text}");
        assert!(
            undecodable
                .envelope
                .to_properties(FieldTable::default())
                .is_ok()
        );
        let fits = "o".repeat(MAX_SHORT_STRING);
        let message = cancelled_for(&fits).unwrap();
        assert_eq!(message.order_id(), fits);
    }
}
