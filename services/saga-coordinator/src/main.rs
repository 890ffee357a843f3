//! The `saga-coordinator` worker binary: configuration from ORDERFLOW_* and the
//! library's `run` until Ctrl-C or SIGTERM.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::app::main("saga-coordinator", saga_coordinator::run).await
}
