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
        Ok(sqlx::query(sqlx::AssertSqlSafe(admit_one(1)))
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
        let admitted: Vec<String> = sqlx::query_scalar(ADMIT_ALL)
            .bind(consumer)
            .bind(&ids)
            .fetch_all(&mut *self.tx)
            .await?;
        Ok(admitted_now(&ids, admitted))
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
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        if self.outgoing.is_empty() {
            self.tx.commit().await?;
            return Ok(());
        }
        self.commit_with(
            |emitted| format!("WITH {emitted} SELECT id, message_id FROM emitted"),
            0,
            |query| query,
        )
        .await
    }

    /// [`commit`](Self::commit) with one round trip less: `last`, the unit's
    /// last statement, also writes its outbox rows. `last` gets the `WITH`
    /// that writes them (named `emitted`, returning `id, message_id`, with
    /// parameters after the `params` that `bind` binds) and must return what
    /// it returns (`… SELECT id, message_id FROM emitted`). Then the unit
    /// commits and the rows go to the relay.
    pub async fn commit_with<'q>(
        mut self,
        last: impl FnOnce(&str) -> String,
        params: usize,
        bind: impl FnOnce(OutboxQuery<'q>) -> OutboxQuery<'q>,
    ) -> Result<(), sqlx::Error> {
        let outgoing = std::mem::take(&mut self.outgoing);
        let columns = OutboxColumns::of(&outgoing);
        let emitted = format!(
            "emitted AS (INSERT INTO outbox {OUTBOX_COLUMNS} SELECT * FROM {} \
             RETURNING id, message_id)",
            OutboxColumns::unnest(params + 1)
        );
        let written: Vec<(i64, String)> = {
            let query = bind(sqlx::query_as(sqlx::AssertSqlSafe(last(&emitted))));
            columns.bind(query).fetch_all(&mut *self.tx).await?
        };
        drop(columns);
        self.tx.commit().await?;
        self.db.hand_over_written(outgoing, &written);
        Ok(())
    }
}

/// The inbox rows of several messages: `$1` the consumer, `$2` the message
/// ids; returns the ids admitted now (a statement of its own, or a `WITH` of
/// a larger one). Read its answer with [`admitted_now`].
pub const ADMIT_ALL: &str = "INSERT INTO inbox (consumer, message_id) \
     SELECT $1, m FROM unnest($2::text[]) AS m ON CONFLICT DO NOTHING RETURNING message_id";

/// For each of `ids` (in order), whether it is among the ids [`ADMIT_ALL`]
/// returned: a message id that comes twice is admitted at its first place.
pub fn admitted_now<S: AsRef<str>>(ids: &[S], returned: Vec<String>) -> Vec<bool> {
    let mut fresh: std::collections::HashSet<String> = returned.into_iter().collect();
    ids.iter().map(|id| fresh.remove(id.as_ref())).collect()
}

/// The inbox row of one message: `$first` the consumer, `$first + 1` the
/// message id; returns a row when it is new.
fn admit_one(first: usize) -> String {
    format!(
        "INSERT INTO inbox (consumer, message_id) VALUES (${first}, ${}) \
         ON CONFLICT DO NOTHING RETURNING 1",
        first + 1
    )
}

/// Where a consumed message's state change runs, and so what it holds to.
/// One statement serves both: written with [`only_if`](Self::only_if) as
/// its condition and wrapped by [`statement`](Self::statement).
#[derive(Clone, Copy, Debug)]
pub enum Admission<'a> {
    /// Inside a unit of work that admitted the message already
    /// ([`UnitOfWork::admit_all`]): the change always applies.
    Admitted,
    /// On its own: the same statement admits `message` into `consumer`'s
    /// inbox (a `WITH` named `admitted`) and changes nothing when the
    /// message was applied before. One round trip, its own transaction.
    Alone {
        consumer: &'a str,
        message: &'a Envelope,
    },
}

impl<'a> Admission<'a> {
    /// The condition the change's rows must meet (`TRUE` or [`ADMITTED`]).
    pub fn only_if(self) -> &'static str {
        match self {
            Self::Admitted => "TRUE",
            Self::Alone { .. } => ADMITTED,
        }
    }

    /// `change` (parameters `$1`..`$params`), preceded by the inbox row's
    /// `WITH` when alone; the inbox's parameters come after the change's.
    pub fn statement(self, change: &str, params: usize) -> String {
        match self {
            Self::Admitted => change.to_owned(),
            Self::Alone { .. } => format!("WITH admitted AS ({}) {change}", admit_one(params + 1)),
        }
    }

    /// Binds the inbox row's parameters (when alone) after the change's.
    pub fn bind<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        match self {
            Self::Admitted => query,
            Self::Alone { consumer, message } => query.bind(consumer).bind(&message.message_id),
        }
    }
}

/// The statement [`Db::change_and_emit`] runs, with what it binds so far.
pub type OutboxQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, (i64, String), sqlx::postgres::PgArguments>;

/// The condition a state change of [`Db::admit_change_and_emit`] (or one
/// run [`Admission::Alone`]) must hold to: the message was admitted now (not
/// applied before).
pub const ADMITTED: &str = "EXISTS (SELECT 1 FROM admitted)";

/// The outbox's columns, in the order [`OutboxColumns`] binds them.
const OUTBOX_COLUMNS: &str = "(message_id, routing_key, correlation_id, causation_id, \
     traceparent, occurred_at, body)";

/// Outgoing messages as the arrays an `UNNEST` of the outbox's columns takes.
struct OutboxColumns<'a> {
    message_ids: Vec<&'a str>,
    routing_keys: Vec<&'a str>,
    correlation_ids: Vec<&'a str>,
    causation_ids: Vec<Option<&'a str>>,
    traceparents: Vec<&'a str>,
    occurred_at: Vec<i64>,
    bodies: Vec<&'a [u8]>,
}

impl<'a> OutboxColumns<'a> {
    fn of(outgoing: &'a [Outgoing]) -> Self {
        let mut columns = Self {
            message_ids: Vec::with_capacity(outgoing.len()),
            routing_keys: Vec::with_capacity(outgoing.len()),
            correlation_ids: Vec::with_capacity(outgoing.len()),
            causation_ids: Vec::with_capacity(outgoing.len()),
            traceparents: Vec::with_capacity(outgoing.len()),
            occurred_at: Vec::with_capacity(outgoing.len()),
            bodies: Vec::with_capacity(outgoing.len()),
        };
        for message in outgoing {
            let envelope = &message.envelope;
            columns.message_ids.push(envelope.message_id.as_str());
            columns.routing_keys.push(message.routing_key.as_str());
            columns
                .correlation_ids
                .push(envelope.correlation_id.as_str());
            columns.causation_ids.push(envelope.causation_id.as_deref());
            columns.traceparents.push(envelope.traceparent.as_str());
            columns
                .occurred_at
                .push(i64::try_from(envelope.timestamp).unwrap_or(i64::MAX));
            columns.bodies.push(message.body.as_slice());
        }
        columns
    }

    /// `UNNEST(...)` of the seven arrays, as parameters `$first`..`$first+6`.
    fn unnest(first: usize) -> String {
        let types = ["text", "text", "text", "text", "text", "int8", "bytea"];
        let params: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("${}::{ty}[]", first + i))
            .collect();
        format!("UNNEST({})", params.join(", "))
    }

    /// Binds the seven arrays, in order, after what `query` already binds.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.message_ids)
            .bind(&self.routing_keys)
            .bind(&self.correlation_ids)
            .bind(&self.causation_ids)
            .bind(&self.traceparents)
            .bind(&self.occurred_at)
            .bind(&self.bodies)
    }
}

impl Db {
    /// Hands the rows `written` (id, message id) of `outgoing` to the relay.
    fn hand_over_written(&self, outgoing: Vec<Outgoing>, written: &[(i64, String)]) {
        let rows: Vec<(i64, Outgoing)> = outgoing
            .into_iter()
            .filter_map(|message| {
                written
                    .iter()
                    .find(|(_, message_id)| *message_id == message.envelope.message_id)
                    .map(|(id, _)| (*id, message))
            })
            .collect();
        self.hand_over().hand_over(rows);
    }

    /// A state change and the events it emits in **one statement** (one
    /// round trip, its own transaction): `state` is a data-modifying query
    /// whose rows say it happened (e.g. `INSERT … ON CONFLICT DO NOTHING
    /// RETURNING …`), with parameters `$1`..`$params` that `bind` binds; the
    /// outbox rows of `outgoing` are written only when it returns a row.
    /// `true` when it did (the rows are then handed to the relay).
    pub async fn change_and_emit<'q>(
        &self,
        state: &str,
        params: usize,
        bind: impl FnOnce(OutboxQuery<'q>) -> OutboxQuery<'q>,
        outgoing: Vec<Outgoing>,
    ) -> Result<bool, sqlx::Error> {
        self.emit_after(&format!("state AS ({state})"), params, bind, outgoing)
            .await
    }

    /// [`change_and_emit`](Self::change_and_emit) for a consumed `message`:
    /// the same statement also admits it into `consumer`'s inbox (the row
    /// [`UnitOfWork::admit`] writes), in a `WITH` named `admitted` that
    /// returns a row when it is new. `state` runs whatever the inbox says,
    /// so it must change nothing unless [`ADMITTED`] holds; its parameters
    /// are `$1`..`$params`, the inbox's come after them.
    pub async fn admit_change_and_emit<'q>(
        &self,
        consumer: &str,
        message: &Envelope,
        state: &str,
        params: usize,
        bind: impl FnOnce(OutboxQuery<'q>) -> OutboxQuery<'q>,
        outgoing: Vec<Outgoing>,
    ) -> Result<bool, sqlx::Error> {
        let ctes = format!(
            "admitted AS ({}), state AS ({state})",
            admit_one(params + 1)
        );
        let (consumer, message_id) = (consumer.to_owned(), message.message_id.clone());
        self.emit_after(
            &ctes,
            params + 2,
            |query| bind(query).bind(consumer).bind(message_id),
            outgoing,
        )
        .await
    }

    /// `WITH <ctes> INSERT INTO outbox … WHERE EXISTS (SELECT 1 FROM state)`,
    /// the outbox's arrays after the `params` the ctes use.
    async fn emit_after<'q>(
        &self,
        ctes: &str,
        params: usize,
        bind: impl FnOnce(OutboxQuery<'q>) -> OutboxQuery<'q>,
        outgoing: Vec<Outgoing>,
    ) -> Result<bool, sqlx::Error> {
        let columns = OutboxColumns::of(&outgoing);
        let sql = format!(
            "WITH {ctes} INSERT INTO outbox {OUTBOX_COLUMNS} \
             SELECT * FROM {} WHERE EXISTS (SELECT 1 FROM state) RETURNING id, message_id",
            OutboxColumns::unnest(params + 1)
        );
        let written: Vec<(i64, String)> = {
            let query = bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)));
            columns.bind(query).fetch_all(self.pool()).await?
        };
        drop(columns);
        let emitted = !written.is_empty();
        self.hand_over_written(outgoing, &written);
        Ok(emitted)
    }
}
