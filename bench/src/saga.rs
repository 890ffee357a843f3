//! `orderflow bench`: drives orderflow the way clients do — start an order,
//! wait until it awaits payment, pay, wait for the end — and prints one JSON
//! line with the throughput and the per-order latency (start call → terminal
//! state seen). The mix: exactly every 20th order (5 %) pays with a method its
//! merchant does not take and ends cancelled; every other one pays with a
//! method its merchant takes (round-robin) and completes. Against a
//! running system (`--api`) or one it starts in-process in a throwaway
//! namespace and database, removed afterwards; with `--baseline` also the
//! infrastructure's ceiling (see `baseline.rs`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, shutdown_on_signal};
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store;
use orderflow_shared::token::DEV_KEYS;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::baseline::{self, BaselineSpec};
use crate::stats::{percentile, sorted_ms};

/// Events a completed order publishes: started, info-generated, awaiting,
/// submitted, selected, captured, completed. The baseline chain has as many hops.
const MESSAGES_PER_ORDER: usize = 7;

/// Suppliers the orders rotate through: haidilao refuses unionpay, the
/// others accept every method.
const SUPPLIERS: [&str; 3] = ["haidilao", "noodle-bar", "sichuan-kitchen"];
/// A method no merchant takes (no provider has it).
const INVALID_METHOD: &str = "bitcoin";
/// One order in this many pays with a method its merchant does not take.
const NOT_ALLOWED_EVERY: usize = 20;

/// Whether order `index` pays with a method its merchant does not take.
fn pays_not_allowed(index: usize) -> bool {
    index % NOT_ALLOWED_EVERY == NOT_ALLOWED_EVERY - 1
}

/// The method order `index` of `supplier` pays with: one the merchant does
/// not take (a known one it refuses, else one nobody has) for every 20th
/// order, else the merchant's methods round-robin (`allowed`, never empty).
fn method_for(index: usize, allowed: &[String], known: &[String]) -> String {
    if pays_not_allowed(index) {
        return known
            .iter()
            .find(|method| !allowed.contains(method))
            .cloned()
            .unwrap_or_else(|| INVALID_METHOD.to_owned());
    }
    allowed[(index / SUPPLIERS.len()) % allowed.len()].clone()
}

#[derive(Debug, clap::Args)]
/// What `orderflow bench` runs (its arguments).
pub struct BenchArgs {
    /// How many orders to run
    #[arg(long, default_value_t = 200)]
    pub orders: usize,
    /// How many orders are in flight at once
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Bench a running orderflow at this base URL (e.g. http://127.0.0.1:8080).
    /// Without it, the bench starts every worker and the API in this process,
    /// in a throwaway namespace and database that it removes afterwards.
    #[arg(long)]
    pub api: Option<String>,
    /// Latency of the simulated payment gateway in the in-process system
    /// (the gateway's time, not orderflow's; `--api` uses the server's setting)
    #[arg(long, default_value_t = 0)]
    pub gateway_latency_ms: u64,
    /// Also measure the ceiling on the same broker and database: a chain of
    /// persistent, confirmed hops through a topic exchange (as many messages
    /// per order as a completed order publishes) and the commit rate for as
    /// many transactions per order as the system used; prints orders/s as a
    /// fraction of it
    #[arg(long)]
    pub baseline: bool,
}

/// A whole orderflow inside this process, in its own namespace and database.
struct InProcess {
    base: String,
    ctx: Ctx,
    shutdown: Shutdown,
    system: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts the system; it stops when `shutdown` is cancelled (by
    /// [`stop`](Self::stop), or by an interruption), and `running` is dropped
    /// once every worker has finished.
    async fn start(
        settings: Settings,
        shutdown: Shutdown,
        running: tokio::sync::mpsc::Sender<()>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a local port for the order API")?;
        let base = format!("http://{}", listener.local_addr()?);
        let ctx = Ctx::declare(settings, Metadata::from_env()?, "orderflow-bench").await?;
        let tasks = orderflow_workers::whole_system(&ctx, listener, &shutdown);
        let system = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let stopped = orderflow_workers::run_all(tasks, &shutdown).await;
                drop(running);
                stopped
            }
        });
        let system = Self {
            base,
            ctx,
            shutdown,
            system,
        };
        let http = reqwest::Client::new();
        let ready = async {
            loop {
                let healthy = http
                    .get(format!("{}/healthz", system.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if tokio::time::timeout(Duration::from_mins(1), ready)
            .await
            .is_err()
        {
            bail!("the in-process orderflow did not become healthy within 60 s");
        }
        Ok(system)
    }

    /// Stops every worker (in-flight work finishes first).
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let stopped = self.system.await;
        self.ctx.broker.close();
        stopped.context("the in-process orderflow panicked")??;
        Ok(())
    }
}

/// The throwaway namespace and database of an in-process run.
struct Scratch {
    settings: Settings,
    /// The database's name, as a user would look for it.
    database: String,
}

impl Scratch {
    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        let mut settings = Settings::from_env()?;
        let tag = crate::scratch::tag();
        settings.namespace = format!("bench-{tag}");
        let database = format!("orderflow_bench_{tag}");
        settings.database_url = store::url_with_database(&settings.database_url, &database)?;
        settings.gateway_latency_ms = args.gateway_latency_ms;
        if settings.token_keys.is_none() {
            settings.token_keys = Some(SecretString::from(DEV_KEYS.to_owned()));
        }
        Ok(Self { settings, database })
    }

    /// Deletes the namespace's queues and exchanges and drops the database.
    async fn remove(&self) -> anyhow::Result<()> {
        let metadata = Metadata::from_env()?;
        let topology = orderflow_shared::app::topology_for(&self.settings, &metadata);
        let ctx = Ctx::new(
            self.settings.clone(),
            metadata,
            topology,
            "orderflow-bench-cleanup",
        )?;
        let deleted = ctx.broker.delete_topology().await;
        ctx.broker.close();
        let database = store::drop_database(&self.settings.database_url).await;
        deleted.with_context(|| {
            format!(
                "deleting the benchmark's broker namespace `{}`",
                self.settings.namespace
            )
        })?;
        database.with_context(|| {
            format!(
                "dropping the benchmark's database {}",
                self.settings.database_url_redacted()
            )
        })?;
        Ok(())
    }
}

/// The server's next transaction id: the difference between two readings
/// is how many transactions wrote something meanwhile (read-only ones get no
/// id). Server-wide, so it counts other databases' writes too: bench on a
/// quiet server.
async fn next_xid(settings: &Settings) -> anyhow::Result<i64> {
    let db = store::Db::open(&settings.database_url, "public", 1).await?;
    let next: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(db.pool())
        .await?;
    db.close().await;
    next.parse()
        .with_context(|| format!("PostgreSQL returned a transaction id `{next}`"))
}

/// Statements the benchmark's database has executed so far, from
/// `pg_stat_statements` (server-wide counters of this database: bench on a
/// quiet server); `None` when the server does not load the extension
/// (`shared_preload_libraries`), which the report then shows as `null`.
async fn statements(settings: &Settings) -> Option<u64> {
    let db = store::Db::open(&settings.database_url, "public", 1)
        .await
        .ok()?;
    let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(db.pool())
        .await;
    let calls: Result<Option<i64>, _> = sqlx::query_scalar(
        "SELECT sum(calls)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(db.pool())
    .await;
    db.close().await;
    calls.ok().flatten().map(|n| n.max(0) as u64)
}

/// `orderflow bench`: runs the orders as `args` says and prints the report
/// line; exit code 1 when any order failed, 130 when interrupted.
pub async fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = match &args.api {
        Some(_) => None,
        None => Some(Scratch::new(args)?),
    };
    if let Some(scratch) = &scratch {
        // Named up front: a run killed with SIGKILL cannot remove them.
        eprintln!(
            "in-process run: namespace {}, database {} (removed at the end, also on Ctrl-C or SIGTERM)",
            scratch.settings.namespace, scratch.database,
        );
    }
    // Ctrl-C, and SIGTERM from `timeout`, `kill` or a cancelled CI job.
    let interrupted = shutdown_on_signal();
    // Closed once the in-process system has stopped (or never started).
    let (running, mut stopped) = tokio::sync::mpsc::channel::<()>(1);
    let settings = match &scratch {
        Some(scratch) => scratch.settings.clone(),
        None => Settings::from_env()?,
    };
    if std::env::var_os("ORDERFLOW_LOG").is_some() {
        orderflow_shared::telemetry::init(&settings.log, settings.log_format)?;
    } else {
        orderflow_shared::telemetry::init("warn", settings.log_format)?;
    }
    let work = async {
        let mut report = if let Some(api) = &args.api {
            let mut report = bench(args, api).await?;
            report["mode"] = json!("external");
            report
        } else {
            store::Db::migrate_all(&settings.database_url).await?;
            let system =
                InProcess::start(settings.clone(), interrupted.child_token(), running).await?;
            let statements_before = statements(&settings).await;
            let before = next_xid(&settings).await?;
            let deliveries_before = orderflow_shared::bus::deliveries_received();
            let report = bench(args, &system.base.clone()).await;
            system.stop().await?;
            let mut report = report?;
            let after = next_xid(&settings).await?;
            let deliveries = orderflow_shared::bus::deliveries_received() - deliveries_before;
            let per_order = |n: u64| json!(n as f64 / args.orders.max(1) as f64);
            report["mode"] = json!("in-process");
            report["gateway_latency_ms"] = json!(args.gateway_latency_ms);
            report["db_write_transactions_per_order"] =
                per_order(u64::try_from(after - before).unwrap_or(0));
            report["deliveries_per_order"] = per_order(deliveries);
            report["sql_statements_per_order"] =
                match (statements_before, statements(&settings).await) {
                    (Some(before), Some(after)) => per_order(after.saturating_sub(before)),
                    _ => Value::Null,
                };
            report
        };
        if args.baseline {
            let transactions = report["db_write_transactions_per_order"]
                .as_f64()
                .map_or(DEFAULT_TRANSACTIONS, |n| n.round() as usize)
                .max(1);
            let measured = baseline::measure(
                settings.amqp_url.expose_secret(),
                settings.database_url.expose_secret(),
                &BaselineSpec {
                    orders: args.orders,
                    concurrency: args.concurrency.max(1),
                    hops: MESSAGES_PER_ORDER,
                    transactions,
                    prefetch: settings.prefetch,
                    db_connections: DB_CONNECTIONS,
                },
            )
            .await
            .context("measuring the baseline")?;
            let orders_per_s = report["orders_per_s"].as_f64().unwrap_or_default();
            report["fraction_of_ceiling"] =
                json!(orders_per_s / measured.ceiling_orders_per_s.max(f64::MIN_POSITIVE));
            report["baseline"] = serde_json::to_value(&measured)?;
            report["baseline"]["hops"] = json!(MESSAGES_PER_ORDER);
            report["baseline"]["transactions"] = json!(transactions);
        }
        anyhow::Ok(report)
    };
    let outcome = tokio::select! {
        outcome = work => Some(outcome),
        () = interrupted.cancelled() => None,
    };
    if outcome.is_none() {
        // The system was told to stop with the signal: let its workers
        // finish before their queues and database go away.
        let _ = tokio::time::timeout(Duration::from_secs(30), stopped.recv()).await;
    }
    let removed = match &scratch {
        Some(scratch) => match scratch.remove().await {
            Ok(()) => "; the benchmark's namespace and database were removed",
            Err(error) => {
                eprintln!("warning: {error:#}");
                ""
            }
        },
        None => "",
    };
    let Some(report) = outcome else {
        eprintln!("interrupted{removed}");
        return Ok(ExitCode::from(130));
    };
    let report = report?;
    println!("{report}");
    Ok(if report["failures"].as_u64() == Some(0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Transactions per order for the baseline when they cannot be counted (a
/// system outside this process): what an in-process run counts.
const DEFAULT_TRANSACTIONS: usize = 20;
/// Connections of the baseline's commit-rate part.
const DB_CONNECTIONS: u32 = 32;

/// What the server says each method charges a supplier (percent), by method.
type Discounts = std::collections::HashMap<(String, String), i64>;

struct Client {
    base: String,
    http: reqwest::Client,
    discounts: Discounts,
    /// Every method any merchant takes, in a stable order.
    known: Vec<String>,
}

/// The outcome of one order as the client saw it.
struct Outcome {
    latency: Duration,
    status: String,
    correct: bool,
}

impl Client {
    async fn json(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let response = request
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{what}: {status}: {body}");
        }
        Ok(body)
    }

    async fn wait_for(&self, order_id: &str, status: &str) -> anyhow::Result<Value> {
        self.json(
            self.http
                .get(format!("{}/orders/{order_id}", self.base))
                .query(&[("wait_for", status), ("timeout_ms", "60000")]),
            "waiting for the order",
        )
        .await
    }

    async fn one(&self, index: usize) -> anyhow::Result<Outcome> {
        let supplier = SUPPLIERS[index % SUPPLIERS.len()];
        let mut allowed: Vec<String> = self
            .discounts
            .keys()
            .filter(|(s, _)| s == supplier)
            .map(|(_, method)| method.clone())
            .collect();
        allowed.sort_by_key(|m| self.known.iter().position(|k| k == m));
        if allowed.is_empty() {
            bail!("merchant {supplier} takes no payment method");
        }
        let method = method_for(index, &allowed, &self.known);
        let method = method.as_str();
        let started = Instant::now();
        let created = self
            .json(
                self.http.post(format!("{}/orders", self.base)).json(&json!({
                    "supplier": supplier,
                    "products": [{"sku": "hotpot-set", "quantity": 1}, {"sku": "tea", "quantity": 2}],
                    "address": "bench",
                })),
                "placing an order",
            )
            .await?;
        let order_id = created["order_id"]
            .as_str()
            .context("no order_id")?
            .to_owned();
        let awaiting = self.wait_for(&order_id, "awaiting_payment").await?;
        let token = awaiting["payment_token"]
            .as_str()
            .with_context(|| format!("order {order_id} has no token: {awaiting}"))?;
        let amount = awaiting["amount_cents"].as_i64().unwrap_or_default();
        self.json(
            self.http
                .post(format!("{}/orders/{order_id}/payment", self.base))
                .json(&json!({"token": token, "method": method})),
            "paying",
        )
        .await?;
        let ended = self.wait_for(&order_id, "completed").await?;
        let latency = started.elapsed();
        let status = ended["status"].as_str().unwrap_or("unknown").to_owned();
        let correct = match self
            .discounts
            .get(&(supplier.to_owned(), method.to_owned()))
        {
            Some(percent) => {
                status == "completed"
                    && ended["charged_cents"].as_i64() == Some((amount * percent + 50) / 100)
            }
            None => status == "cancelled",
        };
        Ok(Outcome {
            latency,
            status,
            correct,
        })
    }
}

/// Runs the orders against the API at `base`; the report without the mode.
async fn bench(args: &BenchArgs, base: &str) -> anyhow::Result<Value> {
    let base = base.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(90))
        .build()?;
    let mut discounts = Discounts::new();
    let mut known: Vec<String> = Vec::new();
    for supplier in SUPPLIERS {
        let client = Client {
            base: base.clone(),
            http: http.clone(),
            discounts: Discounts::new(),
            known: Vec::new(),
        };
        let offered = client
            .json(
                http.get(format!("{base}/merchants/{supplier}/payment-methods")),
                "reading the merchants",
            )
            .await?;
        for entry in offered["payment_methods"].as_array().into_iter().flatten() {
            if let (Some(method), Some(percent)) =
                (entry["method"].as_str(), entry["discount_percent"].as_i64())
            {
                discounts.insert((supplier.to_owned(), method.to_owned()), percent);
                if !known.iter().any(|k| k == method) {
                    known.push(method.to_owned());
                }
            }
        }
    }
    let client = Arc::new(Client {
        base,
        http,
        discounts,
        known,
    });
    let progress = ProgressBar::new(args.orders as u64);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} orders ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let outcomes: Vec<anyhow::Result<Outcome>> = futures::stream::iter(0..args.orders)
        .map(|index| {
            let client = client.clone();
            let progress = progress.clone();
            async move {
                let outcome = client.one(index).await;
                progress.inc(1);
                outcome
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let wall = started.elapsed();
    progress.finish_and_clear();
    let mut latencies = Vec::with_capacity(outcomes.len());
    let (mut completed, mut cancelled, mut failures) = (0, 0, 0);
    for outcome in &outcomes {
        match outcome {
            Ok(outcome) => {
                latencies.push(outcome.latency);
                match outcome.status.as_str() {
                    "completed" => completed += 1,
                    "cancelled" => cancelled += 1,
                    _ => {}
                }
                if !outcome.correct {
                    failures += 1;
                }
            }
            Err(error) => {
                failures += 1;
                eprintln!("order failed: {error:#}");
            }
        }
    }
    let latencies = sorted_ms(latencies);
    let not_allowed = (0..args.orders).filter(|&i| pays_not_allowed(i)).count();
    let report = json!({
        "orders": args.orders,
        "concurrency": args.concurrency,
        "mix": {
            "pay_with_a_method_the_merchant_takes": args.orders - not_allowed,
            "pay_with_a_method_the_merchant_refuses": not_allowed,
            "refused_share": not_allowed as f64 / args.orders.max(1) as f64,
        },
        "completed": completed,
        "cancelled": cancelled,
        "failures": failures,
        "orders_per_s": args.orders as f64 / wall.as_secs_f64(),
        "p50_ms": percentile(&latencies, 50.0),
        "p95_ms": percentile(&latencies, 95.0),
        "p99_ms": percentile(&latencies, 99.0),
        // The slowest order: one order stuck (a long poll nobody woke) hides
        // below p99 but not here.
        "max_ms": percentile(&latencies, 100.0),
        "wall_s": wall.as_secs_f64(),
    });
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_order_in_twenty_pays_with_a_method_its_merchant_refuses() {
        let known: Vec<String> = ["zhifubao", "weixin", "unionpay"]
            .map(String::from)
            .to_vec();
        let haidilao: Vec<String> = ["zhifubao", "weixin"].map(String::from).to_vec();
        let mut refused = 0;
        for index in 0..2_000 {
            let allowed = if index % SUPPLIERS.len() == 0 {
                &haidilao
            } else {
                &known
            };
            let method = method_for(index, allowed, &known);
            if pays_not_allowed(index) {
                refused += 1;
                assert!(!allowed.contains(&method), "{index}: {method}");
            } else {
                assert!(allowed.contains(&method), "{index}: {method}");
            }
        }
        assert_eq!(refused, 100, "5 % of 2,000");
        // A merchant refusing a known method is offered that one; one that
        // takes every method, a method nobody has.
        assert_eq!(method_for(19, &haidilao, &known), "unionpay");
        assert_eq!(method_for(19, &known, &known), INVALID_METHOD);
    }
}
