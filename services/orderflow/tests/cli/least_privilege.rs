//! Least privilege, as a deployment provisions it with the `orderflow`
//! command: a PostgreSQL role per context (`orderflow db init`) and a broker
//! user per service (`orderflow topology users`, loaded with `rabbitmqctl
//! import_definitions`). Each may do its job and nothing else: no service
//! can delete another's queue, publish through `amq.default`, publish an
//! event it does not own, or read another context's tables beyond the ones
//! it needs; and the whole saga runs with exactly these rights.

use std::sync::Arc;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orderflow_shared::store::Context;
use orderflow_tests::system::{System, Workers};
use orderflow_tests::{TestEnv, run_to_end};
use secrecy::{ExposeSecret, SecretString};
use sqlx::Connection as _;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// `url` with `user` (and `password`) instead of its credentials.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

fn password_variable(name: &str) -> String {
    format!(
        "ORDERFLOW_BROKER_PASSWORD_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

/// The broker users of `env`'s namespace, named `<ns>-<service>`, created
/// from `orderflow topology users`; removed by [`drop_users`].
async fn import_users(env: &TestEnv) -> Vec<String> {
    let file = std::env::temp_dir().join(format!("{}-users.json", env.namespace));
    let mut command = Command::new(BIN);
    command.args([
        "topology",
        "users",
        "--namespace",
        &env.namespace,
        "--user-prefix",
        &format!("{}-", env.namespace),
        "--out",
        file.to_str().unwrap(),
    ]);
    let mut users = vec!["admin".to_owned(), "console".to_owned()];
    users.extend(env.topology.services().into_iter().map(str::to_owned));
    for user in &users {
        command.env(password_variable(user), format!("{user}-pw"));
    }
    let (code, _, err) = run_to_end(&mut command).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_to_end(
        Command::new("rabbitmqctl").args(["import_definitions", file.to_str().unwrap()]),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let _ = std::fs::remove_file(file);
    users
        .iter()
        .map(|user| format!("{}-{user}", env.namespace))
        .collect()
}

async fn drop_users(users: &[String]) {
    futures::future::join_all(users.iter().map(|user| async move {
        run_to_end(Command::new("rabbitmqctl").args(["delete_user", user])).await
    }))
    .await;
}

/// A connection as `<ns>-<service>`.
async fn connect_as(env: &TestEnv, service: &str) -> Connection {
    let user = format!("{}-{service}", env.namespace);
    let url = with_user(
        env.amqp_url.expose_secret(),
        &user,
        &format!("{service}-pw"),
    );
    Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap()
}

/// What the broker answers `service` trying `attempt` on a fresh channel.
async fn broker_answer<F, Fut>(env: &TestEnv, service: &str, attempt: F) -> Result<(), String>
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let connection = connect_as(env, service).await;
    let channel = connection.create_channel().await.unwrap();
    let result = attempt(channel).await.map_err(|e| e.to_string());
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn publish(
    channel: lapin::Channel,
    exchange: String,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await?;
    // A refused publish closes the channel; a call after it tells.
    channel
        .queue_declare(
            "amq.gen-probe-does-not-exist".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(drop)
        .or_else(|error| {
            if error.to_string().contains("NOT_FOUND") {
                Ok(())
            } else {
                Err(error)
            }
        })
}

#[tokio::test]
async fn a_service_can_do_its_job_on_the_broker_and_nothing_else() {
    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let names = env.topology.names.clone();
    let refused = |answer: Result<(), String>, what: &str| {
        let error = answer.expect_err(what);
        assert!(error.contains("ACCESS_REFUSED"), "{what}: {error}");
    };

    // Another service's queue cannot be deleted, nor its own (re)declared.
    let other = names.service_queue("saga-coordinator");
    refused(
        broker_answer(&env, "generate-info", |channel| async move {
            channel
                .queue_delete(other.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(drop)
        })
        .await,
        "deleting the coordinator's queue",
    );
    let own = names.service_queue("generate-info");
    refused(
        broker_answer(&env, "generate-info", |channel| async move {
            channel
                .queue_declare(
                    own.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .map(drop)
        })
        .await,
        "declaring its own queue",
    );
    // Nothing straight into a queue through the default exchange.
    let target = names.service_queue("order-api");
    refused(
        broker_answer(&env, "generate-info", |channel| async move {
            publish(channel, String::new(), &target).await
        })
        .await,
        "publishing through amq.default",
    );
    // Only the events it owns, on the events exchange.
    refused(
        broker_answer(&env, "generate-info", |channel| {
            publish(channel, names.events_exchange(), "order.completed")
        })
        .await,
        "publishing order.completed as generate-info",
    );
    broker_answer(&env, "generate-info", |channel| {
        publish(channel, names.events_exchange(), "order.info-generated")
    })
    .await
    .unwrap();
    // Its own delay and dead-letter exchanges, not another's.
    broker_answer(&env, "generate-info", |channel| {
        publish(
            channel,
            names.delay_queue("generate-info", std::time::Duration::from_secs(1)),
            "order.started",
        )
    })
    .await
    .unwrap();
    refused(
        broker_answer(&env, "generate-info", |channel| {
            publish(
                channel,
                names.dead_letter_queue("payment-wait"),
                "order.started",
            )
        })
        .await,
        "publishing into payment-wait's dead letters",
    );
    // Nor back into a queue through a redeliver exchange (only the broker
    // and operators may: it is how retries come back).
    refused(
        broker_answer(&env, "generate-info", |channel| {
            publish(
                channel,
                names.redeliver_exchange("generate-info"),
                "order.completed",
            )
        })
        .await,
        "publishing into its own redeliver exchange",
    );
    drop_users(&users).await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_console_user_may_replay_and_pause_and_nothing_else() {
    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let names = env.topology.names.clone();
    let refused = |answer: Result<(), String>, what: &str| {
        let error = answer.expect_err(what);
        assert!(error.contains("ACCESS_REFUSED"), "{what}: {error}");
    };
    // Replays go back through a service's redeliver exchange; pauses into
    // its pause exchange; a resume purges the pause queue.
    broker_answer(&env, "console", |channel| {
        publish(
            channel,
            names.redeliver_exchange("generate-info"),
            "order.started",
        )
    })
    .await
    .unwrap();
    broker_answer(&env, "console", |channel| {
        publish(channel, names.pause_queue("generate-info"), "")
    })
    .await
    .unwrap();
    let pause = names.pause_queue("generate-info");
    broker_answer(&env, "console", |channel| async move {
        channel
            .queue_purge(pause.as_str().into(), QueuePurgeOptions::default())
            .await
            .map(drop)
    })
    .await
    .unwrap();
    let dead = names.dead_letter_queue("generate-info");
    broker_answer(&env, "console", |channel| async move {
        channel
            .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map(drop)
    })
    .await
    .unwrap();
    // No event, no service queue, nothing declared or deleted.
    refused(
        broker_answer(&env, "console", |channel| {
            publish(channel, names.events_exchange(), "order.started")
        })
        .await,
        "publishing an event",
    );
    let queue = names.service_queue("generate-info");
    refused(
        broker_answer(&env, "console", |channel| async move {
            channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map(drop)
        })
        .await,
        "taking from a service's queue",
    );
    let dead = names.dead_letter_queue("generate-info");
    refused(
        broker_answer(&env, "console", |channel| async move {
            channel
                .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(drop)
        })
        .await,
        "deleting a dead-letter queue",
    );
    drop_users(&users).await;
    env.cleanup().await;
}

/// Runs `sql` as `role` on `database_url`; the SQLSTATE when refused.
async fn as_role(database_url: &SecretString, role: &str, sql: &str) -> Result<(), String> {
    let url = with_user(database_url.expose_secret(), role, "pw");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .map(drop)
        .map_err(|e| {
            e.as_database_error()
                .and_then(sqlx::error::DatabaseError::code)
                .map_or_else(|| e.to_string(), std::borrow::Cow::into_owned)
        });
    let _ = conn.close().await;
    result
}

#[tokio::test]
async fn each_context_has_a_role_that_owns_its_schema_and_reads_only_what_it_needs() {
    let env = TestEnv::deployment().await;
    let prefix = format!("{}_", env.namespace);
    // No passwords, no roles.
    let (code, _, err) = run_to_end(
        Command::new(BIN)
            .args(["db", "init", "--role-prefix", &prefix])
            .env("ORDERFLOW_DATABASE_URL", env.database_url.expose_secret()),
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("ORDERFLOW_DB_PASSWORD_ORDERS"), "{err}");
    let (code, out, err) = provision_roles(&env, &prefix).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("may read coordinator.history"), "{out}");

    let role = |context: Context| context.role(&prefix);
    let url = &env.database_url;
    let denied = "42501";
    let checks: [(Context, &str, Result<(), &str>); 14] = [
        (
            Context::Orders,
            "SELECT count(*) FROM orders.orders",
            Ok(()),
        ),
        (
            Context::Orders,
            "SELECT count(*) FROM coordinator.history",
            Ok(()),
        ),
        (
            Context::Orders,
            "SELECT count(*) FROM coordinator.sagas JOIN coordinator.timers USING (order_id)",
            Ok(()),
        ),
        (
            Context::Orders,
            "UPDATE coordinator.timers SET state = 'fired'",
            Err(denied),
        ),
        (
            Context::Orders,
            "SELECT count(*) FROM coordinator.payment_steps",
            Err(denied),
        ),
        (
            Context::Orders,
            "DELETE FROM coordinator.history",
            Err(denied),
        ),
        (
            Context::Orders,
            "SELECT count(*) FROM payments.captures",
            Err(denied),
        ),
        (
            Context::Payments,
            "SELECT count(*) FROM coordinator.payment_steps",
            Ok(()),
        ),
        (
            Context::Payments,
            "UPDATE coordinator.payment_steps SET amount_cents = 1",
            Err(denied),
        ),
        (
            Context::Payments,
            "SELECT count(*) FROM coordinator.history",
            Err(denied),
        ),
        (
            Context::Payments,
            "SELECT count(*) FROM orders.orders",
            Err(denied),
        ),
        (
            Context::Coordinator,
            "SELECT count(*) FROM payments.gateway_ledger",
            Err(denied),
        ),
        (
            Context::Pricing,
            "CREATE TABLE orders.evil (x int)",
            Err(denied),
        ),
        (Context::Pricing, "CREATE SCHEMA evil", Err(denied)),
    ];
    for (context, sql, expected) in checks {
        let answer = as_role(url, &role(context), sql).await;
        assert_eq!(
            answer,
            expected.map_err(str::to_owned),
            "{} {sql}",
            role(context)
        );
    }
    for context in Context::ALL {
        assert_eq!(
            as_role(url, &role(context), "DO $$ BEGIN IF (SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = current_user) THEN RAISE EXCEPTION 'privileged'; END IF; END $$").await,
            Ok(()),
            "{} holds no administrative right",
            role(context)
        );
    }
    // Idempotent: an operator runs it again after an upgrade.
    let (code, out, err) = provision_roles(&env, &prefix).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("updated"), "{out}");

    let roles = prefix.clone();
    env.cleanup().await;
    orderflow_shared::store::roles::drop_roles(&admin_url(), &roles)
        .await
        .unwrap();
}

fn admin_url() -> SecretString {
    SecretString::from(orderflow_tests::admin_database_url())
}

/// Runs `orderflow db init` for `env`'s database with roles `<prefix>orderflow_<context>`.
async fn provision_roles(env: &TestEnv, prefix: &str) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(["db", "init", "--role-prefix", prefix])
        .env("ORDERFLOW_DATABASE_URL", env.database_url.expose_secret());
    for context in Context::ALL {
        command.env(
            format!(
                "ORDERFLOW_DB_PASSWORD_{}",
                context.schema().to_ascii_uppercase()
            ),
            "pw",
        );
    }
    run_to_end(&mut command).await
}

#[tokio::test]
async fn the_saga_runs_with_each_service_as_its_own_broker_user_and_database_role() {
    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let prefix = format!("{}_", env.namespace);
    let (code, out, err) = provision_roles(&env, &prefix).await;
    assert_eq!(code, 0, "{out}{err}");
    let (namespace, amqp, database) = (
        env.namespace.clone(),
        env.amqp_url.expose_secret().to_owned(),
        env.database_url.expose_secret().to_owned(),
    );
    let roles = prefix.clone();
    let per_service = move |service: &str, settings: &mut orderflow_shared::config::Settings| {
        settings.amqp_url = SecretString::from(with_user(
            &amqp,
            &format!("{namespace}-{service}"),
            &format!("{service}-pw"),
        ));
        // payment-wait keeps no state: it gets the least of the roles.
        let context = Context::of_service(service).unwrap_or(Context::Pricing);
        settings.database_url =
            SecretString::from(with_user(&database, &context.role(&roles), "pw"));
        // The console acts as the console user.
        if service == "order-api" {
            settings.operator_amqp_url = Some(SecretString::from(with_user(
                &amqp,
                &format!("{namespace}-console"),
                "console-pw",
            )));
        }
    };
    let workers = Workers {
        deployment_tiers: true,
        per_service: Some(Arc::new(per_service)),
        ..Workers::default()
    };
    let system = System::start_in(env, |_| {}, workers).await;

    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let order = system.pay(&order_id, "zhifubao").await;
    assert_eq!(order["status"], "completed", "{order:#}");
    assert_eq!(order["charged_cents"], 12_800 * 80 / 100);
    assert_eq!(system.gateway(&order_id).await, (1, 0));
    // The API reads the coordinator's history with its own role.
    let history = system
        .client
        .get(format!("{}/orders/{order_id}/history", system.api))
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 200);
    // The console reads the saga's state with the API's role, and pauses,
    // lists dead letters and resumes as the console user.
    let saga = system
        .client
        .get(format!("{}/orders/{order_id}/saga", system.api))
        .send()
        .await
        .unwrap();
    assert_eq!(saga.status(), 200);
    for (method, path) in [
        (
            reqwest::Method::POST,
            "/services/payment-provider-weixin/pause",
        ),
        (reqwest::Method::GET, "/dead-letters"),
        (reqwest::Method::GET, "/queues"),
        (
            reqwest::Method::POST,
            "/services/payment-provider-weixin/resume",
        ),
        (reqwest::Method::GET, "/sagas/stuck"),
    ] {
        let (status, body) = system.operator(method, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // A poison message is dead-lettered through the service's own exchange.
    system
        .env
        .publish_bare("order.started", b"{broken", BasicProperties::default())
        .await;
    let dead = system.env.dead_letter_queue("generate-info");
    orderflow_tests::eventually(
        std::time::Duration::from_secs(10),
        "generate-info dead-letters the poison",
        || async { system.env.message_count(&dead).await == 1 },
    )
    .await;
    system.stop().await;
    drop_users(&users).await;
    orderflow_shared::store::roles::drop_roles(&admin_url(), &prefix)
        .await
        .unwrap();
}
