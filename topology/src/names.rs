//! Naming of exchanges and queues, with the optional namespace prefix that lets
//! parallel test runs (or several deployments) share one broker.

use std::time::Duration;

/// Builds every broker name used by orderflow. With an empty namespace the names
/// are exactly those of docs/design.md §5 (`orderflow.events`, `orderflow.<service>`);
/// with namespace `t1` they become `t1.orderflow.events`, `t1.orderflow.<service>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn prefixed(&self, name: &str) -> String {
        if self.namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.namespace)
        }
    }

    /// The topic exchange every event is published to; routing key = event name.
    pub fn events_exchange(&self) -> String {
        self.prefixed("orderflow.events")
    }

    /// The quorum queue a consuming service's instances compete on.
    pub fn service_queue(&self, service: &str) -> String {
        self.prefixed(&format!("orderflow.{service}"))
    }

    /// Where a service's messages go when they cannot be handled. The
    /// fanout exchange that leads there has the same name.
    pub fn dead_letter_queue(&self, service: &str) -> String {
        self.prefixed(&format!("orderflow.{service}.dead"))
    }

    /// The fanout exchange that leads back into a service's queue: the
    /// broker dead-letters expired delay-queue messages to it, and operators
    /// replay dead letters through it. No service may publish to it.
    pub fn redeliver_exchange(&self, service: &str) -> String {
        self.prefixed(&format!("orderflow.{service}.redeliver"))
    }

    /// Where an operator's pause of a service is kept: a queue that holds a
    /// marker message while the service is paused (empty otherwise), behind
    /// the fanout exchange of the same name. Its consumers look at its
    /// message count with a passive declaration, which needs no right.
    pub fn pause_queue(&self, service: &str) -> String {
        self.prefixed(&format!("orderflow.{service}.pause"))
    }

    /// A delay queue: messages wait `delay` there, then dead-letter back to the
    /// service queue. The fanout exchange that leads there has the same name.
    pub fn delay_queue(&self, service: &str, delay: Duration) -> String {
        self.prefixed(&format!(
            "orderflow.{service}.retry.{}",
            format_delay(delay)
        ))
    }
}

/// `1s`, `250ms`, `1m`: short, unambiguous and stable, since it is part of a queue name.
fn format_delay(delay: Duration) -> String {
    let (count, unit) = delay_in_largest_unit(delay);
    format!("{count}{unit}")
}

/// `delay` as a whole number of the largest unit that holds it exactly:
/// minutes (`m`), seconds (`s`) or milliseconds (`ms`).
pub fn delay_in_largest_unit(delay: Duration) -> (u128, &'static str) {
    let ms = delay.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        (ms / 60_000, "m")
    } else if ms.is_multiple_of(1000) && ms > 0 {
        (ms / 1000, "s")
    } else {
        (ms, "ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_namespace_gives_the_design_names() {
        let names = Names::default();
        assert_eq!(names.events_exchange(), "orderflow.events");
        assert_eq!(
            names.service_queue("generate-info"),
            "orderflow.generate-info"
        );
        assert_eq!(
            names.dead_letter_queue("generate-info"),
            "orderflow.generate-info.dead"
        );
    }

    #[test]
    fn namespace_prefixes_every_name() {
        let names = Names::new("t42");
        assert_eq!(names.events_exchange(), "t42.orderflow.events");
        assert_eq!(
            names.delay_queue("order-api", Duration::from_millis(1500)),
            "t42.orderflow.order-api.retry.1500ms"
        );
        assert_eq!(
            names.delay_queue("order-api", Duration::from_secs(10)),
            "t42.orderflow.order-api.retry.10s"
        );
        assert_eq!(
            names.delay_queue("order-api", Duration::from_mins(2)),
            "t42.orderflow.order-api.retry.2m"
        );
    }
}
