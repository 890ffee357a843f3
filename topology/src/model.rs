//! The topology model: which exchanges, queues (service, dead-letter, delay) and
//! bindings exist, with their exact arguments. Pure data, built from the list of
//! consuming services.

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

/// A consuming service: its name (queue `orderflow.<name>`) and the routing keys
/// (topic patterns) it subscribes to on the events exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub routing_keys: Vec<String>,
}

impl ServiceSpec {
    pub fn new(name: impl Into<String>, routing_keys: &[&str]) -> Self {
        Self {
            name: name.into(),
            routing_keys: routing_keys.iter().map(|&k| k.to_owned()).collect(),
        }
    }
}

/// The consuming services of orderflow and the events each one reads (DESIGN.md §2).
/// One payment-provider service exists per configured payment method.
pub fn orderflow_services<S: AsRef<str>>(payment_methods: &[S]) -> Vec<ServiceSpec> {
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
        ),
        ServiceSpec::new("generate-info", &["order.started"]),
        ServiceSpec::new("payment-wait", &["order.info-generated"]),
        // The coordinator keeps every order's execution history, so it reads everything.
        ServiceSpec::new("saga-coordinator", &["#"]),
        ServiceSpec::new("order-completed", &["payment.captured"]),
        ServiceSpec::new(
            "order-cancelled",
            &[
                "order.info-rejected",
                "payment.rejected",
                "payment.failed",
                "saga.timed-out",
            ],
        ),
    ];
    for method in payment_methods {
        let method = method.as_ref();
        services.push(ServiceSpec {
            name: format!("payment-provider-{method}"),
            routing_keys: vec![
                format!("payment.selected.{method}"),
                "order.cancelled".to_owned(),
            ],
        });
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub name: String,
    pub kind: &'static str,
}

/// What a queue is for; the consumer runtime and the `dlq` commands look queues
/// up by role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueRole {
    Service,
    DeadLetter,
    Delay(Duration),
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
}

fn s(value: impl Into<String>) -> ArgValue {
    ArgValue::Str(value.into())
}

/// Quorum queue whose dead letters go, at least once, to `target` through the
/// default exchange.
fn quorum_dead_lettering_to(target: &str) -> Arguments {
    Arguments::from([
        ("x-queue-type".to_owned(), s("quorum")),
        ("x-dead-letter-exchange".to_owned(), s("")),
        ("x-dead-letter-routing-key".to_owned(), s(target)),
        ("x-dead-letter-strategy".to_owned(), s("at-least-once")),
        // at-least-once dead-lettering requires reject-publish overflow.
        ("x-overflow".to_owned(), s("reject-publish")),
    ])
}

impl Topology {
    /// The topology for `services`, with `retry_tiers` delay queues per service.
    pub fn build(names: Names, services: &[ServiceSpec], retry_tiers: &[Duration]) -> Self {
        let exchange = names.events_exchange();
        let mut queues = Vec::new();
        let mut bindings = Vec::new();
        for service in services {
            let queue = names.service_queue(&service.name);
            let dead = names.dead_letter_queue(&service.name);
            let mut arguments = quorum_dead_lettering_to(&dead);
            arguments.insert(
                "x-delivery-limit".to_owned(),
                ArgValue::Int(DEFAULT_DELIVERY_LIMIT),
            );
            queues.push(Queue {
                name: queue.clone(),
                service: service.name.clone(),
                role: QueueRole::Service,
                arguments,
            });
            queues.push(Queue {
                name: dead,
                service: service.name.clone(),
                role: QueueRole::DeadLetter,
                arguments: Arguments::from([("x-queue-type".to_owned(), s("quorum"))]),
            });
            for &delay in retry_tiers {
                let mut arguments = quorum_dead_lettering_to(&queue);
                arguments.insert(
                    "x-message-ttl".to_owned(),
                    ArgValue::Int(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                );
                queues.push(Queue {
                    name: names.delay_queue(&service.name, delay),
                    service: service.name.clone(),
                    role: QueueRole::Delay(delay),
                    arguments,
                });
            }
            for routing_key in &service.routing_keys {
                bindings.push(Binding {
                    exchange: exchange.clone(),
                    queue: queue.clone(),
                    routing_key: routing_key.clone(),
                });
            }
        }
        Self {
            exchanges: vec![Exchange {
                name: exchange,
                kind: "topic",
            }],
            names,
            queues,
            bindings,
            retry_tiers: retry_tiers.to_vec(),
        }
    }

    /// The queue of `service` with the given role, if the service is part of
    /// this topology.
    pub fn queue(&self, service: &str, role: &QueueRole) -> Option<&Queue> {
        self.queues
            .iter()
            .find(|q| q.service == service && &q.role == role)
    }

    /// Names of the consuming services, in declaration order.
    pub fn services(&self) -> Vec<&str> {
        self.queues
            .iter()
            .filter(|q| q.role == QueueRole::Service)
            .map(|q| q.service.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_gets_a_queue_a_dead_letter_queue_and_its_delay_tiers() {
        let topology = Topology::build(
            Names::new("ns"),
            &orderflow_services(&["zhifubao"]),
            &DEFAULT_RETRY_TIERS,
        );
        let services = topology.services();
        assert!(services.contains(&"payment-provider-zhifubao"));
        for service in services {
            assert!(topology.queue(service, &QueueRole::DeadLetter).is_some());
            for tier in DEFAULT_RETRY_TIERS {
                let delay = topology.queue(service, &QueueRole::Delay(tier)).unwrap();
                assert_eq!(
                    delay.arguments["x-dead-letter-routing-key"],
                    ArgValue::Str(format!("ns.orderflow.{service}"))
                );
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
}
