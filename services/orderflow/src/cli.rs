//! The command-line interface of `orderflow`: the commands, their arguments and
//! their help texts (clap derive). No behaviour lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::providers::DEFAULT_PROVIDERS_PATH;

/// Where the exported definitions live, relative to the repository root.
pub const DEFAULT_DEFINITIONS_PATH: &str = "topology/definitions.json";

/// orderflow: an order saga run as choreography on RabbitMQ.
#[derive(Debug, Parser)]
#[command(
    name = "orderflow",
    version,
    about = "Operate orderflow, an order saga run as choreography on RabbitMQ",
    long_about = "Operate orderflow, an order saga run as choreography on RabbitMQ.\n\n\
        Small workers each consume a few event topics from the `orderflow.events` \
        exchange and publish their own; this command manages what they share. \
        Paths default to files of the repository, so run it from the repository root.",
    after_help = "Run `orderflow <command> --help` for the details of a command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export, check or draw the RabbitMQ topology (exchanges, queues, bindings)
    #[command(
        subcommand,
        long_about = "Export, check or draw the RabbitMQ topology.\n\n\
            The topology is defined in code (crate orderflow-topology): one topic \
            exchange `orderflow.events`, and per consuming service a quorum queue \
            `orderflow.<service>` bound to the events it reads, a dead-letter queue \
            `orderflow.<service>.dead` and delay queues `orderflow.<service>.retry.<delay>` \
            for retries. There is one payment-provider service per payment method of \
            config/providers.toml. Services declare this topology when they start; the \
            same model is exported to topology/definitions.json, which the broker of \
            docker-compose loads at boot."
    )]
    Topology(TopologyCommand),
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Write the topology as a RabbitMQ definitions file (JSON)
    #[command(
        long_about = "Write the topology as a RabbitMQ definitions file (JSON).\n\n\
        The file lists the vhost, exchanges, queues (with their arguments) and bindings \
        of the model, in the format `rabbitmqctl import_definitions` and the \
        `load_definitions` setting of rabbitmq.conf read. Run it after changing the \
        topology code or config/providers.toml, and commit the result; \
        `orderflow topology lint` checks that the committed file is up to date."
    )]
    Export(ExportArgs),

    /// Check that the committed definitions file matches the model
    #[command(
        long_about = "Check that the committed definitions file matches the model.\n\n\
        Compares the file with what `orderflow topology export` would write (as data: \
        order and formatting do not matter) and lists every exchange, queue or binding \
        that is missing from the file, extra in it, or different.\n\n\
        Exit status: 0 when they match, 1 when they differ, 2 when the check cannot run \
        (unreadable or malformed file)."
    )]
    Lint(LintArgs),

    /// Print a Mermaid flowchart of the topology
    #[command(
        long_about = "Print a Mermaid flowchart of the topology to stdout.\n\n\
        Shows the events exchange, the queue of every service with the routing keys it \
        is bound to, and each service's dead-letter and delay (retry) queues. Paste \
        the output into a ```mermaid block of a Markdown file or into mermaid.live."
    )]
    Diagram(DiagramArgs),
}

/// What the topology model is built from.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Prefix for every exchange and queue name (`<NS>.orderflow.events`).
    ///
    /// Lets parallel test runs share one broker. Empty (the default) gives the names
    /// of the deployment, which is what topology/definitions.json holds.
    #[arg(long, value_name = "NS", default_value = "", value_parser = parse_namespace)]
    pub namespace: String,

    /// The payment providers file: one payment-provider queue per
    /// `[providers.<method>]` table, in file order.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PROVIDERS_PATH)]
    pub providers: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Where to write the definitions; `-` writes to stdout.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DEFINITIONS_PATH)]
    pub out: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct LintArgs {
    /// The definitions file to check.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DEFINITIONS_PATH)]
    pub file: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct DiagramArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// A namespace becomes the first segment of every name: it cannot hold whitespace
/// and cannot make names start with `amq.`, which RabbitMQ reserves.
fn parse_namespace(value: &str) -> Result<String, String> {
    if value.chars().any(char::is_whitespace) {
        return Err("a namespace cannot contain whitespace".to_owned());
    }
    if value == "amq" || value.starts_with("amq.") {
        return Err("names starting with `amq.` are reserved by RabbitMQ".to_owned());
    }
    if value.starts_with('.') || value.ends_with('.') {
        return Err("a namespace cannot start or end with `.`".to_owned());
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn topology_defaults_point_at_the_repository_files() {
        let cli = Cli::try_parse_from(["orderflow", "topology", "export"]).expect("parses");
        let Command::Topology(TopologyCommand::Export(args)) = cli.command else {
            panic!("expected topology export");
        };
        assert_eq!(args.out, PathBuf::from(DEFAULT_DEFINITIONS_PATH));
        assert_eq!(args.model.providers, PathBuf::from(DEFAULT_PROVIDERS_PATH));
        assert_eq!(args.model.namespace, "");
    }

    #[test]
    fn a_reserved_namespace_is_refused() {
        assert!(
            Cli::try_parse_from(["orderflow", "topology", "diagram", "--namespace", "amq"])
                .is_err()
        );
    }
}
