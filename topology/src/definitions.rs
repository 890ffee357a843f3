//! Export of the topology as a RabbitMQ definitions document, the file the
//! broker loads at boot in docker-compose (`topology/definitions.json`).

use serde_json::{Map, Value, json};

use crate::Topology;
use crate::model::{ArgValue, Arguments};

fn arguments_json(arguments: &Arguments) -> Value {
    let map: Map<String, Value> = arguments
        .iter()
        .map(|(key, value)| {
            let value = match value {
                ArgValue::Str(v) => json!(v),
                ArgValue::Int(v) => json!(v),
            };
            (key.clone(), value)
        })
        .collect();
    Value::Object(map)
}

/// The definitions document (exchanges, queues, bindings on vhost `vhost`).
pub fn to_definitions(topology: &Topology, vhost: &str) -> Value {
    // Inside `json!` each list is one expression: an exchange, a queue and
    // a binding object each, as the broker's definitions import reads them.
    json!({
        "vhosts": [{ "name": vhost }],
        "exchanges": topology.exchanges.iter().map(|e| json!({
            "name": e.name, "vhost": vhost, "type": e.kind,
            "durable": true, "auto_delete": false, "internal": false, "arguments": {}
        })).collect::<Vec<Value>>(),
        "queues": topology.queues.iter().map(|q| json!({
            "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
            "arguments": arguments_json(&q.arguments)
        })).collect::<Vec<Value>>(),
        "bindings": topology.bindings.iter().map(|b| json!({
            "source": b.exchange, "vhost": vhost, "destination": b.queue,
            "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}
        })).collect::<Vec<Value>>(),
    })
}
