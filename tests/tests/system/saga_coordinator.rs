//! The saga coordinator's promises: a payment step that can time out, a flow
//! that can time out, a late answer that cannot undo a decision, deadlines
//! that survive the coordinator being down, bad tokens turned down with their
//! reason, and compensation that refunds exactly once.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use orderflow_shared::events::{Event, PaymentSelected, PaymentSubmitted, SagaTimedOut, Step};
use orderflow_shared::token::{Claims, TokenKeys};
use orderflow_tests::system::{System, Workers};
use orderflow_tests::{TEST_TOKEN_KEYS, eventually};
use secrecy::SecretString;
use serde_json::Value;

fn test_keys() -> TokenKeys {
    TokenKeys::parse(&SecretString::from(TEST_TOKEN_KEYS.to_owned())).unwrap()
}

/// Whether the order's history has both terminal events (it never may).
fn both_outcomes(history: &[(String, String)]) -> bool {
    history.iter().any(|(_, name)| name == "order.completed")
        && history.iter().any(|(_, name)| name == "order.cancelled")
}

#[tokio::test]
async fn a_payment_just_before_or_after_its_deadline_ends_one_way_only() {
    let system = System::start_adjusted(|s| s.payment_timeout_secs = 2).await;
    // Offsets around the deadline, in milliseconds.
    let offsets = [-400_i64, -250, -120, -40, 0, 40, 120, 250];
    let runs = offsets.iter().map(|&offset| {
        let system = &system;
        async move {
            let order_id = system.place("noodle-bar", &[("tea", 1)]).await;
            let order = system.wait_for(&order_id, "awaiting_payment").await;
            let token = order["payment_token"].as_str().unwrap().to_owned();
            let deadline: DateTime<Utc> =
                order["token_expires_at"].as_str().unwrap().parse().unwrap();
            let submit_at = deadline + chrono::Duration::milliseconds(offset);
            if let Ok(wait) = (submit_at - Utc::now()).to_std() {
                tokio::time::sleep(wait).await;
            }
            // 409: the API saw the order already cancelled by its deadline.
            let status = system.submit(&order_id, &token, "zhifubao").await;
            assert!(status == 202 || status == 409, "{offset} ms: {status}");
            let order = system.ended(&order_id).await;
            // Let late messages (a capture after the cancel) settle.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let order = system.get_order(&order_id, None).await.max_by_status(order);
            (order_id, offset, order)
        }
    });
    let outcomes = futures::future::join_all(runs).await;
    let completed = outcomes
        .iter()
        .filter(|(_, _, o)| o["status"] == "completed")
        .count();
    eprintln!("deadline race: {completed} of {} completed", outcomes.len());
    for (order_id, offset, order) in &outcomes {
        let (charges, refunds) = system.gateway(order_id).await;
        let history = system.history(order_id).await;
        assert!(
            !both_outcomes(&history),
            "{offset} ms: both outcomes: {history:?}"
        );
        match order["status"].as_str() {
            Some("completed") => assert_eq!((charges, refunds), (1, 0), "{offset} ms"),
            Some("cancelled") => assert_eq!(
                charges, refunds,
                "{offset} ms: a charge of a cancelled order is refunded"
            ),
            other => panic!("{offset} ms: order did not end: {other:?}"),
        }
    }
    system.stop().await;
}

/// Picks the later of two reads of the same order.
trait Latest {
    fn max_by_status(self, other: Value) -> Value;
}

impl Latest for Value {
    fn max_by_status(self, other: Value) -> Value {
        if self["status"] == "completed" || self["status"] == "cancelled" {
            self
        } else {
            other
        }
    }
}

#[tokio::test]
async fn a_deadline_that_passes_while_no_coordinator_runs_fires_once_when_they_come_back() {
    let workers = Workers::all_but(|w| w.coordinator = false);
    let system = System::start_with(|s| s.payment_timeout_secs = 1, workers).await;
    let (stop, first) = system.start_coordinator();
    let orders = [
        system.place("noodle-bar", &[("tea", 1)]).await,
        system.place("noodle-bar", &[("tofu", 1)]).await,
    ];
    let coordinator = system.db("coordinator").await;
    for order_id in &orders {
        system.wait_for(order_id, "awaiting_payment").await;
        eventually(
            Duration::from_secs(10),
            "the payment timer is armed",
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM timers WHERE order_id = $1 AND step = 'payment')",
                )
                .bind(order_id)
                .fetch_one(coordinator.pool())
                .await
                .unwrap()
            },
        )
        .await;
    }
    stop.cancel();
    first.await.unwrap().unwrap();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    for order_id in &orders {
        let order = system.get_order(order_id, None).await;
        assert_eq!(
            order["status"], "awaiting_payment",
            "nobody fired the timer yet"
        );
    }
    // Two coordinators come back at once; each deadline fires once.
    let (stop_a, a) = system.start_coordinator();
    let (stop_b, b) = system.start_coordinator();
    for order_id in &orders {
        let order = system.ended(order_id).await;
        assert_eq!(order["status"], "cancelled");
        assert_eq!(order["cancel_reason"], "timed out waiting for the payment");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for order_id in &orders {
        let fired: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE correlation_id = $1 AND routing_key = 'saga.timed-out'",
        )
        .bind(order_id)
        .fetch_one(coordinator.pool())
        .await
        .unwrap();
        assert_eq!(fired, 1, "order {order_id}: the timer fired once");
    }
    coordinator.close().await;
    stop_a.cancel();
    stop_b.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    system.stop().await;
}

#[tokio::test]
async fn every_bad_token_is_rejected_with_its_reason_and_changes_nothing() {
    let system = System::start().await;
    let order_id = system.place("noodle-bar", &[("noodles", 1)]).await;
    let other_id = system.place("noodle-bar", &[("tea", 1)]).await;
    let token = system.payment_token(&order_id).await;
    let other_token = system.payment_token(&other_id).await;
    let keys = test_keys();
    let claims = keys.verify(&token, 0).unwrap();
    let mint = |keys: &TokenKeys, change: &dyn Fn(&mut Claims)| {
        let mut claims = claims.clone();
        change(&mut claims);
        keys.mint(&claims).unwrap()
    };
    let foreign = TokenKeys::parse(&SecretString::from(
        "test:someone-elses-secret-key".to_owned(),
    ))
    .unwrap();
    let unknown =
        TokenKeys::parse(&SecretString::from("k9:0123456789abcdef0123".to_owned())).unwrap();
    let tampered = {
        let mut claims = claims.clone();
        claims.amount_cents = 1;
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let tag = token.rsplit('.').next().unwrap();
        format!("v1.{payload}.{tag}")
    };
    let cases = [
        (
            "forged",
            mint(&foreign, &|_| {}),
            "token signature is invalid",
        ),
        ("tampered", tampered, "token signature is invalid"),
        (
            "unknown key",
            mint(&unknown, &|c| c.kid = "k9".into()),
            "token signed with unknown key `k9`",
        ),
        (
            "expired",
            mint(&keys, &|c| c.expires_at = Utc::now().timestamp() - 5),
            "token expired",
        ),
        (
            "wrong order",
            other_token.clone(),
            "token belongs to another order",
        ),
        (
            "wrong step",
            mint(&keys, &|c| c.step = "generate-info".into()),
            "token is for step `generate-info`, not `payment`",
        ),
        ("malformed", "not-a-token".to_owned(), "malformed token"),
    ];
    for (case, bad, reason) in &cases {
        assert_eq!(
            system.submit(&order_id, bad, "zhifubao").await,
            202,
            "{case}"
        );
        system
            .wait_for_rejection(&order_id, &format!("{case} rejected"), reason)
            .await;
        let order = system.get_order(&order_id, None).await;
        assert_eq!(
            order["status"], "awaiting_payment",
            "{case} changed nothing"
        );
    }
    // The genuine token still works, once.
    let order = system.pay(&order_id, "zhifubao").await;
    assert_eq!(order["status"], "completed");
    // The API refuses to pay an ended order (409); a replay straight onto
    // the bus meets the coordinator's ledger.
    assert_eq!(system.submit(&order_id, &token, "zhifubao").await, 409);
    let replay = Event::PaymentSubmitted(PaymentSubmitted {
        order_id: order_id.clone(),
        token: token.clone(),
        method: "zhifubao".into(),
    });
    system.publish_event(&replay).await;
    system
        .wait_for_rejection(&order_id, "replay rejected", "token already used")
        .await;
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    let rejections = system
        .history_count(&order_id, "rejection", "payment.submission-rejected")
        .await;
    assert_eq!(rejections, cases.len() + 1);
    // The other order was untouched by its token's misuse.
    assert_eq!(
        system.get_order(&other_id, None).await["status"],
        "awaiting_payment"
    );
    system.stop().await;
}

#[tokio::test]
async fn a_capture_that_lands_after_the_cancellation_is_refunded_once() {
    let system = System::start_adjusted(|s| s.gateway_latency_ms = 1500).await;
    let order_id = system.place("noodle-bar", &[("beef-slices", 1)]).await;
    system.submit_payment(&order_id, "unionpay").await;
    // `paying`: the method was selected and the provider is at the gateway,
    // which takes 1.5 s.
    system.wait_for(&order_id, "paying").await;
    // While the gateway works, the flow deadline passes.
    system
        .publish_event(&Event::SagaTimedOut(SagaTimedOut {
            order_id: order_id.clone(),
            step: Step::Flow,
        }))
        .await;
    eventually(Duration::from_secs(20), "charge refunded", || async {
        system.get_order(&order_id, None).await["refunded_cents"].is_i64()
    })
    .await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["status"], "cancelled", "{order:#}");
    assert_eq!(order["refunded_cents"], 4_600 * 70 / 100);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        system.gateway(&order_id).await,
        (1, 1),
        "one charge, one refund"
    );
    system.stop().await;
}

#[tokio::test]
async fn a_duplicate_payment_selected_charges_once() {
    let system = System::start().await;
    let (order_id, order) = system
        .place_and_pay("noodle-bar", &[("noodles", 2)], "weixin")
        .await;
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], 1_200);
    // The coordinator's decision once more, as a distinct message (not a
    // redelivery): the inbox cannot help here, the capture's state does.
    let selected = Event::PaymentSelected(PaymentSelected {
        order_id: order_id.clone(),
        method: "weixin".into(),
        amount_cents: 2_400,
    });
    system.publish_event(&selected).await;
    let queue = system.env.queue("payment-provider-weixin");
    system
        .wait_for_depth(&queue, 0, "the copy is handled")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    assert_eq!(
        system
            .env
            .message_count(&system.env.dead_letter_queue("payment-provider-weixin"))
            .await,
        0,
        "a copy of a real decision is no forgery"
    );
    system.stop().await;
}

#[tokio::test]
async fn a_provider_that_gives_up_fails_the_payment_and_the_order_is_cancelled() {
    let system = System::start_adjusted(|s| {
        s.gateway_failure_rate = 1.0;
        s.gateway_retries = 2;
    })
    .await;
    let (order_id, order) = system
        .place_and_pay("noodle-bar", &[("tea", 1)], "zhifubao")
        .await;
    assert_eq!(order["status"], "cancelled");
    let reason = order["cancel_reason"].as_str().unwrap();
    assert!(reason.starts_with("payment failed at zhifubao"), "{reason}");
    assert_eq!(system.gateway(&order_id).await, (0, 0));
    system.stop().await;
}

#[tokio::test]
async fn an_order_whose_info_never_comes_is_cancelled_at_its_timeout() {
    let workers = Workers::all_but(|w| w.generate_info = false);
    let system = System::start_with(|s| s.generate_info_timeout_secs = 1, workers).await;
    let order_id = system.place("noodle-bar", &[("tea", 1)]).await;
    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(
        order["cancel_reason"],
        "timed out waiting for the order information"
    );
    system
        .assert_in_history(&order_id, "timer", "saga.timed-out")
        .await;
    system.stop().await;
}

#[tokio::test]
async fn the_flow_timeout_cancels_a_saga_stuck_in_any_step() {
    // Stuck waiting for the payment (nobody pays)...
    let system = System::start_adjusted(|s| s.flow_timeout_secs = 2).await;
    let waiting = system.place("noodle-bar", &[("tea", 1)]).await;
    system.wait_for(&waiting, "awaiting_payment").await;
    let order = system.ended(&waiting).await;
    assert_eq!(
        order["cancel_reason"],
        "timed out: the order took longer than the flow allows"
    );
    system.stop().await;

    // ...and stuck before that (nobody prices the order).
    let workers = Workers::all_but(|w| w.generate_info = false);
    let system = System::start_with(|s| s.flow_timeout_secs = 2, workers).await;
    let unpriced = system.place("noodle-bar", &[("tea", 1)]).await;
    let order = system.ended(&unpriced).await;
    assert_eq!(
        order["cancel_reason"],
        "timed out: the order took longer than the flow allows"
    );
    system.stop().await;
}
