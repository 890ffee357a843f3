//! The invariants of a chaos run, checked from outside once the load is
//! over: through the order API (what clients see), the database (orders,
//! the coordinator's payment steps and history, the gateway's ledger) and
//! the broker (every queue empty, the dead letters exactly the poison that
//! was injected). Each invariant says how many orders or queues it checked
//! and lists its first violations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use orderflow_shared::bus::Broker;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::topology::QueueRole;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::faults::{header_text, no_arguments};
use super::load::{Placed, Scenario};

/// One invariant's result.
#[derive(Debug, Default, serde::Serialize)]
pub struct Invariant {
    pub ok: bool,
    pub checked: usize,
    pub violations: usize,
    /// The first violations, described.
    pub examples: Vec<String>,
}

impl Invariant {
    fn new() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    fn check(&mut self, holds: bool, describe: impl FnOnce() -> String) {
        self.checked += 1;
        if !holds {
            self.ok = false;
            self.violations += 1;
            if self.examples.len() < 10 {
                self.examples.push(describe());
            }
        }
    }
}

/// An order as the database holds it, with its money.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    order_id: String,
    status: String,
    method: Option<String>,
    charged_cents: Option<i64>,
    cancel_reason: Option<String>,
    step_amount: Option<i64>,
    accepted_method: Option<String>,
    charges: i64,
    charged: i64,
    refunds: i64,
    refunded: i64,
    completed_events: i64,
    cancelled_events: i64,
}

/// Waits until every accepted order is terminal in the database, up to
/// `patience`; the ones still not.
pub async fn settle(pool: &PgPool, orders: &[String], patience: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let open: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM unnest($1::text[]) AS ids(id) \
             WHERE NOT EXISTS (SELECT 1 FROM orders.orders o WHERE o.order_id = ids.id \
                               AND o.status IN ('completed', 'cancelled'))",
        )
        .bind(orders)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|_| orders.to_vec());
        if open.is_empty() || tokio::time::Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The money and terminal-state invariants, from the database and the API.
pub async fn orders(
    pool: &PgPool,
    metadata: &Metadata,
    placed: &[Placed],
    http: &reqwest::Client,
    apis: &[String],
) -> anyhow::Result<(BTreeMap<&'static str, Invariant>, Value)> {
    let accepted: Vec<String> = placed
        .iter()
        .filter(|p| p.accepted)
        .map(|p| p.order_id.clone())
        .collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT o.order_id, o.status, o.method, o.charged_cents, o.cancel_reason, \
           s.amount_cents AS step_amount, s.accepted_method, \
           coalesce(l.charges, 0) AS charges, coalesce(l.charged, 0)::int8 AS charged, \
           coalesce(l.refunds, 0) AS refunds, coalesce(l.refunded, 0)::int8 AS refunded, \
           coalesce(h.completed, 0) AS completed_events, coalesce(h.cancelled, 0) AS cancelled_events \
         FROM orders.orders o \
         LEFT JOIN coordinator.payment_steps s USING (order_id) \
         LEFT JOIN (SELECT order_id, count(*) FILTER (WHERE kind = 'charge') AS charges, \
                      sum(amount_cents) FILTER (WHERE kind = 'charge') AS charged, \
                      count(*) FILTER (WHERE kind = 'refund') AS refunds, \
                      sum(amount_cents) FILTER (WHERE kind = 'refund') AS refunded \
                    FROM payments.gateway_ledger GROUP BY order_id) l USING (order_id) \
         LEFT JOIN (SELECT order_id, count(*) FILTER (WHERE name = 'order.completed') AS completed, \
                      count(*) FILTER (WHERE name = 'order.cancelled') AS cancelled \
                    FROM coordinator.history GROUP BY order_id) h USING (order_id) \
         WHERE o.order_id = ANY($1)",
    )
    .bind(&accepted)
    .fetch_all(pool)
    .await?;
    let by_id: BTreeMap<&str, &Row> = rows.iter().map(|r| (r.order_id.as_str(), r)).collect();

    let mut terminal = Invariant::new();
    let mut one_capture = Invariant::new();
    let mut refunded = Invariant::new();
    let mut not_both = Invariant::new();
    let mut api_agrees = Invariant::new();
    let mut paid_complete = Invariant::new();
    let mut outcomes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();

    for order in placed.iter().filter(|p| p.accepted) {
        let id = order.order_id.as_str();
        let row = by_id.get(id);
        let status = row.map_or("missing", |r| r.status.as_str());
        *outcomes
            .entry(format!("{:?}", order.scenario).to_lowercase())
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
        terminal.check(matches!(status, "completed" | "cancelled"), || {
            format!("order {id} is `{status}`, not terminal")
        });
        let Some(row) = row else { continue };
        not_both.check(
            !(row.completed_events > 0 && row.cancelled_events > 0),
            || format!("order {id} was announced both completed and cancelled"),
        );
        match status {
            "completed" => {
                let expected = row
                    .accepted_method
                    .as_deref()
                    .zip(row.step_amount)
                    .and_then(|(method, amount)| metadata.charge_for(method, amount));
                one_capture.check(
                    row.charges == 1
                        && Some(row.charged) == expected
                        && row.charged_cents == expected
                        && row.refunds == 0
                        && row.method == row.accepted_method,
                    || {
                        format!(
                            "order {id} completed with {} charge(s) of {} cents in all (order says \
                             {:?}), {} refund(s); expected one charge of {expected:?} ({:?} on {:?})",
                            row.charges,
                            row.charged,
                            row.charged_cents,
                            row.refunds,
                            row.accepted_method,
                            row.step_amount
                        )
                    },
                );
            }
            "cancelled" => refunded.check(row.refunded == row.charged, || {
                format!(
                    "order {id} cancelled ({:?}) with {} cents charged and {} refunded",
                    row.cancel_reason, row.charged, row.refunded
                )
            }),
            _ => {}
        }
        // A normal order, paid at once, completes: a fault must not cancel it.
        if order.scenario == Scenario::Normal && order.paid {
            paid_complete.check(status == "completed", || {
                format!(
                    "order {id} was paid at once but is `{status}` ({:?})",
                    row.cancel_reason
                )
            });
        }
    }
    // What clients see: the API agrees with the database (16 reads at a time).
    let seen: Vec<(&str, Option<String>)> =
        futures::stream::iter(placed.iter().filter(|p| p.accepted))
            .map(|order| async move {
                let id = order.order_id.as_str();
                // Either instance of the API; 10 s each at most.
                let mut status = None;
                for api in apis {
                    let response = http
                        .get(format!("{api}/orders/{id}"))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success());
                    if let Some(response) = response {
                        status = response
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|o| o["status"].as_str().map(str::to_owned));
                        break;
                    }
                }
                (id, status)
            })
            .buffer_unordered(16)
            .collect()
            .await;
    for (id, api_status) in seen {
        let db_status = by_id.get(id).map(|r| r.status.clone());
        api_agrees.check(api_status.is_some() && api_status == db_status, || {
            format!("order {id}: the API says {api_status:?}, the database {db_status:?}")
        });
    }
    let mut invariants = BTreeMap::new();
    invariants.insert("every_accepted_order_terminal", terminal);
    invariants.insert(
        "completed_orders_one_capture_of_the_server_amount",
        one_capture,
    );
    invariants.insert("cancelled_orders_refunds_equal_captures", refunded);
    invariants.insert("no_order_both_completed_and_cancelled", not_both);
    invariants.insert("api_agrees_with_database", api_agrees);
    invariants.insert("paid_orders_complete", paid_complete);
    Ok((invariants, json!(outcomes)))
}

/// Messages in `queue`, by a passive declaration (0 also after a
/// node came back: callers poll); an error after 10 s without an answer.
async fn count(broker: &Broker, queue: &str) -> anyhow::Result<u32> {
    tokio::time::timeout(Duration::from_secs(10), count_once(broker, queue))
        .await
        .map_err(|_| anyhow::anyhow!("no answer counting {queue} within 10 s"))?
}

async fn count_once(broker: &Broker, queue: &str) -> anyhow::Result<u32> {
    let channel = broker.channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            no_arguments(),
        )
        .await?;
    let _ = channel.close(200, "counted".into()).await;
    Ok(declared.message_count())
}

/// Every queue of the topology but the dead letters is empty (polled up to
/// `patience`, the last view reported); the remaining count per queue.
pub async fn queues_drained(
    broker: &Broker,
    patience: Duration,
) -> (Invariant, BTreeMap<String, u32>) {
    let queues: Vec<String> = broker
        .topology()
        .queues
        .iter()
        .filter(|q| q.role != QueueRole::DeadLetter)
        .map(|q| q.name.clone())
        .collect();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let counts = futures::future::join_all(queues.iter().map(|q| count(broker, q))).await;
        let remaining: BTreeMap<String, u32> = queues
            .iter()
            .cloned()
            .zip(counts.into_iter().map(|n| n.unwrap_or(u32::MAX)))
            .collect();
        let left = remaining.values().any(|n| *n > 0);
        if !left || tokio::time::Instant::now() > deadline {
            let mut invariant = Invariant::new();
            for (queue, n) in &remaining {
                invariant.check(*n == 0, || {
                    if *n == u32::MAX {
                        format!("queue {queue} could not be counted")
                    } else {
                        format!("queue {queue} still holds {n} message(s)")
                    }
                });
            }
            return (invariant, remaining);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Takes every dead letter and compares them with the injected poison:
/// the same message ids per queue, each with a reason.
pub async fn dead_letters(
    broker: &Broker,
    poison: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<(Invariant, Value)> {
    let mut invariant = Invariant::new();
    let mut seen = BTreeMap::new();
    let queues: Vec<String> = broker
        .topology()
        .queues
        .iter()
        .filter(|q| q.role == QueueRole::DeadLetter)
        .map(|q| q.name.clone())
        .collect();
    let channel = broker.channel().await?;
    for queue in &queues {
        let mut found: BTreeSet<String> = BTreeSet::new();
        let mut letters = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?
        {
            let properties = &message.delivery.properties;
            let id = properties
                .message_id()
                .as_ref()
                .map_or_else(|| "(no message id)".to_owned(), |id| id.as_str().to_owned());
            let reason = header_text(properties, "x-orderflow-reason");
            invariant.check(reason.is_some(), || {
                format!("dead letter {id} in {queue} has no reason")
            });
            letters.push(json!({"message_id": id, "reason": reason}));
            found.insert(id);
        }
        let expected: BTreeSet<String> = poison
            .get(queue)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        for id in found.difference(&expected) {
            invariant.check(false, || {
                format!("{queue} holds {id}, which was not injected")
            });
        }
        for id in expected.difference(&found) {
            invariant.check(false, || format!("{queue} lacks the injected poison {id}"));
        }
        invariant.checked += expected.intersection(&found).count();
        if !letters.is_empty() {
            seen.insert(queue.clone(), letters);
        }
    }
    let _ = channel.close(200, "dead letters read".into()).await;
    Ok((invariant, json!(seen)))
}
