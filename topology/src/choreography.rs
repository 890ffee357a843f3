//! The choreography as data, and its lint: who outside the services
//! publishes events (clients), which saga steps wait on something outside
//! orderflow, which timer covers each wait and which event compensates when
//! it fires. [`lint`] checks the services' model ([`ServiceSpec`]: what each
//! consumes and publishes) against it:
//!
//! - every routing key a service or a client publishes is consumed by some
//!   service (an event nobody reads is a step that silently goes nowhere);
//! - every routing key (topic pattern) a service consumes is published by
//!   some service or client (a binding nobody feeds is a step that never
//!   starts);
//! - every wait has a timer, whose event its owner publishes, and a
//!   compensation that the timer's event leads to through the services
//!   (a wait without them is a saga that can hang forever, or end without
//!   undoing what it did).
//!
//! `orderflow topology lint` prints the findings and the console's
//! choreography page shows them.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::ServiceSpec;

/// Someone outside the services who publishes events: the customer through
/// the API's clients, an operator in the RabbitMQ UI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientSpec {
    pub name: String,
    pub publishes: Vec<String>,
}

/// The timer that covers a wait: its name (the `step` of `saga.timed-out`),
/// the service that keeps it and the event it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimerSpec {
    pub name: String,
    pub owner: String,
    pub fires: String,
}

/// A saga step that waits on something outside orderflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaitSpec {
    /// The step, as the coordinator names it (`payment`, `paying`, …).
    pub step: String,
    /// What is waited on, in words (the customer, the payment gateway).
    pub waits_on: String,
    /// Events that open the wait.
    pub opened_by: Vec<String>,
    /// Events that end it as it should.
    pub closed_by: Vec<String>,
    /// The timer that ends it when the outside never answers.
    pub timer: Option<TimerSpec>,
    /// The event that undoes or closes the saga once the timer fired.
    pub compensation: Option<String>,
}

/// The parts of the choreography the services' model does not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choreography {
    pub clients: Vec<ClientSpec>,
    pub waits: Vec<WaitSpec>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|&item| item.to_owned()).collect()
}

/// A timer of the coordinator, firing `saga.timed-out`.
fn timer(name: &str) -> TimerSpec {
    TimerSpec {
        name: name.to_owned(),
        owner: "saga-coordinator".to_owned(),
        fires: "saga.timed-out".to_owned(),
    }
}

/// The choreography of orderflow for the configured payment methods: the
/// clients (the API's customers submit payments through `order-api`, which
/// is a service; an order may also be started by anyone allowed to publish
/// `order.started`, as the RabbitMQ UI does), and the three timed waits of
/// docs/design.md §3.4.
pub fn orderflow_choreography<S: AsRef<str>>(payment_methods: &[S]) -> Choreography {
    let selected: Vec<String> = payment_methods
        .iter()
        .map(|m| format!("payment.selected.{}", m.as_ref()))
        .collect();
    Choreography {
        clients: vec![ClientSpec {
            name: "client (CLI, RabbitMQ UI)".to_owned(),
            publishes: strings(&["order.started"]),
        }],
        waits: vec![
            WaitSpec {
                step: "generate-info".to_owned(),
                waits_on: "pricing (the catalogue and the merchant)".to_owned(),
                opened_by: strings(&["order.started"]),
                closed_by: strings(&["order.info-generated", "order.info-rejected"]),
                timer: Some(timer("generate-info")),
                compensation: Some("order.cancelled".to_owned()),
            },
            WaitSpec {
                step: "payment".to_owned(),
                waits_on: "the customer (a payment with the token)".to_owned(),
                opened_by: strings(&["payment.awaiting"]),
                closed_by: strings(&["payment.submitted"]),
                timer: Some(timer("payment")),
                compensation: Some("order.cancelled".to_owned()),
            },
            WaitSpec {
                step: "paying".to_owned(),
                waits_on: "the payment gateway".to_owned(),
                opened_by: selected,
                closed_by: strings(&["payment.captured", "payment.failed"]),
                timer: Some(timer("flow")),
                compensation: Some("payment.refunded".to_owned()),
            },
        ],
    }
}

/// What is wrong with a choreography.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// A routing key is published and no service consumes it.
    Unconsumed,
    /// A service consumes a routing key nobody publishes.
    Unpublished,
    /// A wait has no timer.
    WaitWithoutTimer,
    /// A wait's timer event is not published by the timer's owner.
    TimerNotPublished,
    /// A wait has no compensation.
    WaitWithoutCompensation,
    /// The compensation cannot follow from the timer's event.
    CompensationUnreachable,
}

/// One finding: its kind, what it is about, and a sentence that says what
/// to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub subject: String,
    pub message: String,
}

/// Whether the topic pattern `pattern` (`*` one word, `#` zero or more)
/// matches the routing key `key`.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn words(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => {
                words(rest, key)
                    || key
                        .split_first()
                        .is_some_and(|(_, tail)| words(pattern, tail))
            }
            (Some((&"*", rest)), Some((_, tail))) => words(rest, tail),
            (Some((word, rest)), Some((first, tail))) => word == first && words(rest, tail),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    words(&pattern, &key)
}

/// Every finding on `services` with `choreography`, in a stable order:
/// unconsumed keys, unpublished keys, then the waits in order.
pub fn lint(services: &[ServiceSpec], choreography: &Choreography) -> Vec<Finding> {
    let mut findings = Vec::new();
    // Every published key, with who publishes it.
    let mut published: Vec<(String, Vec<String>)> = Vec::new();
    let publishers = services
        .iter()
        .map(|s| (&s.name, &s.publishes))
        .chain(choreography.clients.iter().map(|c| (&c.name, &c.publishes)));
    for (name, keys) in publishers {
        for key in keys {
            match published.iter_mut().find(|(k, _)| k == key) {
                Some((_, names)) => names.push(name.clone()),
                None => published.push((key.clone(), vec![name.clone()])),
            }
        }
    }
    for (key, by) in &published {
        let consumed = services
            .iter()
            .any(|s| s.routing_keys.iter().any(|p| topic_matches(p, key)));
        if !consumed {
            findings.push(Finding {
                kind: FindingKind::Unconsumed,
                subject: key.clone(),
                message: format!(
                    "{key} is published by {} but no service consumes it: bind a service's queue \
                     to it, or stop publishing it",
                    by.join(", ")
                ),
            });
        }
    }
    for service in services {
        for pattern in &service.routing_keys {
            if !published.iter().any(|(key, _)| topic_matches(pattern, key)) {
                findings.push(Finding {
                    kind: FindingKind::Unpublished,
                    subject: pattern.clone(),
                    message: format!(
                        "{} consumes {pattern}, which no service publishes and no client is \
                         declared to publish: add its publisher to the model, or remove the \
                         binding",
                        service.name
                    ),
                });
            }
        }
    }
    for wait in &choreography.waits {
        lint_wait(services, wait, &mut findings);
    }
    findings
}

fn lint_wait(services: &[ServiceSpec], wait: &WaitSpec, findings: &mut Vec<Finding>) {
    let step = &wait.step;
    let Some(timer) = &wait.timer else {
        findings.push(Finding {
            kind: FindingKind::WaitWithoutTimer,
            subject: step.clone(),
            message: format!(
                "step {step} waits on {} with no timer: if it never answers, the saga waits \
                 forever; give the wait a timer",
                wait.waits_on
            ),
        });
        return;
    };
    let fired = services
        .iter()
        .any(|s| s.name == timer.owner && s.publishes.contains(&timer.fires));
    if !fired {
        findings.push(Finding {
            kind: FindingKind::TimerNotPublished,
            subject: step.clone(),
            message: format!(
                "the {} timer of step {step} fires {}, which its owner {} does not publish",
                timer.name, timer.fires, timer.owner
            ),
        });
    }
    let Some(compensation) = &wait.compensation else {
        findings.push(Finding {
            kind: FindingKind::WaitWithoutCompensation,
            subject: step.clone(),
            message: format!(
                "step {step} has a timer but no compensation: when {} fires, nothing undoes or \
                 closes the saga; name the event that does",
                timer.fires
            ),
        });
        return;
    };
    if !reachable(services, &timer.fires).contains(compensation) {
        findings.push(Finding {
            kind: FindingKind::CompensationUnreachable,
            subject: step.clone(),
            message: format!(
                "step {step}: {compensation} does not follow from {} through any service; the \
                 compensation never happens",
                timer.fires
            ),
        });
    }
}

/// Every routing key that can follow from `start`: the keys published by
/// the services that consume a key already reached, to a fixpoint.
fn reachable(services: &[ServiceSpec], start: &str) -> BTreeSet<String> {
    let mut reached = BTreeSet::from([start.to_owned()]);
    loop {
        let mut more = Vec::new();
        for service in services {
            let triggered = service
                .routing_keys
                .iter()
                .any(|p| reached.iter().any(|key| topic_matches(p, key)));
            if triggered {
                more.extend(
                    service
                        .publishes
                        .iter()
                        .filter(|key| !reached.contains(*key))
                        .cloned(),
                );
            }
        }
        if more.is_empty() {
            return reached;
        }
        reached.extend(more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orderflow_services;

    const METHODS: [&str; 2] = ["zhifubao", "weixin"];

    #[test]
    fn topic_patterns_match_as_the_broker_does() {
        assert!(topic_matches(
            "payment.selected.*",
            "payment.selected.weixin"
        ));
        assert!(!topic_matches("payment.selected.*", "payment.selected"));
        assert!(!topic_matches("payment.selected.*", "payment.selected.a.b"));
        assert!(topic_matches("#", "order.started"));
        assert!(topic_matches("order.#", "order"));
        assert!(topic_matches("order.#", "order.a.b"));
        assert!(topic_matches("*.started", "order.started"));
        assert!(!topic_matches("order.started", "order.completed"));
    }

    #[test]
    fn the_model_of_orderflow_has_no_finding() {
        let findings = lint(
            &orderflow_services(&METHODS),
            &orderflow_choreography(&METHODS),
        );
        assert_eq!(findings, []);
    }

    #[test]
    fn an_event_nobody_consumes_is_found() {
        let mut services = orderflow_services(&METHODS);
        services[1].publishes.push("order.shipped".to_owned());
        let findings = lint(&services, &orderflow_choreography(&METHODS));
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].kind, FindingKind::Unconsumed);
        assert_eq!(findings[0].subject, "order.shipped");
        assert!(
            findings[0].message.contains("generate-info"),
            "{}",
            findings[0].message
        );
    }

    #[test]
    fn a_binding_nobody_feeds_is_found() {
        let mut services = orderflow_services(&METHODS);
        services.push(ServiceSpec::new("audit", &["inventory.*"]));
        let findings = lint(&services, &orderflow_choreography(&METHODS));
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].kind, FindingKind::Unpublished);
        assert!(
            findings[0]
                .message
                .starts_with("audit consumes inventory.*")
        );
        // Declared as published by a client, it is fed.
        let mut choreography = orderflow_choreography(&METHODS);
        choreography.clients.push(ClientSpec {
            name: "warehouse".to_owned(),
            publishes: vec!["inventory.counted".to_owned()],
        });
        assert_eq!(lint(&services, &choreography), []);
    }

    #[test]
    fn a_wait_without_a_timer_or_a_compensation_is_found() {
        let services = orderflow_services(&METHODS);
        let mut choreography = orderflow_choreography(&METHODS);
        choreography.waits[1].timer = None;
        choreography.waits[2].compensation = None;
        let findings = lint(&services, &choreography);
        let kinds: Vec<(FindingKind, &str)> = findings
            .iter()
            .map(|f| (f.kind, f.subject.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (FindingKind::WaitWithoutTimer, "payment"),
                (FindingKind::WaitWithoutCompensation, "paying"),
            ]
        );
    }

    #[test]
    fn a_compensation_no_service_leads_to_and_a_timer_nobody_fires_are_found() {
        let mut services = orderflow_services(&METHODS);
        // Nobody reacts to timeouts any more.
        for service in &mut services {
            service.routing_keys.retain(|k| k != "saga.timed-out");
        }
        let mut choreography = orderflow_choreography(&METHODS);
        if let Some(timer) = choreography.waits[0].timer.as_mut() {
            timer.fires = "saga.expired".to_owned();
        }
        let kinds: Vec<(FindingKind, String)> = lint(&services, &choreography)
            .into_iter()
            .map(|f| (f.kind, f.subject))
            .collect();
        for expected in [
            (FindingKind::Unconsumed, "saga.timed-out"),
            (FindingKind::TimerNotPublished, "generate-info"),
            (FindingKind::CompensationUnreachable, "generate-info"),
            (FindingKind::CompensationUnreachable, "payment"),
            (FindingKind::CompensationUnreachable, "paying"),
        ] {
            assert!(
                kinds.contains(&(expected.0, expected.1.to_owned())),
                "{expected:?} in {kinds:?}"
            );
        }
    }
}
