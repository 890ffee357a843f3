//! The saga rows a unit of work touches: locked together when it begins
//! (one statement with the unit's inbox rows, in order-id order, created for
//! an order seen the first time), changed in memory while its messages apply
//! one after another, and written back with the unit's history, timer
//! changes and outbox rows as it commits (one statement). Every message of
//! one order therefore applies one at a time, whichever unit or coordinator
//! handles it, and a batch of messages costs two statements for its inbox,
//! sagas, timers it settles, history and events however many there are. A
//! saga's status and the step it waits on are [`SagaStatus`] and
//! [`SagaStep`], stored as text.

use std::collections::HashMap;

use orderflow_shared::store::{ADMIT_ALL, UnitOfWork, admitted_now};

use sqlx::PgConnection;

use crate::history::Pending;
use crate::timers::Settling;

orderflow_shared::text_enum! {
    /// Where a saga is: running until its first terminal event.
    pub enum SagaStatus {
        Running,
        Completed,
        Cancelled,
    }
}

orderflow_shared::text_enum! {
    /// The step a running saga waits on, declared in the order it passes
    /// them: the order of the variants is the order of the steps, and a
    /// saga's step only moves forward.
    #[derive(PartialOrd, Ord)]
    pub enum SagaStep {
        GenerateInfo,
        PaymentWait,
        Payment,
        Paying,
    }
}

/// One saga as the unit of work sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saga {
    pub status: SagaStatus,
    /// The content digest of the order's first `order.started`.
    pub started_digest: Option<String>,
    /// The step it waits on (only moves forward).
    pub step: Option<SagaStep>,
    /// Written back when the unit commits (its `updated_at` moves).
    changed: bool,
}

/// A row of [`Sagas::admit_and_lock`]: the admitted message ids, then a
/// locked saga (order id, status, first digest, step).
type LockedRow = (
    Vec<String>,
    String,
    SagaStatus,
    Option<String>,
    Option<SagaStep>,
);

/// The sagas of one unit of work, locked.
#[derive(Debug, Default)]
pub struct Sagas {
    sagas: HashMap<String, Saga>,
}

impl Sagas {
    /// Admits `messages` (message id, order id, and for an `order.started`
    /// its content digest) into `consumer`'s inbox and locks the sagas of
    /// the admitted ones, creating those not seen before, in **one
    /// statement**: for each message whether it is applied now (a message id
    /// that comes twice is admitted once, at its first place; one applied
    /// before is not), and the sagas. A saga keeps its first digest; a new
    /// one takes the first digest among its admitted messages. Locks are
    /// taken in order-id order, so two units never wait for each other in a
    /// cycle. The inbox rows are [`ADMIT_ALL`]'s.
    pub async fn admit_and_lock(
        conn: &mut PgConnection,
        consumer: &str,
        messages: &[(&str, &str, Option<String>)],
    ) -> Result<(Vec<bool>, Self), sqlx::Error> {
        let message_ids: Vec<&str> = messages.iter().map(|(m, _, _)| *m).collect();
        let order_ids: Vec<&str> = messages.iter().map(|(_, o, _)| *o).collect();
        let digests: Vec<Option<&str>> = messages.iter().map(|(_, _, d)| d.as_deref()).collect();
        // DO UPDATE rather than DO NOTHING: it locks an existing row too.
        let sql = format!(
            "WITH admitted AS ({ADMIT_ALL}), \
                 input AS ( \
                   SELECT m, o, d, i FROM unnest($2::text[], $3::text[], $4::text[]) \
                     WITH ORDINALITY AS u(m, o, d, i)), \
                 wanted AS ( \
                   SELECT DISTINCT ON (input.o) input.o, input.d \
                   FROM input JOIN admitted ON admitted.message_id = input.m \
                   ORDER BY input.o, input.d IS NULL, input.i), \
                 locked AS ( \
                   INSERT INTO sagas (order_id, started_digest) \
                   SELECT o, d FROM wanted ORDER BY o \
                   ON CONFLICT (order_id) DO UPDATE \
                     SET started_digest = COALESCE(sagas.started_digest, EXCLUDED.started_digest) \
                   RETURNING order_id, status, started_digest, step) \
                 SELECT (SELECT array_agg(message_id) FROM admitted), \
                   order_id, status, started_digest, step FROM locked"
        );
        let rows: Vec<LockedRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(consumer)
            .bind(&message_ids)
            .bind(&order_ids)
            .bind(&digests)
            .fetch_all(conn)
            .await?;
        // Every row carries the admitted ids; no row: nothing was admitted.
        let returned = rows
            .first()
            .map(|(admitted, ..)| admitted.clone())
            .unwrap_or_default();
        let sagas = rows
            .into_iter()
            .map(|(_, order_id, status, started_digest, step)| {
                (
                    order_id,
                    Saga {
                        status,
                        started_digest,
                        step,
                        changed: false,
                    },
                )
            })
            .collect();
        Ok((admitted_now(&message_ids, returned), Self { sagas }))
    }

    /// The saga of `order_id` (locked by [`admit_and_lock`](Self::admit_and_lock)).
    pub fn get(&self, order_id: &str) -> Option<&Saga> {
        self.sagas.get(order_id)
    }

    /// A running saga moved: its time, and the step it now waits on when
    /// that is further along than the recorded one (events of one order may
    /// be handled out of order; the step never moves back).
    pub fn progress(&mut self, order_id: &str, step: Option<SagaStep>) {
        let Some(saga) = self.sagas.get_mut(order_id) else {
            return;
        };
        if saga.status != SagaStatus::Running {
            return;
        }
        saga.changed = true;
        // `None` (no step yet) comes before every step.
        if step > saga.step {
            saga.step = step;
        }
    }

    /// A running saga ended with `status`; `true` when it was running.
    pub fn end(&mut self, order_id: &str, status: SagaStatus) -> bool {
        let Some(saga) = self.sagas.get_mut(order_id) else {
            return false;
        };
        if saga.status != SagaStatus::Running {
            return false;
        }
        saga.status = status;
        saga.step = None;
        saga.changed = true;
        true
    }

    /// Writes the changed sagas back, the unit's timer changes, its
    /// `history` and its outbox rows in one statement (data-modifying
    /// `WITH`s, which run to completion whatever the others do; with
    /// nothing changed they change nothing), and commits `unit`.
    pub async fn write_and_commit(
        self,
        history: &Pending,
        settling: &Settling,
        unit: UnitOfWork,
    ) -> Result<(), sqlx::Error> {
        let changed: Vec<(String, Saga)> =
            self.sagas.into_iter().filter(|(_, s)| s.changed).collect();
        let ids: Vec<&str> = changed.iter().map(|(id, _)| id.as_str()).collect();
        let statuses: Vec<SagaStatus> = changed.iter().map(|(_, s)| s.status).collect();
        let steps: Vec<Option<SagaStep>> = changed.iter().map(|(_, s)| s.step).collect();
        // Parameters: the sagas', then the timers', then the history's.
        let settling_first = WRITE_SAGAS_PARAMS + 1;
        let history_first = settling_first + Settling::PARAMS;
        unit.commit_with(
            |emitted| {
                format!(
                    "WITH written AS ({WRITE_SAGAS}), {}, recorded AS ({}), {emitted} \
                     SELECT id, message_id FROM emitted",
                    Settling::ctes(settling_first),
                    Pending::insert(history_first)
                )
            },
            WRITE_SAGAS_PARAMS + Settling::PARAMS + Pending::PARAMS,
            |query| history.bind(settling.bind(query.bind(&ids).bind(&statuses).bind(&steps))),
        )
        .await
    }
}

/// How many parameters [`WRITE_SAGAS`] takes.
const WRITE_SAGAS_PARAMS: usize = 3;

/// Writes sagas back: `$1` order ids, `$2` statuses, `$3` steps.
const WRITE_SAGAS: &str = "UPDATE sagas SET status = u.status, step = u.step, updated_at = now() \
     FROM unnest($1::text[], $2::text[], $3::text[]) AS u(order_id, status, step) \
     WHERE sagas.order_id = u.order_id";

#[cfg(test)]
mod tests {
    use strum::VariantArray as _;

    use super::*;

    fn running(step: Option<SagaStep>) -> Saga {
        Saga {
            status: SagaStatus::Running,
            started_digest: None,
            step,
            changed: false,
        }
    }

    fn sagas(saga: Saga) -> Sagas {
        Sagas {
            sagas: HashMap::from([("o".to_owned(), saga)]),
        }
    }

    #[test]
    fn the_step_only_moves_forward_and_only_while_running() {
        let mut all = sagas(running(Some(SagaStep::Payment)));
        all.progress("o", Some(SagaStep::PaymentWait));
        assert_eq!(all.get("o").unwrap().step, Some(SagaStep::Payment));
        all.progress("o", Some(SagaStep::Paying));
        assert_eq!(all.get("o").unwrap().step, Some(SagaStep::Paying));
        assert!(all.end("o", SagaStatus::Completed));
        assert!(
            !all.end("o", SagaStatus::Cancelled),
            "the first ending wins"
        );
        all.progress("o", Some(SagaStep::Payment));
        let saga = all.get("o").unwrap();
        assert_eq!((saga.status, saga.step), (SagaStatus::Completed, None));
        assert!(saga.changed);
    }

    #[test]
    fn a_message_without_a_step_moves_only_the_time() {
        let mut all = sagas(running(Some(SagaStep::PaymentWait)));
        all.progress("o", None);
        assert_eq!(all.get("o").unwrap().step, Some(SagaStep::PaymentWait));
        assert!(all.get("o").unwrap().changed, "its time still moves");
    }

    /// The steps in the order a saga passes them, spelled as the table
    /// and the console have them.
    #[test]
    fn steps_are_ordered_and_spelled_as_stored() {
        let names: Vec<&str> = SagaStep::VARIANTS.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            ["generate-info", "payment-wait", "payment", "paying"]
        );
        assert!(SagaStep::VARIANTS.is_sorted());
        for step in SagaStep::VARIANTS {
            assert_eq!(step.as_str().parse::<SagaStep>().unwrap(), *step);
            assert_eq!(serde_json::to_value(step).unwrap(), step.as_str());
        }
        for status in SagaStatus::VARIANTS {
            assert_eq!(status.as_str().parse::<SagaStatus>().unwrap(), *status);
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert!("no-such-step".parse::<SagaStep>().is_err());
    }
}
