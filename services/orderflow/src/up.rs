//! `orderflow up`: every worker and the order API in one process, from the
//! same libraries the separate binaries use.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use anyhow::Context as _;
use orderflow_shared::Shutdown;
use orderflow_shared::app::{Ctx, shutdown_on_signal};
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::token::DEV_KEYS;
use secrecy::SecretString;

use crate::cli::UpArgs;

type Task = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

pub fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(up(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn up(args: &UpArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref())?;
    orderflow_shared::telemetry::init(&settings.log, settings.log_format)?;
    if settings.token_keys.is_none() {
        eprintln!(
            "WARNING: ORDERFLOW_TOKEN_KEYS is not set; payment tokens are signed with the PUBLIC \
             development key `dev`. Anyone can forge them. Set ORDERFLOW_TOKEN_KEYS=kid:secret \
             for anything but a local demo."
        );
        tracing::warn!("dev mode: signing payment tokens with the public development key");
        settings.token_keys = Some(SecretString::from(DEV_KEYS.to_owned()));
    }
    orderflow_shared::store::ensure_database(&settings.database_url)
        .await
        .with_context(|| {
            format!(
                "preparing the database {}",
                settings.database_url_redacted()
            )
        })?;
    let metadata = Metadata::from_env()?;
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (ORDERFLOW_HTTP_ADDR); is another orderflow running?",
                settings.http_addr
            )
        })?;
    let address = listener.local_addr()?;
    let ctx = Ctx::declare(settings, metadata, "orderflow-up").await?;
    let shutdown = shutdown_on_signal();
    let tasks = system(&ctx, listener, &shutdown);
    println!(
        "orderflow is up: API on http://{address} (namespace `{}`); Ctrl-C to stop",
        ctx.settings.namespace
    );
    run_all(tasks, &shutdown).await?;
    println!("orderflow stopped");
    Ok(())
}

/// Every worker and the order API (on `listener`), as tasks of this process.
pub(crate) fn system(
    ctx: &Ctx,
    listener: tokio::net::TcpListener,
    shutdown: &Shutdown,
) -> Vec<(String, Task)> {
    let mut tasks: Vec<(String, Task)> = vec![
        (
            "order-api".into(),
            Box::pin(order_api::serve(ctx.clone(), listener, shutdown.clone())),
        ),
        (
            "generate-info".into(),
            Box::pin(generate_info::run(ctx.clone(), shutdown.clone())),
        ),
        (
            "payment-wait".into(),
            Box::pin(payment_wait::run(ctx.clone(), shutdown.clone())),
        ),
        (
            "saga-coordinator".into(),
            Box::pin(saga_coordinator::run(ctx.clone(), shutdown.clone())),
        ),
        (
            "order-completed".into(),
            Box::pin(order_completed::run(ctx.clone(), shutdown.clone())),
        ),
        (
            "order-cancelled".into(),
            Box::pin(order_cancelled::run(ctx.clone(), shutdown.clone())),
        ),
    ];
    for method in ctx.metadata.methods() {
        tasks.push((
            payment_provider::service_name(&method),
            Box::pin(payment_provider::run(ctx.clone(), method, shutdown.clone())),
        ));
    }
    tasks
}

/// Runs every task; the first that fails stops the others, and its error is returned.
pub(crate) async fn run_all(tasks: Vec<(String, Task)>, shutdown: &Shutdown) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for (name, task) in tasks {
        let shutdown = shutdown.clone();
        set.spawn(async move {
            let result = task.await.with_context(|| format!("{name} stopped"));
            if result.is_err() {
                shutdown.cancel();
            }
            result
        });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let result = joined.context("a worker task panicked").and_then(|r| r);
        if let Err(error) = result {
            tracing::error!(error = %format!("{error:#}"), "worker failed; stopping orderflow");
            first_error.get_or_insert(error);
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok(())
}
