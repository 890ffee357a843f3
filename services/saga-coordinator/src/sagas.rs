//! The saga rows a unit of work touches: locked together when it begins
//! (one statement, in order-id order, created for an order seen the first
//! time), changed in memory while its messages apply one after another, and
//! written back together before it commits (one statement). Every message of
//! one order therefore applies one at a time, whichever unit or coordinator
//! handles it, and a batch of messages costs two statements for its sagas
//! however many there are. A saga's status and the step it waits on are
//! [`SagaStatus`] and [`SagaStep`], stored as text.

use std::collections::HashMap;

use sqlx::PgConnection;

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

/// The sagas of one unit of work, locked.
#[derive(Debug, Default)]
pub struct Sagas {
    sagas: HashMap<String, Saga>,
}

impl Sagas {
    /// Locks the sagas of `orders` (order id, and the content digest of an
    /// `order.started` among the unit's messages), creating the ones not seen
    /// before; a saga's first digest is kept. Locks are taken in order-id
    /// order, so two units never wait for each other in a cycle.
    pub async fn lock(
        conn: &mut PgConnection,
        orders: &[(String, Option<String>)],
    ) -> Result<Self, sqlx::Error> {
        let mut first: Vec<(&str, Option<&str>)> = Vec::with_capacity(orders.len());
        for (order_id, digest) in orders {
            match first.iter_mut().find(|(id, _)| id == order_id) {
                Some((_, known)) => {
                    if known.is_none() {
                        *known = digest.as_deref();
                    }
                }
                None => first.push((order_id, digest.as_deref())),
            }
        }
        first.sort_by(|a, b| a.0.cmp(b.0));
        let ids: Vec<&str> = first.iter().map(|(id, _)| *id).collect();
        let digests: Vec<Option<&str>> = first.iter().map(|(_, d)| *d).collect();
        // DO UPDATE rather than DO NOTHING: it locks an existing row too.
        let rows: Vec<(String, SagaStatus, Option<String>, Option<SagaStep>)> = sqlx::query_as(
            "INSERT INTO sagas (order_id, started_digest) \
             SELECT o, d FROM unnest($1::text[], $2::text[]) AS u(o, d) ORDER BY o \
             ON CONFLICT (order_id) DO UPDATE \
               SET started_digest = COALESCE(sagas.started_digest, EXCLUDED.started_digest) \
             RETURNING order_id, status, started_digest, step",
        )
        .bind(&ids)
        .bind(&digests)
        .fetch_all(conn)
        .await?;
        Ok(Self {
            sagas: rows
                .into_iter()
                .map(|(order_id, status, started_digest, step)| {
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
                .collect(),
        })
    }

    /// The saga of `order_id` (locked by [`lock`](Self::lock)).
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

    /// Writes the changed sagas back (one statement).
    pub async fn write(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let changed: Vec<(String, Saga)> =
            self.sagas.into_iter().filter(|(_, s)| s.changed).collect();
        if changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = changed.iter().map(|(id, _)| id.as_str()).collect();
        let statuses: Vec<SagaStatus> = changed.iter().map(|(_, s)| s.status).collect();
        let steps: Vec<Option<SagaStep>> = changed.iter().map(|(_, s)| s.step).collect();
        sqlx::query(
            "UPDATE sagas SET status = u.status, step = u.step, updated_at = now() \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS u(order_id, status, step) \
             WHERE sagas.order_id = u.order_id",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&steps)
        .execute(conn)
        .await?;
        Ok(())
    }
}

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
