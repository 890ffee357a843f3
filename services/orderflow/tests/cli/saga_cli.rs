//! `orderflow saga history|stuck` against a running system: the binary reads
//! the coordinator's schema of the test database directly and shows what the
//! API shows; an order waiting for its payment is stuck; an unknown order and
//! a database the coordinator never ran on are clear errors.

use std::time::Duration;

use orderflow_tests::system::System;
use orderflow_tests::{TestEnv, eventually};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::process::Command;

use crate::support::{BIN, Ended, run};

/// Runs `orderflow <args>` on `database_url`.
async fn cli(database_url: &SecretString, args: &[&str]) -> Ended {
    run(Command::new(BIN)
        .args(args)
        .env("ORDERFLOW_DATABASE_URL", database_url.expose_secret())
        .env_remove("ORDERFLOW_CONFIG"))
    .await
}

/// The API's history entries of `order_id` once one is named `name`.
async fn api_history_until(system: &System, order_id: &str, name: &str) -> Vec<Value> {
    let url = format!("{}/orders/{order_id}/history", system.api);
    let fetch = || async {
        let response = system.client.get(&url).send().await.unwrap();
        if response.status().is_success() {
            let body: Value = response.json().await.unwrap();
            body["entries"].as_array().unwrap().clone()
        } else {
            Vec::new()
        }
    };
    eventually(
        Duration::from_secs(20),
        &format!("{name} in the history of {order_id}"),
        || async { fetch().await.iter().any(|e| e["name"] == name) },
    )
    .await;
    fetch().await
}

#[tokio::test]
async fn saga_history_and_stuck_read_the_coordinator() {
    let system = System::start().await;
    let db = &system.env.database_url;

    let completed = system.place("sichuan-kitchen", &[("hotpot-set", 1)]).await;
    assert_eq!(
        system.pay(&completed, "zhifubao").await["status"],
        "completed"
    );
    let entries = api_history_until(&system, &completed, "order.completed").await;

    let out = cli(db, &["saga", "history", &completed]).await.succeeded();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("order {completed} (")),
        "{out}"
    );
    assert!(lines[1].starts_with("#  TIME"), "{out}");
    assert_eq!(lines.len(), 2 + entries.len(), "{out}");
    for (line, entry) in lines[2..].iter().zip(&entries) {
        let name = entry["name"].as_str().unwrap();
        assert!(line.contains(name), "{name} missing from {line:?}:\n{out}");
        let message_id = entry["message_id"].as_str().unwrap();
        assert!(
            line.contains(&message_id[message_id.len() - 8..]),
            "{line:?}"
        );
    }
    let selected = lines
        .iter()
        .find(|l| l.contains("payment.selected.zhifubao"))
        .unwrap();
    assert!(selected.contains("zhifubao, amount 128.00"), "{out}");
    assert!(
        lines
            .iter()
            .find(|l| l.contains("order.completed"))
            .unwrap()
            .contains("charged 102.40"),
        "{out}"
    );
    assert!(
        !out.contains("v1."),
        "no payment token in the table:\n{out}"
    );

    let out = cli(db, &["saga", "history", &completed, "--json"])
        .await
        .succeeded();
    let json: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(json.len(), entries.len());
    assert_eq!(json, entries, "the CLI and the API show the same entries");

    // Placed, never paid: the saga waits on the payment step.
    let waiting = system.place("haidilao", &[("tea", 1)]).await;
    system.wait_for(&waiting, "awaiting_payment").await;
    api_history_until(&system, &waiting, "payment.awaiting").await;

    let out = cli(db, &["saga", "stuck", "--older-than", "0s"])
        .await
        .succeeded();
    assert!(out.starts_with("ORDER"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&waiting))
        .unwrap_or_else(|| panic!("{waiting} not listed:\n{out}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[1], "payment", "{out}");
    assert!(line.contains(" s ago)"), "{out}");
    assert!(
        !out.contains(&completed),
        "an ended saga is not stuck:\n{out}"
    );

    let out = cli(db, &["saga", "stuck", "--older-than", "0s", "--json"])
        .await
        .succeeded();
    let stuck: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(stuck.len(), 1, "{out}");
    assert_eq!(stuck[0]["order_id"], waiting.as_str());
    assert_eq!(stuck[0]["step"], "payment");

    let out = cli(db, &["saga", "stuck", "--older-than", "1h"])
        .await
        .succeeded();
    assert_eq!(out.trim(), "no stuck sagas (older than 1h)");

    cli(db, &["saga", "history", "no-such-order"])
        .await
        .failed_saying(&["no history for order no-such-order"]);
    cli(db, &["saga", "stuck", "--older-than", "soon"])
        .await
        .failed_saying(&["--older-than"]);

    system.stop().await;
}

#[tokio::test]
async fn a_database_without_the_coordinator_is_explained() {
    let env = TestEnv::new(&[]).await;
    for args in [
        &["saga", "history", "some-order"][..],
        &["saga", "stuck", "--older-than", "5m"],
    ] {
        let err = cli(&env.database_url, args)
            .await
            .failed_saying(&["no saga coordinator tables"]);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    env.cleanup().await;
}
