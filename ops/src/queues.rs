//! Each service queue as the console shows it: depth, consumers, message
//! rates, dead letters, whether the service is paused, and a status that
//! flags a queue that backs up or has no consumer.
//!
//! Depth and consumers come from passive declarations, which need no
//! permission, work whether the management plugin is on or not, and are
//! exact at the time of asking; the RabbitMQ management HTTP API adds the
//! message rates (and unacknowledged messages) when it answers. (Its own
//! figures are refreshed by the broker every few seconds: a queue declared
//! a moment ago has none yet.)

use std::collections::HashMap;
use std::time::Duration;

use orderflow_shared::bus::Broker;
use orderflow_shared::topology::QueueRole;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::OpsError;

/// Ready messages from which a queue counts as backing up.
pub const BACKING_UP_AT: u64 = 100;

/// How long the management API may take to answer.
pub const MANAGEMENT_PATIENCE: Duration = Duration::from_secs(2);

/// What the console says about a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Consumed, and not backing up.
    Ok,
    /// An operator paused the service.
    Paused,
    /// Nobody consumes it (the service is down).
    NoConsumer,
    /// At least [`BACKING_UP_AT`] messages wait.
    BackingUp,
}

/// One service's queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueStats {
    pub service: String,
    pub queue: String,
    /// Ready messages.
    pub messages_ready: u64,
    /// Delivered, not yet acknowledged (management API only).
    pub messages_unacknowledged: Option<u64>,
    pub consumers: u64,
    /// Messages per second into the queue (management API only).
    pub publish_rate: Option<f64>,
    /// Messages per second delivered to consumers (management API only).
    pub deliver_rate: Option<f64>,
    /// Messages per second acknowledged (management API only).
    pub ack_rate: Option<f64>,
    /// Messages in the service's dead-letter queue.
    pub dead_letters: u64,
    pub paused: bool,
    pub status: Status,
}

/// Every service queue, and where the figures came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// `management` (with rates) or `passive` (without).
    pub source: &'static str,
    /// Why the management API was not used, when it was asked.
    pub management_error: Option<String>,
    pub queues: Vec<QueueStats>,
}

/// The management HTTP API of the broker, with an operator's credentials.
#[derive(Clone, Debug)]
pub struct Management {
    base_url: String,
    user: String,
    password: SecretString,
    vhost: String,
    client: reqwest::Client,
}

impl Management {
    /// The API at `base_url` (e.g. `http://127.0.0.1:15672`), with the user,
    /// password and vhost of the broker URL `amqp_url`.
    pub fn new(base_url: &str, amqp_url: &SecretString) -> Result<Self, String> {
        // A list of cluster nodes shares one user: the first URL says which.
        let uri: lapin::uri::AMQPUri = amqp_url
            .expose_secret()
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .parse()
            .map_err(|e| format!("the operator's broker URL is invalid: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(MANAGEMENT_PATIENCE)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            user: uri.authority.userinfo.username,
            password: SecretString::from(uri.authority.userinfo.password),
            vhost: uri.vhost,
            client,
        })
    }

    /// Queue figures of the vhost, by queue name.
    async fn queues(&self) -> Result<HashMap<String, ApiQueue>, String> {
        let vhost: String = self
            .vhost
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let url = format!("{}/api/queues/{vhost}", self.base_url);
        let response = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
            .query(&[("columns", "name,messages_unacknowledged,message_stats")])
            .send()
            .await
            .map_err(|e| {
                format!(
                    "the management API at {} does not answer: {e}",
                    self.base_url
                )
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "the management API at {} answered {status} (is the user tagged `management`?)",
                self.base_url
            ));
        }
        let queues: Vec<ApiQueue> = response
            .json()
            .await
            .map_err(|e| format!("the management API's answer is not what was expected: {e}"))?;
        Ok(queues.into_iter().map(|q| (q.name.clone(), q)).collect())
    }
}

#[derive(Debug, Deserialize)]
struct ApiQueue {
    name: String,
    #[serde(default)]
    messages_unacknowledged: Option<u64>,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Debug, Default, Deserialize)]
#[allow(
    clippy::struct_field_names,
    reason = "the management API's own field names"
)]
struct MessageStats {
    #[serde(default)]
    publish_details: Option<Rate>,
    #[serde(default)]
    deliver_get_details: Option<Rate>,
    #[serde(default)]
    ack_details: Option<Rate>,
}

#[derive(Debug, Deserialize)]
struct Rate {
    rate: f64,
}

/// The status of a queue with these figures.
pub fn status(paused: bool, consumers: u64, messages_ready: u64) -> Status {
    if paused {
        Status::Paused
    } else if consumers == 0 {
        Status::NoConsumer
    } else if messages_ready >= BACKING_UP_AT {
        Status::BackingUp
    } else {
        Status::Ok
    }
}

/// (ready messages, consumers) of `queue`, by a passive declaration.
async fn declare(channel: &lapin::Channel, queue: &str) -> Result<(u64, u64), OpsError> {
    let declared = crate::inspect(channel, queue).await?;
    Ok((
        u64::from(declared.message_count()),
        u64::from(declared.consumer_count()),
    ))
}

/// Every service queue of `broker`'s topology. With `management`, its
/// figures (and rates) when it answers; the dead-letter and pause queues are
/// always counted by passive declarations (exact, and they decide the
/// status).
pub async fn stats(broker: &Broker, management: Option<&Management>) -> Result<Stats, OpsError> {
    let (api, management_error) = match management {
        None => (None, None),
        Some(management) => match management.queues().await {
            Ok(queues) => (Some(queues), None),
            Err(error) => {
                tracing::debug!(%error, "queue figures from passive declarations");
                (None, Some(error))
            }
        },
    };
    let topology = broker.topology();
    let channel = broker.channel().await?;
    let read = async {
        let mut queues = Vec::new();
        for service in topology.services() {
            let name_of = |role: &QueueRole| {
                topology
                    .queue(service, role)
                    .map(|q| q.name.clone())
                    .unwrap_or_default()
            };
            let queue = name_of(&QueueRole::Service);
            let (dead_letters, _) = declare(&channel, &name_of(&QueueRole::DeadLetter)).await?;
            let (markers, _) = declare(&channel, &name_of(&QueueRole::Pause)).await?;
            let paused = markers > 0;
            // Depth and consumers exact at the time of asking; the
            // management API (its figures lag by its collection interval)
            // adds the rates.
            let (ready, consumers) = declare(&channel, &queue).await?;
            let from_api = api.as_ref().and_then(|queues| queues.get(&queue));
            let rates = from_api.and_then(|found| found.message_stats.as_ref());
            let rate = |pick: fn(&MessageStats) -> Option<&Rate>| {
                from_api.map(|_| rates.and_then(pick).map_or(0.0, |r| r.rate))
            };
            let stats = QueueStats {
                service: service.to_owned(),
                messages_ready: ready,
                messages_unacknowledged: from_api.and_then(|found| found.messages_unacknowledged),
                consumers,
                publish_rate: rate(|s| s.publish_details.as_ref()),
                deliver_rate: rate(|s| s.deliver_get_details.as_ref()),
                ack_rate: rate(|s| s.ack_details.as_ref()),
                dead_letters,
                paused,
                status: status(paused, consumers, ready),
                queue,
            };
            queues.push(stats);
        }
        Ok::<_, OpsError>(queues)
    }
    .await;
    let _ = channel.close(200, "counted".into()).await;
    Ok(Stats {
        source: if api.is_some() {
            "management"
        } else {
            "passive"
        },
        management_error,
        queues: read?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_queue_is_paused_before_anything_else() {
        assert_eq!(status(true, 0, 5000), Status::Paused);
        assert_eq!(status(false, 0, 0), Status::NoConsumer);
        assert_eq!(status(false, 2, BACKING_UP_AT), Status::BackingUp);
        assert_eq!(status(false, 2, BACKING_UP_AT - 1), Status::Ok);
    }

    #[test]
    fn the_management_api_takes_the_credentials_and_vhost_of_the_broker_url() {
        let management = Management::new(
            "http://broker:15672/",
            &SecretString::from("amqp://console:s3cret@broker:5672/%2f"),
        )
        .unwrap();
        assert_eq!(management.base_url, "http://broker:15672");
        assert_eq!(management.user, "console");
        assert_eq!(management.vhost, "/");
        assert!(!format!("{management:?}").contains("s3cret"));
    }
}
