//! order-api: the HTTP API of orderflow (docs/design.md §7) and the read model of
//! orders behind it.
//!
//! [`serve`] runs three things until shutdown: the read-model consumer (every
//! event bound to `orderflow.order-api`, applied once through the inbox, in
//! any order of arrival), the outbox relay of the `orders` schema (which
//! publishes the `order.started` and `payment.submitted` events the API
//! commits) and the axum server; plus the long-poll watcher (`watch.rs`),
//! which every committed change to an order reaches: the API's own at once,
//! the terminal workers' and other API instances' through their batched
//! NOTIFY.
//!
//! The console (`console/`, at `/console`) is served from here too: its
//! assets are compiled in; its operator side needs `ORDERFLOW_OPERATOR_TOKEN`.
//!
//! `GET /orders/{id}/history` shows the saga coordinator's execution history:
//! the coordinator owns that data; the API only reads it, through the
//! coordinator crate's own read function, on a pool of the `coordinator`
//! schema.
//!
//! # Pools: client traffic apart from event handling
//!
//! The `orders` schema has two pools, so that no number of clients can take
//! the connections the read model needs to keep up with events:
//!
//! - the **event pool** (`ORDERFLOW_DB_POOL_SIZE`): the read-model consumer's
//!   units of work, and the long-poll watcher (its LISTEN connection and its
//!   batched NOTIFY), and the retention of the schema's inbox and sent
//!   outbox rows (`Retention`: short statements every few minutes);
//! - the **HTTP pool** (`ORDERFLOW_HTTP_DB_POOL_SIZE`): everything a request
//!   does, reads and writes alike. `POST /orders` and payment submissions
//!   write too, and they are client traffic just as much as reads are: what
//!   matters is which side may starve which, not reads against writes.
//!
//! The outbox relay runs on the HTTP pool. It must: a committed unit of work
//! hands its rows over to the relay attached to the same `Db` value it was
//! begun on (`Db::hand_over`), and only the API's requests emit events here
//! (the read model emits nothing, so the event pool needs no relay). The
//! relay takes connections to sweep and to mark rows sent, so a flood of
//! requests can hold it up as it holds up the requests that commit events:
//! a mark that times out leaves its rows unsent, a later sweep publishes them
//! again under the same `message_id` and consumers' inboxes drop the copy.
//! Never the read model.
//!
//! The coordinator's schema is read only by requests (histories): its pool is
//! an HTTP pool too, of the same size.
//!
//! The other bounds of the HTTP side (request timeout, concurrency limit,
//! long-poll waiter cap) are in `bounds.rs`; `/healthz` checks the database
//! on the HTTP pool and the broker by whether the read-model consumer is
//! consuming.

mod bounds;
mod console;
mod error;
mod http;
mod input;
mod metrics;
mod orders;
mod read_model;
mod status;
mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use orderflow_shared::Shutdown;
use orderflow_shared::app::Ctx;
use orderflow_shared::store::{Context, Relay, Retention};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use read_model::ReadModelHandler;
pub use status::Status;
pub use watch::{HELLO_EVERY, PEER_WINDOW, Watcher};

/// The service name: its queue is `orderflow.order-api`, its inbox rows carry it.
pub const SERVICE: &str = "order-api";

/// Binds `ctx.settings.http_addr` and serves until `shutdown`.
pub async fn run(ctx: Ctx, shutdown: Shutdown) -> anyhow::Result<()> {
    let addr = ctx.settings.http_addr.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (ORDERFLOW_HTTP_ADDR)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!("order API listening on http://{local}");
    serve(ctx, listener, shutdown).await
}

/// Serves the API on `listener`, consumes the read-model events and relays
/// the orders outbox until `shutdown`; returns when all of them have ended.
/// If one of them fails, the others are stopped and the error returned.
pub async fn serve(ctx: Ctx, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let settings = &ctx.settings;
    settings.validate()?;
    // The event pool: the read model and the watcher (migrates the schema).
    let events = ctx.db(Context::Orders).await?;
    // The HTTP pool: every request, and the relay of what requests commit.
    let db = ctx
        .open_db(Context::Orders.schema(), settings.http_db_pool_size)
        .await
        .context("opening the HTTP pool of the `orders` schema")?;
    // Read-only use: the execution history the coordinator writes (the
    // coordinator migrates its schema; the API's role may only read it).
    let coordinator = ctx
        .open_db(Context::Coordinator.schema(), settings.http_db_pool_size)
        .await
        .context("opening the `coordinator` schema (read only)")?;
    // Stops everything on shutdown, or when one part ends by itself.
    let stop = shutdown.child_token();
    let metrics = Arc::new(metrics::Metrics::new());
    let (watcher, watcher_task) = watch::Watcher::spawn(events.pool().clone(), stop.clone());

    let options = ctx.consumer(SERVICE);
    let consuming = options.consuming.clone();
    let consumer = supervise(
        "read-model consumer",
        stop.clone(),
        orderflow_shared::bus::run_consumer(
            ctx.broker.clone(),
            options,
            Arc::new(ReadModelHandler::new(events.clone(), watcher.clone())),
            stop.clone(),
        ),
    );
    let relay = Relay::new(db.clone(), ctx.broker.publisher()).run(stop.clone());
    // Old inbox rows of the read model and sent outbox rows of the API.
    let retention =
        tokio::spawn(Retention::new(events.clone(), settings.retention()).run(stop.clone()));
    let relay = supervise("outbox relay", stop.clone(), async move {
        relay.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let topology = Arc::new(ctx.broker.topology().clone());
    let operator = console::Operator::from_settings(settings, &topology)?.map(Arc::new);
    if operator.is_some() {
        tracing::info!("the console's operator side is on (ORDERFLOW_OPERATOR_TOKEN)");
    }
    let app = http::router(http::AppState {
        metadata: ctx.metadata.clone(),
        db: db.clone(),
        coordinator: coordinator.clone(),
        watcher,
        metrics,
        bounds: Arc::new(bounds::Bounds::new(settings)),
        consuming,
        shutdown: stop.clone(),
        topology,
        operator: operator.clone(),
    });
    let server = supervise(
        "HTTP server",
        stop.clone(),
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    let (consumer, relay, server) = tokio::join!(consumer, relay, server);
    stop.cancel();
    let retention = retention
        .await
        .map_err(|error| anyhow::anyhow!("the retention task panicked: {error}"));
    let watcher = watcher_task
        .await
        .map_err(|error| anyhow::anyhow!("the long-poll listener task panicked: {error}"));
    if let Some(operator) = operator {
        operator.broker.close();
    }
    db.close().await;
    events.close().await;
    coordinator.close().await;
    consumer
        .context("the read-model consumer failed")
        .and(relay)
        .and(server.context("the HTTP server failed"))
        .and(watcher)
        .and(retention)
}

/// Runs `task` on its own tokio task; when it ends before `stop` (by an error
/// or otherwise), stops the others.
async fn supervise<F, E>(what: &'static str, stop: Shutdown, task: F) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<anyhow::Error> + Send + 'static,
{
    let handle: JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        let result = task.await.map_err(Into::into);
        if !stop.is_cancelled() {
            match &result {
                Ok(()) => tracing::error!("{what} ended before shutdown; stopping the order API"),
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "{what} failed; stopping the order API");
                }
            }
            stop.cancel();
        }
        result
    });
    join(handle, what).await
}

async fn join(handle: JoinHandle<anyhow::Result<()>>, what: &str) -> anyhow::Result<()> {
    match handle.await {
        Ok(result) => result,
        Err(error) => Err(anyhow::anyhow!(
            "the {what} task panicked or was aborted: {error}"
        )),
    }
}
