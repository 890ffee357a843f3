//! The `order-cancelled` worker binary: configuration from ORDERFLOW_* and the
//! library's `run` until Ctrl-C or SIGTERM.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::app::main("order-cancelled", order_cancelled::run).await
}
