//! `orderflow`: the operator command line of orderflow. Thin entry point: parse
//! the arguments, run the command, report errors.

mod cli;
mod db;
mod dlq;
mod order;
mod pause;
mod providers;
mod saga;
mod topology;
mod up;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit status of a command that could not run (clap uses the same for usage
/// errors); 1 is left for "checked, and found a difference" (`topology lint`).
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // `orderflow topology diagram | head`: the reader left, nothing to report.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                // Multi-line causes (a TOML parse error with its snippet) stay indented.
                let cause = cause.to_string();
                eprintln!("  caused by: {}", cause.trim_end().replace('\n', "\n    "));
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Topology(command) => topology::run(command),
        Command::Up(args) => up::run(&args),
        Command::Worker(args) => up::run_one(&args),
        Command::Db(command) => db::run(command),
        Command::Order(command) => block_on(order::run(command))?,
        Command::Saga(command) => block_on(saga::run(command))?,
        Command::Dlq(command) => block_on(dlq::run(command))?,
        Command::Pause(args) => pause::run(&args, true),
        Command::Resume(args) => pause::run(&args, false),
        Command::Bench(args) => block_on(orderflow_bench::saga::run(&args))?,
        Command::Chaos(args) => orderflow_chaos::run(&args),
    }
}

/// Runs the asynchronous part of a command to its end on a runtime of its
/// own (every command that needs one starts it here).
fn block_on<F: std::future::Future>(work: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    Ok(runtime.block_on(work))
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
