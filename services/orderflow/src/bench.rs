//! `orderflow bench`: drives a running orderflow the way clients do — start
//! an order, wait until it awaits payment, pay (methods round-robin, about 5 %
//! invalid ones), wait for the end — and prints one JSON line with the
//! throughput and the per-order latency (start call → terminal state seen).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::BenchArgs;

/// Suppliers the orders rotate through: haidilao refuses unionpay, the
/// others accept every method.
const SUPPLIERS: [&str; 3] = ["haidilao", "noodle-bar", "sichuan-kitchen"];
const METHODS: [&str; 3] = ["zhifubao", "weixin", "unionpay"];
/// Every 20th order pays with a method no provider has.
const INVALID_METHOD: &str = "bitcoin";

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

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

async fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let base = args
        .api
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
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
    println!("{report}");
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
