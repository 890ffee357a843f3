//! The topology model: which exchanges, queues (service, dead-letter, delay)
//! and bindings exist, with their exact arguments, and which routing keys each
//! service consumes and publishes. Pure data, built from the list of services.
//!
//! Per consuming service `<svc>`:
//!
//! - queue `orderflow.<svc>` (quorum), bound to the events it reads on the
//!   topic exchange `orderflow.events`; the broker dead-letters a message
//!   delivered too often to the fanout exchange `orderflow.<svc>.dead`;
//! - queue `orderflow.<svc>.dead` behind the fanout exchange of that name,
//!   where the service (or the broker) parks what cannot be handled;
//! - per delay tier, queue `orderflow.<svc>.retry.<tier>` behind the fanout
//!   exchange of that name, whose messages expire into the fanout exchange
//!   `orderflow.<svc>.redeliver`, bound to the service queue;
//! - queue `orderflow.<svc>.pause` behind the fanout exchange of that name:
//!   it holds a marker message while an operator has paused the service's
//!   consumption (`orderflow pause`), and nothing otherwise.
//!
//! Every hop keeps the routing key the message was first published with (no
//! `x-dead-letter-routing-key` anywhere), so a consumer reads the event type
//! from the delivery itself, never from a header a publisher controls. A
//! service publishes only to the events exchange and to its own delay and
//! dead-letter exchanges; nothing goes through `amq.default`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Names;

/// Delay tiers of a deployment: a transiently failing message waits 1 s, then
/// 10 s, then 60 s before it is tried again, then it is dead-lettered.
pub const DEFAULT_RETRY_TIERS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_mins(1),
];

/// How often the broker delivers one message to a service queue before it
/// dead-letters it by itself (a message that crashes its consumer every time).
pub const DEFAULT_DELIVERY_LIMIT: i64 = 20;

/// A service: its name (queue `orderflow.<name>`), the routing keys (topic
/// patterns) it subscribes to on the events exchange, and the routing keys it
/// may publish there (exact keys; the broker users' topic permissions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub routing_keys: Vec<String>,
    pub publishes: Vec<String>,
}

impl ServiceSpec {
    /// A service that consumes `routing_keys` and publishes nothing.
    pub fn new(name: impl Into<String>, routing_keys: &[&str]) -> Self {
        Self {
            name: name.into(),
            routing_keys: routing_keys.iter().map(|&k| k.to_owned()).collect(),
            publishes: Vec::new(),
        }
    }

    /// The same service, publishing `keys`.
    #[must_use]
    pub fn publishing<S: AsRef<str>>(mut self, keys: &[S]) -> Self {
        self.publishes = keys.iter().map(|k| k.as_ref().to_owned()).collect();
        self
    }
}

/// What the `orders` context publishes: its services share one outbox, and
/// any of their relays may publish any row of it.
const ORDERS_CONTEXT_PUBLISHES: &[&str] = &[
    "order.started",
    "payment.submitted",
    "order.completed",
    "order.cancelled",
];

/// What the `payments` context publishes (every provider shares its outbox).
const PAYMENTS_CONTEXT_PUBLISHES: &[&str] =
    &["payment.captured", "payment.failed", "payment.refunded"];

/// The services of orderflow, the events each one reads and the events it
/// publishes. One payment-provider service exists per configured payment
/// method.
pub fn orderflow_services<S: AsRef<str>>(payment_methods: &[S]) -> Vec<ServiceSpec> {
    let selected: Vec<String> = payment_methods
        .iter()
        .map(|m| format!("payment.selected.{}", m.as_ref()))
        .collect();
    let mut coordinator_publishes = selected.clone();
    coordinator_publishes.extend(
        [
            "payment.rejected",
            "payment.submission-rejected",
            "saga.timed-out",
        ]
        .map(str::to_owned),
    );
    let mut services = vec![
        ServiceSpec::new(
            "order-api",
            &[
                "order.started",
                "order.info-generated",
                "order.info-rejected",
                "payment.awaiting",
                "payment.selected.*",
                "payment.rejected",
                "payment.submission-rejected",
                "payment.captured",
                "payment.refunded",
                "saga.timed-out",
                "order.completed",
                "order.cancelled",
            ],
        )
        .publishing(ORDERS_CONTEXT_PUBLISHES),
        ServiceSpec::new("generate-info", &["order.started"])
            .publishing(&["order.info-generated", "order.info-rejected"]),
        ServiceSpec::new("payment-wait", &["order.info-generated"])
            .publishing(&["payment.awaiting"]),
        // The coordinator keeps every order's execution history: it reads
        // every event but its own, which it records as it sends them.
        ServiceSpec::new(
            "saga-coordinator",
            &[
                "order.started",
                "order.info-generated",
                "order.info-rejected",
                "payment.awaiting",
                "payment.submitted",
                "payment.captured",
                "payment.failed",
                "payment.refunded",
                "order.completed",
                "order.cancelled",
            ],
        )
        .publishing(&coordinator_publishes),
        ServiceSpec::new("order-completed", &["payment.captured"])
            .publishing(ORDERS_CONTEXT_PUBLISHES),
        ServiceSpec::new(
            "order-cancelled",
            &[
                "order.info-rejected",
                "payment.rejected",
                "payment.failed",
                "saga.timed-out",
            ],
        )
        .publishing(ORDERS_CONTEXT_PUBLISHES),
    ];
    for (method, selected) in payment_methods.iter().zip(&selected) {
        services.push(
            ServiceSpec::new(format!("payment-provider-{}", method.as_ref()), &[])
                .publishing(PAYMENTS_CONTEXT_PUBLISHES),
        );
        if let Some(provider) = services.last_mut() {
            provider.routing_keys = vec![selected.clone(), "order.cancelled".to_owned()];
        }
    }
    services
}

/// A queue or exchange argument value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgValue {
    Str(String),
    Int(i64),
}

pub type Arguments = BTreeMap<String, ArgValue>;

/// What an exchange is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeRole {
    /// The topic exchange every event is published to.
    Events,
    /// Leads back into a service's queue (expired delays, replayed dead letters).
    Redeliver,
    /// Leads into a service's dead-letter queue.
    DeadLetter,
    /// Leads into one of a service's delay queues.
    Delay(Duration),
    /// Leads into a service's pause queue (operators only).
    Pause,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub name: String,
    /// `topic` or `fanout`.
    pub kind: &'static str,
    pub role: ExchangeRole,
    /// The service a per-service exchange belongs to (`None` for the events exchange).
    pub service: Option<String>,
}

/// What a queue is for; the consumer runtime and the `dlq` commands look queues
/// up by role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueRole {
    Service,
    DeadLetter,
    Delay(Duration),
    /// Holds a marker while an operator has paused the service.
    Pause,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    pub name: String,
    pub service: String,
    pub role: QueueRole,
    pub arguments: Arguments,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub exchange: String,
    pub queue: String,
    /// A topic pattern on the events exchange; empty on a fanout exchange.
    pub routing_key: String,
}

/// Everything orderflow declares on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub names: Names,
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
    pub retry_tiers: Vec<Duration>,
    /// The services, as given to [`build`](Self::build).
    pub services: Vec<ServiceSpec>,
}

/// A fanout exchange of `service` with its binding to `queue`.
fn fanout(
    exchanges: &mut Vec<Exchange>,
    bindings: &mut Vec<Binding>,
    name: &str,
    role: ExchangeRole,
    service: &str,
    queue: &str,
) {
    exchanges.push(Exchange {
        name: name.to_owned(),
        kind: "fanout",
        role,
        service: Some(service.to_owned()),
    });
    bindings.push(Binding {
        exchange: name.to_owned(),
        queue: queue.to_owned(),
        routing_key: String::new(),
    });
}

fn s(value: impl Into<String>) -> ArgValue {
    ArgValue::Str(value.into())
}

/// Quorum queue whose dead letters go, at least once and with their routing
/// key unchanged, to the exchange `target`.
fn quorum_dead_lettering_to(target: &str) -> Arguments {
    Arguments::from([
        ("x-queue-type".to_owned(), s("quorum")),
        ("x-dead-letter-exchange".to_owned(), s(target)),
        ("x-dead-letter-strategy".to_owned(), s("at-least-once")),
        // at-least-once dead-lettering requires reject-publish overflow.
        ("x-overflow".to_owned(), s("reject-publish")),
    ])
}

impl Topology {
    /// The topology for `services`, with `retry_tiers` delay queues per service.
    pub fn build(names: Names, services: &[ServiceSpec], retry_tiers: &[Duration]) -> Self {
        let events = names.events_exchange();
        let mut exchanges = vec![Exchange {
            name: events.clone(),
            kind: "topic",
            role: ExchangeRole::Events,
            service: None,
        }];
        let mut queues = Vec::new();
        let mut bindings = Vec::new();
        for service in services {
            let name = service.name.as_str();
            let queue = names.service_queue(name);
            let dead = names.dead_letter_queue(name);
            let redeliver = names.redeliver_exchange(name);
            let mut arguments = quorum_dead_lettering_to(&dead);
            arguments.insert(
                "x-delivery-limit".to_owned(),
                ArgValue::Int(DEFAULT_DELIVERY_LIMIT),
            );
            queues.push(Queue {
                name: queue.clone(),
                service: name.to_owned(),
                role: QueueRole::Service,
                arguments,
            });
            queues.push(Queue {
                name: dead.clone(),
                service: name.to_owned(),
                role: QueueRole::DeadLetter,
                arguments: Arguments::from([("x-queue-type".to_owned(), s("quorum"))]),
            });
            fanout(
                &mut exchanges,
                &mut bindings,
                &dead,
                ExchangeRole::DeadLetter,
                name,
                &dead,
            );
            fanout(
                &mut exchanges,
                &mut bindings,
                &redeliver,
                ExchangeRole::Redeliver,
                name,
                &queue,
            );
            let pause = names.pause_queue(name);
            queues.push(Queue {
                name: pause.clone(),
                service: name.to_owned(),
                role: QueueRole::Pause,
                arguments: Arguments::from([("x-queue-type".to_owned(), s("quorum"))]),
            });
            fanout(
                &mut exchanges,
                &mut bindings,
                &pause,
                ExchangeRole::Pause,
                name,
                &pause,
            );
            for &delay in retry_tiers {
                let delay_queue = names.delay_queue(name, delay);
                let mut arguments = quorum_dead_lettering_to(&redeliver);
                arguments.insert(
                    "x-message-ttl".to_owned(),
                    ArgValue::Int(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                );
                queues.push(Queue {
                    name: delay_queue.clone(),
                    service: name.to_owned(),
                    role: QueueRole::Delay(delay),
                    arguments,
                });
                fanout(
                    &mut exchanges,
                    &mut bindings,
                    &delay_queue,
                    ExchangeRole::Delay(delay),
                    name,
                    &delay_queue,
                );
            }
            for routing_key in &service.routing_keys {
                bindings.push(Binding {
                    exchange: events.clone(),
                    queue: queue.clone(),
                    routing_key: routing_key.clone(),
                });
            }
        }
        Self {
            exchanges,
            names,
            queues,
            bindings,
            retry_tiers: retry_tiers.to_vec(),
            services: services.to_vec(),
        }
    }

    /// The queue of `service` with the given role, if the service is part of
    /// this topology.
    pub fn queue(&self, service: &str, role: &QueueRole) -> Option<&Queue> {
        self.queues
            .iter()
            .find(|q| q.service == service && &q.role == role)
    }

    /// The exchange of `service` with the given role (`service` is ignored
    /// for the events exchange).
    pub fn exchange(&self, service: &str, role: ExchangeRole) -> Option<&Exchange> {
        self.exchanges.iter().find(|e| {
            e.role == role
                && (role == ExchangeRole::Events || e.service.as_deref() == Some(service))
        })
    }

    /// Names of the consuming services, in declaration order.
    pub fn services(&self) -> Vec<&str> {
        self.queues
            .iter()
            .filter(|q| q.role == QueueRole::Service)
            .map(|q| q.service.as_str())
            .collect()
    }

    /// The bindings of `service`'s queue on the events exchange.
    pub fn event_bindings(&self, service: &str) -> impl Iterator<Item = &Binding> {
        let queue = self.names.service_queue(service);
        let events = self.names.events_exchange();
        self.bindings
            .iter()
            .filter(move |b| b.queue == queue && b.exchange == events)
    }
}

#[cfg(test)]
impl Topology {
    /// The deployment's topology in `namespace` with one payment `method`,
    /// for the crate's tests.
    pub(crate) fn with_one_method(namespace: &str, method: &str) -> Self {
        Self::build(
            Names::new(namespace),
            &orderflow_services(&[method]),
            &DEFAULT_RETRY_TIERS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::with_one_method("ns", "zhifubao")
    }

    #[test]
    fn every_service_gets_a_queue_a_dead_letter_queue_and_its_delay_tiers() {
        let topology = topology();
        let services = topology.services();
        assert!(services.contains(&"payment-provider-zhifubao"));
        for service in services {
            assert!(topology.queue(service, &QueueRole::DeadLetter).is_some());
            let redeliver = topology.exchange(service, ExchangeRole::Redeliver).unwrap();
            assert!(
                topology
                    .bindings
                    .iter()
                    .any(|b| b.exchange == redeliver.name
                        && b.queue == format!("ns.orderflow.{service}"))
            );
            for tier in DEFAULT_RETRY_TIERS {
                let delay = topology.queue(service, &QueueRole::Delay(tier)).unwrap();
                assert_eq!(
                    delay.arguments["x-dead-letter-exchange"],
                    ArgValue::Str(format!("ns.orderflow.{service}.redeliver"))
                );
                let into_delay = topology
                    .exchange(service, ExchangeRole::Delay(tier))
                    .unwrap();
                assert_eq!(into_delay.name, delay.name);
                assert_eq!(into_delay.kind, "fanout");
            }
        }
        assert!(
            topology
                .bindings
                .iter()
                .any(|b| b.queue == "ns.orderflow.payment-provider-zhifubao"
                    && b.routing_key == "payment.selected.zhifubao")
        );
    }

    #[test]
    fn no_hop_rewrites_the_routing_key_or_goes_through_the_default_exchange() {
        let topology = topology();
        for queue in &topology.queues {
            assert!(
                !queue.arguments.contains_key("x-dead-letter-routing-key"),
                "{}",
                queue.name
            );
            if let Some(ArgValue::Str(target)) = queue.arguments.get("x-dead-letter-exchange") {
                assert!(
                    topology.exchanges.iter().any(|e| &e.name == target),
                    "{} dead-letters to {target}, which is not declared",
                    queue.name
                );
            }
        }
    }

    #[test]
    fn each_routing_key_is_published_by_the_services_that_own_it() {
        let services = orderflow_services(&["weixin"]);
        let publishers = |key: &str| -> Vec<&str> {
            services
                .iter()
                .filter(|s| s.publishes.iter().any(|k| k == key))
                .map(|s| s.name.as_str())
                .collect()
        };
        assert_eq!(publishers("payment.selected.weixin"), ["saga-coordinator"]);
        assert_eq!(publishers("payment.captured"), ["payment-provider-weixin"]);
        assert_eq!(
            publishers("order.completed"),
            ["order-api", "order-completed", "order-cancelled"]
        );
    }
}
