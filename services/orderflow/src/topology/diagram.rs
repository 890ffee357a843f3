//! The topology as a Mermaid flowchart: the events exchange, each service queue
//! with the routing keys it is bound to, and each service's dead-letter, delay
//! and pause queues.

use std::fmt::Write as _;
use std::time::Duration;

use orderflow_topology::{ExchangeRole, QueueRole, Topology};

/// The Mermaid source of `topology` (a `flowchart LR`), ending with a newline.
///
/// Per service, in a subgraph named after it: the service queue, its dead-letter
/// queue (a cylinder) and its delay queues (rounded). Solid edges are broker
/// routing (exchange bindings, expired delays going back to the service queue);
/// dotted edges are where the consumer moves a message it cannot handle now.
pub fn mermaid(topology: &Topology) -> String {
    let mut out = String::from("flowchart LR\n");
    let namespace = topology.names.namespace();
    let _ = writeln!(
        out,
        "    %% orderflow topology{}; regenerate with `orderflow topology diagram`",
        if namespace.is_empty() {
            String::new()
        } else {
            format!(" (namespace {namespace})")
        }
    );
    let mut edges = Vec::new();
    // The per-service fanout exchanges in front of the dead-letter and delay
    // queues are drawn as the edges they stand for.
    let events: Vec<_> = topology
        .exchanges
        .iter()
        .filter(|e| e.role == ExchangeRole::Events)
        .collect();
    for (e, exchange) in events.iter().enumerate() {
        let _ = writeln!(
            out,
            "    x{e}{{{{\"{}<br/>{} exchange\"}}}}",
            escape(&exchange.name),
            escape(exchange.kind)
        );
    }
    for (s, service) in topology.services().into_iter().enumerate() {
        let _ = writeln!(out, "    subgraph s{s} [\"{}\"]", escape(service));
        if let Some(queue) = topology.queue(service, &QueueRole::Service) {
            let _ = writeln!(out, "        s{s}q[\"{}\"]", escape(&queue.name));
            for (e, exchange) in events.iter().enumerate() {
                let keys: Vec<String> = topology
                    .bindings
                    .iter()
                    .filter(|b| b.exchange == exchange.name && b.queue == queue.name)
                    .map(|b| escape(&b.routing_key))
                    .collect();
                if !keys.is_empty() {
                    edges.push(format!("x{e} -->|\"{}\"| s{s}q", keys.join("<br/>")));
                }
            }
        }
        if let Some(dead) = topology.queue(service, &QueueRole::DeadLetter) {
            let _ = writeln!(out, "        s{s}d[(\"{}\")]", escape(&dead.name));
            edges.push(format!("s{s}q -.->|\"dead letter\"| s{s}d"));
        }
        if let Some(pause) = topology.queue(service, &QueueRole::Pause) {
            let _ = writeln!(out, "        s{s}p[/\"{}\"/]", escape(&pause.name));
            edges.push(format!(
                "s{s}p -.-|\"pauses while it holds a marker\"| s{s}q"
            ));
        }
        for (t, &tier) in topology.retry_tiers.iter().enumerate() {
            if let Some(delay) = topology.queue(service, &QueueRole::Delay(tier)) {
                let _ = writeln!(out, "        s{s}r{t}([\"{}\"])", escape(&delay.name));
                let retry = t + 1;
                edges.push(format!("s{s}q -.->|\"retry {retry}\"| s{s}r{t}"));
                edges.push(format!(
                    "s{s}r{t} -->|\"after {}\"| s{s}q",
                    format_delay(tier)
                ));
            }
        }
        out.push_str("    end\n");
    }
    for edge in edges {
        let _ = writeln!(out, "    {edge}");
    }
    out
}

/// Text inside a quoted Mermaid label: `#`, `"`, `<` and `>` as entity codes.
fn escape(text: &str) -> String {
    text.replace('#', "#35;")
        .replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

/// `1 min`, `10 s`, `250 ms`: for people.
fn format_delay(delay: Duration) -> String {
    match orderflow_topology::delay_in_largest_unit(delay) {
        (count, "m") => format!("{count} min"),
        (count, unit) => format!("{count} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use orderflow_topology::{DEFAULT_RETRY_TIERS, Names, orderflow_services};

    use super::*;

    #[test]
    fn every_queue_and_binding_is_drawn() {
        let topology = Topology::build(
            Names::new("t1"),
            &orderflow_services(&["weixin"]),
            &DEFAULT_RETRY_TIERS,
        );
        let diagram = mermaid(&topology);
        assert!(diagram.starts_with("flowchart LR\n"));
        for queue in &topology.queues {
            assert!(
                diagram.contains(&format!("\"{}\"", queue.name)),
                "{}",
                queue.name
            );
        }
        assert!(diagram.contains("-->|\"payment.selected.weixin<br/>order.cancelled\"|"));
        // A binding to everything, `#`, is escaped for Mermaid.
        let everything = mermaid(&Topology::build(
            Names::new("t1"),
            &[orderflow_topology::ServiceSpec::new("audit", &["#"])],
            &DEFAULT_RETRY_TIERS,
        ));
        assert!(everything.contains("-->|\"#35;\"|"), "{everything}");
        assert_eq!(
            diagram.matches("    subgraph ").count(),
            topology.services().len()
        );
    }
}
