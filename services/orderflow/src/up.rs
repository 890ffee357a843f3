//! `orderflow up`: every worker and the order API in one process, from the
//! same libraries the separate binaries use (the workers the registry,
//! `orderflow-workers`, lists); `orderflow worker NAME` runs one of them as
//! its own binary would. Development mode: without
//! `ORDERFLOW_TOKEN_KEYS` it signs tokens with a public development key, and
//! without `ORDERFLOW_OPERATOR_TOKEN` it makes a console operator token for
//! the run and prints it.

use std::process::ExitCode;

use anyhow::Context as _;
use orderflow_shared::app::{Ctx, shutdown_on_signal};
use orderflow_shared::config::Settings;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::token::DEV_KEYS;
use secrecy::SecretString;

use crate::cli::{UpArgs, WorkerArgs};

pub fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(up(args))??;
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
    let development_operator_token = settings.operator_token.is_none().then(|| {
        // Random for this run: the console's operator side needs a token,
        // and nothing but this process and whoever reads its output knows it.
        let token = format!(
            "dev-{}{}",
            uuid::Uuid::now_v7().simple(),
            uuid::Uuid::now_v7().simple()
        );
        settings.operator_token = Some(SecretString::from(token.clone()));
        token
    });
    orderflow_shared::store::Db::migrate_all(&settings.database_url)
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
    let tasks = orderflow_workers::whole_system(&ctx, listener, &shutdown);
    println!(
        "orderflow is up: API on http://{address} (namespace `{}`); Ctrl-C to stop",
        ctx.settings.namespace
    );
    println!("console: http://{address}/console");
    if let Some(token) = development_operator_token {
        println!(
            "console operator token (development, this run only; set ORDERFLOW_OPERATOR_TOKEN \
             to choose one): {token}"
        );
    }
    orderflow_workers::run_all(tasks, &shutdown).await?;
    println!("orderflow stopped");
    Ok(())
}

/// `orderflow worker NAME`: one worker, as its own binary runs it (settings
/// from the environment, its part of the topology checked, not declared).
pub fn run_one(args: &WorkerArgs) -> anyhow::Result<ExitCode> {
    let metadata = Metadata::from_env()?;
    let names = orderflow_workers::names(&metadata);
    if !names.contains(&args.name) {
        anyhow::bail!(
            "unknown worker `{}`; the workers are: {}",
            args.name,
            names.join(", ")
        );
    }
    crate::block_on(orderflow_shared::app::main(&args.name, |ctx, shutdown| {
        let name = args.name.clone();
        async move {
            let task = orderflow_workers::start(&name, ctx, None, shutdown)
                .with_context(|| format!("no worker `{name}` in this configuration"))?;
            task.await
        }
    }))
}
