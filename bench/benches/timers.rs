//! `cargo bench -p orderflow-bench --bench timers`: the durable timers'
//! benchmark ([`orderflow_bench::timers`]).

use std::process::ExitCode;

use clap::Parser as _;
use orderflow_bench::timers::{self, Options};

#[tokio::main]
async fn main() -> ExitCode {
    timers::main(Options::parse()).await
}
