//! `orderflow bench` against a running system: every order ends as expected
//! and the report line has the promised fields; in-process with `--baseline`:
//! the ceiling is reported and nothing is left behind.

use orderflow_tests::system::System;
use serde_json::Value;
use tokio::process::Command;

use crate::support::{BIN, run};

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

/// Queue and database names an in-process bench leaves behind, if any.
async fn leftovers() -> (Vec<String>, Vec<String>) {
    let queues = tokio::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|name| name.starts_with("bench-"))
        .map(str::to_owned)
        .collect();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&orderflow_tests::admin_database_url())
            .await
            .unwrap();
    let databases: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'orderflow\\_bench\\_%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    (queues, databases)
}

#[tokio::test]
async fn bench_in_process_with_baseline_reports_the_ceiling_and_leaves_nothing_behind() {
    let before = leftovers().await;
    let out = run(Command::new(BIN)
        .args(["bench", "--orders", "6", "--concurrency", "2", "--baseline"])
        .env("ORDERFLOW_AMQP_URL", orderflow_tests::amqp_url())
        // The bench puts its own database on this server.
        .env(
            "ORDERFLOW_DATABASE_URL",
            orderflow_tests::admin_database_url(),
        )
        .env_remove("ORDERFLOW_NAMESPACE")
        .env_remove("ORDERFLOW_API_URL"))
    .await
    .succeeded();
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
    // The throwaway namespace and database are gone (other tests' benches
    // may run at the same time: compare with what was there before).
    let after = leftovers().await;
    assert!(after.0.iter().all(|q| before.0.contains(q)), "{after:?}");
    assert!(after.1.iter().all(|d| before.1.contains(d)), "{after:?}");
}
