//! The reduced chaos run, as `./scripts/test` runs it: `orderflow chaos` on
//! a three-node cluster of its own, a couple of hundred orders, each fault
//! once (connections closed, the broker stopped and started, a node killed
//! with SIGKILL, PostgreSQL restarted fast and immediate, each worker type
//! killed, duplicates and poison on every service queue, payments around
//! their deadline, cancellations racing captures). Every invariant holds,
//! every fault was really injected, and the run leaves nothing behind: no
//! process of the run, no directory. (Whatever happens, the test kills
//! what the run left, found by the run id every process of it carries.)

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const ORDERS: u64 = 200;

/// The processes whose environment carries `ORDERFLOW_CHAOS_RUN=<run_id>`.
fn processes_of(run_id: &str) -> Vec<u32> {
    let marker = format!("ORDERFLOW_CHAOS_RUN={run_id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
            })
        })
        .collect()
}

/// Kills what a run left and removes its directory, also when the test fails.
struct Leftovers {
    run_id: String,
    dir: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in processes_of(&self.run_id) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_reduced_chaos_run_on_a_cluster_loses_nothing_and_leaves_nothing() {
    let run_id = format!("chaost{}", &uuid::Uuid::now_v7().simple().to_string()[24..]);
    let dir = std::env::temp_dir().join(format!("orderflow-{run_id}"));
    let _leftovers = Leftovers {
        run_id: run_id.clone(),
        dir: dir.clone(),
    };
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["chaos", "--cluster", "--once"])
        .args(["--orders", &ORDERS.to_string(), "--concurrency", "25"])
        .args(["--rate", "8", "--fault-gap-ms", "1500", "--down-ms", "1500"])
        .args(["--seed", "13", "--timeout-secs", "200"])
        .args(["--run-id", &run_id])
        .arg("--work-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{stderr}"));
    assert!(
        output.status.success() && summary["ok"] == true,
        "the chaos run found violations ({}):\n{:#}\nstderr:\n{stderr}",
        output.status,
        summary["invariants"]
    );
    eprintln!("reduced chaos run: {took:?}");

    // Every order accepted and ended; every invariant checked something.
    assert_eq!(summary["orders"]["accepted"], ORDERS, "{summary:#}");
    assert_eq!(
        summary["orders"]["completed"].as_u64().unwrap()
            + summary["orders"]["cancelled"].as_u64().unwrap(),
        ORDERS
    );
    for (name, invariant) in summary["invariants"].as_object().unwrap() {
        assert_eq!(invariant["ok"], true, "{name}: {invariant:#}");
        assert!(
            invariant["checked"].as_u64().unwrap() > 0,
            "{name} checked nothing"
        );
    }
    // A run with faults, each of them, the node loss included.
    let counts = &summary["fault_counts"];
    for kind in [
        "close_all_connections",
        "broker_stop_start_app",
        "broker_node_sigkill",
        "postgres_restart_fast",
        "postgres_restart_immediate",
        "poison",
        "duplicate_delivery",
    ] {
        assert!(
            counts[kind].as_u64().unwrap_or(0) >= 1,
            "no {kind}: {counts:#}"
        );
    }
    assert!(
        counts["worker_sigkill"].as_u64().unwrap() >= 9,
        "{counts:#}"
    );
    for fault in summary["faults"].as_array().unwrap() {
        assert_eq!(fault["injected"], true, "{fault:#}");
    }
    // The races were run, and the cancellations were refunded (checked above).
    let scenarios = &summary["orders"]["by_scenario"];
    assert!(
        scenarios["deadline"].is_object() && scenarios["cancelrace"].is_object(),
        "{scenarios:#}"
    );
    // Every service queue had traffic, and let all of it through.
    for (queue, figures) in summary["queues"].as_object().unwrap() {
        assert!(
            figures["routed"].as_u64().unwrap() > 0,
            "{queue}: {figures}"
        );
        assert_eq!(figures["remaining"], 0, "{queue}: {figures}");
    }

    // Nothing left behind.
    assert!(
        processes_of(&run_id).is_empty(),
        "processes of the run are still running"
    );
    assert!(!dir.exists(), "the run's directory is still there");
    assert!(took < Duration::from_mins(4), "took {took:?}");
}
