//! orderflow-shared: the runtime every orderflow worker stands on.
//!
//! A worker is a [`bus::Handler`] run by [`bus::run_consumer`]; a stateful
//! handler opens a [`store::UnitOfWork`] (inbox row + state change + outbox rows
//! in one transaction), and a [`store::Relay`] publishes the outbox with
//! publisher confirms. Everything talks to the real RabbitMQ and PostgreSQL.

mod allocator;
pub mod app;
pub mod bus;
pub mod config;
pub mod envelope;
pub mod events;
pub mod metadata;
pub mod store;
#[cfg(any(test, feature = "proptest"))]
pub mod strategies;
pub mod telemetry;
pub mod token;

pub use orderflow_topology as topology;
pub use tokio_util::sync::CancellationToken as Shutdown;
