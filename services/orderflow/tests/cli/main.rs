//! The command line tests, one binary: each module runs the `orderflow`
//! binary as a user would, against the real RabbitMQ and PostgreSQL.

#![allow(
    clippy::unwrap_used,
    reason = "a test, and the helpers of one, fail loudly on the first surprise"
)]

mod bench_cli;
mod chaos;
mod dlq_cli;
mod least_privilege;
mod pause_cli;
mod provider_crash;
mod saga_cli;
mod support;
mod up_and_order;
