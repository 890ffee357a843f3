//! The web console (`/console`): a page for the people who run orderflow,
//! served by the order API itself from assets compiled into the binary
//! (plain HTML, CSS and JavaScript; nothing to build).
//!
//! - Customers' side, no credential (the API's own routes, `live.rs`): the
//!   catalogue (`GET /catalogue`), placing and paying an order (`POST
//!   /orders`, `POST /orders/{id}/payment`), an order's page with its saga's
//!   step, deadlines and history updating live (`GET /orders/{id}/saga`,
//!   `GET /orders/{id}/live`, server-sent events).
//! - Operators' side (`/console/api/…`, the bearer token of
//!   `ORDERFLOW_OPERATOR_TOKEN`, `auth.rs`): the choreography (the topology
//!   model and its lint), each queue live, dead letters and their replay,
//!   pausing and resuming a service, stuck sagas. Every read and change goes
//!   through the code the command line runs: `orderflow_ops` (dead letters,
//!   pauses, queues), the coordinator's `history` (stuck sagas, state),
//!   `orderflow_topology::lint`. It acts on the broker as
//!   `ORDERFLOW_OPERATOR_AMQP_URL`'s user (by default the API's own), and
//!   reads rates from the management API at `ORDERFLOW_MANAGEMENT_URL`
//!   when it answers.

mod auth;
pub mod live;

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use orderflow_ops::OpsError;
use orderflow_ops::dlq::{self, Replay};
use orderflow_ops::queues::{self, Management};
use orderflow_shared::bus::Broker;
use orderflow_shared::config::Settings;
use orderflow_shared::topology::{Choreography, Topology, lint, orderflow_choreography};
use saga_coordinator::history;
use serde::Deserialize;
use serde_json::json;

pub use auth::OperatorToken;

use crate::error::ApiError;
use crate::http::AppState;
use crate::input::query_limit;

/// The console's page and its assets, compiled in.
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Dead letters listed per service when the request does not say.
const DEFAULT_DEAD_LETTERS: usize = 20;

/// Most dead letters listed per service.
const MAX_DEAD_LETTERS: usize = 200;

/// What the operator side works with; `None` in [`AppState`] when no token
/// is configured.
#[derive(Clone, Debug)]
pub struct Operator {
    pub token: OperatorToken,
    /// The operator's broker user (`ORDERFLOW_OPERATOR_AMQP_URL`).
    pub broker: Broker,
    /// The management API with the same user, if it can be addressed.
    pub management: Option<Management>,
    /// `ORDERFLOW_RETENTION_DAYS`: replays refuse older dead letters.
    pub retention_days: u32,
}

impl Operator {
    /// The operator side for `settings`, on `topology`; `None` without
    /// `ORDERFLOW_OPERATOR_TOKEN`.
    pub fn from_settings(settings: &Settings, topology: &Topology) -> anyhow::Result<Option<Self>> {
        let Some(token) = &settings.operator_token else {
            return Ok(None);
        };
        let url = settings.operator_amqp_url();
        let broker = Broker::new(
            url,
            "order-api-console",
            topology.clone(),
            Duration::from_millis(settings.publish_timeout_ms),
        )?;
        let management = match Management::new(&settings.management_url, url) {
            Ok(management) => Some(management),
            Err(error) => {
                tracing::warn!(%error, "the console counts queues with passive declarations only");
                None
            }
        };
        Ok(Some(Self {
            token: OperatorToken::new(token),
            broker,
            management,
            retention_days: settings.retention_days,
        }))
    }
}

/// The console's routes: its page (no credential: what it shows of the
/// operators' side asks for the token) and the operator API.
pub fn router(state: &AppState) -> Router<AppState> {
    let operator = Router::new()
        .route("/choreography", get(choreography))
        .route("/queues", get(queue_stats))
        .route("/services/{service}/pause", post(pause))
        .route("/services/{service}/resume", post(resume))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{service}/replay", post(replay))
        .route("/sagas/stuck", get(stuck))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::operator_only,
        ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .nest("/console/api", operator)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The operator side (present: the middleware let the request through).
fn operator(state: &AppState) -> Result<&Operator, ApiError> {
    state
        .operator
        .as_deref()
        .ok_or_else(|| ApiError::new(StatusCode::FORBIDDEN, "the operator console is off"))
}

/// An operator operation that failed: an unknown service is 404; the broker
/// refusing or being away is 503, with what to do.
impl From<OpsError> for ApiError {
    fn from(error: OpsError) -> Self {
        match error {
            OpsError::UnknownService { .. } => Self::not_found(error.to_string()),
            error => {
                tracing::warn!(%error, "console operation failed");
                Self::unavailable(error.to_string())
            }
        }
    }
}

/// The choreography of this deployment: the model and its findings.
fn model(state: &AppState) -> (Vec<orderflow_shared::topology::ServiceSpec>, Choreography) {
    let services = state.topology.services.clone();
    (services, orderflow_choreography(&state.metadata.methods()))
}

/// `GET /console/api/choreography`: `{services: [{name, consumes,
/// publishes}], clients, waits, findings}` (`orderflow topology lint`'s
/// checks on the model this server runs).
async fn choreography(State(state): State<AppState>) -> Response {
    let (services, choreography) = model(&state);
    let findings = lint(&services, &choreography);
    let services: Vec<_> = services
        .iter()
        .map(|s| json!({"name": s.name, "consumes": s.routing_keys, "publishes": s.publishes}))
        .collect();
    Json(json!({
        "services": services,
        "clients": choreography.clients,
        "waits": choreography.waits,
        "findings": findings,
    }))
    .into_response()
}

/// `GET /console/api/queues`: every service queue's depth, consumers, rates
/// (management API), dead letters, pause and status (`orderflow_ops::queues`).
async fn queue_stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    let operator = operator(&state)?;
    let figures = queues::stats(&operator.broker, operator.management.as_ref()).await?;
    Ok(Json(figures).into_response())
}

/// `POST /console/api/services/{service}/pause`: `{service, queue, paused}`.
async fn pause(
    State(state): State<AppState>,
    service: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(service) = service?;
    let operator = operator(&state)?;
    let paused = orderflow_ops::pause::pause(&operator.broker, &service, "the console").await?;
    Ok(Json(paused).into_response())
}

/// `POST /console/api/services/{service}/resume`: `{service, queue, paused}`.
async fn resume(
    State(state): State<AppState>,
    service: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(service) = service?;
    let operator = operator(&state)?;
    let resumed = orderflow_ops::pause::resume(&operator.broker, &service).await?;
    Ok(Json(resumed).into_response())
}

#[derive(Debug, Deserialize)]
struct DeadLetterQuery {
    service: Option<String>,
    limit: Option<usize>,
}

/// `GET /console/api/dead-letters?service=&limit=`: `{services: [{service,
/// queue, count, messages: [{routing_key, order_id, message_id, reason,
/// failed_at, retries, body}]}]}`, as `orderflow dlq list` reads them.
async fn dead_letters(
    State(state): State<AppState>,
    query: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let operator = operator(&state)?;
    let limit = query_limit(query.limit, DEFAULT_DEAD_LETTERS, 0..=MAX_DEAD_LETTERS)?;
    let mut services = Vec::new();
    for service in orderflow_ops::services(&operator.broker, query.service.as_deref())? {
        services.push(dlq::list(&operator.broker, &service, limit).await?);
    }
    Ok(Json(json!({ "services": services })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// Only this message; all of the service's dead letters without it.
    message_id: Option<String>,
    /// Also dead letters older than the retention.
    #[serde(default)]
    force: bool,
}

/// `POST /console/api/dead-letters/{service}/replay` `{message_id?, force?}`:
/// the replay of `orderflow dlq replay`; 200 with the report (`replayed`,
/// `refused`, `left`, `summary`); 404 when `message_id` is not there; 409
/// when dead letters older than the retention were left (the report says
/// which; `force` replays them).
async fn replay(
    State(state): State<AppState>,
    service: Result<Path<String>, PathRejection>,
    body: Result<Json<ReplayRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(service) = service?;
    let Json(body) = body?;
    let operator = operator(&state)?;
    let request = Replay {
        message_id: body.message_id.clone(),
        limit: None,
        force: body.force,
        retention_days: operator.retention_days,
    };
    let report = dlq::replay(&operator.broker, &service, &request).await?;
    tracing::warn!(
        %service,
        replayed = report.replayed.len(),
        refused = report.refused.len(),
        "dead letters replayed from the console"
    );
    let summary = report.summary();
    if !report.refused.is_empty() {
        let error = format!(
            "{} dead letter(s) older than the retention of {} day(s) were left in {}: check \
             their orders, then replay with force",
            report.refused.len(),
            operator.retention_days,
            report.queue
        );
        return Ok((
            StatusCode::CONFLICT,
            Json(json!({"error": error, "summary": summary, "report": report})),
        )
            .into_response());
    }
    if let Some(message_id) = &body.message_id
        && report.replayed.is_empty()
    {
        return Err(ApiError::not_found(format!(
            "no dead letter with message id {message_id} in {}",
            report.queue
        )));
    }
    Ok(Json(json!({"summary": summary, "report": report})).into_response())
}

#[derive(Debug, Deserialize)]
struct StuckQuery {
    older_than_secs: Option<u64>,
    limit: Option<i64>,
}

/// `GET /console/api/sagas/stuck?older_than_secs=&limit=`: `{sagas:
/// [{order_id, step, updated_at, created_at}]}`, running sagas with no
/// progress for that long (60 s and 100 by default), as `orderflow saga
/// stuck` lists them.
async fn stuck(
    State(state): State<AppState>,
    query: Result<Query<StuckQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let limit = query_limit(query.limit, 100, 1..=1000)?;
    let before = i64::try_from(query.older_than_secs.unwrap_or(60))
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
        .ok_or_else(|| {
            ApiError::bad_request("older_than_secs reaches before the beginning of time")
        })?;
    let sagas = history::stuck(state.coordinator.pool(), before, limit).await?;
    Ok(Json(json!({ "sagas": sagas })).into_response())
}
