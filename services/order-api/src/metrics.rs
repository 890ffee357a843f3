//! Prometheus metrics of the API (prometheus-client, OpenMetrics text at
//! `GET /metrics`): requests by method, route and status, orders created, and
//! the long-poll waiters in flight.

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::OwnedSemaphorePermit;

use crate::http::AppState;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/orders/{id}`), never the raw path, so the label
    /// set stays small; `unmatched` for unknown routes.
    pub route: String,
    pub status: u16,
}

/// The API's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub orders_created: Counter,
    pub long_poll_waiters: Gauge,
    pub long_poll_reads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "orderflow_http_requests",
            "HTTP requests answered by the order API, by method, route and status",
            http_requests.clone(),
        );
        let orders_created = Counter::default();
        registry.register(
            "orderflow_orders_created",
            "Orders created through POST /orders",
            orders_created.clone(),
        );
        let long_poll_waiters = Gauge::default();
        registry.register(
            "orderflow_long_poll_waiters",
            "GET /orders/{id}?wait_for= requests currently waiting",
            long_poll_waiters.clone(),
        );
        let long_poll_reads = Counter::default();
        registry.register(
            "orderflow_long_poll_reads",
            "Reads of an order by long polls (the first one, and one per change that may \
             satisfy it and did not bring the order's row along)",
            long_poll_reads.clone(),
        );
        Self {
            registry,
            http_requests,
            orders_created,
            long_poll_waiters,
            long_poll_reads,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a waiter, which holds `slot` (its place under the waiter cap,
    /// `bounds.rs`), until the returned guard is dropped: however the wait
    /// ends, also when the client goes away mid-wait (the handler's future is
    /// dropped) — the slot is given back with it.
    pub fn waiting(&self, slot: OwnedSemaphorePermit) -> WaiterGuard {
        self.long_poll_waiters.inc();
        WaiterGuard {
            gauge: self.long_poll_waiters.clone(),
            _slot: slot,
        }
    }
}

/// One long-poll waiter in flight, and its slot under the waiter cap.
#[derive(Debug)]
pub struct WaiterGuard {
    gauge: Gauge,
    _slot: OwnedSemaphorePermit,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Middleware: counts every answered request.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method();
    let method = if [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ]
    .contains(method)
    {
        method.as_str().to_owned()
    } else {
        "other".to_owned()
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
