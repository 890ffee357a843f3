//! orderflow-ops: what operators do to a running orderflow, as library
//! functions that the command line (`orderflow dlq`, `orderflow pause`,
//! `orderflow resume`) and the order API's console both call, so that there
//! is one implementation of each:
//!
//! - [`dlq`]: list a service's dead letters with their reasons, and replay
//!   them onto the service's own queue;
//! - [`pause`]: pause and resume a service's consumption (the marker in its
//!   pause queue that every consumer of the service looks at);
//! - [`queues`]: each service queue's depth, consumers and message rates,
//!   from the management HTTP API when it answers, else from passive
//!   declarations.
//!
//! Each takes a [`Broker`](orderflow_shared::bus::Broker) whose user may do
//! the operation (an operator's: `topology users` writes a `console` user
//! with exactly these rights).

pub mod dlq;
mod error;
pub mod pause;
pub mod queues;

pub use error::OpsError;

use orderflow_shared::bus::Broker;
use orderflow_shared::topology::{QueueRole, inspect_queue};

/// The services of `broker`'s topology, or only `service` when given (an
/// unknown one is [`OpsError::UnknownService`]).
pub fn services(broker: &Broker, only: Option<&str>) -> Result<Vec<String>, OpsError> {
    let all: Vec<String> = broker
        .topology()
        .services()
        .into_iter()
        .map(str::to_owned)
        .collect();
    match only {
        None => Ok(all),
        Some(service) if all.iter().any(|s| s == service) => Ok(vec![service.to_owned()]),
        Some(service) => Err(OpsError::UnknownService {
            service: service.to_owned(),
            known: all.join(", "),
        }),
    }
}

/// The name of `service`'s queue of `role`; an unknown service (or one
/// without such a queue) is [`OpsError::UnknownService`].
pub(crate) fn queue_of(
    broker: &Broker,
    service: &str,
    role: &QueueRole,
) -> Result<String, OpsError> {
    services(broker, Some(service))?;
    broker
        .topology()
        .queue(service, role)
        .map(|q| q.name.clone())
        .ok_or_else(|| OpsError::UnknownService {
            service: service.to_owned(),
            known: broker.topology().services().join(", "),
        })
}

/// `queue` as the broker has it (a passive declaration); a queue that does
/// not exist is [`OpsError::MissingQueue`].
pub(crate) async fn inspect(
    channel: &lapin::Channel,
    queue: &str,
) -> Result<lapin::Queue, OpsError> {
    inspect_queue(channel, queue)
        .await
        .map_err(|cause| OpsError::MissingQueue {
            queue: queue.to_owned(),
            cause: Box::new(cause),
        })
}
