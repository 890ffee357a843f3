//! The `orderflow` binary as a user meets it: `orderflow up` on a fresh
//! database, orders placed and paid with `orderflow order`, and `up` killed
//! with SIGKILL in the middle of an order and started again.

use std::process::Stdio;
use std::time::Duration;

use orderflow_tests::{TEST_TOKEN_KEYS, TestEnv};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{BIN, Ended, orderflow_in, run, spawn_logging_warnings, stop_with_sigterm};

/// Starts `orderflow up` on the test's namespace and database; returns the
/// child, the API URL it printed and the console's development operator token.
async fn up(env: &TestEnv) -> (Child, String, String) {
    let mut child = spawn_logging_warnings(
        orderflow_in(env)
            .arg("up")
            .env("ORDERFLOW_HTTP_ADDR", "127.0.0.1:0")
            .env("ORDERFLOW_TOKEN_KEYS", TEST_TOKEN_KEYS)
            .env("ORDERFLOW_GATEWAY_LATENCY_MS", "1"),
        Stdio::piped(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_mins(1), lines.next_line())
        .await
        .expect("`orderflow up` printed nothing within 60 s")
        .unwrap()
        .expect("`orderflow up` exited before it was up");
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no API address in {line:?}"))
        .to_owned();
    // Then where the console is, and its development operator token.
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert_eq!(next().await, format!("console: {url}/console"));
    let token_line = next().await;
    let token = token_line
        .strip_prefix("console operator token (development, this run only; set ")
        .and_then(|rest| rest.rsplit_once(": "))
        .map_or_else(
            || panic!("no operator token in {token_line:?}"),
            |(_, token)| token.to_owned(),
        );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, token)
}

/// Runs `orderflow <words> --api <api>`, `words` split at white space.
async fn cli(api: &str, words: &str) -> Ended {
    run(Command::new(BIN)
        .args(words.split_whitespace())
        .args(["--api", api]))
    .await
}

#[tokio::test]
async fn up_serves_orders_and_survives_sigkill() {
    let env = TestEnv::deployment().await;
    let (mut first, api, token) = up(&env).await;
    // The console's operator side works with the printed token, only.
    let http = reqwest::Client::new();
    let queues = format!("{api}/console/api/queues");
    let answer = http.get(&queues).bearer_auth(&token).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer = http
        .get(&queues)
        .bearer_auth("dev-guess")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);

    let start = "order start --supplier haidilao --product hotpot-set:1 --wait --json";
    let out = cli(&api, start).await.succeeded();
    let order: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(order["status"], "awaiting_payment", "{order:#}");
    let order_id = order["order_id"].as_str().unwrap().to_owned();

    // Killed without warning while the order waits for its payment.
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let (mut second, api, second_token) = up(&env).await;
    assert_ne!(second_token, token, "a development token is for one run");

    let pay = format!("order pay {order_id} --method zhifubao --json");
    let out = cli(&api, &pay).await.succeeded();
    let order: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(order["status"], "completed", "{order:#}");
    assert_eq!(order["charged_cents"], 12_800 * 80 / 100);

    let out = cli(&api, &format!("order show {order_id}"))
        .await
        .succeeded();
    assert!(out.contains("completed") && out.contains("102.40"), "{out}");

    cli(
        &api,
        "order pay no-such-order --method weixin --timeout-secs 1",
    )
    .await
    .failed_saying(&["not found"]);
    cli(&api, "order start --supplier x --product tea")
        .await
        .failed_saying(&["SKU:QUANTITY"]);

    // SIGTERM: a graceful stop.
    let status = stop_with_sigterm(&mut second, Duration::from_secs(30), "`orderflow up`").await;
    assert!(status.success(), "{status}");
    env.cleanup().await;
}

#[tokio::test]
async fn up_explains_a_database_it_cannot_reach() {
    run(Command::new(BIN)
        .arg("up")
        .env("ORDERFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env(
            "ORDERFLOW_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/nowhere",
        )
        .env("ORDERFLOW_HTTP_ADDR", "127.0.0.1:0"))
    .await
    .failed_saying(&["cannot reach PostgreSQL"]);
}
