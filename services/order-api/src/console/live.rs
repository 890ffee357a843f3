//! The customers' side of the console, as API routes without a credential:
//!
//! - `GET /catalogue`: merchants with the payment methods each accepts,
//!   and the products with their prices (what the order form offers);
//! - `GET /orders/{id}/saga`: the saga's status, the step it waits on and
//!   its timers with the time left (404 until the coordinator saw it);
//! - `GET /orders/{id}/live`: server-sent events while the order moves:
//!   `order` (the order, as `GET /orders/{id}`), `saga` (as `/saga`, when it
//!   changed) and `entry` (each history entry once, its id as the event id,
//!   so a reconnecting `EventSource` resumes after the last one it saw with
//!   `Last-Event-ID`).
//!
//! A live stream is a long poll that lasts: it holds a waiter slot (the
//! waiter cap bounds them), wakes when its order changes (the watcher) and
//! at least every [`TICK`] (history entries and timers the orders table
//! does not show), bounds each read by the request timeout, and ends after
//! [`LIFETIME`] or when the server shuts down (the browser reconnects).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use saga_coordinator::history::{self, SagaState};
use saga_coordinator::timers::TimerState;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::http::AppState;
use crate::metrics::WaiterGuard;
use crate::orders;
use crate::watch::Subscription;

/// The route of the live stream (exempt from the request timeout and slots).
pub const LIVE_ROUTE: &str = "/orders/{id}/live";

/// How often a live stream reads again without a wake-up.
pub const TICK: Duration = Duration::from_secs(1);

/// How long one live stream lasts before the browser reconnects.
pub const LIFETIME: Duration = Duration::from_mins(5);

/// History entries read per tick at most.
const ENTRIES_PER_READ: u32 = 200;

/// `GET /catalogue`.
pub async fn catalogue(State(state): State<AppState>) -> Response {
    let metadata = &state.metadata;
    let methods = |supplier: &str| -> Vec<Value> {
        metadata
            .payment_methods_for(supplier)
            .iter()
            .filter_map(|method| {
                metadata.provider(method).map(|provider| {
                    json!({
                        "method": method,
                        "display_name": provider.display_name,
                        "discount_percent": provider.discount_percent,
                    })
                })
            })
            .collect()
    };
    let merchants: Vec<Value> = metadata
        .merchants()
        .map(|(supplier, merchant)| {
            json!({
                "supplier": supplier,
                "display_name": merchant.display_name.as_deref().unwrap_or(supplier),
                "payment_methods": methods(supplier),
            })
        })
        .collect();
    let products: Vec<Value> = metadata
        .products()
        .map(|(sku, product)| {
            json!({"sku": sku, "name": product.name, "price_cents": product.price_cents})
        })
        .collect();
    Json(json!({
        "merchants": merchants,
        // What a merchant without its own entry accepts.
        "default_payment_methods": methods(""),
        "products": products,
    }))
    .into_response()
}

/// The saga as the console shows it: its state, plus each armed timer's
/// seconds left (0 once due).
fn saga_view(saga: &SagaState) -> Value {
    let now = Utc::now();
    let deadlines: Vec<Value> = saga
        .timers
        .iter()
        .filter(|timer| timer.state == TimerState::Armed)
        .map(|timer| {
            json!({
                "step": timer.step,
                "due_at": timer.due_at,
                "seconds_left": (timer.due_at - now).num_seconds().max(0),
            })
        })
        .collect();
    let mut view = serde_json::to_value(saga).unwrap_or(Value::Null);
    if let Some(fields) = view.as_object_mut() {
        fields.insert("deadlines".to_owned(), Value::Array(deadlines));
    }
    view
}

/// `GET /orders/{id}/saga`.
pub async fn saga(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(order_id) = id?;
    match history::saga_state(state.coordinator.pool(), &order_id).await? {
        Some(saga) => Ok(Json(saga_view(&saga)).into_response()),
        None => Err(ApiError::not_found(format!(
            "the saga coordinator has not seen order {order_id} (yet)"
        ))),
    }
}

/// One live stream's state between events.
struct Live {
    state: AppState,
    order_id: String,
    /// The last history entry sent.
    after: Option<i64>,
    /// What was last sent of the order and of the saga (unchanged: not again).
    order: Option<String>,
    saga: Option<String>,
    pending: VecDeque<Event>,
    changes: Subscription,
    ends: tokio::time::Instant,
    first: bool,
    /// Held as long as the stream: the waiter cap counts it.
    _slot: WaiterGuard,
}

impl Live {
    /// Reads the order, its saga and new history entries; queues what changed.
    async fn refresh(&mut self) -> Result<(), ApiError> {
        let timeout = self.state.bounds.request_timeout();
        let read = async {
            let order = orders::fetch(&self.state.db, &self.order_id).await?;
            let saga = history::saga_state(self.state.coordinator.pool(), &self.order_id).await?;
            let page = history::read_page(
                self.state.coordinator.pool(),
                &self.order_id,
                self.after,
                ENTRIES_PER_READ,
            )
            .await?;
            Ok::<_, sqlx::Error>((order, saga, page))
        };
        let (order, saga, page) = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| self.state.bounds.read_timed_out(&self.order_id))??;
        if let Some(order) = order {
            let text = serde_json::to_string(&order).unwrap_or_default();
            if self.order.as_ref() != Some(&text) {
                self.pending
                    .push_back(Event::default().event("order").data(&text));
                self.order = Some(text);
            }
        }
        if let Some(saga) = saga {
            // Compared without the seconds left, which change every tick.
            let key = serde_json::to_string(&saga).unwrap_or_default();
            if self.saga.as_ref() != Some(&key) {
                let view = saga_view(&saga);
                self.pending
                    .push_back(Event::default().event("saga").data(view.to_string()));
                self.saga = Some(key);
            }
        }
        for entry in page.entries {
            self.after = Some(self.after.map_or(entry.id, |after| after.max(entry.id)));
            let data = serde_json::to_string(&entry).unwrap_or_default();
            self.pending.push_back(
                Event::default()
                    .event("entry")
                    .id(entry.id.to_string())
                    .data(data),
            );
        }
        Ok(())
    }

    /// The next event, waiting for one; `None` when the stream ends.
    async fn next(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((event, self));
            }
            if !self.first {
                tokio::select! {
                    // Whatever the change was: every part is read again.
                    _changed = self.changes.changed() => {}
                    () = tokio::time::sleep(TICK) => {}
                    () = tokio::time::sleep_until(self.ends) => return None,
                    () = self.state.shutdown.cancelled() => return None,
                }
            }
            let first = std::mem::replace(&mut self.first, false);
            if let Err(error) = self.refresh().await {
                let event = Event::default()
                    .event("problem")
                    .data(json!({"error": error.message}).to_string());
                // Said once; the browser reconnects after the stream ends.
                self.ends = tokio::time::Instant::now();
                return Some((event, self));
            }
            if first {
                self.pending.push_front(
                    Event::default()
                        .retry(Duration::from_secs(1))
                        .comment("live"),
                );
            }
        }
    }
}

/// `GET /orders/{id}/live`: server-sent events (see the module). 404 for an
/// order the API does not know; 503 when every waiter slot is taken.
pub async fn live(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(order_id) = id?;
    let slot = state.bounds.wait(&state.metrics)?;
    // Subscribed before the first read: no change can slip in between.
    let changes = state.watcher.subscribe(&order_id);
    if orders::fetch(&state.db, &order_id).await?.is_none() {
        return Err(ApiError::not_found(format!("order {order_id} not found")));
    }
    let after = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok())
        .filter(|after| *after >= 0);
    let live = Live {
        state,
        order_id,
        after,
        order: None,
        saga: None,
        pending: VecDeque::new(),
        changes,
        ends: tokio::time::Instant::now() + LIFETIME,
        first: true,
        _slot: slot,
    };
    let stream = futures::stream::unfold(live, |live| async move {
        live.next()
            .await
            .map(|(event, live)| (Ok::<_, Infallible>(event), live))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
