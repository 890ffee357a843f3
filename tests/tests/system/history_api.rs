//! `GET /orders/{id}/history`: the coordinator's execution history of an
//! order through the API, with every worker running: a completed order's
//! whole saga in order with its causes (also page by page), a cancelled
//! order's rejection, and 404 for an order the coordinator never saw.

use std::time::Duration;

use orderflow_tests::eventually;
use orderflow_tests::system::System;
use serde_json::Value;

/// GET /orders/{id}/history; (status, body).
async fn history(system: &System, order_id: &str) -> (u16, Value) {
    history_page(system, order_id, "").await
}

/// GET /orders/{id}/history?<query>; (status, body).
async fn history_page(system: &System, order_id: &str, query: &str) -> (u16, Value) {
    let response = system
        .get_response(&format!("/orders/{order_id}/history?{query}"))
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Every page of `limit` entries, following `next` until it is null.
async fn pages(system: &System, order_id: &str, limit: u32) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut query = format!("limit={limit}");
    loop {
        let (status, page) = history_page(system, order_id, &query).await;
        assert_eq!(status, 200, "{page:#}");
        pages.push(page["entries"].as_array().unwrap().clone());
        match page["next"].as_i64() {
            Some(next) => query = format!("limit={limit}&after={next}"),
            None => return pages,
        }
    }
}

/// The history's entries once it has one named `last` (the coordinator sees
/// the terminal event a moment after the order shows it).
async fn history_until(system: &System, order_id: &str, last: &str) -> Vec<Value> {
    eventually(
        Duration::from_secs(20),
        &format!("{last} in the history of {order_id}"),
        || async {
            let (status, body) = history(system, order_id).await;
            status == 200
                && body["entries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["name"] == last)
        },
    )
    .await;
    let (status, body) = history(system, order_id).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["order_id"], order_id);
    body["entries"].as_array().unwrap().clone()
}

/// Places an order of one hotpot-set with `supplier` and pays it with
/// `method`; once it ended `status`, (its id, its history up to
/// `order.<status>`).
async fn ended_order_history(
    system: &System,
    supplier: &str,
    method: &str,
    status: &str,
) -> (String, Vec<Value>) {
    let (order_id, order) = system
        .place_and_pay(supplier, &[("hotpot-set", 1)], method)
        .await;
    assert_eq!(order["status"], status, "{order:#}");
    let entries = history_until(system, &order_id, &format!("order.{status}")).await;
    (order_id, entries)
}

/// The entry named `name`.
fn named<'a>(entries: &'a [Value], name: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {entries:#?}"))
}

/// Asserts that `effect` was caused by `cause` (its causation id is the
/// cause's message id).
fn caused_by(entries: &[Value], effect: &str, cause: &str) {
    assert_eq!(
        named(entries, effect)["causation_id"],
        named(entries, cause)["message_id"],
        "{effect} should be caused by {cause}: {entries:#?}"
    );
}

/// Every entry has the fields of the API and a distinct id, and none comes
/// before the entry that caused it. (Ids follow the order the coordinator
/// recorded entries in, which need not be causal: an order's events may be
/// handled out of order, and the history reads them back in causal order.)
fn well_formed(entries: &[Value]) {
    let mut ids = std::collections::HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        for field in ["recorded_at", "kind", "name", "message_id", "detail"] {
            assert!(!entry[field].is_null(), "{field} missing: {entry:#}");
        }
        assert!(entry.get("causation_id").is_some(), "{entry:#}");
        assert!(
            ids.insert(entry["id"].as_i64().unwrap()),
            "distinct ids: {entries:#?}"
        );
        if let Some(cause) = entry["causation_id"].as_str() {
            assert!(
                !entries[i..]
                    .iter()
                    .any(|later| later["message_id"] == cause),
                "{} comes before its cause: {entries:#?}",
                entry["name"]
            );
        }
    }
}

#[tokio::test]
async fn a_completed_order_has_its_whole_saga_in_order_with_causes() {
    let system = System::start().await;
    let (order_id, entries) =
        ended_order_history(&system, "sichuan-kitchen", "weixin", "completed").await;
    let text = serde_json::to_string(&entries).unwrap();
    assert!(
        !text.contains("\"v1."),
        "tokens are kept as digests only: {text}"
    );
    assert!(text.contains("sha256:"), "{text}");
    well_formed(&entries);
    let events: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "event")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "order.started",
            "order.info-generated",
            "payment.awaiting",
            "payment.submitted",
            "payment.selected.weixin",
            "payment.captured",
            "order.completed",
        ],
        "{entries:#?}"
    );
    // The customer's actions (placing, paying) have no causing message;
    // everything else names the message it came from.
    assert!(named(&entries, "order.started")["causation_id"].is_null());
    assert!(named(&entries, "payment.submitted")["causation_id"].is_null());
    for entry in &entries {
        if entry["name"] != "order.started" && entry["name"] != "payment.submitted" {
            assert!(entry["causation_id"].is_string(), "{entry:#}");
        }
    }
    caused_by(&entries, "order.info-generated", "order.started");
    caused_by(&entries, "payment.awaiting", "order.info-generated");
    caused_by(&entries, "payment.selected.weixin", "payment.submitted");
    caused_by(&entries, "payment.captured", "payment.selected.weixin");
    caused_by(&entries, "order.completed", "payment.captured");

    // Page by page: every entry once, pages in id order.
    let paged = pages(&system, &order_id, 3).await;
    assert_eq!(paged.len(), entries.len().div_ceil(3), "{paged:#?}");
    let ids = |entries: &[Value]| -> Vec<i64> {
        let mut ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids(&paged.concat()), ids(&entries));
    for pair in paged.windows(2) {
        assert!(ids(&pair[0]).last() < ids(&pair[1]).first(), "{paged:#?}");
    }

    // The details are the events' bodies.
    let selected = named(&entries, "payment.selected.weixin");
    assert_eq!(selected["detail"]["method"], "weixin");
    assert_eq!(selected["detail"]["amount_cents"], 12_800);
    assert_eq!(
        named(&entries, "order.completed")["detail"]["charged_cents"],
        12_800 / 2
    );
    system.stop().await;
}

#[tokio::test]
async fn a_cancelled_order_shows_the_rejection_that_ended_it() {
    let system = System::start().await;
    let (_, entries) = ended_order_history(&system, "haidilao", "unionpay", "cancelled").await;
    well_formed(&entries);
    let seen: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("event", "order.started"),
            ("event", "order.info-generated"),
            ("event", "payment.awaiting"),
            ("event", "payment.submitted"),
            ("rejection", "payment.rejected"),
            ("event", "order.cancelled"),
        ],
        "{entries:#?}"
    );
    let rejected = named(&entries, "payment.rejected");
    assert_eq!(rejected["detail"]["method"], "unionpay");
    assert_eq!(rejected["detail"]["reason"], "method not allowed");
    caused_by(&entries, "payment.rejected", "payment.submitted");
    caused_by(&entries, "order.cancelled", "payment.rejected");
    system.stop().await;
}

#[tokio::test]
async fn an_unknown_order_has_no_history() {
    let system = System::start().await;
    let (status, body) = history(&system, "no-such-order").await;
    assert_eq!(status, 404, "{body:#}");
    assert_eq!(body["error"], "no history for order no-such-order");
    system.stop().await;
}
