//! Declares the topology on a live broker, idempotently: the same model declared
//! twice is a no-op, and a queue that exists with other arguments is reported
//! with the queue's name instead of being silently left as it is.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::Topology;
use crate::model::{ArgValue, Arguments};

#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    #[error(
        "declaring {what} `{name}` failed: {cause}; if it exists with other arguments \
         (an older orderflow version), delete it or use another namespace"
    )]
    Declare {
        what: &'static str,
        name: String,
        cause: lapin::Error,
    },
}

pub(crate) fn field_table(arguments: &Arguments) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            ArgValue::Str(v) => AMQPValue::LongString(v.as_str().into()),
            ArgValue::Int(v) => AMQPValue::LongLongInt(*v),
        };
        table.insert(key.as_str().into(), value);
    }
    table
}

/// Declares every exchange, queue and binding of `topology` on `channel`.
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), DeclareError> {
    for exchange in &topology.exchanges {
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| DeclareError::Declare {
                what: "exchange",
                name: exchange.name.clone(),
                cause: source,
            })?;
    }
    for queue in &topology.queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions::durable(),
                field_table(&queue.arguments),
            )
            .await
            .map_err(|source| DeclareError::Declare {
                what: "queue",
                name: queue.name.clone(),
                cause: source,
            })?;
    }
    for binding in &topology.bindings {
        channel
            .queue_bind(
                binding.queue.as_str().into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| DeclareError::Declare {
                what: "binding",
                name: format!("{} -> {}", binding.routing_key, binding.queue),
                cause: source,
            })?;
    }
    tracing::debug!(
        namespace = topology.names.namespace(),
        queues = topology.queues.len(),
        "topology declared"
    );
    Ok(())
}
