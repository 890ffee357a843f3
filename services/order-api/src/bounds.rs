//! The bounds of the HTTP API: however many clients come and however slow
//! the database gets, the API answers every request within a known time,
//! keeps a known number of requests and waiters in memory, and never takes
//! the database connections event handling needs.
//!
//! - **Request timeout** (`ORDERFLOW_HTTP_REQUEST_TIMEOUT_MS`, 10 s): a
//!   request still unanswered by then is answered 503
//!   `{"error": "GET /orders/{id} did not finish within … ms; …"}` (the route
//!   template, never the raw path). Its handler future is dropped: an open
//!   transaction is rolled back, and the connection goes back to the pool
//!   once the statement it was running ends in the database (nothing cancels
//!   that statement). A write cut after its commit is not undone:
//!   `POST /orders` is idempotent by `order_id`, and the committed outbox
//!   rows reach the broker by hand-over or, if the cut came between commit
//!   and hand-over, by the relay's sweep.
//! - **Concurrency limit** (`ORDERFLOW_HTTP_MAX_CONCURRENCY`, 256): one more
//!   request is answered 503 with `Retry-After: 1` at once. Load is shed, not
//!   queued: a queue would only turn overload into timeouts later, while
//!   holding the request and its connection meanwhile. Every route counts,
//!   `/healthz` and `/metrics` included: an instance at its limit tells its
//!   load balancer so.
//! - **Waiter cap** (`ORDERFLOW_HTTP_MAX_WAITERS`, 1024): long polls
//!   (`GET /orders/{id}?wait_for=`) are counted apart; one more is answered
//!   503 with `Retry-After: 1`. A waiter's slot is held by the same guard that
//!   counts it in the `orderflow_long_poll_waiters` gauge
//!   ([`Metrics::waiting`]), so it is given back however the wait ends: the
//!   status arrived, the timeout passed, the server shuts down, an error, or
//!   the client went away (hyper drops the handler's future).
//!
//! Why long polls count apart: a waiter costs a subscription and a sleeping
//! task, not a database connection or CPU, and it lives up to a minute. In
//! the request slots, a few hundred waiting clients would take every slot for
//! a minute and shut out the requests that cost little and answer at once,
//! the `POST /orders` that the waiters wait on included. So the cheap,
//! long-lived waits get their own larger cap, and the request slots stay for
//! work. Long polls are likewise exempt from the request timeout: they end by
//! their own `timeout_ms` (at most [`MAX_WAIT`](crate::http::MAX_WAIT)); each
//! read of the order a long poll makes is bounded by the request timeout
//! instead, so a stuck database holds a waiter at most one request timeout
//! past its wait.
//!
//! Why not `tower::limit` + `tower::load_shed`, nor tower-http's
//! `TimeoutLayer`: a long poll and a plain read are the same route,
//! `GET /orders/{id}`, told apart by the query string, so the choice is per
//! request. `ConcurrencyLimit` takes its permit in `poll_ready`, before it
//! sees the request, so it cannot leave long polls out; and `TimeoutLayer`
//! wraps every request its route gets and answers with an empty body, while
//! every error of this API is JSON naming what failed. One small middleware
//! ([`limit`]) on a [`Semaphore`] does both with `try_acquire` (shedding at
//! once, as `load_shed` would) and `tokio::time::timeout`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orderflow_shared::config::Settings;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::http::{AppState, is_long_poll};
use crate::metrics::{Metrics, WaiterGuard};

/// The bounds of one API server, shared by every request.
#[derive(Debug)]
pub struct Bounds {
    request_timeout: Duration,
    max_requests: usize,
    requests: Arc<Semaphore>,
    max_waiters: usize,
    waiters: Arc<Semaphore>,
}

impl Bounds {
    /// The bounds `settings` give (validated: none is 0).
    pub fn new(settings: &Settings) -> Self {
        // A semaphore holds at most MAX_PERMITS; more would panic.
        let max_requests = settings.http_max_concurrency.min(Semaphore::MAX_PERMITS);
        let max_waiters = settings.http_max_waiters.min(Semaphore::MAX_PERMITS);
        Self {
            request_timeout: Duration::from_millis(settings.http_request_timeout_ms),
            max_requests,
            requests: Arc::new(Semaphore::new(max_requests)),
            max_waiters,
            waiters: Arc::new(Semaphore::new(max_waiters)),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// A place under the waiter cap, counted in `metrics` until the guard is
    /// dropped; 503 with `Retry-After` when every place is taken.
    pub fn wait(&self, metrics: &Metrics) -> Result<WaiterGuard, ApiError> {
        let Ok(slot) = self.waiters.clone().try_acquire_owned() else {
            tracing::debug!(
                max_waiters = self.max_waiters,
                "long poll turned away: every waiter slot is taken"
            );
            return Err(ApiError::busy(format!(
                "too many clients are waiting for orders ({} at most); retry later",
                self.max_waiters
            )));
        };
        Ok(metrics.waiting(slot))
    }

    /// The answer to a request of `route` that took longer than the timeout.
    pub fn timed_out(&self, route: &str) -> ApiError {
        let timeout_ms = self.request_timeout.as_millis();
        tracing::warn!(%route, timeout_ms, "request timed out; answered 503");
        ApiError::unavailable(format!(
            "{route} did not finish within {timeout_ms} ms; try again later"
        ))
    }

    /// The answer to a long poll whose read of the order took longer than
    /// the request timeout.
    pub fn read_timed_out(&self, order_id: &str) -> ApiError {
        let timeout_ms = self.request_timeout.as_millis();
        tracing::warn!(%order_id, timeout_ms, "a long poll's read timed out; answered 503");
        ApiError::unavailable(format!(
            "GET /orders/{{id}}?wait_for=: reading order {order_id} took longer than \
             {timeout_ms} ms; try again later"
        ))
    }
}

/// Middleware: every request but a long poll takes a request slot (503 with
/// `Retry-After` at once when none is free) and is answered within the
/// request timeout (503 naming its route). Long polls pass: their handler
/// takes a waiter slot and bounds its own wait.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_long_poll(&request) {
        return next.run(request).await;
    }
    let bounds = &state.bounds;
    let Ok(_slot) = bounds.requests.clone().try_acquire_owned() else {
        tracing::debug!(
            max_requests = bounds.max_requests,
            "request shed: every request slot is taken"
        );
        return ApiError::busy(format!(
            "the order API is busy ({} requests in progress, its limit); retry later",
            bounds.max_requests
        ))
        .into_response();
    };
    let route = route(&request);
    match tokio::time::timeout(bounds.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => bounds.timed_out(&route).into_response(),
    }
}

/// `METHOD /route/{template}` of `request`; its path when no route matched.
fn route(request: &Request) -> String {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path(), MatchedPath::as_str);
    format!("{} {path}", request.method())
}
