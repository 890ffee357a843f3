//! Service connections find rows by their key even while a table is nearly
//! empty: a generic plan made then is kept for the connection's life, and
//! one that scans the table would scan it whole on every execution as it
//! grows (`store::NO_SEQUENTIAL_SCANS`).

use orderflow_shared::store::{Context, Db};
use orderflow_tests::TestEnv;

/// The generic plan of `statement` (a `PREPARE`d `p`) executed with `args`,
/// on one of `db`'s connections, as a service's cached statement gets it.
async fn generic_plan(db: &Db, statement: &str, args: &str) -> String {
    let mut connection = db.pool().acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE p AS {statement}")))
        .execute(&mut *connection)
        .await
        .unwrap();
    let lines: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE p{args}")))
            .fetch_all(&mut *connection)
            .await
            .unwrap();
    sqlx::query("DEALLOCATE p")
        .execute(&mut *connection)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn a_service_plans_its_keyed_statements_by_key_on_an_empty_table() {
    let env = TestEnv::new(&[]).await;
    let coordinator = Db::for_context(&env.database_url, Context::Coordinator, 1)
        .await
        .unwrap();
    // The shape of the coordinator's sagas write: a batch's rows joined by key.
    let plan = generic_plan(
        &coordinator,
        "UPDATE sagas SET status = u.status, updated_at = now() \
         FROM unnest($1::text[], $2::text[]) AS u(order_id, status) \
         WHERE sagas.order_id = u.order_id",
        "('{a}', '{running}')",
    )
    .await;
    assert!(
        plan.contains("Index Scan using sagas_pkey") && !plan.contains("Seq Scan"),
        "{plan}"
    );

    // A provider's read of the accepted amounts, by order ids.
    let payments = Db::for_context(&env.database_url, Context::Payments, 1)
        .await
        .unwrap();
    let plan = generic_plan(
        &payments,
        "SELECT order_id FROM captures WHERE order_id = ANY($1::text[]) \
         AND status IN ('charging', 'pending') ORDER BY order_id FOR UPDATE",
        "('{a}')",
    )
    .await;
    assert!(
        plan.contains("captures_pkey") && !plan.contains("Seq Scan"),
        "{plan}"
    );

    // A table with no index for the lookup is still read: the setting
    // changes which plan is taken, never whether there is one.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM captures WHERE provider = $1")
        .bind("weixin")
        .fetch_one(payments.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    env.cleanup().await;
}
