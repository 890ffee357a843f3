//! A migration's text edited after release in comments only: a database
//! migrated with the released text keeps starting, and any other change to
//! an applied migration is still refused.

use orderflow_shared::store::{Context, Db, StoreError};
use orderflow_tests::TestEnv;
use sqlx::migrate::MigrateError;

/// SHA-384 of `orders/0001_orders.sql` as released (its comment then
/// pointed outside the repository).
const RELEASED_ORDERS_0001: &str = "e4dd510f14fb10b12b2acb269dc582c7da7719866ae49584a0cf871d86a9d0135516698015bd7df1a2a243adfb63e8a0";

async fn set_checksum(db: &Db, hex: &str) {
    sqlx::query("UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 1")
        .bind(hex)
        .execute(db.pool())
        .await
        .unwrap();
}

async fn checksum(db: &Db) -> Vec<u8> {
    sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 1")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_database_migrated_with_the_released_comment_still_migrates_and_other_edits_are_refused()
{
    let env = TestEnv::new(&[]).await;
    let db = Db::for_context(&env.database_url, Context::Orders, 2)
        .await
        .unwrap();
    let current = checksum(&db).await;

    // As a database migrated before the comment changed has it.
    set_checksum(&db, RELEASED_ORDERS_0001).await;
    db.migrate(Some(&Context::Orders.migrator()))
        .await
        .expect("a comment-only edit of orders/0001 is accepted");
    assert_eq!(
        checksum(&db).await,
        current,
        "the released checksum is replaced by the file's"
    );

    // Any other checksum is a changed migration, still refused.
    set_checksum(&db, "00").await;
    let refused = db.migrate(Some(&Context::Orders.migrator())).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Migrate {
                cause: MigrateError::VersionMismatch(1),
                ..
            })
        ),
        "{refused:?}"
    );
    db.close().await;
    env.cleanup().await;
}
