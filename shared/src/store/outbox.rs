//! The outbox relay: publishes committed outbox rows with publisher confirms
//! and marks them sent. Rows are claimed with `FOR UPDATE SKIP LOCKED`, so any
//! number of relays can run; a relay that dies between publish and mark-sent
//! leaves the row unsent and it is published again, with the same
//! `message_id`, which consumers' inboxes recognise.
//!
//! The relay wakes on an in-process signal (same process), on `NOTIFY`
//! (other processes) and, as a safety net, on a slow poll.

use std::time::Duration;

use futures::future::join_all;
use sqlx::Row;
use sqlx::postgres::PgListener;

use super::Db;
use crate::Shutdown;
use crate::bus::{Outgoing, PublishError, Publisher};
use crate::envelope::Envelope;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox of schema `{schema}`: {cause}")]
    Sql { schema: String, cause: sqlx::Error },
    #[error(
        "outbox of schema `{schema}`: {failed} of {claimed} messages not published, first: {first}"
    )]
    Publish {
        schema: String,
        claimed: usize,
        failed: usize,
        first: PublishError,
    },
}

/// Publishes one schema's outbox.
#[derive(Clone, Debug)]
pub struct Relay {
    db: Db,
    publisher: Publisher,
    batch_size: i64,
    poll_interval: Duration,
}

impl Relay {
    pub fn new(db: Db, publisher: Publisher) -> Self {
        Self {
            db,
            publisher,
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
        }
    }

    fn sql_error(&self, source: sqlx::Error) -> RelayError {
        RelayError::Sql {
            schema: self.db.schema().to_owned(),
            cause: source,
        }
    }

    /// Claims up to one batch of unsent rows, publishes them (all confirms in
    /// flight at once) and marks the confirmed ones sent. Returns how many
    /// were published.
    pub async fn relay_batch(&self) -> Result<usize, RelayError> {
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| self.sql_error(e))?;
        let rows = sqlx::query(
            "SELECT id, message_id, routing_key, correlation_id, causation_id, traceparent, \
             occurred_at, body FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.sql_error(e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id").map_err(|e| self.sql_error(e))?;
            let routing_key: String = row.try_get("routing_key").map_err(|e| self.sql_error(e))?;
            let occurred_at: i64 = row.try_get("occurred_at").map_err(|e| self.sql_error(e))?;
            let envelope = Envelope {
                message_id: row.try_get("message_id").map_err(|e| self.sql_error(e))?,
                correlation_id: row
                    .try_get("correlation_id")
                    .map_err(|e| self.sql_error(e))?,
                kind: routing_key.clone(),
                timestamp: u64::try_from(occurred_at).unwrap_or_default(),
                causation_id: row.try_get("causation_id").map_err(|e| self.sql_error(e))?,
                traceparent: row.try_get("traceparent").map_err(|e| self.sql_error(e))?,
            };
            let body: Vec<u8> = row.try_get("body").map_err(|e| self.sql_error(e))?;
            claimed.push((
                id,
                Outgoing {
                    routing_key,
                    envelope,
                    body,
                },
            ));
        }
        let results = join_all(
            claimed
                .iter()
                .map(|(_, message)| self.publisher.publish(message)),
        )
        .await;
        let mut sent = Vec::with_capacity(claimed.len());
        let mut failures = Vec::new();
        for ((id, message), result) in claimed.iter().zip(results) {
            match result {
                Ok(()) => sent.push(*id),
                Err(error) => {
                    tracing::warn!(
                        order_id = %message.envelope.correlation_id,
                        message_id = %message.envelope.message_id,
                        %error,
                        "outbox message not published; it stays in the outbox for the next try"
                    );
                    failures.push(error);
                }
            }
        }
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.sql_error(e))?;
        tx.commit().await.map_err(|e| self.sql_error(e))?;
        let claimed_count = claimed.len();
        match failures.len() {
            0 => Ok(sent.len()),
            failed => Err(RelayError::Publish {
                schema: self.db.schema().to_owned(),
                claimed: claimed_count,
                failed,
                first: failures.swap_remove(0),
            }),
        }
    }

    /// Publishes until the outbox is empty, backing off on failure.
    async fn drain(&self, failures: &mut u32) {
        loop {
            match self.relay_batch().await {
                Ok(n) if n as i64 == self.batch_size => {}
                Ok(_) => {
                    *failures = 0;
                    return;
                }
                Err(error) => {
                    *failures = failures.saturating_add(1);
                    let delay = Duration::from_millis(100 * 2u64.pow((*failures).min(6)));
                    tracing::warn!(%error, ?delay, "outbox relay failed, retrying");
                    tokio::time::sleep(delay).await;
                    return;
                }
            }
        }
    }

    /// Deletes rows sent more than an hour ago so the table stays small.
    async fn prune(&self) {
        let result = sqlx::query(
            "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < now() - interval '1 hour'",
        )
        .execute(self.db.pool())
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, schema = %self.db.schema(), "pruning the outbox failed");
        }
    }

    /// Runs until `shutdown`, publishing whatever is committed to the outbox.
    pub async fn run(self, shutdown: Shutdown) {
        let signal = self.db.outbox_signal().clone();
        let mut listener = match PgListener::connect_with(self.db.pool()).await {
            Ok(mut listener) => match listener.listen(&self.db.outbox_channel()).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; relying on polling");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; relying on polling");
                None
            }
        };
        let mut failures = 0;
        let mut prune = tokio::time::interval(Duration::from_mins(5));
        loop {
            self.drain(&mut failures).await;
            let notified = async {
                match listener.as_mut() {
                    Some(listener) => {
                        if let Err(error) = listener.recv().await {
                            tracing::debug!(%error, "outbox LISTEN interrupted");
                            tokio::time::sleep(self.poll_interval).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = signal.notified() => {}
                () = notified => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                _ = prune.tick() => self.prune().await,
            }
        }
        // Last pass so that nothing committed before shutdown waits for the next start.
        self.drain(&mut failures).await;
        tracing::info!(schema = %self.db.schema(), "outbox relay stopped");
    }
}
