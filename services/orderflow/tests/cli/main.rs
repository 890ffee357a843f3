//! The command line tests, one binary: each module runs the `orderflow`
//! binary as a user would, against the real RabbitMQ and PostgreSQL.

mod bench_cli;
mod chaos;
mod dlq_cli;
mod least_privilege;
mod pause_cli;
mod provider_crash;
mod saga_cli;
mod up_and_order;
