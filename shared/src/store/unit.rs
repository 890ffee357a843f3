//! A unit of work: the inbox row of the message being handled, the handler's
//! state change and the events it emits (outbox rows), in one transaction.
//! A duplicate delivery finds its inbox row and gets no unit of work at all.
//! After the commit the outbox rows go straight to the relay (in memory), as
//! many as its hand-over limit leaves room for; the others wait in the table
//! for a sweep.

use sqlx::{PgConnection, Postgres, Transaction};

use super::Db;
use crate::bus::Outgoing;
use crate::envelope::Envelope;

/// An open transaction for one message. Dropping it without [`commit`]
/// rolls everything back, the inbox row included, so the redelivery retries.
///
/// [`commit`]: UnitOfWork::commit
#[derive(Debug)]
pub struct UnitOfWork {
    db: Db,
    tx: Transaction<'static, Postgres>,
    outgoing: Vec<Outgoing>,
}

impl Db {
    /// Begins the unit of work for `message` as seen by `consumer` (the
    /// service name). `None` when this consumer already applied the message.
    pub async fn begin_unit(
        &self,
        consumer: &str,
        message: &Envelope,
    ) -> Result<Option<UnitOfWork>, sqlx::Error> {
        let mut unit = self.begin_unit_without_inbox().await?;
        if !unit.admit(consumer, message).await? {
            tracing::debug!(
                consumer,
                message_id = %message.message_id,
                order_id = %message.correlation_id,
                "duplicate delivery skipped (inbox)"
            );
            return Ok(None);
        }
        Ok(Some(unit))
    }

    /// A unit of work that is not tied to an incoming message (an API call,
    /// a timer): state change + outbox rows in one transaction.
    pub async fn begin_unit_without_inbox(&self) -> Result<UnitOfWork, sqlx::Error> {
        Ok(UnitOfWork {
            db: self.clone(),
            tx: self.pool().begin().await?,
            outgoing: Vec::new(),
        })
    }
}

impl UnitOfWork {
    /// Records in this unit's transaction that `consumer` applies `message`
    /// (its inbox row). `false` when it already did: skip the message. A
    /// batch handler admits each message of the batch into one unit.
    pub async fn admit(&mut self, consumer: &str, message: &Envelope) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query(
            "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(&message.message_id)
        .execute(&mut *self.tx)
        .await?
        .rows_affected()
            == 1)
    }

    /// [`admit`](Self::admit) for several messages in one statement: for
    /// each, `true` when `consumer` applies it now. A message id that comes
    /// twice in `messages` is admitted once (its first time).
    pub async fn admit_all(
        &mut self,
        consumer: &str,
        messages: &[&Envelope],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        let admitted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO inbox (consumer, message_id) SELECT $1, m FROM unnest($2::text[]) AS m \
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(consumer)
        .bind(&ids)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut fresh: std::collections::HashSet<&str> =
            admitted.iter().map(String::as_str).collect();
        Ok(ids.iter().map(|id| fresh.remove(id)).collect())
    }

    /// Whether `consumer` already applied `message` (its inbox row is
    /// committed), without recording anything: for a handler that commits
    /// work of its own before the unit that applies the message.
    pub async fn seen(&mut self, consumer: &str, message: &Envelope) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)",
        )
        .bind(consumer)
        .bind(&message.message_id)
        .fetch_one(&mut *self.tx)
        .await
    }

    /// The transaction's connection, for the handler's own queries.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Emits an event when (and only if) the unit commits.
    pub fn emit(&mut self, message: Outgoing) {
        self.outgoing.push(message);
    }

    /// Writes the outbox rows, commits, and hands the rows to the relay.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if self.outgoing.is_empty() {
            self.tx.commit().await?;
            return Ok(());
        }
        let count = self.outgoing.len();
        let mut message_ids = Vec::with_capacity(count);
        let mut routing_keys = Vec::with_capacity(count);
        let mut correlation_ids = Vec::with_capacity(count);
        let mut causation_ids = Vec::with_capacity(count);
        let mut traceparents = Vec::with_capacity(count);
        let mut occurred_at = Vec::with_capacity(count);
        let mut bodies = Vec::with_capacity(count);
        for message in &self.outgoing {
            let envelope = &message.envelope;
            message_ids.push(envelope.message_id.as_str());
            routing_keys.push(message.routing_key.as_str());
            correlation_ids.push(envelope.correlation_id.as_str());
            causation_ids.push(envelope.causation_id.as_deref());
            traceparents.push(envelope.traceparent.as_str());
            occurred_at.push(i64::try_from(envelope.timestamp).unwrap_or(i64::MAX));
            bodies.push(message.body.as_slice());
        }
        let written: Vec<(i64, String)> = sqlx::query_as(
            "INSERT INTO outbox (message_id, routing_key, correlation_id, causation_id, \
             traceparent, occurred_at, body) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::int8[], $7::bytea[]) RETURNING id, message_id",
        )
        .bind(&message_ids)
        .bind(&routing_keys)
        .bind(&correlation_ids)
        .bind(&causation_ids)
        .bind(&traceparents)
        .bind(&occurred_at)
        .bind(&bodies)
        .fetch_all(&mut *self.tx)
        .await?;
        drop((
            message_ids,
            routing_keys,
            correlation_ids,
            causation_ids,
            traceparents,
            bodies,
        ));
        self.tx.commit().await?;
        let mut rows = Vec::with_capacity(count);
        for message in self.outgoing {
            if let Some((id, _)) = written
                .iter()
                .find(|(_, message_id)| *message_id == message.envelope.message_id)
            {
                rows.push((*id, message));
            }
        }
        self.db.hand_over().hand_over(rows);
        Ok(())
    }
}
