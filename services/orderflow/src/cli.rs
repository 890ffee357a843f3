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

    /// Run every worker and the order API in one process (development, demos)
    #[command(long_about = "Run every worker and the order API in one process.\n\n\
        Uses the same libraries as the separate worker binaries: order-api, generate-info, \
        payment-wait, saga-coordinator, one payment-provider per configured method, \
        order-completed and order-cancelled. With no flags it works on a fresh machine \
        against the local RabbitMQ and PostgreSQL: it creates the database if missing, runs \
        the migrations, declares the topology and prints where the API listens. Configure it \
        with the ORDERFLOW_* environment (see the README). Without ORDERFLOW_TOKEN_KEYS it \
        signs payment tokens with a public development key and says so. Ctrl-C or SIGTERM \
        stops it gracefully: in-flight messages finish, nothing is lost.")]
    Up(UpArgs),

    /// Place, pay and inspect orders through the order API
    #[command(subcommand)]
    Order(OrderCommand),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A TOML file with settings (the ORDERFLOW_* environment overrides it)
    #[arg(long, env = "ORDERFLOW_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the order API [default: http://$ORDERFLOW_HTTP_ADDR, else http://127.0.0.1:8080]
    #[arg(long, env = "ORDERFLOW_API_URL")]
    pub api: Option<String>,
    /// Print the API's JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Place an order (POST /orders); prices come from the server's catalogue
    Start(StartArgs),
    /// Pay an order: fetches its payment token, submits the method, waits for the outcome
    Pay(PayArgs),
    /// Show an order's state (GET /orders/{id})
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The merchant, e.g. haidilao
    #[arg(long)]
    pub supplier: String,
    /// A product line as SKU:QUANTITY (repeat for more lines), e.g. --product hotpot-set:2
    #[arg(long = "product", required = true, value_name = "SKU:QTY")]
    pub products: Vec<String>,
    /// Delivery address
    #[arg(long, default_value = "1 Harbour Road")]
    pub address: String,
    /// Use this order id instead of a generated one (placing it again is idempotent)
    #[arg(long)]
    pub order_id: Option<String>,
    /// Wait until the order awaits payment (or has ended) before returning
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in seconds
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct PayArgs {
    /// The order id
    pub order_id: String,
    /// The payment method, e.g. zhifubao, weixin, unionpay
    #[arg(long)]
    pub method: String,
    /// Return after submitting instead of waiting for completed/cancelled
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the token and for the outcome, in seconds
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The order id
    pub order_id: String,
    #[command(flatten)]
    pub api: ApiArgs,
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
