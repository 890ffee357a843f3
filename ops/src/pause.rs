//! Pausing and resuming a service's consumption. The paused state is a
//! marker message in the service's pause queue (`orderflow.<svc>.pause`,
//! durable, quorum): [`pause`] publishes one through the pause exchange
//! (publisher-confirmed, persistent), [`resume`] purges the queue. Every
//! consumer of the service looks at the queue's message count (a passive
//! declaration, which its least-privilege user may make) before it consumes
//! and about every second while it consumes or waits
//! (`orderflow_shared::bus::run_consumer`), so a pause reaches every
//! instance in every process, and survives worker and broker restarts.

use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::QueuePurgeOptions;
use orderflow_shared::bus::Broker;
use orderflow_shared::topology::QueueRole;
use serde::Serialize;

use crate::OpsError;
use crate::dlq::count;

/// Whether a service is paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PauseState {
    pub service: String,
    /// The pause queue that holds the marker.
    pub queue: String,
    pub paused: bool,
}

fn pause_queue(broker: &Broker, service: &str) -> Result<String, OpsError> {
    crate::queue_of(broker, service, &QueueRole::Pause)
}

/// Whether `service` is paused now.
pub async fn state(broker: &Broker, service: &str) -> Result<PauseState, OpsError> {
    let queue = pause_queue(broker, service)?;
    let channel = broker.channel().await?;
    let counted = count(&channel, &queue).await;
    let _ = channel.close(200, "looked".into()).await;
    Ok(PauseState {
        service: service.to_owned(),
        paused: counted? > 0,
        queue,
    })
}

/// Pauses `service`: its consumers stop taking messages (within their
/// pause check interval) after finishing what they hold; its queue fills.
/// Idempotent. `by` says who paused it (kept in the marker, for operators).
pub async fn pause(broker: &Broker, service: &str, by: &str) -> Result<PauseState, OpsError> {
    let current = state(broker, service).await?;
    if current.paused {
        return Ok(current);
    }
    let marker = serde_json::json!({
        "service": service,
        "paused_at": Utc::now().to_rfc3339(),
        "by": by,
    });
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_type("orderflow.pause".into());
    broker
        .publisher()
        .publish_raw(
            &current.queue,
            "",
            marker.to_string().as_bytes(),
            properties,
        )
        .await
        .map_err(|cause| OpsError::Publish {
            what: format!(
                "pausing {service}: publishing its marker to {} (the operator's broker user must \
                 be allowed to write it)",
                current.queue
            ),
            cause: Box::new(cause),
        })?;
    tracing::warn!(service, by, "service paused by an operator");
    Ok(PauseState {
        paused: true,
        ..current
    })
}

/// Resumes `service`: its consumers take messages again (within their pause
/// check interval). Idempotent.
pub async fn resume(broker: &Broker, service: &str) -> Result<PauseState, OpsError> {
    let queue = pause_queue(broker, service)?;
    let channel = broker.channel().await?;
    let purged = channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await;
    let _ = channel.close(200, "resumed".into()).await;
    purged
        .map_err(|cause| OpsError::amqp(format!("resuming {service} (purging {queue})"), cause))?;
    tracing::warn!(service, "service resumed by an operator");
    Ok(PauseState {
        service: service.to_owned(),
        queue,
        paused: false,
    })
}
