//! The HTTP routes of docs/design.md §7 (axum): start an order, read it (also by
//! long poll), submit a payment, the saga's execution history, merchant
//! payment methods, health and metrics; and the console's (`console/`): its
//! page, the catalogue, the saga's state and live stream, the operator API.
//! Every error is JSON `{"error": "..."}`; no input makes a handler panic.
//! Every route runs under the bounds of `bounds.rs` (timeout, concurrency
//! limit, waiter cap).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use orderflow_shared::Shutdown;
use orderflow_shared::bus::Consuming;
use orderflow_shared::events::PaymentSubmitted;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::Db;
use orderflow_shared::topology::Topology;
use saga_coordinator::history;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bounds::{self, Bounds};
use crate::console::{self, Operator, live};
use crate::error::{ApiError, error_body};
use crate::input::query_limit;
use crate::input::{NewOrder, PaymentSubmission};
use crate::metrics::{self, Metrics};
use crate::orders::{self, Creation, OrderView, Submission};
use crate::status::Status;
use crate::watch::{Known, Watcher};

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Longest a long poll waits, whatever `timeout_ms` asks for.
pub const MAX_WAIT: Duration = Duration::from_mins(1);

/// How long a long poll waits when `timeout_ms` is not given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// How long each `/healthz` check may take.
pub const HEALTH_CHECK_PATIENCE: Duration = Duration::from_secs(2);

/// Entries of a history page when `limit` is not given.
pub const DEFAULT_HISTORY_PAGE: u32 = 100;

/// The route of `GET /orders/{id}` (and its long polls).
const ORDER_ROUTE: &str = "/orders/{id}";

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    pub metadata: Arc<Metadata>,
    /// The HTTP pool of the `orders` schema: every read and write of a
    /// request, never the read-model consumer's connections (see `lib.rs`).
    pub db: Db,
    /// The coordinator's schema, read only: the execution history.
    pub coordinator: Db,
    pub watcher: Watcher,
    pub metrics: Arc<Metrics>,
    pub bounds: Arc<Bounds>,
    /// Whether the read-model consumer consumes: the broker check of `/healthz`.
    pub consuming: Consuming,
    /// Long polls answer at once when the server shuts down.
    pub shutdown: Shutdown,
    /// The topology this server runs on (the console's choreography).
    pub topology: Arc<Topology>,
    /// The console's operator side; `None` without `ORDERFLOW_OPERATOR_TOKEN`.
    pub operator: Option<Arc<Operator>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(console::router(&state))
        .route("/catalogue", get(live::catalogue))
        .route("/orders/{id}/saga", get(live::saga))
        .route(live::LIVE_ROUTE, get(live::live))
        .route("/orders", post(create_order))
        .route(ORDER_ROUTE, get(get_order))
        .route("/orders/{id}/payment", post(submit_payment))
        .route("/orders/{id}/history", get(get_history))
        .route(
            "/merchants/{supplier}/payment-methods",
            get(merchant_payment_methods),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bounds::limit,
        ))
        // Outside the bounds: shed and timed-out requests are counted too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

#[derive(Debug, Serialize)]
struct Accepted {
    order_id: String,
    status: String,
}

fn accepted(order_id: String, status: impl Into<String>) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(Accepted {
            order_id,
            status: status.into(),
        }),
    )
        .into_response()
}

/// `POST /orders`: 202 for a new order or the same request again, 409 for
/// the same id with another body, 400/413/415/422 for bad input.
async fn create_order(
    State(state): State<AppState>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let order = body.validate(&state.metadata)?;
    let order_id = order.started.order_id.clone();
    match orders::create(&state.db, &order).await? {
        Creation::Created => {
            state.watcher.changed(&order_id, Some(Status::Started));
            state.metrics.orders_created.inc();
            tracing::info!(order_id = %order_id, supplier = %order.started.supplier, "order created");
            Ok(accepted(order_id, Status::Started.as_str()))
        }
        Creation::Repeated { status } => Ok(accepted(order_id, status)),
        Creation::Conflict => Err(ApiError::conflict(format!(
            "order {order_id} exists with a different request; use another order_id"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait_for: Option<String>,
    timeout_ms: Option<u64>,
}

/// Whether `request` is a long poll (`GET /orders/{id}` with `wait_for`, as
/// [`get_order`] will read its query, or a live stream of the console);
/// the bounds treat long polls apart.
pub fn is_long_poll(request: &Request) -> bool {
    let route = request.extensions().get::<MatchedPath>();
    if route.is_some_and(|route| route.as_str() == live::LIVE_ROUTE) {
        return true;
    }
    route.is_some_and(|route| route.as_str() == ORDER_ROUTE)
        && Query::<WaitQuery>::try_from_uri(request.uri())
            .is_ok_and(|Query(query)| query.wait_for.is_some())
}

/// `GET /orders/{id}`, with `?wait_for=<status>&timeout_ms=<n>` a long poll:
/// answers once the order has that status (or a later or terminal one), or
/// with the current state when the timeout passes.
async fn get_order(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(order_id) = id?;
    let Query(query) = query?;
    let found = match query.wait_for {
        None => orders::fetch(&state.db, &order_id).await?,
        Some(wanted) => {
            let wanted: Status = wanted
                .parse()
                .map_err(|e: crate::status::UnknownStatus| ApiError::bad_request(e.to_string()))?;
            let timeout = query
                .timeout_ms
                .map_or(DEFAULT_WAIT, Duration::from_millis)
                .min(MAX_WAIT);
            wait_for(&state, &order_id, wanted, timeout).await?
        }
    };
    match found {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::not_found(format!("order {order_id} not found"))),
    }
}

/// Reads the order until it satisfies `wanted`, `timeout` passes or the
/// server shuts down; woken by the watcher when the order changes (here, or
/// in a terminal worker or another API instance, through their batched
/// NOTIFY). A change whose statement returned the row (the read model's
/// upserts) answers with that row, without a read. Holds a waiter slot
/// throughout (503 when none is free); each read is bounded by the request
/// timeout.
async fn wait_for(
    state: &AppState,
    order_id: &str,
    wanted: Status,
    timeout: Duration,
) -> Result<Option<OrderView>, ApiError> {
    let _waiting = state.bounds.wait(&state.metrics)?;
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribed before the first read: no change can slip in between.
    let mut changes = state.watcher.subscribe(order_id);
    let mut last_read_is_current = true;
    loop {
        state.metrics.long_poll_reads.inc();
        let view = tokio::time::timeout(
            state.bounds.request_timeout(),
            orders::fetch(&state.db, order_id),
        )
        .await
        .map_err(|_| state.bounds.read_timed_out(order_id))??;
        let done = view
            .as_ref()
            .and_then(OrderView::status)
            .is_some_and(|status| status.satisfies(wanted));
        if done || !last_read_is_current {
            return Ok(view);
        }
        // Changes the waiter does not care about (the status the one who made
        // them reported is still short of `wanted`) need no read; the answer
        // at the deadline is read afresh if such a change came meanwhile.
        loop {
            tokio::select! {
                known = changes.changed() => match known {
                    Some(known) if !known.status.satisfies(wanted) => last_read_is_current = false,
                    // The change's own statement returned the row: no read.
                    Some(Known { row: Some(row), .. }) => {
                        return Ok(Some(Arc::unwrap_or_clone(row).shown()));
                    }
                    _ => {
                        last_read_is_current = true;
                        break;
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    if last_read_is_current {
                        return Ok(view);
                    }
                    break;
                }
                () = state.shutdown.cancelled() => {
                    if last_read_is_current {
                        return Ok(view);
                    }
                    break;
                }
            }
        }
    }
}

/// `POST /orders/{id}/payment`: the customer's token and method, handed to
/// the coordinator as `payment.submitted`; the outcome shows on the order.
async fn submit_payment(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<PaymentSubmission>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(order_id) = id?;
    let Json(body) = body?;
    body.validate()?;
    let method = body.method.clone();
    let submission = PaymentSubmitted {
        order_id: order_id.clone(),
        token: body.token,
        method: body.method,
    };
    match orders::submit_payment(&state.db, submission).await? {
        Submission::Submitted => {
            // Never the token: it is a credential.
            tracing::info!(order_id = %order_id, method = %method, "payment submitted");
            Ok(accepted(order_id, "payment_submitted"))
        }
        Submission::NotFound => Err(ApiError::not_found(format!("order {order_id} not found"))),
        Submission::Finished(status) => Err(ApiError::conflict(format!(
            "order {order_id} is already {status}"
        ))),
    }
}

#[derive(Debug, Serialize)]
struct HistoryView {
    order_id: String,
    entries: Vec<history::Entry>,
    /// `after` for the next page; `null` on the last one.
    next: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

/// `GET /orders/{id}/history?after=<entry id>&limit=<n>`: one page of the
/// saga's execution history as the coordinator recorded it (every event,
/// rejection, timer, compensation and late message), `limit` entries (100 by
/// default, 1000 at most) after entry `after`, in causal order within the
/// page (the rule is [`history::read_page`]'s), and `next`, the `after` of
/// the next page (`null` on the last). 404 when the coordinator has seen
/// nothing of the order (yet); past the end, an empty last page. 400 for an
/// `after` below 0 or a `limit` outside 1..=1000.
async fn get_history(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(order_id) = id?;
    let Query(query) = query?;
    let limit = query_limit(query.limit, DEFAULT_HISTORY_PAGE, 1..=history::MAX_PAGE)?;
    if let Some(after) = query.after
        && after < 0
    {
        return Err(ApiError::bad_request(format!(
            "after must be the id of a history entry (0 or more), not {after}"
        )));
    }
    let page = history::read_page(state.coordinator.pool(), &order_id, query.after, limit).await?;
    if page.entries.is_empty() && query.after.is_none() {
        return Err(ApiError::not_found(format!(
            "no history for order {order_id}"
        )));
    }
    Ok(Json(HistoryView {
        order_id,
        entries: page.entries,
        next: page.next,
    })
    .into_response())
}

#[derive(Debug, Serialize)]
struct MethodView<'a> {
    method: &'a str,
    display_name: &'a str,
    discount_percent: i64,
}

/// `GET /merchants/{supplier}/payment-methods`: what the front end offers
/// (the default set for a merchant without its own entry).
async fn merchant_payment_methods(
    State(state): State<AppState>,
    supplier: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(supplier) = supplier?;
    let methods: Vec<MethodView<'_>> = state
        .metadata
        .payment_methods_for(&supplier)
        .iter()
        .filter_map(|method| {
            // Metadata validation guarantees a provider per merchant method.
            state.metadata.provider(method).map(|provider| MethodView {
                method,
                display_name: &provider.display_name,
                discount_percent: provider.discount_percent,
            })
        })
        .collect();
    Ok(Json(json!({ "supplier": supplier, "payment_methods": methods })).into_response())
}

/// `GET /healthz`: each dependency, `"ok"` or `"unavailable: <why>"`:
/// `{"status": "ok"|"degraded", "checks": {"database": .., "broker": ..}}`,
/// 200 when every check is ok, 503 otherwise. The reasons are short and
/// fixed; the driver's own error goes to the log, never to the client.
async fn healthz(State(state): State<AppState>) -> Response {
    let database = match database_check(&state.db).await {
        Ok(()) => "ok".to_owned(),
        Err(reason) => format!("unavailable: {reason}"),
    };
    let broker = if state.consuming.is_consuming() {
        "ok".to_owned()
    } else if state.consuming.is_paused() {
        // Connected (it looks at its pause marker), not consuming on purpose.
        "ok (the read model is paused by an operator)".to_owned()
    } else {
        "unavailable: the read-model consumer has no channel (reconnecting)".to_owned()
    };
    let healthy = database == "ok" && broker.starts_with("ok");
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "checks": { "database": database, "broker": broker },
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `SELECT 1` on the HTTP pool (what serves the clients) within
/// [`HEALTH_CHECK_PATIENCE`]; the reason it failed, in a few words.
async fn database_check(db: &Db) -> Result<(), &'static str> {
    let check = tokio::time::timeout(
        HEALTH_CHECK_PATIENCE,
        sqlx::query("SELECT 1").execute(db.pool()),
    )
    .await;
    match check {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => {
            let reason = unavailable_reason(&error);
            tracing::warn!(%error, reason, "health check: the database failed");
            Err(reason)
        }
        Err(_) => {
            tracing::warn!("health check: the database did not answer within 2 s");
            Err("no answer within 2 s")
        }
    }
}

/// Why the database is unavailable, in words that hold no driver text.
fn unavailable_reason(error: &sqlx::Error) -> &'static str {
    use std::io::ErrorKind;
    match error {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused",
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => "connection lost",
            ErrorKind::TimedOut => "no answer",
            _ => "cannot connect",
        },
        sqlx::Error::Tls(_) => "TLS handshake failed",
        // Also what a connection closed during the handshake looks like.
        sqlx::Error::Protocol(_) => "unexpected answer from the server",
        sqlx::Error::PoolTimedOut => "no free connection",
        sqlx::Error::PoolClosed => "shutting down",
        sqlx::Error::Database(database) => match database.code().as_deref() {
            Some(code) if code.starts_with("28") => "access denied",
            Some("3D000") => "the database does not exist",
            Some(code) if code.starts_with("57P") => "the server is shutting down or starting",
            Some(code) if code.starts_with("53") => "the server is out of resources",
            _ => "the server answered with an error",
        },
        _ => "the query failed",
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn no_route(method: Method, uri: Uri) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        &format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed on {}", uri.path()),
    )
}
