//! A unit of work: the inbox row of the message being handled, the handler's
//! state change and the events it emits (outbox rows), in one transaction.
//! A duplicate delivery finds its inbox row and gets no unit of work at all.

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
        let mut tx = self.pool().begin().await?;
        let fresh = sqlx::query(
            "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(&message.message_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            tracing::debug!(
                consumer,
                message_id = %message.message_id,
                order_id = %message.correlation_id,
                "duplicate delivery skipped (inbox)"
            );
            return Ok(None);
        }
        Ok(Some(UnitOfWork {
            db: self.clone(),
            tx,
            outgoing: Vec::new(),
        }))
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
    /// The transaction's connection, for the handler's own queries.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Emits an event when (and only if) the unit commits.
    pub fn emit(&mut self, message: Outgoing) {
        self.outgoing.push(message);
    }

    /// Writes the outbox rows, commits, and wakes the relay.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let has_outgoing = !self.outgoing.is_empty();
        if has_outgoing {
            let mut message_ids = Vec::with_capacity(self.outgoing.len());
            let mut routing_keys = Vec::with_capacity(self.outgoing.len());
            let mut correlation_ids = Vec::with_capacity(self.outgoing.len());
            let mut causation_ids = Vec::with_capacity(self.outgoing.len());
            let mut traceparents = Vec::with_capacity(self.outgoing.len());
            let mut occurred_at = Vec::with_capacity(self.outgoing.len());
            let mut bodies = Vec::with_capacity(self.outgoing.len());
            for message in self.outgoing.drain(..) {
                let envelope = message.envelope;
                message_ids.push(envelope.message_id);
                routing_keys.push(message.routing_key);
                correlation_ids.push(envelope.correlation_id);
                causation_ids.push(envelope.causation_id);
                traceparents.push(envelope.traceparent);
                occurred_at.push(i64::try_from(envelope.timestamp).unwrap_or(i64::MAX));
                bodies.push(message.body);
            }
            // One round trip: the rows, and the NOTIFY that wakes relays in
            // other processes when this transaction commits.
            sqlx::query(
                "WITH written AS (INSERT INTO outbox (message_id, routing_key, correlation_id, \
                 causation_id, traceparent, occurred_at, body) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::int8[], $7::bytea[]) RETURNING 1) \
                 SELECT pg_notify($8, '') FROM (SELECT 1) once WHERE EXISTS (SELECT 1 FROM written)",
            )
            .bind(&message_ids)
            .bind(&routing_keys)
            .bind(&correlation_ids)
            .bind(&causation_ids)
            .bind(&traceparents)
            .bind(&occurred_at)
            .bind(&bodies)
            .bind(self.db.outbox_channel())
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        if has_outgoing {
            self.db.outbox_signal().notify_one();
        }
        Ok(())
    }
}
