//! What every service starts from: a [`Ctx`] (settings, metadata, the broker
//! whose topology an operator declared and the worker checked, token keys)
//! and a shutdown signal; plus [`main`], the whole body of each thin worker
//! binary, and [`run_worker`], which runs a worker's consumer with its outbox
//! relay and retention. `Ctx` is the handle a service runs with, not a
//! context: that word means a bounded context (`store::Context`).

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::Shutdown;
use crate::bus::{Broker, ConsumerOptions};
use crate::config::Settings;
use crate::metadata::Metadata;
use crate::store::{Context, Db};
use crate::token::TokenKeys;
use crate::topology::{DEFAULT_RETRY_TIERS, Names, Topology, orderflow_services};

/// How long a context waits for the broker (and its topology) to be there.
const BROKER_PATIENCE: Duration = Duration::from_mins(1);

/// Everything a service's `run(ctx, shutdown)` needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub settings: Arc<Settings>,
    pub metadata: Arc<Metadata>,
    pub broker: Broker,
    /// `None` when `ORDERFLOW_TOKEN_KEYS` is not set.
    pub token_keys: Option<TokenKeys>,
}

/// The orderflow topology for `settings`' namespace and `metadata`'s methods.
pub fn topology_for(settings: &Settings, metadata: &Metadata) -> Topology {
    Topology::build(
        Names::new(&settings.namespace),
        &orderflow_services(&metadata.methods()),
        &DEFAULT_RETRY_TIERS,
    )
}

impl Ctx {
    /// A context on `topology` (tests pass one with short delay tiers);
    /// connects lazily. `connection_name` shows in the RabbitMQ UI.
    pub fn new(
        settings: Settings,
        metadata: Metadata,
        topology: Topology,
        connection_name: &str,
    ) -> anyhow::Result<Self> {
        let broker = Broker::new(
            &settings.amqp_url,
            connection_name,
            topology,
            Duration::from_millis(settings.publish_timeout_ms),
        )?;
        let token_keys = settings
            .token_keys
            .as_ref()
            .map(TokenKeys::parse)
            .transpose()?;
        Ok(Self {
            settings: Arc::new(settings),
            metadata: Arc::new(metadata),
            broker,
            token_keys,
        })
    }

    /// A worker's context: the deployment's topology, whose part `service`
    /// uses is checked (passively) to exist on the broker, waiting up to a
    /// minute for the broker and the topology to be there. Workers never
    /// declare: that is the operator's step (`orderflow topology declare`,
    /// `orderflow up`, or definitions loaded by the broker at boot).
    pub async fn start(
        settings: Settings,
        metadata: Metadata,
        service: &str,
    ) -> anyhow::Result<Self> {
        let ctx = Self::on_deployment(settings, metadata, service)?;
        let checked = ctx.broker.check_topology(service, BROKER_PATIENCE).await;
        checked.with_context(|| format!("checking the RabbitMQ topology of `{service}`"))?;
        Ok(ctx)
    }

    /// The operator's context (`orderflow up`, benchmarks): the deployment's
    /// whole topology, declared on the broker (waiting up to a minute for it
    /// to come up). Needs the right to configure every orderflow name.
    pub async fn declare(
        settings: Settings,
        metadata: Metadata,
        connection_name: &str,
    ) -> anyhow::Result<Self> {
        let ctx = Self::on_deployment(settings, metadata, connection_name)?;
        let declared = ctx.broker.declare_topology(BROKER_PATIENCE).await;
        declared.context("declaring the RabbitMQ topology")?;
        Ok(ctx)
    }

    /// A context on the deployment's topology (not yet checked or declared).
    fn on_deployment(
        settings: Settings,
        metadata: Metadata,
        connection_name: &str,
    ) -> anyhow::Result<Self> {
        let topology = topology_for(&settings, &metadata);
        Self::new(settings, metadata, topology, connection_name)
    }

    /// `context`'s schema, migrated (the database is created if missing).
    /// Waits up to a minute for PostgreSQL to come up, as for the broker
    /// ([`store::patiently`](crate::store::patiently)).
    pub async fn db(&self, context: Context) -> anyhow::Result<Db> {
        let url = &self.settings.database_url;
        let size = self.settings.db_pool_size.max(1);
        crate::store::patiently(
            &format!("opening the `{}` schema", context.schema()),
            crate::store::START_PATIENCE,
            || async move {
                crate::store::ensure_database(url).await?;
                Db::for_context(url, context, size).await
            },
        )
        .await
        .with_context(|| format!("opening the `{}` schema", context.schema()))
    }

    /// Another pool on the existing `schema` (no migration), of
    /// `max_connections`; waits for PostgreSQL like [`db`](Self::db).
    pub async fn open_db(&self, schema: &str, max_connections: u32) -> anyhow::Result<Db> {
        let url = &self.settings.database_url;
        crate::store::patiently(
            &format!("connecting to the `{schema}` schema"),
            crate::store::START_PATIENCE,
            || Db::open(url, schema, max_connections),
        )
        .await
        .with_context(|| format!("connecting to the `{schema}` schema"))
    }

    /// Consumer options for `service` from the settings.
    pub fn consumer(&self, service: &str) -> ConsumerOptions {
        ConsumerOptions {
            prefetch: self.settings.prefetch,
            concurrency: self.settings.concurrency,
            pause_check: self.settings.pause_check(),
            ..ConsumerOptions::new(service)
        }
    }

    /// The token keys, or an error that says how to set them.
    pub fn require_token_keys(&self) -> anyhow::Result<&TokenKeys> {
        self.token_keys.as_ref().context(
            "ORDERFLOW_TOKEN_KEYS is not set: give the signing keys as `kid:secret[,kid:secret]` \
             (`orderflow up` falls back to a development key)",
        )
    }
}

/// A shutdown token cancelled by Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> Shutdown {
    let shutdown = Shutdown::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; finishing in-flight work");
        trigger.cancel();
    });
    shutdown
}

/// The body of a worker binary: settings, logs, metadata, context, then
/// `run` until Ctrl-C/SIGTERM. Errors are printed with their causes.
pub async fn main<F, Fut>(service: &str, run: F) -> ExitCode
where
    F: FnOnce(Ctx, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let result = async {
        let settings = Settings::from_env()?;
        crate::telemetry::init(&settings.log, settings.log_format)?;
        let metadata = Metadata::from_env()?;
        tracing::info!(service, amqp = %settings.amqp_url_redacted(), database = %settings.database_url_redacted(), "starting");
        let ctx = Ctx::start(settings, metadata, service).await?;
        run(ctx, shutdown_on_signal()).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {service}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `service`'s consumer with `handler` until `shutdown`, and for a
/// stateful service the relay of its outbox (`outbox`), which makes a last
/// pass after the consumer stopped, and the retention of its schema's inbox
/// and outbox ([`Retention`](crate::store::Retention)).
pub async fn run_worker<H: crate::bus::Handler>(
    ctx: &Ctx,
    service: &str,
    handler: Arc<H>,
    outbox: Option<Db>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let background = outbox.map(|db| {
        let retention = tokio::spawn(
            crate::store::Retention::new(db.clone(), ctx.settings.retention())
                .run(shutdown.clone()),
        );
        let relay = tokio::spawn(
            crate::store::Relay::new(db, ctx.broker.publisher()).run(shutdown.clone()),
        );
        (relay, retention)
    });
    crate::bus::run_consumer(ctx.broker.clone(), ctx.consumer(service), handler, shutdown).await?;
    if let Some((relay, retention)) = background {
        relay.await.context("outbox relay task")?;
        retention.await.context("retention task")?;
    }
    Ok(())
}
