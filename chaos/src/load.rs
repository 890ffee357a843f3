//! The load of a chaos run: orders placed the two ways clients place them
//! (`POST /orders` on the order API, or `order.started` published straight
//! onto the events exchange), paid through the API with the token the
//! order shows, and followed to their end, while faults are injected. Each
//! order's calls are retried as a careful client retries them (the same
//! order id and body, the same message id), so a fault costs time, never an
//! order. A few orders play the races of the issue: a payment submitted
//! around its deadline, and a cancellation (a `saga.timed-out`, as the
//! coordinator's timer publishes it) racing the capture.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use orderflow_shared::bus::{Outgoing, Publisher};
use orderflow_shared::envelope::Envelope;
use orderflow_shared::events::{Event, OrderStarted, ProductLine, SagaTimedOut, Step};
use serde_json::{Value, json};
use tokio::time::Instant;

/// What an order of the run was meant to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Placed, paid at once: must complete.
    Normal,
    /// Paid around its deadline (a second before to half a second after):
    /// completes or is cancelled by the timer, never both.
    Deadline,
    /// Paid while a cancellation is published: whichever wins, a cancelled
    /// order is refunded what it was charged.
    CancelRace,
}

/// How an order was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Api,
    Exchange,
}

/// One order of the run, as its client saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Placed {
    pub order_id: String,
    pub via: Via,
    pub scenario: Scenario,
    /// The API answered 202 or the broker confirmed the `order.started`.
    pub accepted: bool,
    /// The payment submission was answered 202.
    pub paid: bool,
    /// The status the client last saw.
    pub status: Option<String>,
    pub cancel_reason: Option<String>,
    /// Why the client gave up on it, if it did.
    pub error: Option<String>,
}

/// The client side of the run.
pub struct Load {
    pub http: reqwest::Client,
    /// The order API's instances; calls go round them.
    pub apis: Vec<String>,
    pub publisher: Publisher,
    pub run_id: String,
    /// How long a client waits for one order before it gives up on it.
    pub patience: Duration,
    /// The payment timeout of the run (deadline scenario).
    pub payment_timeout: Duration,
}

const SUPPLIERS: [&str; 3] = ["haidilao", "xiaolongkan", "generic-store"];
const SKUS: [&str; 5] = ["hotpot-set", "beef-slices", "tofu", "noodles", "tea"];

impl Load {
    fn api(&self, attempt: usize) -> &str {
        &self.apis[attempt % self.apis.len()]
    }

    /// Drives order number `i` to its end.
    pub async fn drive(self: Arc<Self>, i: usize, seed: u64) -> Placed {
        let mut rng =
            fastrand::Rng::with_seed(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let scenario = match i % 50 {
            7 => Scenario::Deadline,
            13 | 37 => Scenario::CancelRace,
            _ => Scenario::Normal,
        };
        let via = if rng.u8(0..5) == 0 {
            Via::Exchange
        } else {
            Via::Api
        };
        let supplier = SUPPLIERS[rng.usize(0..SUPPLIERS.len())];
        let lines: Vec<(String, u32)> = (0..rng.usize(1..3))
            .map(|_| (SKUS[rng.usize(0..SKUS.len())].to_owned(), rng.u32(1..4)))
            .collect();
        let mut placed = Placed {
            order_id: format!("{}-{i:05}", self.run_id),
            via,
            scenario,
            accepted: false,
            paid: false,
            status: None,
            cancel_reason: None,
            error: None,
        };
        let deadline = Instant::now() + self.patience;
        if let Err(error) = self
            .run(&mut placed, supplier, &lines, &mut rng, deadline)
            .await
        {
            placed.error = Some(format!("order {}: {error:#}", placed.order_id));
        }
        placed
    }

    async fn run(
        &self,
        placed: &mut Placed,
        supplier: &str,
        lines: &[(String, u32)],
        rng: &mut fastrand::Rng,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let order = OrderStarted {
            order_id: placed.order_id.clone(),
            supplier: supplier.to_owned(),
            products: lines
                .iter()
                .map(|(sku, quantity)| ProductLine {
                    sku: sku.clone(),
                    quantity: *quantity,
                })
                .collect(),
            address: "1 Chaos Road".to_owned(),
        };
        match placed.via {
            Via::Api => self.post_order(&order, deadline).await?,
            Via::Exchange => self.publish_order(order, deadline).await?,
        }
        placed.accepted = true;
        let order = self
            .wait_for(&placed.order_id, "awaiting_payment", deadline)
            .await?;
        if order["status"] != "awaiting_payment" {
            return Self::finish(placed, &order);
        }
        let token = order["payment_token"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("awaiting payment without a token: {order}"))?
            .to_owned();
        let methods: Vec<String> = order["payment_methods"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        anyhow::ensure!(!methods.is_empty(), "no payment methods: {order}");
        let method = methods[rng.usize(0..methods.len())].clone();
        match placed.scenario {
            Scenario::Normal => {}
            Scenario::Deadline => {
                let expires_at: DateTime<Utc> = order["token_expires_at"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("no token deadline: {order}"))?;
                // From a second before the deadline to half a second after.
                let at = expires_at - chrono::Duration::milliseconds(rng.i64(-500..1000));
                if let Ok(wait) = (at - Utc::now()).to_std() {
                    tokio::time::sleep(wait.min(self.payment_timeout)).await;
                }
            }
            Scenario::CancelRace => {
                let cancel = Outgoing::event(
                    &Event::SagaTimedOut(SagaTimedOut {
                        order_id: placed.order_id.clone(),
                        step: Step::Flow,
                    }),
                    None,
                );
                let publisher = self.publisher.clone();
                // Sometimes before the capture, sometimes after it.
                let jitter = Duration::from_millis(rng.u64(0..600));
                tokio::spawn(async move {
                    tokio::time::sleep(jitter).await;
                    publish_patiently(&publisher, &cancel).await;
                });
            }
        }
        placed.paid = self
            .submit(&placed.order_id, &token, &method, deadline)
            .await?;
        let order = self
            .wait_for(&placed.order_id, "completed", deadline)
            .await?;
        Self::finish(placed, &order)
    }

    fn finish(placed: &mut Placed, order: &Value) -> anyhow::Result<()> {
        placed.status = order["status"].as_str().map(str::to_owned);
        placed.cancel_reason = order["cancel_reason"].as_str().map(str::to_owned);
        anyhow::ensure!(
            matches!(placed.status.as_deref(), Some("completed" | "cancelled")),
            "did not end: {order}"
        );
        Ok(())
    }

    /// Places `order` through the API (its body is the event's).
    async fn post_order(&self, order: &OrderStarted, deadline: Instant) -> anyhow::Result<()> {
        let body = serde_json::to_value(order)?;
        let placed = self
            .post_patiently("/orders", &body, deadline, "placing the order")
            .await?;
        anyhow::ensure!(
            placed,
            "POST /orders answered 409: order {} exists with another body",
            order.order_id
        );
        Ok(())
    }

    /// Publishes `order` straight on the events exchange, as a user can.
    async fn publish_order(&self, order: OrderStarted, deadline: Instant) -> anyhow::Result<()> {
        let started = Event::OrderStarted(order);
        // One message, published until confirmed: a retry is the same message.
        let message = Outgoing::event(&started, None::<&Envelope>);
        let mut attempt = 0;
        loop {
            match self.publisher.publish(&message).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    attempt += 1;
                    pause(
                        attempt,
                        deadline,
                        &format!("publishing order.started ({error})"),
                    )
                    .await?;
                }
            }
        }
    }

    /// `GET /orders/{id}?wait_for=status`, until the order has that status or
    /// ended (404 while the read model has not seen the order yet).
    async fn wait_for(
        &self,
        order_id: &str,
        status: &str,
        deadline: Instant,
    ) -> anyhow::Result<Value> {
        let mut attempt = 0;
        loop {
            let url = format!("{}/orders/{order_id}", self.api(attempt));
            let response = self
                .http
                .get(&url)
                .query(&[("wait_for", status), ("timeout_ms", "15000")])
                .send()
                .await;
            if let Ok(response) = response
                && response.status().is_success()
                && let Ok(order) = response.json::<Value>().await
                && (order["status"] == status
                    || order["status"] == "completed"
                    || order["status"] == "cancelled")
            {
                return Ok(order);
            }
            attempt += 1;
            pause(attempt.min(3), deadline, &format!("waiting for `{status}`")).await?;
        }
    }

    /// Submits the token; true when answered 202, false when the order had
    /// ended already (409).
    async fn submit(
        &self,
        order_id: &str,
        token: &str,
        method: &str,
        deadline: Instant,
    ) -> anyhow::Result<bool> {
        let body = json!({"token": token, "method": method});
        let path = format!("/orders/{order_id}/payment");
        self.post_patiently(&path, &body, deadline, "submitting the payment")
            .await
    }

    /// POSTs `body` to `path`, on the next API instance at each attempt,
    /// until it is answered 202 (true) or 409 (false: the order had ended,
    /// or holds another body). Another client error but 404 (the order not
    /// known yet) is final; anything else is tried again until `deadline`.
    async fn post_patiently(
        &self,
        path: &str,
        body: &Value,
        deadline: Instant,
        doing: &str,
    ) -> anyhow::Result<bool> {
        let mut attempt = 0;
        loop {
            let url = format!("{}{path}", self.api(attempt));
            match self.http.post(&url).json(body).send().await {
                Ok(r) if r.status().as_u16() == 202 => return Ok(true),
                Ok(r) if r.status().as_u16() == 409 => return Ok(false),
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 404 => {
                    anyhow::bail!(
                        "POST {path} answered {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                Ok(_) | Err(_) => {}
            }
            attempt += 1;
            pause(attempt, deadline, doing).await?;
        }
    }
}

/// Publishes `message` until the broker confirms it (same message id each time).
pub async fn publish_patiently(publisher: &Publisher, message: &Outgoing) {
    let mut delay = Duration::from_millis(100);
    while let Err(error) = publisher.publish(message).await {
        tracing::warn!(%error, "chaos: publish failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Waits before attempt `attempt` (100 ms doubling to 2 s), or gives up
/// past `deadline`, saying what it was doing.
async fn pause(attempt: usize, deadline: Instant, doing: &str) -> anyhow::Result<()> {
    let delay = Duration::from_millis(100 * (1u64 << attempt.min(5))).min(Duration::from_secs(2));
    anyhow::ensure!(
        Instant::now() + delay < deadline,
        "gave up {doing}: the client's patience is over"
    );
    tokio::time::sleep(delay).await;
    Ok(())
}
