//! Least-privilege broker permissions per service, derived from the model
//! (who consumes what, who publishes what), as RabbitMQ's regular
//! expressions. A service may
//!
//! - **configure** nothing: the topology is declared by an operator, and a
//!   worker only checks it with passive declarations, which need no right;
//! - **write** (publish) to the events exchange and to its own delay and
//!   dead-letter exchanges, and nowhere else (not `amq.default`, so it cannot
//!   put a message straight into another service's queue);
//! - **read** (consume) its own queue only;
//! - publish on the events exchange only the routing keys it owns (topic
//!   permissions), and bind nothing.

use crate::Topology;
use crate::model::{ExchangeRole, QueueRole};

/// One service's permissions on the deployment's vhost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// The service (and broker user) name.
    pub service: String,
    pub configure: String,
    pub write: String,
    pub read: String,
    /// The routing keys it may publish on the events exchange.
    pub topic_write: String,
    /// The binding keys it may use on the events exchange.
    pub topic_read: String,
}

/// `name` with the metacharacters of a regular expression escaped.
pub fn escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if ".\\^$|?*+()[]{}".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// `^(a|b)$` for exactly the given names; `^$` (nothing) for none.
fn exactly<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let alternatives: Vec<String> = names.into_iter().map(escape).collect();
    if alternatives.is_empty() {
        "^$".to_owned()
    } else {
        format!("^({})$", alternatives.join("|"))
    }
}

/// The permissions of every service of `topology`.
pub fn service_permissions(topology: &Topology) -> Vec<Permissions> {
    topology
        .services
        .iter()
        .map(|spec| {
            let service = spec.name.as_str();
            let writable = topology.exchanges.iter().filter(|e| match e.role {
                ExchangeRole::Events => true,
                ExchangeRole::DeadLetter | ExchangeRole::Delay(_) => {
                    e.service.as_deref() == Some(service)
                }
                ExchangeRole::Redeliver | ExchangeRole::Pause => false,
            });
            Permissions {
                service: service.to_owned(),
                configure: "^$".to_owned(),
                write: exactly(writable.map(|e| e.name.as_str())),
                read: exactly([topology.names.service_queue(service).as_str()]),
                topic_write: exactly(spec.publishes.iter().map(String::as_str)),
                topic_read: "^$".to_owned(),
            }
        })
        .collect()
}

/// The broker user of the operators' console (`ORDERFLOW_OPERATOR_AMQP_URL`
/// of the order API): what replaying dead letters and pausing services
/// needs, and nothing else. It configures nothing; reads (takes from) the
/// dead-letter queues and the pause queues (a resume purges its marker);
/// writes only the redeliver exchanges (a replayed dead letter goes back to
/// its own service) and the pause exchanges; publishes no event.
pub fn console_permissions(topology: &Topology, user: &str) -> Permissions {
    let write = topology
        .exchanges
        .iter()
        .filter(|e| matches!(e.role, ExchangeRole::Redeliver | ExchangeRole::Pause));
    let read = topology
        .queues
        .iter()
        .filter(|q| matches!(q.role, QueueRole::DeadLetter | QueueRole::Pause));
    Permissions {
        service: user.to_owned(),
        configure: "^$".to_owned(),
        write: exactly(write.map(|e| e.name.as_str())),
        read: exactly(read.map(|q| q.name.as_str())),
        topic_write: "^$".to_owned(),
        topic_read: "^$".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_service_writes_only_the_events_exchange_and_its_own_retry_and_dead_exchanges() {
        let topology = Topology::with_one_method("t1", "weixin");
        let all = service_permissions(&topology);
        let wait = all.iter().find(|p| p.service == "payment-wait").unwrap();
        assert_eq!(wait.configure, "^$");
        assert_eq!(wait.read, "^(t1\\.orderflow\\.payment-wait)$");
        assert_eq!(
            wait.write,
            "^(t1\\.orderflow\\.events|t1\\.orderflow\\.payment-wait\\.dead|\
             t1\\.orderflow\\.payment-wait\\.retry\\.1s|t1\\.orderflow\\.payment-wait\\.retry\\.10s|\
             t1\\.orderflow\\.payment-wait\\.retry\\.1m)$"
        );
        assert!(!wait.write.contains("amq"));
        assert_eq!(wait.topic_write, "^(payment\\.awaiting)$");
        assert_eq!(all.len(), topology.services().len());
    }

    #[test]
    fn the_console_replays_and_pauses_and_does_nothing_else() {
        let topology = Topology::with_one_method("t1", "weixin");
        let console = console_permissions(&topology, "console");
        assert_eq!(console.configure, "^$");
        assert_eq!(console.topic_write, "^$");
        assert!(
            console
                .write
                .contains("t1\\.orderflow\\.generate-info\\.redeliver")
        );
        assert!(
            console
                .write
                .contains("t1\\.orderflow\\.generate-info\\.pause")
        );
        assert!(!console.write.contains("events"), "{}", console.write);
        assert!(!console.write.contains(".dead"), "{}", console.write);
        assert!(console.read.contains("t1\\.orderflow\\.order-api\\.dead"));
        assert!(console.read.contains("t1\\.orderflow\\.order-api\\.pause"));
        assert!(
            !console.read.contains("t1\\.orderflow\\.order-api|"),
            "{}",
            console.read
        );
        // A service may neither write nor read its pause marker.
        for service in service_permissions(&topology) {
            assert!(!service.write.contains("pause"), "{}", service.write);
            assert!(!service.read.contains("pause"), "{}", service.read);
        }
    }

    #[test]
    fn escaping_leaves_no_metacharacter_free() {
        assert_eq!(escape("a.b*c"), "a\\.b\\*c");
        assert_eq!(exactly([]), "^$");
    }
}
