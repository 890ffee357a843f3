//! `orderflow pause|resume SERVICE` against a running system (the same
//! `orderflow_ops::pause` as the console): a paused service stops consuming
//! and its orders wait at its step; resumed, they go on. And `orderflow
//! topology lint` checks the choreography of the repository's model.

use std::time::Duration;

use orderflow_tests::system::System;
use tokio::process::Command;

use crate::support::{BIN, Ended, WaitForQueue, orderflow_on_broker, run};

/// Runs `orderflow <args>` on `system`'s broker and namespace.
async fn orderflow(system: &System, args: &[&str]) -> Ended {
    run(orderflow_on_broker(&system.env).args(args)).await
}

#[tokio::test]
async fn a_paused_service_holds_its_orders_until_it_is_resumed() {
    let system = System::start_with(
        |settings| settings.pause_check_ms = 100,
        orderflow_tests::system::Workers::default(),
    )
    .await;
    let queue = system.env.queue("generate-info");
    let out = orderflow(&system, &["pause", "generate-info"])
        .await
        .succeeded();
    assert!(
        out.contains("paused generate-info") && out.contains("orderflow resume generate-info"),
        "{out}"
    );
    let stops = "generate-info stops";
    system
        .env
        .wait_for_consumers(&queue, 0, Duration::from_secs(10), stops)
        .await;
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    system
        .wait_for_depth(&queue, 1, "order.started waits")
        .await;
    assert_eq!(system.get_order(&order_id, None).await["status"], "started");

    let out = orderflow(&system, &["resume", "generate-info"])
        .await
        .succeeded();
    assert!(out.contains("resumed generate-info"), "{out}");
    let order = system.wait_for(&order_id, "awaiting_payment").await;
    assert_eq!(order["amount_cents"], 900);
    // Resuming a running service changes nothing.
    orderflow(&system, &["resume", "generate-info"])
        .await
        .succeeded();

    orderflow(&system, &["pause", "no-such-service"])
        .await
        .failed_saying(&["unknown service `no-such-service`", "generate-info"]);
    system.stop().await;
}

#[tokio::test]
async fn topology_lint_checks_the_choreography_of_the_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = run(Command::new(BIN)
        .args(["topology", "lint"])
        .current_dir(&root))
    .await
    .succeeded();
    assert!(out.contains("matches the model"), "{out}");
    assert!(out.contains("the choreography is sound"), "{out}");
}
