//! `orderflow pause|resume SERVICE` against a running system (the same
//! `orderflow_ops::pause` as the console): a paused service stops consuming
//! and its orders wait at its step; resumed, they go on. And `orderflow
//! topology lint` checks the choreography of the repository's model.

use std::time::Duration;

use orderflow_tests::system::System;
use orderflow_tests::{eventually, run_to_end};
use secrecy::ExposeSecret;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

async fn orderflow(system: &System, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        Command::new(BIN)
            .args(args)
            .env("ORDERFLOW_AMQP_URL", system.env.amqp_url.expose_secret())
            .env("ORDERFLOW_NAMESPACE", &system.env.namespace),
    )
    .await
}

#[tokio::test]
async fn a_paused_service_holds_its_orders_until_it_is_resumed() {
    let system = System::start_with(
        |settings| settings.pause_check_ms = 100,
        orderflow_tests::system::Workers::default(),
    )
    .await;
    let queue = system.env.queue("generate-info");
    let (code, out, err) = orderflow(&system, &["pause", "generate-info"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("paused generate-info") && out.contains("orderflow resume generate-info"),
        "{out}"
    );
    eventually(Duration::from_secs(10), "generate-info stops", || async {
        system.env.consumer_count(&queue).await == 0
    })
    .await;
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    eventually(Duration::from_secs(10), "order.started waits", || async {
        system.env.message_count(&queue).await == 1
    })
    .await;
    assert_eq!(system.get_order(&order_id, None).await["status"], "started");

    let (code, out, err) = orderflow(&system, &["resume", "generate-info"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resumed generate-info"), "{out}");
    let order = system.wait_for(&order_id, "awaiting_payment").await;
    assert_eq!(order["amount_cents"], 900);
    // Resuming a running service changes nothing.
    let (code, _, err) = orderflow(&system, &["resume", "generate-info"]).await;
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = orderflow(&system, &["pause", "no-such-service"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown service `no-such-service`") && err.contains("generate-info"),
        "{err}"
    );
    system.stop().await;
}

#[tokio::test]
async fn topology_lint_checks_the_choreography_of_the_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (code, out, err) = run_to_end(
        Command::new(BIN)
            .args(["topology", "lint"])
            .current_dir(&root),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("matches the model"), "{out}");
    assert!(out.contains("the choreography is sound"), "{out}");
}
