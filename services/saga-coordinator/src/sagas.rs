//! The saga rows a unit of work touches: locked together when it begins
//! (one statement, in order-id order, created for an order seen the first
//! time), changed in memory while its messages apply one after another, and
//! written back together before it commits (one statement). Every message of
//! one order therefore applies one at a time, whichever unit or coordinator
//! handles it, and a batch of messages costs two statements for its sagas
//! however many there are.

use std::collections::HashMap;

use sqlx::PgConnection;

/// The steps a saga waits on, in the order it passes them.
pub const STEPS: &[&str] = &["generate-info", "payment-wait", "payment", "paying"];

/// One saga as the unit of work sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saga {
    /// `running`, `completed` or `cancelled`.
    pub status: String,
    /// The content digest of the order's first `order.started`.
    pub started_digest: Option<String>,
    /// The step it waits on (only moves forward).
    pub step: Option<String>,
    /// Written back when the unit commits (its `updated_at` moves).
    changed: bool,
}

/// The sagas of one unit of work, locked.
#[derive(Debug, Default)]
pub struct Sagas {
    sagas: HashMap<String, Saga>,
}

fn rank(step: &str) -> usize {
    STEPS.iter().position(|s| *s == step).map_or(0, |i| i + 1)
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
        let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
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
    pub fn progress(&mut self, order_id: &str, step: Option<&str>) {
        let Some(saga) = self.sagas.get_mut(order_id) else {
            return;
        };
        if saga.status != "running" {
            return;
        }
        saga.changed = true;
        if let Some(step) = step
            && rank(step) > saga.step.as_deref().map_or(0, rank)
        {
            saga.step = Some(step.to_owned());
        }
    }

    /// A running saga ended with `status`; `true` when it was running.
    pub fn end(&mut self, order_id: &str, status: &str) -> bool {
        let Some(saga) = self.sagas.get_mut(order_id) else {
            return false;
        };
        if saga.status != "running" {
            return false;
        }
        status.clone_into(&mut saga.status);
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
        let statuses: Vec<&str> = changed.iter().map(|(_, s)| s.status.as_str()).collect();
        let steps: Vec<Option<&str>> = changed.iter().map(|(_, s)| s.step.as_deref()).collect();
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
    use super::*;

    fn running(step: Option<&str>) -> Saga {
        Saga {
            status: "running".into(),
            started_digest: None,
            step: step.map(str::to_owned),
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
        let mut all = sagas(running(Some("payment")));
        all.progress("o", Some("payment-wait"));
        assert_eq!(all.get("o").unwrap().step.as_deref(), Some("payment"));
        all.progress("o", Some("paying"));
        assert_eq!(all.get("o").unwrap().step.as_deref(), Some("paying"));
        assert!(all.end("o", "completed"));
        assert!(!all.end("o", "cancelled"), "the first ending wins");
        all.progress("o", Some("payment"));
        let saga = all.get("o").unwrap();
        assert_eq!(
            (saga.status.as_str(), saga.step.as_deref()),
            ("completed", None)
        );
        assert!(saga.changed);
    }

    #[test]
    fn an_unknown_step_ranks_first() {
        let mut all = sagas(running(None));
        all.progress("o", Some("no-such-step"));
        assert_eq!(all.get("o").unwrap().step, None);
        assert!(all.get("o").unwrap().changed, "its time still moves");
    }
}
