//! `orderflow bench` against a running system: every order ends as expected
//! and the report line has the promised fields.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use orderflow_tests::run_to_end;
use orderflow_tests::system::System;
use serde_json::Value;
use tokio::process::Command;

#[tokio::test]
async fn bench_reports_one_json_line_with_every_order_accounted_for() {
    let system = System::start().await;
    let (code, out, err) = run_to_end(Command::new(env!("CARGO_BIN_EXE_orderflow")).args([
        "bench",
        "--orders",
        "24",
        "--concurrency",
        "4",
        "--api",
        &system.api,
    ]))
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
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
        "wall_s",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
    assert_eq!(report["orders"], 24);
    assert_eq!(report["failures"], 0, "{report}");
    let completed = report["completed"].as_u64().unwrap();
    let cancelled = report["cancelled"].as_u64().unwrap();
    assert_eq!(completed + cancelled, 24);
    // haidilao refuses unionpay, and order 19 pays with a method nobody has.
    assert!(cancelled >= 2 && completed >= 16, "{report}");
    assert!(report["p99_ms"].as_f64().unwrap() >= report["p50_ms"].as_f64().unwrap());
    system.stop().await;
}
