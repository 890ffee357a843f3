//! The timer loop on the real database: due timers fire once each, an
//! order's other deadlines are settled when one fires, and timers that are
//! not due or already settled do not fire.

use std::sync::Arc;

use chrono::{Duration, Utc};
use orderflow_shared::events::Step;
use orderflow_shared::store::{Context, Db};
use orderflow_tests::{TestEnv, count_with};
use saga_coordinator::timers::{self, Settled, TimerLoop, TimerWake};

/// The `saga.timed-out` events of `order_id` in the outbox.
async fn timed_out_events(db: &Db, order_id: &str) -> i64 {
    count_with(
        db,
        "SELECT count(*) FROM outbox WHERE correlation_id = $1 AND routing_key = 'saga.timed-out'",
        order_id,
    )
    .await
}

#[tokio::test]
async fn two_due_timers_of_one_order_in_one_batch_time_it_out_once() {
    let env = TestEnv::new(&[]).await;
    let db = Db::for_context(&env.database_url, Context::Coordinator, 4)
        .await
        .unwrap();
    let past = Utc::now() - Duration::seconds(5);
    let mut conn = db.pool().acquire().await.unwrap();
    timers::arm(&mut conn, "o1", &[(Step::GenerateInfo, past)])
        .await
        .unwrap();
    timers::arm(&mut conn, "o1", &[(Step::Flow, past)])
        .await
        .unwrap();
    timers::arm(&mut conn, "o2", &[(Step::Payment, past)])
        .await
        .unwrap();
    timers::arm(
        &mut conn,
        "o3",
        &[(Step::Flow, Utc::now() + Duration::hours(1))],
    )
    .await
    .unwrap();
    timers::arm(&mut conn, "o4", &[(Step::Payment, past)])
        .await
        .unwrap();
    assert_eq!(
        timers::settle(&mut conn, "o4", Step::Payment)
            .await
            .unwrap(),
        Settled::Won
    );
    drop(conn);

    let timer_loop = TimerLoop::new(db.clone(), Arc::new(TimerWake::default()));
    assert_eq!(timer_loop.fire_due().await.unwrap(), 2, "o1 once, o2 once");
    assert_eq!(
        timer_loop.fire_due().await.unwrap(),
        0,
        "nothing fires twice"
    );
    assert_eq!(timed_out_events(&db, "o1").await, 1);
    assert_eq!(timed_out_events(&db, "o2").await, 1);
    assert_eq!(timed_out_events(&db, "o3").await, 0, "not due");
    assert_eq!(timed_out_events(&db, "o4").await, 0, "completed in time");
    let mut conn = db.pool().acquire().await.unwrap();
    assert_eq!(
        timers::settle(&mut conn, "o2", Step::Payment)
            .await
            .unwrap(),
        Settled::TimedOut,
        "a late completion loses to the timer"
    );
    drop(conn);
    db.close().await;
    env.cleanup().await;
}
