//! The system tests, one binary: every module starts the real services against
//! the real RabbitMQ and PostgreSQL, each in its own topology namespace and
//! database (see `orderflow_tests::TestEnv`). One binary links once.

#![allow(
    clippy::unwrap_used,
    reason = "a test, and the helpers of one, fail loudly on the first surprise"
)]

mod batches;
mod broker_connection_loss;
mod broker_failover;
mod console_api;
mod console_browser;
mod database_restart;
mod deployment;
mod envelope_round_trip;
mod graceful_shutdown;
mod history_api;
mod hostile_messages;
mod inbox_outbox;
mod late_payment_step;
mod migrations;
mod money_safety;
mod order_api;
mod pause_resume;
mod publish_and_topology;
mod query_plans;
mod retention;
mod retries_and_dead_letters;
mod saga_coordinator;
mod saga_end_to_end;
mod timers;
