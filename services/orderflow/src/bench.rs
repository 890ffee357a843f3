//! `orderflow bench`: drives orderflow the way clients do — start an order,
//! wait until it awaits payment, pay (methods round-robin, about 5 % invalid
//! ones), wait for the end — and prints one JSON line with the throughput and
//! the per-order latency (start call → terminal state seen). Against a
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
use orderflow_shared::app::Ctx;
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store;
use orderflow_shared::token::DEV_KEYS;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::baseline::{self, BaselineSpec};
use crate::cli::BenchArgs;
use crate::up;

/// Events a completed order publishes: started, info-generated, awaiting,
/// submitted, selected, captured, completed. The baseline chain has as many hops.
const MESSAGES_PER_ORDER: usize = 7;

/// Suppliers the orders rotate through: haidilao refuses unionpay, the
/// others accept every method.
const SUPPLIERS: [&str; 3] = ["haidilao", "noodle-bar", "sichuan-kitchen"];
const METHODS: [&str; 3] = ["zhifubao", "weixin", "unionpay"];
/// Every 20th order pays with a method no provider has.
const INVALID_METHOD: &str = "bitcoin";

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(main(args))
}

/// A whole orderflow inside this process, in its own namespace and database.
struct InProcess {
    base: String,
    ctx: Ctx,
    shutdown: Shutdown,
    system: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    async fn start(settings: Settings) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a local port for the order API")?;
        let base = format!("http://{}", listener.local_addr()?);
        let ctx = Ctx::declare(settings, Metadata::from_env()?, "orderflow-bench").await?;
        let shutdown = Shutdown::new();
        let tasks = up::system(&ctx, listener, &shutdown);
        let system = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { up::run_all(tasks, &shutdown).await }
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
}

impl Scratch {
    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        let mut settings = Settings::from_env()?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let tag = &id[id.len() - 10..];
        settings.namespace = format!("bench-{tag}");
        settings.database_url =
            store::url_with_database(&settings.database_url, &format!("orderflow_bench_{tag}"))?;
        settings.gateway_latency_ms = args.gateway_latency_ms;
        if settings.token_keys.is_none() {
            settings.token_keys = Some(SecretString::from(DEV_KEYS.to_owned()));
        }
        Ok(Self { settings })
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

async fn main(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = match &args.api {
        Some(_) => None,
        None => Some(Scratch::new(args)?),
    };
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
            let system = InProcess::start(settings.clone()).await?;
            let before = next_xid(&settings).await?;
            let report = bench(args, &system.base.clone()).await;
            system.stop().await?;
            let mut report = report?;
            let after = next_xid(&settings).await?;
            report["mode"] = json!("in-process");
            report["gateway_latency_ms"] = json!(args.gateway_latency_ms);
            report["db_write_transactions_per_order"] =
                json!((after - before) as f64 / args.orders.max(1) as f64);
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
        _ = tokio::signal::ctrl_c() => None,
    };
    if let Some(scratch) = &scratch
        && let Err(error) = scratch.remove().await
    {
        eprintln!("warning: {error:#}");
    }
    let Some(report) = outcome else {
        eprintln!("interrupted; the benchmark's namespace and database were removed");
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
        let method = if index % 20 == 19 {
            INVALID_METHOD
        } else {
            METHODS[(index / SUPPLIERS.len()) % METHODS.len()]
        };
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

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Runs the orders against the API at `base`; the report without the mode.
async fn bench(args: &BenchArgs, base: &str) -> anyhow::Result<Value> {
    let base = base.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(90))
        .build()?;
    let mut discounts = Discounts::new();
    for supplier in SUPPLIERS {
        let client = Client {
            base: base.clone(),
            http: http.clone(),
            discounts: Discounts::new(),
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
            }
        }
    }
    let client = Arc::new(Client {
        base,
        http,
        discounts,
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
    latencies.sort();
    let report = json!({
        "orders": args.orders,
        "concurrency": args.concurrency,
        "completed": completed,
        "cancelled": cancelled,
        "failures": failures,
        "orders_per_s": args.orders as f64 / wall.as_secs_f64(),
        "p50_ms": percentile(&latencies, 50.0),
        "p95_ms": percentile(&latencies, 95.0),
        "p99_ms": percentile(&latencies, 99.0),
        "wall_s": wall.as_secs_f64(),
    });
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert!((percentile(&samples, 50.0) - 50.0).abs() < 1e-9);
        assert!((percentile(&samples, 99.0) - 99.0).abs() < 1e-9);
        assert!((percentile(&samples[..1], 99.0) - 1.0).abs() < 1e-9);
        assert!(percentile(&[], 50.0).abs() < 1e-9);
    }
}
