//! The `order-api` binary: the HTTP API and the orders read model, until
//! Ctrl-C/SIGTERM. Everything lives in the library.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    orderflow_shared::app::main("order-api", order_api::run).await
}
