//! Declares the topology on a live broker, idempotently: the same model declared
//! twice is a no-op, and a queue that exists with other arguments is reported
//! with the queue's name instead of being silently left as it is. Declaring is
//! an operator's step (`orderflow topology declare`, `orderflow up`, or the
//! definitions the broker loads at boot); a worker only [`check`]s, passively,
//! that what it uses exists. Also deletes a whole topology (throwaway
//! namespaces: benchmarks, tests).

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::Topology;
use crate::model::{ArgValue, Arguments, QueueRole};

#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    #[error(
        "declaring {what} `{name}` failed: {cause}; if it exists with other arguments \
         (an older orderflow version), delete it or use another namespace"
    )]
    Declare {
        what: &'static str,
        name: String,
        cause: Box<lapin::Error>,
    },
    #[error(
        "{what} `{name}` does not exist on the broker ({cause}); declare the topology first: \
         `orderflow topology declare` (or load topology/definitions.json into the broker), \
         with the same ORDERFLOW_NAMESPACE"
    )]
    Missing {
        what: &'static str,
        name: String,
        cause: Box<lapin::Error>,
    },
    #[error("service `{0}` is not part of the topology; is it listed in orderflow_services()?")]
    UnknownService(String),
    #[error("deleting {what} `{name}` failed: {cause}")]
    Delete {
        what: &'static str,
        name: String,
        cause: Box<lapin::Error>,
    },
}

/// Deletes every queue and exchange of `topology` (with their messages and
/// bindings). Missing ones are fine; the first failure is returned after
/// trying all of them. Only for throwaway namespaces: never point it at a
/// deployment's topology.
pub async fn delete(channel: &Channel, topology: &Topology) -> Result<(), DeclareError> {
    let mut first_error = None;
    for queue in &topology.queues {
        if let Err(cause) = channel
            .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            first_error.get_or_insert(DeclareError::Delete {
                what: "queue",
                name: queue.name.clone(),
                cause: Box::new(cause),
            });
        }
    }
    for exchange in &topology.exchanges {
        if let Err(cause) = channel
            .exchange_delete(
                exchange.name.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
        {
            first_error.get_or_insert(DeclareError::Delete {
                what: "exchange",
                name: exchange.name.clone(),
                cause: Box::new(cause),
            });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Queue or exchange arguments of the model as an AMQP field table.
pub fn field_table(arguments: &Arguments) -> FieldTable {
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
                if exchange.kind == "fanout" {
                    ExchangeKind::Fanout
                } else {
                    ExchangeKind::Topic
                },
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
                cause: Box::new(source),
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
                cause: Box::new(source),
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
                cause: Box::new(source),
            })?;
    }
    tracing::debug!(
        namespace = topology.names.namespace(),
        queues = topology.queues.len(),
        "topology declared"
    );
    Ok(())
}

/// Checks, without changing anything (passive declarations, which need no
/// permission), that what `service` uses exists: the events exchange, its
/// queue, and its delay and dead-letter exchanges. Each passive declaration
/// that fails closes the channel, so this takes a channel it may spend.
/// `queue` as the broker has it (its message and consumer counts), by a
/// passive declaration: it must exist, and no right is needed.
pub async fn inspect_queue(channel: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

pub async fn check(
    channel: &Channel,
    topology: &Topology,
    service: &str,
) -> Result<(), DeclareError> {
    let queue = topology
        .queue(service, &QueueRole::Service)
        .ok_or_else(|| DeclareError::UnknownService(service.to_owned()))?;
    // The pause marker too: the consumer reads its message count (a passive
    // declaration) to know whether an operator paused the service.
    let pause = topology.queue(service, &QueueRole::Pause);
    for queue in std::iter::once(queue).chain(pause) {
        inspect_queue(channel, &queue.name)
            .await
            .map_err(|cause| DeclareError::Missing {
                what: "queue",
                name: queue.name.clone(),
                cause: Box::new(cause),
            })?;
    }
    let used = topology
        .exchanges
        .iter()
        .filter(|e| e.service.is_none() || e.service.as_deref() == Some(service));
    for exchange in used {
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|cause| DeclareError::Missing {
                what: "exchange",
                name: exchange.name.clone(),
                cause: Box::new(cause),
            })?;
    }
    Ok(())
}
