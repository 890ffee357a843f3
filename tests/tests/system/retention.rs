//! Retention: a pruning pass deletes inbox rows older than the retention and
//! outbox rows sent over an hour ago, and keeps everything else (unsent rows
//! above all); the coordinator's pass deletes finished sagas that ended
//! longer ago than the retention with all their rows and keeps running
//! sagas, however old, and sagas that ended recently; a saga a handler holds
//! is skipped, not waited for; a pass that fails says which table and
//! schema. Old rows are made by moving their timestamps back, never by
//! waiting.

use std::time::Duration;

use orderflow_shared::bus::Outgoing;
use orderflow_shared::store::retention::Pruned;
use orderflow_shared::store::{Db, Retention};
use orderflow_tests::system::System;
use orderflow_tests::{TestEnv, count, count_with, sample_event};
use saga_coordinator::retention::SagaRetention;

/// The default retention.
const RETENTION: Duration = Duration::from_hours(30 * 24);

/// Moves the inbox rows of `message_ids` back 31 days, past the retention.
async fn age_inbox_rows(db: &Db, message_ids: &[String]) {
    sqlx::query(
        "UPDATE inbox SET received_at = now() - interval '31 days' WHERE message_id = ANY($1)",
    )
    .bind(message_ids)
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_pass_prunes_old_inbox_rows_and_long_sent_outbox_rows_and_keeps_the_rest() {
    let env = TestEnv::with_service("downstream").await;
    let db = env.db("upstream").await;
    // Seven messages applied through the inbox; five of them long ago.
    let messages: Vec<Outgoing> = (0..7)
        .map(|i| Outgoing::event(&sample_event(&format!("order-{i}")), None))
        .collect();
    for message in &messages {
        let mut unit = db
            .begin_unit("downstream", &message.envelope)
            .await
            .unwrap()
            .unwrap();
        unit.emit(message.clone());
        unit.commit().await.unwrap();
    }
    let old_ids: Vec<String> = messages[..5]
        .iter()
        .map(|m| m.envelope.message_id.clone())
        .collect();
    age_inbox_rows(&db, &old_ids).await;
    // Outbox: three rows sent two hours ago, one sent a minute ago, and
    // three never sent, however old (they wait for a sweep, never pruned).
    sqlx::query(
        "UPDATE outbox SET sent_at = now() - interval '2 hours' \
         WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 3)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox SET sent_at = now() - interval '1 minute' \
         WHERE id = (SELECT id FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT 1)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE outbox SET created_at = now() - interval '40 days' WHERE sent_at IS NULL")
        .execute(db.pool())
        .await
        .unwrap();

    // Batches of two: the pass goes on until nothing old is left.
    let retention = Retention::new(db.clone(), RETENTION).with_batch(2);
    assert_eq!(
        retention.prune_once().await.unwrap(),
        Pruned {
            inbox: 5,
            sent_outbox: 3
        }
    );
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, 2);
    assert_eq!(count(&db, "SELECT count(sent_at) FROM outbox").await, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
        3,
        "unsent rows are never pruned"
    );
    // A recent message is still known: delivered again, it is skipped.
    assert!(
        db.begin_unit("downstream", &messages[6].envelope)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(retention.prune_once().await.unwrap(), Pruned::default());
    env.cleanup().await;
}

#[tokio::test]
async fn a_failing_pass_says_which_table_of_which_schema_and_that_the_next_pass_retries() {
    let env = TestEnv::with_service("downstream").await;
    // A schema nobody migrated: the tables a pass deletes from are missing.
    let bare = Db::connect(&env.database_url, "bare", 2).await.unwrap();
    let error = Retention::new(bare.clone(), RETENTION)
        .prune_once()
        .await
        .unwrap_err();
    assert_eq!((error.schema.as_str(), error.table), ("bare", "inbox"));
    let text = error.to_string();
    assert!(
        text.contains("`inbox` of schema `bare`") && text.contains("next pass"),
        "{text}"
    );
    let error = SagaRetention::new(bare.clone(), RETENTION)
        .prune_once()
        .await
        .unwrap_err();
    assert_eq!(error.what, "finished sagas");
    assert!(error.to_string().contains("next pass"), "{error}");
    bare.close().await;
    env.cleanup().await;
}

/// Rows the coordinator keeps about `order_id`: (sagas, timers, history,
/// used tokens, payment steps).
async fn saga_rows(db: &Db, order_id: &str) -> (i64, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM sagas WHERE order_id = $1), \
                (SELECT count(*) FROM timers WHERE order_id = $1), \
                (SELECT count(*) FROM history WHERE order_id = $1), \
                (SELECT count(*) FROM used_tokens WHERE order_id = $1), \
                (SELECT count(*) FROM payment_steps WHERE order_id = $1)",
    )
    .bind(order_id)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// The ids of the messages the coordinator recorded for `order_id`.
async fn message_ids(db: &Db, order_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT message_id FROM history WHERE order_id = $1")
        .bind(order_id)
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// The coordinator's inbox rows of `messages`.
async fn inbox_rows(db: &Db, messages: &[String]) -> i64 {
    count_with(
        db,
        "SELECT count(*) FROM inbox WHERE consumer = 'saga-coordinator' \
         AND message_id = ANY($1)",
        messages,
    )
    .await
}

#[tokio::test]
async fn finished_sagas_past_the_retention_go_with_all_their_rows_and_running_ones_stay() {
    let system = System::start().await;
    let db = system.db("coordinator").await;
    // Long finished, recently finished, and running (waiting for its payment).
    let long_done = system.place("haidilao", &[("hotpot-set", 1)]).await;
    assert_eq!(
        system.pay(&long_done, "weixin").await["status"],
        "completed"
    );
    let recently_done = system.place("haidilao", &[("hotpot-set", 1)]).await;
    assert_eq!(
        system.pay(&recently_done, "weixin").await["status"],
        "completed"
    );
    let running = system.place("haidilao", &[("hotpot-set", 1)]).await;
    system.wait_for(&running, "awaiting_payment").await;
    orderflow_tests::eventually(
        Duration::from_secs(10),
        "the coordinator opened the payment step",
        || async { saga_rows(&db, &running).await.4 == 1 },
    )
    .await;

    let long_done_rows = saga_rows(&db, &long_done).await;
    let (_, _, history, tokens, steps) = long_done_rows;
    assert!(
        history > 0 && tokens == 1 && steps == 1,
        "{long_done_rows:?}"
    );
    let long_done_messages = message_ids(&db, &long_done).await;
    assert!(inbox_rows(&db, &long_done_messages).await > 0);
    let running_rows = saga_rows(&db, &running).await;
    let running_messages = message_ids(&db, &running).await;
    let running_inbox = inbox_rows(&db, &running_messages).await;
    assert!(running_inbox > 0);
    // Everything of the long finished order and of the running one moves
    // back 31 days; the running saga's inbox rows stay recent (a running
    // saga is younger than the flow timeout, which the retention exceeds).
    for order_id in [&long_done, &running] {
        for statement in [
            "UPDATE sagas SET updated_at = now() - interval '31 days', \
             created_at = now() - interval '31 days' WHERE order_id = $1",
            "UPDATE timers SET settled_at = now() - interval '31 days' \
             WHERE order_id = $1 AND state <> 'armed'",
        ] {
            sqlx::query(statement)
                .bind(order_id)
                .execute(db.pool())
                .await
                .unwrap();
        }
    }
    age_inbox_rows(&db, &long_done_messages).await;
    // A settled timer whose saga is gone (left by an older version).
    sqlx::query(
        "INSERT INTO timers (order_id, step, due_at, state, settled_at) \
         VALUES ('orphan', 'flow', now() - interval '40 days', 'fired', now() - interval '40 days')",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let pruned = SagaRetention::new(db.clone(), RETENTION)
        .with_batch(1)
        .prune_once()
        .await
        .unwrap();
    let inbox = Retention::new(db.clone(), RETENTION)
        .prune_once()
        .await
        .unwrap()
        .inbox;
    assert_eq!(
        pruned,
        saga_coordinator::retention::Pruned {
            sagas: 1,
            timers: u64::try_from(long_done_rows.1).unwrap(),
            history: u64::try_from(history).unwrap(),
            used_tokens: 1,
            payment_steps: 1,
            settled_timers: 1,
        }
    );
    assert!(inbox > 0);
    assert_eq!(saga_rows(&db, &long_done).await, (0, 0, 0, 0, 0));
    assert_eq!(
        inbox_rows(&db, &long_done_messages).await,
        0,
        "the inbox rows of the long finished order are gone"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM inbox WHERE received_at < now() - interval '30 days'"
        )
        .await,
        0
    );
    assert_eq!(
        saga_rows(&db, &running).await,
        running_rows,
        "a running saga stays whole"
    );
    assert_eq!(inbox_rows(&db, &running_messages).await, running_inbox);
    assert_eq!(
        saga_rows(&db, &recently_done).await.0,
        1,
        "ended within the retention"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM timers WHERE order_id = 'orphan'").await,
        0
    );

    // The running saga goes on as if nothing happened.
    assert_eq!(system.pay(&running, "weixin").await["status"], "completed");
    db.close().await;
    system.stop().await;
}

#[tokio::test]
async fn a_finished_saga_a_handler_holds_is_skipped_not_waited_for() {
    let system = System::start().await;
    let db = system.db("coordinator").await;
    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    assert_eq!(system.pay(&order_id, "weixin").await["status"], "completed");
    orderflow_tests::eventually(Duration::from_secs(10), "the saga ended", || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM sagas WHERE order_id = $1")
            .bind(&order_id)
            .fetch_optional(db.pool())
            .await
            .unwrap()
            .is_some_and(|status| status == "completed")
    })
    .await;
    sqlx::query("UPDATE sagas SET updated_at = now() - interval '31 days' WHERE order_id = $1")
        .bind(&order_id)
        .execute(db.pool())
        .await
        .unwrap();
    // A handler applying a late event of the order holds its saga row.
    let mut handler = db.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagas WHERE order_id = $1 FOR UPDATE")
        .bind(&order_id)
        .execute(&mut *handler)
        .await
        .unwrap();
    let retention = SagaRetention::new(db.clone(), RETENTION);
    // The pass returns (it would hang here if it waited for the lock).
    let pruned = tokio::time::timeout(Duration::from_secs(30), retention.prune_once())
        .await
        .expect("the pass skips a locked saga instead of waiting for it")
        .unwrap();
    assert_eq!(pruned.sagas, 0);
    handler.commit().await.unwrap();
    assert_eq!(retention.prune_once().await.unwrap().sagas, 1);
    assert_eq!(saga_rows(&db, &order_id).await, (0, 0, 0, 0, 0));
    db.close().await;
    system.stop().await;
}
