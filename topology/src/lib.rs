//! The RabbitMQ topology of orderflow as code: every exchange, queue and binding
//! the services need, built from one model so that the broker declaration at
//! start, the exported `definitions.json` and the consumer runtime agree on names
//! and arguments.

mod choreography;
mod declare;
mod definitions;
mod model;
mod names;
mod permissions;

pub use choreography::{
    Choreography, ClientSpec, Finding, FindingKind, TimerSpec, WaitSpec, lint,
    orderflow_choreography, topic_matches,
};
pub use declare::{DeclareError, check, declare, delete, field_table, inspect_queue};
pub use definitions::to_definitions;
pub use model::{
    ArgValue, Arguments, Binding, DEFAULT_DELIVERY_LIMIT, DEFAULT_RETRY_TIERS, Exchange,
    ExchangeRole, Queue, QueueRole, ServiceSpec, Topology, orderflow_services,
};
pub use names::{Names, delay_in_largest_unit};
pub use permissions::{Permissions, console_permissions, escape, service_permissions};
