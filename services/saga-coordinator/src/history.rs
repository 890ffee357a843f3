//! The execution history of each order: every event the coordinator sees
//! (its own decisions and timers included, since it consumes everything),
//! classified, in the order it saw them, with message and causation ids.
//! Read by `GET /orders/{id}/history` (a page at a time, [`read_page`]) and
//! `orderflow saga history` (all of it, [`read`]); the saga's status, step
//! and timers by the console's order page ([`saga_state`]), running sagas
//! that stopped moving by `orderflow saga stuck` and the console
//! ([`stuck`]).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use orderflow_shared::envelope::Envelope;
use orderflow_shared::events::{Event, Step};
use orderflow_shared::store::OutboxQuery;
use serde::Serialize;
use sqlx::PgPool;

use crate::sagas::{SagaStatus, SagaStep};
use crate::timers::TimerState;

/// One line of an order's history.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub id: i64,
    pub recorded_at: DateTime<Utc>,
    /// `event`, `rejection` (a submission or method turned down), `timer`
    /// (a deadline passed), `compensation` (a refund), `late` (arrived after
    /// the saga ended).
    pub kind: String,
    /// The event name (routing key).
    pub name: String,
    pub message_id: String,
    pub causation_id: Option<String>,
    /// The event's body.
    pub detail: serde_json::Value,
}

/// How `event` is classified, given the saga's status before it.
pub fn classify(event: &Event, status_before: Option<SagaStatus>) -> &'static str {
    let ended = matches!(
        status_before,
        Some(SagaStatus::Completed | SagaStatus::Cancelled)
    );
    match event {
        Event::PaymentRefunded(_) => "compensation",
        Event::SubmissionRejected(_) | Event::PaymentRejected(_) | Event::InfoRejected(_) => {
            "rejection"
        }
        Event::SagaTimedOut(_) => "timer",
        Event::OrderCompleted(_) | Event::OrderCancelled(_) if !ended => "event",
        _ if ended => "late",
        _ => "event",
    }
}

/// History entries of one unit of work, written together in one `WITH` of
/// the unit's last statement ([`Pending::insert`]), however many there are.
#[derive(Debug, Default)]
pub struct Pending {
    order_ids: Vec<String>,
    kinds: Vec<&'static str>,
    names: Vec<String>,
    message_ids: Vec<String>,
    causation_ids: Vec<Option<String>>,
    details: Vec<serde_json::Value>,
}

impl Pending {
    /// Appends `event` to its order's history (once per message). `rejected`
    /// is why the coordinator turned the event itself down (an order started
    /// again with other content, a payment step opened with another token):
    /// the entry is then a `rejection` with that `reason` in its detail.
    pub fn push(
        &mut self,
        envelope: &Envelope,
        event: &Event,
        kind: &'static str,
        rejected: Option<&str>,
    ) {
        let mut detail: serde_json::Value =
            serde_json::from_slice(&event.to_json()).unwrap_or(serde_json::Value::Null);
        let kind = match (rejected, detail.as_object_mut()) {
            (Some(reason), Some(fields)) => {
                fields.insert("reason".to_owned(), serde_json::Value::from(reason));
                "rejection"
            }
            _ => kind,
        };
        // A task token is a bearer credential: the history keeps its digest only.
        if let Some(token) = detail.get_mut("token") {
            let digest = orderflow_shared::token::digest(token.as_str().unwrap_or_default());
            *token = serde_json::Value::String(format!("sha256:{}", &digest[..16]));
        }
        self.order_ids.push(event.order_id().to_owned());
        self.kinds.push(kind);
        self.names.push(event.routing_key());
        self.message_ids.push(envelope.message_id.clone());
        self.causation_ids.push(envelope.causation_id.clone());
        self.details.push(detail);
    }

    /// Whether no entry was pushed.
    pub fn is_empty(&self) -> bool {
        self.order_ids.is_empty()
    }

    /// How many parameters [`insert`](Self::insert) takes (its arrays).
    pub const PARAMS: usize = 6;

    /// The statement that writes the entries, in the order they were pushed
    /// (their ids follow it), skipping an entry already recorded (a message
    /// handled again); its [`PARAMS`](Self::PARAMS) arrays are parameters
    /// `$first`.., bound by [`bind`](Self::bind).
    pub fn insert(first: usize) -> String {
        let p = |i: usize| first + i;
        format!(
            "INSERT INTO history (order_id, kind, name, message_id, causation_id, detail) \
             SELECT o, k, n, m, c, d FROM unnest(${}::text[], ${}::text[], ${}::text[], \
               ${}::text[], ${}::text[], ${}::jsonb[]) WITH ORDINALITY AS e(o, k, n, m, c, d, i) \
             ORDER BY i \
             ON CONFLICT (order_id, message_id) DO NOTHING",
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        )
    }

    /// Binds the six arrays of [`insert`](Self::insert), after what `query`
    /// already binds.
    pub fn bind<'q>(&'q self, query: OutboxQuery<'q>) -> OutboxQuery<'q> {
        query
            .bind(&self.order_ids)
            .bind(&self.kinds)
            .bind(&self.names)
            .bind(&self.message_ids)
            .bind(&self.causation_ids)
            .bind(&self.details)
    }
}

/// Most entries one page holds (and one query of [`read`] fetches).
pub const MAX_PAGE: u32 = 1000;

/// One page of an order's history, as [`read_page`] cuts it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page {
    /// In causal order within the page.
    pub entries: Vec<Entry>,
    /// The `after` of the next page: the highest id on this page; `None`
    /// when this page is the last.
    pub next: Option<i64>,
}

/// The whole history of `order_id` (empty for an unknown order), in causal
/// order: an entry never comes before the entry that caused it; otherwise in
/// the order the coordinator recorded them. (Messages of different steps can
/// be handled in either order when they arrive together; their causation ids
/// say which came first.) Fetched [`MAX_PAGE`] rows per query, ordered as a
/// whole.
pub async fn read(pool: &PgPool, order_id: &str) -> Result<Vec<Entry>, sqlx::Error> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let rows = recorded(pool, order_id, after, MAX_PAGE).await?;
        let last_page = rows.len() < MAX_PAGE as usize;
        after = rows.last().map(|entry| entry.id).or(after);
        all.extend(rows);
        if last_page {
            return Ok(causal_order(all));
        }
    }
}

/// One page of the history of `order_id`: the (at most) `limit` entries
/// recorded after entry `after` (from the first when `None`), `limit` taken
/// between 1 and [`MAX_PAGE`].
///
/// The rule: pages are cut by id, that is in recorded order, and the entries
/// of one page are in causal order among themselves (as [`read`] orders the
/// whole). Paging through an order with `after = next` returns every entry
/// exactly once. An effect recorded before its cause (two messages handled
/// in the other order) stays on the page of its own id, so when a page ends
/// between the two it shows a page before its cause; one page that holds the
/// whole history is exactly [`read`]'s order.
pub async fn read_page(
    pool: &PgPool,
    order_id: &str,
    after: Option<i64>,
    limit: u32,
) -> Result<Page, sqlx::Error> {
    let limit = limit.clamp(1, MAX_PAGE);
    // One more than asked: whether a next page exists, without a count.
    let mut rows = recorded(pool, order_id, after, limit + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|entry| entry.id)
    } else {
        None
    };
    Ok(Page {
        entries: causal_order(rows),
        next,
    })
}

/// Up to `limit` entries of `order_id` with an id above `after`, by id.
async fn recorded(
    pool: &PgPool,
    order_id: &str,
    after: Option<i64>,
    limit: u32,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, recorded_at, kind, name, message_id, causation_id, detail \
         FROM history WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(order_id)
    .bind(after.unwrap_or(0))
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
}

/// `entries` (in recorded order) reordered so that each comes after its cause.
fn causal_order(mut remaining: Vec<Entry>) -> Vec<Entry> {
    let present: HashSet<String> = remaining.iter().map(|e| e.message_id.clone()).collect();
    let mut placed = HashSet::with_capacity(remaining.len());
    let mut ordered = Vec::with_capacity(remaining.len());
    while !remaining.is_empty() {
        let ready = remaining
            .iter()
            .position(|entry| {
                entry
                    .causation_id
                    .as_ref()
                    .is_none_or(|cause| !present.contains(cause) || placed.contains(cause))
            })
            // A cycle cannot happen (a message cannot cause its cause); if
            // the data says otherwise, fall back to recorded order.
            .unwrap_or(0);
        let entry = remaining.remove(ready);
        placed.insert(entry.message_id.clone());
        ordered.push(entry);
    }
    ordered
}

/// A running saga that has not progressed for a while.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct Stuck {
    pub order_id: String,
    /// The step it waits on.
    pub step: Option<SagaStep>,
    pub updated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Running sagas with no progress since `before`, oldest first.
pub async fn stuck(
    pool: &PgPool,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Stuck>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, step, updated_at, created_at FROM sagas \
         WHERE status = 'running' AND updated_at < $1 ORDER BY updated_at LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A saga as the console shows it: its status, the step it waits on, and
/// its timers (a step is open while its timer is armed; `due_at` is its
/// deadline).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SagaState {
    pub order_id: String,
    pub status: SagaStatus,
    /// The step it waits on, while it runs.
    pub step: Option<SagaStep>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub timers: Vec<Timer>,
}

/// One timer of a saga.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Timer {
    pub step: Step,
    pub due_at: DateTime<Utc>,
    pub state: TimerState,
}

/// The saga of `order_id` with its timers (earliest deadline first); `None`
/// when the coordinator has not seen the order.
pub async fn saga_state(pool: &PgPool, order_id: &str) -> Result<Option<SagaState>, sqlx::Error> {
    type Row = (SagaStatus, Option<SagaStep>, DateTime<Utc>, DateTime<Utc>);
    let saga: Option<Row> = sqlx::query_as(
        "SELECT status, step, created_at, updated_at FROM sagas WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    let Some((status, step, created_at, updated_at)) = saga else {
        return Ok(None);
    };
    let timers: Vec<Timer> = sqlx::query_as(
        "SELECT step, due_at, state FROM timers WHERE order_id = $1 ORDER BY due_at, step",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(SagaState {
        order_id: order_id.to_owned(),
        // The step is only waited on while the saga runs.
        step: step.filter(|_| status == SagaStatus::Running),
        status,
        created_at,
        updated_at,
        timers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64, message_id: &str, cause: Option<&str>) -> Entry {
        Entry {
            id,
            recorded_at: Utc::now(),
            kind: "event".into(),
            name: message_id.into(),
            message_id: message_id.into(),
            causation_id: cause.map(str::to_owned),
            detail: serde_json::Value::Null,
        }
    }

    #[test]
    fn effects_never_come_before_their_causes() {
        // Recorded as: awaiting, started, info (handled out of order).
        let recorded = vec![
            entry(1, "awaiting", Some("info")),
            entry(2, "started", None),
            entry(3, "info", Some("started")),
            entry(4, "submitted", None),
            entry(5, "refund", Some("not-in-this-history")),
        ];
        let names: Vec<String> = causal_order(recorded)
            .into_iter()
            .map(|e| e.message_id)
            .collect();
        assert_eq!(
            names,
            ["started", "info", "awaiting", "submitted", "refund"]
        );
    }
}
