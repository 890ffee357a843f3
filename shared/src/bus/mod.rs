//! The bus: a [`Broker`] (pooled connections to RabbitMQ that come back by
//! themselves), a [`Publisher`] (confirms, mandatory, timeout) and the consumer
//! runtime [`run_consumer`] (manual ack, bounded prefetch, retries, dead letters).

mod consumer;
mod failover;
mod message;
mod publisher;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use deadpool::Runtime;
use deadpool::managed::{Pool, PoolConfig, Timeouts};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use crate::topology::{self, Names, Topology};

pub use consumer::{
    ConsumerOptions, Consuming, DEFAULT_PAUSE_CHECK, HandleError, Handler, deliveries_received,
    run_consumer,
};
pub use failover::{FailoverManager, NoNode, parse_urls};
pub use message::{Message, Outgoing};
pub use publisher::{MANDATORY, PublishError, Publisher};

/// Errors of the broker connection itself (as opposed to one publish).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot set up the RabbitMQ connection pool for {url}: {detail}")]
    Pool { url: String, detail: String },
    #[error(
        "cannot reach RabbitMQ at {url}: {detail}; is the broker running and ORDERFLOW_AMQP_URL right?"
    )]
    Connect { url: String, detail: String },
    #[error("RabbitMQ refused to open a channel: {0}")]
    Channel(lapin::Error),
    #[error(transparent)]
    Declare(#[from] topology::DeclareError),
    #[error("service `{0}` has no queue in the topology; is it listed in orderflow_services()?")]
    UnknownService(String),
    #[error(
        "broker name `{name}` is {len} bytes long, and AMQP names hold at most {max}; shorten \
         ORDERFLOW_NAMESPACE (or the payment method names of providers.toml)",
        max = crate::envelope::MAX_SHORT_STRING
    )]
    NameTooLong { name: String, len: usize },
}

/// Every exchange and queue name of `topology` fits an AMQP short string
/// (lapin panics on a longer one), or the first that does not.
fn check_names(topology: &Topology) -> Result<(), BusError> {
    let names = topology
        .exchanges
        .iter()
        .map(|e| e.name.as_str())
        .chain(topology.queues.iter().map(|q| q.name.as_str()));
    for name in names {
        if name.len() > crate::envelope::MAX_SHORT_STRING {
            return Err(BusError::NameTooLong {
                name: crate::envelope::abbreviate(name, crate::envelope::ID_CHARS),
                len: name.len(),
            });
        }
    }
    Ok(())
}

struct Inner {
    pool: Pool<FailoverManager>,
    url_redacted: String,
    topology: Topology,
    publish_timeout: Duration,
}

/// A handle on the broker: a pool of connections, the topology and the
/// publish timeout. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.inner.url_redacted)
            .field("namespace", &self.inner.topology.names.namespace())
            .finish_non_exhaustive()
    }
}

/// How long one broker node may take to open a connection before the next
/// node of the list is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The backoff used to come back after the broker went away: 100 ms doubling
/// to 5 s, with jitter, for as long as it takes.
pub(crate) fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Broker {
    /// A broker handle; connects lazily. `url` is one broker URL or several
    /// nodes of a cluster, comma-separated: a connection goes to the node
    /// that answered last, else the next in the list ([`FailoverManager`]).
    /// `connection_name` shows in the management UI and `rabbitmqctl
    /// list_connections client_properties`. A topology with a name AMQP
    /// cannot carry is [`BusError::NameTooLong`].
    pub fn new(
        url: &SecretString,
        connection_name: &str,
        topology: Topology,
        publish_timeout: Duration,
    ) -> Result<Self, BusError> {
        check_names(&topology)?;
        let url_redacted = crate::config::redact_url(url.expose_secret());
        let urls = parse_urls(url).map_err(|detail| BusError::Pool {
            url: url_redacted.clone(),
            detail,
        })?;
        let name = connection_name.to_owned();
        let manager = FailoverManager::new(
            urls,
            move || ConnectionProperties::default().with_connection_name(name.as_str().into()),
            CONNECT_TIMEOUT,
        );
        let pool = Pool::builder(manager)
            .config(PoolConfig {
                max_size: 8,
                timeouts: Timeouts {
                    wait: Some(Duration::from_secs(10)),
                    create: Some(Duration::from_secs(10)),
                    recycle: Some(Duration::from_secs(5)),
                },
                ..PoolConfig::default()
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| BusError::Pool {
                url: url_redacted.clone(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                url_redacted,
                topology,
                publish_timeout,
            }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn names(&self) -> &Names {
        &self.inner.topology.names
    }

    pub fn publish_timeout(&self) -> Duration {
        self.inner.publish_timeout
    }

    /// A fresh channel on a pooled connection (a broken connection is
    /// replaced by the pool). One attempt; callers retry.
    pub async fn channel(&self) -> Result<Channel, BusError> {
        let connection = self.inner.pool.get().await.map_err(|e| BusError::Connect {
            url: self.inner.url_redacted.clone(),
            detail: e.to_string(),
        })?;
        connection.create_channel().await.map_err(BusError::Channel)
    }

    /// A fresh channel in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> Result<Channel, BusError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BusError::Channel)?;
        Ok(channel)
    }

    /// Declares the whole topology (idempotent). Waits for the broker with
    /// backoff up to `patience`, then gives up with the last error.
    pub async fn declare_topology(&self, patience: Duration) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut delays = reconnect_backoff();
        loop {
            let result = async {
                let channel = self.channel().await?;
                topology::declare(&channel, self.topology()).await?;
                let _ = channel.close(200, "topology declared".into()).await;
                Ok::<(), BusError>(())
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                // A precondition failure will not heal by waiting.
                Err(e @ BusError::Declare(_)) => return Err(e),
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, ?delay, "broker not ready, retrying topology declaration");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Checks, passively, that the part of the topology `service` uses exists
    /// (see [`topology::check`]). Waits with backoff up to `patience` for the
    /// broker to answer and the topology to appear (an operator may be
    /// declaring it), then gives up with the last error.
    pub async fn check_topology(&self, service: &str, patience: Duration) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut delays = reconnect_backoff();
        loop {
            let result = async {
                // A failed passive declaration closes its channel: one per try.
                let channel = self.channel().await?;
                topology::check(&channel, self.topology(), service).await?;
                let _ = channel.close(200, "topology checked".into()).await;
                Ok::<(), BusError>(())
            }
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(BusError::Declare(topology::DeclareError::UnknownService(service))) => {
                    return Err(BusError::UnknownService(service));
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    if tokio::time::Instant::now() + delay > deadline {
                        return Err(e);
                    }
                    tracing::warn!(service, error = %e, ?delay, "topology not usable yet, checking again");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// A publisher on its own confirm channel (created on first use).
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.clone())
    }

    /// Deletes every queue and exchange of this broker's topology. Only for
    /// throwaway namespaces (benchmarks): never for a deployment.
    pub async fn delete_topology(&self) -> Result<(), BusError> {
        let channel = self.channel().await?;
        crate::topology::delete(&channel, self.topology()).await?;
        let _ = channel.close(200, "topology deleted".into()).await;
        Ok(())
    }

    /// Closes the pool; open channels end with their connections.
    pub fn close(&self) {
        self.inner.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_name_amqp_cannot_carry_is_refused_before_anything_panics() {
        let topology = |namespace: &str| {
            Topology::build(
                Names::new(namespace),
                &topology::orderflow_services(&["zhifubao"]),
                &topology::DEFAULT_RETRY_TIERS,
            )
        };
        let url = SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f");
        let error = Broker::new(
            &url,
            "test",
            topology(&"n".repeat(250)),
            Duration::from_secs(1),
        )
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("ORDERFLOW_NAMESPACE") && text.contains("255"),
            "{text}"
        );
        assert!(Broker::new(&url, "test", topology("t1"), Duration::from_secs(1)).is_ok());
    }
}
