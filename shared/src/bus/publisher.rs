//! Publishing with publisher confirms, the mandatory flag and a timeout on
//! every publish: a nack, a returned (unroutable) message or a timeout is an
//! error the caller sees, never a silent drop. Broken channels are replaced
//! and the publish retried with backoff (the envelope keeps its `message_id`,
//! so a retry that duplicates a message is deduplicated by the inbox).

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::Mutex;

use super::{Broker, BusError, Outgoing};
use crate::envelope::{ID_CHARS, MAX_SHORT_STRING, abbreviate};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "message {message_id} ({routing_key}) is unroutable: no queue is bound to it on `{exchange}` \
         (broker said {reply}); is the topology declared?"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        message_id: String,
        reply: String,
    },
    #[error("broker refused (nack) message {message_id} ({routing_key})")]
    Nacked {
        routing_key: String,
        message_id: String,
    },
    #[error("no confirm for message {message_id} ({routing_key}) within {timeout:?}")]
    Timeout {
        routing_key: String,
        message_id: String,
        timeout: Duration,
    },
    #[error("publishing message {message_id} ({routing_key}) failed: {cause}")]
    Broker {
        routing_key: String,
        message_id: String,
        cause: lapin::Error,
    },
    #[error("publishing message {message_id}: {cause}")]
    Connection { message_id: String, cause: BusError },
    /// The message cannot be put on the wire at all (an id, the routing key
    /// or the exchange name longer than an AMQP short string): nothing was
    /// sent, and sending it again cannot work.
    #[error("message {message_id} ({routing_key}) cannot be published: {detail}")]
    Invalid {
        routing_key: String,
        message_id: String,
        detail: String,
    },
}

impl PublishError {
    /// Worth trying again on a fresh channel (everything but an unroutable
    /// or an invalid message).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Unroutable { .. } | Self::Invalid { .. })
    }

    /// Will never succeed, whatever the broker does: the message itself
    /// cannot be published.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}

/// Why `name` (an exchange or a routing key) cannot be an AMQP short
/// string, if it cannot.
fn too_long(what: &str, name: &str) -> Option<String> {
    (name.len() > MAX_SHORT_STRING).then(|| {
        format!(
            "the {what} is {} bytes long, and AMQP carries at most {MAX_SHORT_STRING}",
            name.len()
        )
    })
}

fn message_id_of(properties: &BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default()
}

/// Publishes on one confirm channel, shared by all clones; many publishes can
/// be in flight at once, each waiting for its own confirm.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    channel: Arc<Mutex<Option<Channel>>>,
    retry: ExponentialBuilder,
}

/// Publish options for every message: `mandatory`, so that a message no
/// queue is bound for comes back as unroutable instead of vanishing.
pub const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub(crate) fn new(broker: Broker) -> Self {
        Self {
            broker,
            channel: Arc::new(Mutex::new(None)),
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(6)
                .with_jitter(),
        }
    }

    /// Publishes an event on the events exchange.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        let exchange = self.broker.names().events_exchange();
        let properties = message
            .envelope
            .to_properties(FieldTable::default())
            .map_err(|error| PublishError::Invalid {
                routing_key: abbreviate(&message.routing_key, ID_CHARS),
                message_id: abbreviate(&message.envelope.message_id, ID_CHARS),
                detail: error.to_string(),
            })?;
        self.publish_raw(&exchange, &message.routing_key, &message.body, properties)
            .await
    }

    /// Publishes any body with any properties; used for events, delay queues
    /// and dead-letter queues (`exchange` "" = straight to a queue). An
    /// exchange or routing key longer than AMQP allows is
    /// [`PublishError::Invalid`], never sent.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        if let Some(detail) =
            too_long("exchange name", exchange).or_else(|| too_long("routing key", routing_key))
        {
            return Err(PublishError::Invalid {
                routing_key: abbreviate(routing_key, ID_CHARS),
                message_id: message_id_of(&properties),
                detail,
            });
        }
        let attempt = || self.publish_once(exchange, routing_key, body, &properties);
        attempt
            .retry(self.retry)
            .sleep(tokio::time::sleep)
            .when(PublishError::is_retryable)
            .notify(|error, delay| {
                tracing::warn!(%error, ?delay, "publish failed, retrying on a fresh channel");
            })
            .await
    }

    async fn channel(&self) -> Result<Channel, BusError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.broker.confirm_channel().await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Drops the cached channel (if it is `broken`, or whichever it is when
    /// `None`), so the next publish opens a fresh one.
    async fn forget_channel(&self, broken: Option<&Channel>) {
        let mut slot = self.channel.lock().await;
        if broken.is_none_or(|b| slot.as_ref().is_some_and(|c| c.id() == b.id())) {
            *slot = None;
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<(), PublishError> {
        let message_id = message_id_of(properties);
        let timeout = self.broker.publish_timeout();
        // The timeout covers getting a channel too: on a stalled connection
        // even opening one never completes.
        let attempt = tokio::time::timeout(timeout, async {
            let channel = self
                .channel()
                .await
                .map_err(|source| PublishError::Connection {
                    message_id: message_id.clone(),
                    cause: source,
                })?;
            let confirm = async {
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        MANDATORY,
                        body,
                        properties.clone(),
                    )
                    .await?
                    .await
            }
            .await;
            match confirm {
                Ok(confirm) => Ok(confirm),
                Err(source) => {
                    self.forget_channel(Some(&channel)).await;
                    Err(PublishError::Broker {
                        routing_key: routing_key.to_owned(),
                        message_id: message_id.clone(),
                        cause: source,
                    })
                }
            }
        })
        .await;
        let Ok(result) = attempt else {
            // Whatever channel this publish was using may be stalled.
            self.forget_channel(None).await;
            return Err(PublishError::Timeout {
                routing_key: routing_key.to_owned(),
                message_id,
                timeout,
            });
        };
        let confirm = result?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    message_id,
                    reply: format!("{} {}", returned.reply_code, returned.reply_text),
                })
            }
            Confirmation::Nack(None) | Confirmation::NotRequested => Err(PublishError::Nacked {
                routing_key: routing_key.to_owned(),
                message_id,
            }),
        }
    }
}
