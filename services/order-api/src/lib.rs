//! order-api: the HTTP API of orderflow (DESIGN.md §6) and the read model of
//! orders behind it.
//!
//! [`serve`] runs three things until shutdown: the read-model consumer (every
//! event bound to `orderflow.order-api`, applied once through the inbox, in
//! any order of arrival), the outbox relay of the `orders` schema (which
//! publishes the `order.started` and `payment.submitted` events the API
//! commits) and the axum server; plus the long-poll watcher (`watch.rs`),
//! which every committed change to an order goes through.
//!
//! `GET /orders/{id}/history` shows the saga coordinator's execution history:
//! the coordinator owns that data; the API only reads it, through the
//! coordinator crate's own read function, on a pool of the `coordinator`
//! schema.

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
use orderflow_shared::store::{Context, Relay};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use read_model::ReadModel;
pub use status::Status;

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
    let db = ctx.db(Context::Orders).await?;
    // Read-only use: the execution history the coordinator writes.
    let coordinator = ctx.db(Context::Coordinator).await?;
    // Stops everything on shutdown, or when one part ends by itself.
    let stop = shutdown.child_token();
    let metrics = Arc::new(metrics::Metrics::new());
    let (watcher, watcher_task) = watch::Watcher::spawn(db.pool().clone(), stop.clone());

    let consumer = supervise(
        "read-model consumer",
        stop.clone(),
        orderflow_shared::bus::run_consumer(
            ctx.broker.clone(),
            ctx.consumer(SERVICE),
            Arc::new(ReadModel::new(db.clone(), watcher.clone())),
            stop.clone(),
        ),
    );
    let relay = Relay::new(db.clone(), ctx.broker.publisher()).run(stop.clone());
    let relay = supervise("outbox relay", stop.clone(), async move {
        relay.await;
        Ok::<(), std::convert::Infallible>(())
    });
    let app = http::router(http::AppState {
        metadata: ctx.metadata.clone(),
        db: db.clone(),
        coordinator: coordinator.clone(),
        watcher,
        metrics,
        shutdown: stop.clone(),
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
    let watcher = watcher_task
        .await
        .map_err(|error| anyhow::anyhow!("the long-poll listener task panicked: {error}"));
    db.close().await;
    coordinator.close().await;
    consumer
        .context("the read-model consumer failed")
        .and(relay)
        .and(server.context("the HTTP server failed"))
        .and(watcher)
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
