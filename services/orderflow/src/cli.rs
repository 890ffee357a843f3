//! The command-line interface of `orderflow`: the commands, their arguments and
//! their help texts (clap derive). No behaviour lives here.

use std::path::PathBuf;
use std::time::Duration;

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
            for retries, each behind a fanout exchange of the same name, and \
            `orderflow.<service>.redeliver` leading back into the service queue. There \
            is one payment-provider service per payment method of config/providers.toml. \
            Declaring the topology is the operator's step (`topology declare`, or the \
            definitions the broker loads at boot, exported to topology/definitions.json); \
            workers only check that their part exists. `topology users` writes the \
            broker users with least-privilege permissions."
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

    /// Run one worker by name, as its own binary would (for one process per service)
    #[command(long_about = "Run one worker by name, as its own binary would.\n\n\
        NAME is one of order-api, generate-info, payment-wait, saga-coordinator, \
        order-completed, order-cancelled, or payment-provider-<method> for a method of \
        config/providers.toml. Configured like the worker binaries (the ORDERFLOW_* \
        environment; payment-wait and saga-coordinator need ORDERFLOW_TOKEN_KEYS, there \
        is no development key here). The worker checks that its part of the topology \
        exists and never declares it (`orderflow topology declare` does). Ctrl-C or \
        SIGTERM stops it gracefully.")]
    Worker(WorkerArgs),

    /// Provision the database with a role per context (an operator's step)
    #[command(
        subcommand,
        long_about = "Provision the database of a deployment with least privilege.\n\n\
            `db init` connects with ORDERFLOW_DATABASE_URL, which must be an administrator's, \
            creates the database if missing, and for each context (orders, coordinator, \
            payments, pricing) a login role `orderflow_<context>` that owns the context's \
            schema and runs its migrations. A role may read nothing of other contexts except: \
            orders reads coordinator.history (the API serves it), payments reads \
            coordinator.payment_steps (a provider charges exactly what the coordinator \
            accepted). Services then connect as their context's role. Passwords come from \
            ORDERFLOW_DB_PASSWORD_ORDERS, _COORDINATOR, _PAYMENTS and _PRICING; all are \
            required. Idempotent: run it again after an upgrade (it also hands over objects \
            an older version created as the administrator)."
    )]
    Db(DbCommand),

    /// Place, pay and inspect orders through the order API
    #[command(subcommand)]
    Order(OrderCommand),

    /// Inspect sagas in the coordinator's database: an order's history, stuck sagas
    #[command(
        subcommand,
        long_about = "Inspect sagas in the saga coordinator's database.\n\n\
            Reads the `coordinator` schema of ORDERFLOW_DATABASE_URL directly (no API or \
            broker needed) and only reads: it never runs migrations. Use it when an \
            order is not where you expect it: `saga history` shows everything the \
            coordinator saw of one order, `saga stuck` finds running sagas that stopped \
            moving."
    )]
    Saga(SagaCommand),

    /// Inspect and replay the services' dead-letter queues
    #[command(
        subcommand,
        long_about = "Inspect and replay the services' dead-letter queues.\n\n\
            A message a service cannot handle (bad JSON, invalid data, a failure that \
            outlasted every retry, a message that kept crashing its consumer) ends in \
            `orderflow.<service>.dead` with the reason in its headers. `dlq list` shows what \
            is there and why; once the cause is fixed, `dlq replay` puts messages back on \
            the service's own queue (not on the exchange, so no other service sees them \
            twice). Uses ORDERFLOW_AMQP_URL and ORDERFLOW_NAMESPACE.\n\n\
            Dead outbox rows: an event a service committed but the broker kept refusing as \
            unroutable (no queue bound to its routing key) is moved by the outbox relay to \
            the `outbox_dead` table of its schema (orders, coordinator, payments, pricing). \
            `dlq list` shows them too, read from ORDERFLOW_DATABASE_URL (JSON entries with \
            \"source\": \"outbox\"; queue entries have \"source\": \"queue\"), and `dlq replay \
            --outbox --schema S --id N` puts one back into its outbox once a queue is bound to \
            its routing key.\n\n\
            Retention: services prune inbox rows and finished sagas older than \
            ORDERFLOW_RETENTION_DAYS (default 30). A dead letter first published longer ago \
            may find them gone, so replaying it could apply it twice: `dlq replay` refuses \
            such messages unless --force is given."
    )]
    Dlq(DlqCommand),

    /// Pause one service's consumption: its queue fills, its orders wait at its step
    #[command(
        long_about = "Pause one service's consumption (an operator's step).\n\n\
        Every consumer of SERVICE, in every process, stops taking messages within \
        ORDERFLOW_PAUSE_CHECK_MS (1 s by default), after finishing what it holds. Its queue \
        fills; orders wait at its step; the saga's timers go on running, so orders whose \
        deadline passes meanwhile are cancelled as usual. The pause is kept on the broker \
        (a marker in the queue orderflow.<SERVICE>.pause): it survives restarts of the \
        workers and of the broker, and a worker started meanwhile starts paused. Uses \
        ORDERFLOW_AMQP_URL (an operator's broker user) and ORDERFLOW_NAMESPACE. Idempotent."
    )]
    Pause(PauseArgs),

    /// Resume a paused service's consumption
    #[command(long_about = "Resume a paused service's consumption.\n\n\
        Removes the pause marker of SERVICE; its consumers take messages again within \
        ORDERFLOW_PAUSE_CHECK_MS and drain what waited in its queue. Idempotent.")]
    Resume(PauseArgs),

    /// Drive orderflow like its clients do and report throughput and latency
    #[command(
        long_about = "Drive orderflow like its clients do and report throughput and latency.\n\n\
        Each order: POST /orders, wait (long poll) until it awaits payment, pay, wait until \
        it is completed or cancelled. The mix: exactly every 20th order (5 %) pays with a \
        method its merchant does not take and must be cancelled (haidilao is offered \
        unionpay, which it refuses; the others a method nobody has); the rest pay with \
        their merchant's methods round-robin and must complete. An outcome other \
        than the expected one, or a charge other than the discounted server amount, \
        counts as a failure. Prints one JSON line: orders, concurrency, mix, completed, \
        cancelled, failures, orders_per_s, p50_ms, p95_ms, p99_ms, max_ms, wall_s (latency \
        is per order, from the start call to the terminal state the client saw). \
        Exits 1 when any order failed.\n\n\
        Without --api the bench starts the whole system in this process (namespace \
        `bench-<id>`, database `orderflow_bench_<id>` on ORDERFLOW_AMQP_URL / \
        ORDERFLOW_DATABASE_URL's server, both removed at the end, also on Ctrl-C) and \
        adds mode, gateway_latency_ms, db_write_transactions_per_order, deliveries_per_order \
        and sql_statements_per_order (server-wide counters, the last from pg_stat_statements \
        when the server loads it, else null: bench on a quiet server) to the report. With \
        --baseline it then measures the ceiling on the same broker and database and \
        adds baseline {broker_orders_per_s, db_orders_per_s, ceiling_orders_per_s, ...} \
        and fraction_of_ceiling."
    )]
    Bench(orderflow_bench::BenchArgs),

    /// Run the whole system under faults and check that nothing was lost (docs/chaos.md)
    #[command(
        long_about = "Run the whole system under faults, then check it from outside.\n\n\
        Starts its own PostgreSQL and its own RabbitMQ (one node, or with --cluster three \
        nodes with quorum queues on all three) on loopback ports of their own, beside the \
        machine's, and every worker as its own process (two of some). Places and pays \
        --orders orders through the API and straight onto the exchange while it closes \
        every broker connection, stops and starts the broker, kills a cluster node with \
        SIGKILL, restarts PostgreSQL (fast and immediate), kills each worker type with \
        SIGKILL, and publishes duplicates and malformed messages on every service queue; a \
        few orders pay around their deadline or race a cancellation. Then it checks: every \
        accepted order ended, each completed order was charged once the server's amount, \
        each cancelled order was refunded what it was charged, none both, every queue \
        drained, the dead letters exactly the injected poison, every fault really \
        injected. Prints one JSON summary; exit status 1 on any violation, 2 when the run \
        could not run. Needs RabbitMQ and PostgreSQL 15 installed (not running)."
    )]
    Chaos(orderflow_chaos::ChaosArgs),
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The service, e.g. payment-provider-zhifubao or generate-info
    #[arg(value_name = "SERVICE")]
    pub service: String,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count every service's dead letters and every schema's dead outbox rows, and show the
    /// first few with their reasons
    List(DlqListArgs),
    /// Move dead letters of one service back onto its queue, or a dead outbox row back into
    /// its outbox (--outbox)
    Replay(DlqReplayArgs),
}

#[derive(Debug, Args)]
pub struct DlqListArgs {
    /// Only this service's dead-letter queue (e.g. generate-info, payment-provider-zhifubao);
    /// dead outbox rows are then listed only with --schema
    #[arg(long)]
    pub service: Option<String>,
    /// Only this schema's dead outbox rows (orders, coordinator, payments, pricing);
    /// dead-letter queues are then listed only with --service
    #[arg(long)]
    pub schema: Option<String>,
    /// Show at most this many messages per service and rows per schema
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Print the messages as JSON: one array, each entry with "source": "queue" or "outbox"
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DlqReplayArgs {
    /// The service whose dead letters to replay
    #[arg(long, required_unless_present = "outbox", conflicts_with = "outbox")]
    pub service: Option<String>,
    /// Replay only the message with this message id
    #[arg(long, conflicts_with = "outbox")]
    pub message_id: Option<String>,
    /// Replay at most this many messages
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    pub limit: usize,
    /// Replay even messages first published longer ago than the retention
    /// (ORDERFLOW_RETENTION_DAYS): inboxes may no longer know them, so a message a service
    /// had already applied would be applied again
    #[arg(long)]
    pub force: bool,
    /// Put a dead outbox row (--schema, --id) back into its outbox instead: the schema's
    /// relay publishes it at its next sweep. Bind a queue to its routing key first
    #[arg(long, requires_all = ["schema", "id"])]
    pub outbox: bool,
    /// The schema of the dead outbox row (orders, coordinator, payments, pricing)
    #[arg(long, requires = "outbox")]
    pub schema: Option<String>,
    /// The id of the dead outbox row, as `dlq list` shows it
    #[arg(long, requires = "outbox")]
    pub id: Option<i64>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A TOML file with settings (the ORDERFLOW_* environment overrides it)
    #[arg(long, env = "ORDERFLOW_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Create the roles and schemas, run the migrations, grant the cross-context reads
    Init(DbInitArgs),
}

#[derive(Debug, Args)]
pub struct DbInitArgs {
    /// Prefix of the role names (several deployments, or tests, on one server).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub role_prefix: String,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The worker (service) to run, e.g. generate-info or payment-provider-zhifubao
    #[arg(value_name = "NAME")]
    pub name: String,
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
pub enum SagaCommand {
    /// Show an order's execution history: every event, rejection, timer and refund, in order
    #[command(
        long_about = "Show an order's execution history, as the saga coordinator recorded it.\n\n\
        One line per message the coordinator saw for the order, oldest first: `#` (its position), \
        the time it was recorded (UTC), its kind, the event name, a short detail from the event \
        (supplier, method, amounts, reason, step), the message id and the id of the message that \
        caused it (`-` for none). Ids are shortened to their last 8 characters (the start of a \
        UUID v7 is its timestamp, alike for one order's messages); search logs or --json output \
        for the full ones.\n\n\
        Kinds: `event` (a step of the saga), `rejection` (a payment method or submission turned \
        down, an order that could not be priced), `timer` (a deadline passed: saga.timed-out), \
        `compensation` (a refund), `late` (arrived after the saga had ended).\n\n\
        Exit status: 0 when shown, 2 when the order has no history or the database cannot be read."
    )]
    History(HistoryArgs),

    /// List running sagas that have not progressed for longer than a duration
    #[command(
        long_about = "List running sagas that have not progressed for longer than a duration.\n\n\
        A saga progresses each time the coordinator sees an event of its order. One that has \
        not moved for a while waits on a step: `generate-info` (pricing), `payment-wait` (the \
        payment token), `payment` (the customer has not paid yet) or `paying` (the payment \
        provider has not answered). Its durable timers cancel it eventually (300 s per step, \
        3600 s in all by default); a saga stuck long after those deadlines points at a \
        worker or the coordinator not running. Oldest first, with the step, the last progress \
        and when the saga started.\n\n\
        Exit status: 0 (also when there are none), 2 when the database cannot be read."
    )]
    Stuck(StuckArgs),
}

/// Where the coordinator's database is.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// A TOML file with settings such as database_url (ORDERFLOW_DATABASE_URL overrides it)
    #[arg(long, env = "ORDERFLOW_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The order id
    pub order_id: String,
    /// Print the entries as a JSON array (full ids, the events' whole bodies)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct StuckArgs {
    /// Only sagas with no progress for longer than this, e.g. 30s, 5m, 1h, 1h30m
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub older_than: Duration,
    /// Print the sagas as a JSON array
    #[arg(long)]
    pub json: bool,
    /// At most this many sagas, the longest stuck first
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: i64,
    #[command(flatten)]
    pub database: DatabaseArgs,
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

    /// Check that the committed definitions file matches the model, and the choreography
    #[command(
        long_about = "Check that the committed definitions file matches the model.\n\n\
        Compares the file with what `orderflow topology export` would write (as data: \
        order and formatting do not matter) and lists every exchange, queue or binding \
        that is missing from the file, extra in it, or different.\n\n\
        Then checks the choreography itself, from the model: every routing key a service \
        (or a declared client) publishes is consumed by some service, every key a service \
        consumes is published by someone, and every step that waits on the outside has a \
        timer and a compensation that follows from it.\n\n\
        Exit status: 0 when they match and the choreography has no finding, 1 when they \
        differ or it has one, 2 when the check cannot run (unreadable or malformed file)."
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

    /// Declare the topology on the broker (an operator's step; idempotent)
    #[command(
        long_about = "Declare the topology on the broker of ORDERFLOW_AMQP_URL.\n\n\
        Creates every exchange, queue and binding of the model in ORDERFLOW_NAMESPACE \
        (or --namespace), idempotently: declaring twice changes nothing, and a queue \
        that exists with other arguments is reported by name. Needs a broker user that \
        may configure every orderflow name (an operator, not a service: services may \
        only check that their part exists). `orderflow up` does this by itself; \
        docker-compose's broker loads topology/definitions.json at boot instead."
    )]
    Declare(DeclareArgs),

    /// Write the broker users (least privilege per service) as a definitions file
    #[command(
        long_about = "Write the broker users of a deployment as a RabbitMQ definitions file.\n\n\
        One user per service, with the permissions the topology model derives: configure \
        nothing; read its own queue; write only the events exchange and its own delay \
        and dead-letter exchanges (never amq.default); on the events exchange publish \
        only the routing keys it owns (topic permissions). Plus an administrator for \
        operators (the management UI, `orderflow dlq replay`, `topology declare`), and the \
        console's user (the order API's ORDERFLOW_OPERATOR_AMQP_URL): it may take and replay \
        dead letters and pause and resume services, and nothing else.\n\n\
        Passwords come from ORDERFLOW_BROKER_PASSWORD_<USER> (the service name \
        upper-cased, `-` as `_`: ORDERFLOW_BROKER_PASSWORD_GENERATE_INFO, \
        ORDERFLOW_BROKER_PASSWORD_ADMIN, ORDERFLOW_BROKER_PASSWORD_CONSOLE); every one must be set, there are no defaults. \
        The file holds salted SHA-256 hashes only. Load it with `rabbitmqctl \
        import_definitions FILE` or the broker's load_definitions directory."
    )]
    Users(UsersArgs),
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

/// The deployment a live command works on: its namespace; the payment
/// methods come from the deployment's configuration (ORDERFLOW_CONFIG_DIR, or
/// the configuration compiled in), exactly as the workers read it.
#[derive(Debug, Args)]
pub struct DeploymentArgs {
    /// Prefix of every name; defaults to ORDERFLOW_NAMESPACE (empty: none).
    #[arg(long, value_name = "NS", env = "ORDERFLOW_NAMESPACE", default_value = "", value_parser = parse_namespace)]
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct DeclareArgs {
    #[command(flatten)]
    pub deployment: DeploymentArgs,
}

#[derive(Debug, Args)]
pub struct UsersArgs {
    /// Where to write the users file; `-` writes to stdout.
    #[arg(long, value_name = "PATH", default_value = "-")]
    pub out: PathBuf,

    /// The vhost the permissions are for.
    #[arg(long, value_name = "VHOST", default_value = "/")]
    pub vhost: String,

    /// Prefix of every user name (several deployments, or tests, on one broker).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub user_prefix: String,

    /// The operators' user (tagged administrator, every permission).
    #[arg(long, value_name = "NAME", default_value = "admin")]
    pub admin: String,

    /// The console's user (the order API's ORDERFLOW_OPERATOR_AMQP_URL): takes and replays
    /// dead letters, pauses and resumes services, reads queue rates (tagged management)
    #[arg(long, value_name = "NAME", default_value = "console")]
    pub console: String,

    #[command(flatten)]
    pub deployment: DeploymentArgs,
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
    fn stuck_takes_a_human_duration() {
        let cli = Cli::try_parse_from(["orderflow", "saga", "stuck", "--older-than", "1h30m"])
            .expect("parses");
        let Command::Saga(SagaCommand::Stuck(args)) = cli.command else {
            panic!("expected saga stuck");
        };
        assert_eq!(args.older_than, Duration::from_mins(90));
        assert_eq!(args.limit, 100);
        for duration in ["0s", "30s", "5m"] {
            assert!(
                Cli::try_parse_from(["orderflow", "saga", "stuck", "--older-than", duration])
                    .is_ok(),
                "{duration}"
            );
        }
        for bad in ["5", "soon", "-1s"] {
            assert!(
                Cli::try_parse_from(["orderflow", "saga", "stuck", "--older-than", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(
            Cli::try_parse_from([
                "orderflow",
                "saga",
                "stuck",
                "--older-than",
                "1m",
                "--limit",
                "0"
            ])
            .is_err()
        );
    }

    #[test]
    fn a_reserved_namespace_is_refused() {
        assert!(
            Cli::try_parse_from(["orderflow", "topology", "diagram", "--namespace", "amq"])
                .is_err()
        );
    }
}
