//! `orderflow bench` against a running system: every order ends as expected
//! and the report line has the promised fields; in-process with `--baseline`:
//! the ceiling is reported and nothing is left behind; in-process and stopped
//! with SIGTERM midway: its namespace and database are removed all the same.

use std::process::Stdio;
use std::time::Duration;

use orderflow_tests::eventually;
use orderflow_tests::system::System;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{BIN, run, stop_with_sigterm};

#[tokio::test]
async fn bench_reports_one_json_line_with_every_order_accounted_for() {
    let system = System::start().await;
    let out = run(Command::new(BIN).args([
        "bench",
        "--orders",
        "24",
        "--concurrency",
        "4",
        "--api",
        &system.api,
    ]))
    .await
    .succeeded();
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    for field in [
        "orders",
        "concurrency",
        "completed",
        "cancelled",
        "failures",
        "orders_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "wall_s",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
    assert_eq!(report["orders"], 24);
    assert_eq!(report["failures"], 0, "{report}");
    let completed = report["completed"].as_u64().unwrap();
    let cancelled = report["cancelled"].as_u64().unwrap();
    assert_eq!(completed + cancelled, 24);
    // Exactly every 20th order pays with a method its merchant refuses.
    assert_eq!(
        report["mix"]["pay_with_a_method_the_merchant_refuses"], 1,
        "{report}"
    );
    assert_eq!((completed, cancelled), (23, 1), "{report}");
    assert!(report["p99_ms"].as_f64().unwrap() >= report["p50_ms"].as_f64().unwrap());
    assert!(report["max_ms"].as_f64().unwrap() >= report["p99_ms"].as_f64().unwrap());
    system.stop().await;
}

/// An in-process bench on the test's broker, with its own database put on
/// the test's server; `args` after `bench`.
fn in_process_bench(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("bench")
        .args(args)
        .env("ORDERFLOW_AMQP_URL", orderflow_tests::amqp_url())
        // The bench puts its own database on this server.
        .env(
            "ORDERFLOW_DATABASE_URL",
            orderflow_tests::admin_database_url(),
        )
        .env_remove("ORDERFLOW_NAMESPACE")
        .env_remove("ORDERFLOW_API_URL");
    command
}

/// The namespace and database an in-process bench named on its stderr.
fn scratch_named_in(stderr: &str) -> (String, String) {
    let line = stderr
        .lines()
        .find_map(|line| line.strip_prefix("in-process run: namespace "))
        .unwrap_or_else(|| panic!("no namespace named in: {stderr}"));
    let (namespace, rest) = line.split_once(", database ").unwrap();
    let database = rest.split_whitespace().next().unwrap();
    (namespace.to_owned(), database.to_owned())
}

/// The queues of `namespace` and whether `database` exists.
async fn left_of(namespace: &str, database: &str) -> (Vec<String>, bool) {
    let listed = Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(listed.status.success(), "rabbitmqctl list_queues failed");
    let prefix = format!("{namespace}.");
    let queues = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&orderflow_tests::admin_database_url())
            .await
            .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    (queues, exists)
}

#[tokio::test]
async fn bench_in_process_with_baseline_reports_the_ceiling_and_leaves_nothing_behind() {
    let ended = run(&mut in_process_bench(&[
        "--orders",
        "6",
        "--concurrency",
        "2",
        "--baseline",
    ]))
    .await;
    let (namespace, database) = scratch_named_in(&ended.err);
    let out = ended.succeeded();
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["mode"], "in-process", "{report}");
    assert_eq!(report["failures"], 0, "{report}");
    assert_eq!(
        report["completed"].as_u64().unwrap() + report["cancelled"].as_u64().unwrap(),
        6
    );
    assert!(report["db_write_transactions_per_order"].as_f64().unwrap() > 1.0);
    let baseline = &report["baseline"];
    let ceiling = baseline["ceiling_orders_per_s"].as_f64().unwrap();
    assert!(ceiling > 0.0, "{report}");
    assert!(
        (ceiling
            - baseline["broker_orders_per_s"]
                .as_f64()
                .unwrap()
                .min(baseline["db_orders_per_s"].as_f64().unwrap()))
        .abs()
            < 1e-9
    );
    let fraction = report["fraction_of_ceiling"].as_f64().unwrap();
    assert!(
        (fraction - report["orders_per_s"].as_f64().unwrap() / ceiling).abs() < 1e-9,
        "{report}"
    );
    // The throwaway namespace and database are gone.
    assert_eq!(
        left_of(&namespace, &database).await,
        (vec![], false),
        "{namespace} / {database}"
    );
}

#[tokio::test]
async fn bench_stopped_with_sigterm_midway_removes_its_namespace_and_database() {
    // Far more orders than it can finish before the signal.
    let mut child = in_process_bench(&["--orders", "100000", "--concurrency", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .expect("the bench named nothing within 30 s")
        .unwrap()
        .expect("the bench ended before naming its namespace");
    let (namespace, database) = scratch_named_in(&first);
    // Midway: its system is up and orders are going through.
    let url = orderflow_shared::store::url_with_database(
        &SecretString::from(orderflow_tests::admin_database_url()),
        &database,
    )
    .unwrap();
    eventually(
        Duration::from_mins(2),
        "10 orders in the bench's database",
        || async {
            let Ok(mut db) =
                <sqlx::PgConnection as sqlx::Connection>::connect(url.expose_secret()).await
            else {
                return false;
            };
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders.orders")
                .fetch_one(&mut db)
                .await
                .is_ok_and(|n| n >= 10)
        },
    )
    .await;
    let (queues, exists) = left_of(&namespace, &database).await;
    assert!(!queues.is_empty() && exists, "nothing to remove yet");

    let status = stop_with_sigterm(&mut child, Duration::from_mins(1), "the bench").await;
    let mut said = String::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), stderr.next_line()).await
    {
        said.push_str(&line);
        said.push('\n');
    }
    assert_eq!(status.code(), Some(130), "{status}; stderr: {said}");
    assert!(
        said.contains("interrupted; the benchmark's namespace and database were removed"),
        "{said}"
    );
    assert_eq!(
        left_of(&namespace, &database).await,
        (vec![], false),
        "{namespace} / {database} left behind"
    );
}
