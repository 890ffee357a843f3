//! Least privilege, as a deployment provisions it with the `orderflow`
//! command: a PostgreSQL role per context (`orderflow db init`) and a broker
//! user per service (`orderflow topology users`, loaded with `rabbitmqctl
//! import_definitions`). Each may do its job and nothing else: no service
//! can delete another's queue, publish through `amq.default`, publish an
//! event it does not own, or read another context's tables beyond the ones
//! it needs; and the whole saga runs with exactly these rights.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use orderflow_shared::store::Context;
use orderflow_tests::TestEnv;
use orderflow_tests::system::{System, Workers};
use secrecy::{ExposeSecret, SecretString};
use sqlx::Connection as _;
use tokio::process::Command;

use crate::support::{BIN, Ended, run};

/// `url` with `user` (and `password`) instead of its credentials.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

/// `amqp_url` as the broker user of `service` in `namespace` (imported by
/// [`import_users`]).
fn broker_url_as(amqp_url: &str, namespace: &str, service: &str) -> String {
    with_user(
        amqp_url,
        &format!("{namespace}-{service}"),
        &format!("{service}-pw"),
    )
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
    run(&mut command).await.succeeded();
    run(Command::new("rabbitmqctl").args(["import_definitions", file.to_str().unwrap()]))
        .await
        .succeeded();
    let _ = std::fs::remove_file(file);
    users
        .iter()
        .map(|user| format!("{}-{user}", env.namespace))
        .collect()
}

async fn drop_users(users: &[String]) {
    futures::future::join_all(users.iter().map(|user| async move {
        run(Command::new("rabbitmqctl").args(["delete_user", user])).await
    }))
    .await;
}

/// One thing a broker user tries; see [`assert_broker_answers`].
enum Operation {
    /// Deleting the queue.
    DeleteQueue(String),
    /// Declaring the queue, durable.
    DeclareQueue(String),
    /// Taking a message from the queue (to be acknowledged).
    Take(String),
    /// Purging the queue.
    Purge(String),
    /// Publishing `{}` to the exchange with the routing key, confirmed.
    Publish(String, String),
}

impl Operation {
    /// Publishing `{}` to `exchange` with `routing_key`, confirmed.
    fn publish(exchange: String, routing_key: &str) -> Self {
        Self::Publish(exchange, routing_key.to_owned())
    }

    /// Tries this on `channel`.
    async fn try_on(self, channel: Channel) -> Result<(), lapin::Error> {
        match self {
            Self::DeleteQueue(queue) => channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(drop),
            Self::DeclareQueue(queue) => channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .map(drop),
            Self::Take(queue) => channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map(drop),
            Self::Purge(queue) => channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .map(drop),
            Self::Publish(exchange, routing_key) => {
                publish_confirmed(channel, &exchange, &routing_key).await
            }
        }
    }
}

/// Publishes `{}` to `exchange` with `routing_key` on `channel` and waits
/// for the broker's confirm.
async fn publish_confirmed(
    channel: Channel,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await?;
    // A refused publish closes the channel; a call after it tells.
    orderflow_topology::inspect_queue(&channel, "amq.gen-probe-does-not-exist")
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

/// What the broker answers `service` trying `operation` on a fresh
/// connection and channel.
async fn broker_answer(env: &TestEnv, service: &str, operation: Operation) -> Result<(), String> {
    let url = broker_url_as(env.amqp_url.expose_secret(), &env.namespace, service);
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let result = operation.try_on(channel).await.map_err(|e| e.to_string());
    let _ = connection.close(200, "done".into()).await;
    result
}

/// Whether the broker is to let an operation through.
enum Answer {
    /// Done.
    Allowed,
    /// Refused with ACCESS_REFUSED.
    Refused,
}

/// Asserts, in order, that the broker answers `service` each operation as
/// expected; the failure names the operation and says the broker's answer.
async fn assert_broker_answers<const N: usize>(
    env: &TestEnv,
    service: &str,
    expected: [(&str, Operation, Answer); N],
) {
    for (what, operation, answer) in expected {
        let result = broker_answer(env, service, operation).await;
        match answer {
            Answer::Allowed => result.unwrap_or_else(|error| panic!("{what}: {error}")),
            Answer::Refused => {
                let error = result.expect_err(what);
                assert!(error.contains("ACCESS_REFUSED"), "{what}: {error}");
            }
        }
    }
}

#[tokio::test]
async fn a_service_can_do_its_job_on_the_broker_and_nothing_else() {
    use Answer::{Allowed, Refused};
    use Operation::{DeclareQueue, DeleteQueue};

    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let names = &env.topology.names;
    let events = || names.events_exchange();
    assert_broker_answers(
        &env,
        "generate-info",
        [
            // Another service's queue cannot be deleted, nor its own (re)declared.
            (
                "deleting the coordinator's queue",
                DeleteQueue(names.service_queue("saga-coordinator")),
                Refused,
            ),
            (
                "declaring its own queue",
                DeclareQueue(names.service_queue("generate-info")),
                Refused,
            ),
            // Nothing straight into a queue through the default exchange.
            (
                "publishing through amq.default",
                Operation::publish(String::new(), &names.service_queue("order-api")),
                Refused,
            ),
            // Only the events it owns, on the events exchange.
            (
                "publishing order.completed as generate-info",
                Operation::publish(events(), "order.completed"),
                Refused,
            ),
            (
                "publishing order.info-generated as generate-info",
                Operation::publish(events(), "order.info-generated"),
                Allowed,
            ),
            // Its own delay and dead-letter exchanges, not another's.
            (
                "publishing into its own delay queue",
                Operation::publish(
                    names.delay_queue("generate-info", Duration::from_secs(1)),
                    "order.started",
                ),
                Allowed,
            ),
            (
                "publishing into payment-wait's dead letters",
                Operation::publish(names.dead_letter_queue("payment-wait"), "order.started"),
                Refused,
            ),
            // Nor back into a queue through a redeliver exchange (only the broker
            // and operators may: it is how retries come back).
            (
                "publishing into its own redeliver exchange",
                Operation::publish(names.redeliver_exchange("generate-info"), "order.completed"),
                Refused,
            ),
        ],
    )
    .await;
    drop_users(&users).await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_console_user_may_replay_and_pause_and_nothing_else() {
    use Answer::{Allowed, Refused};
    use Operation::{DeleteQueue, Purge, Take};

    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let names = &env.topology.names;
    assert_broker_answers(
        &env,
        "console",
        [
            // Replays go back through a service's redeliver exchange; pauses into
            // its pause exchange; a resume purges the pause queue.
            (
                "replaying through generate-info's redeliver exchange",
                Operation::publish(names.redeliver_exchange("generate-info"), "order.started"),
                Allowed,
            ),
            (
                "pausing generate-info",
                Operation::publish(names.pause_queue("generate-info"), ""),
                Allowed,
            ),
            (
                "purging generate-info's pause queue",
                Purge(names.pause_queue("generate-info")),
                Allowed,
            ),
            (
                "taking a dead letter of generate-info",
                Take(names.dead_letter_queue("generate-info")),
                Allowed,
            ),
            // No event, no service queue, nothing declared or deleted.
            (
                "publishing an event",
                Operation::publish(names.events_exchange(), "order.started"),
                Refused,
            ),
            (
                "taking from a service's queue",
                Take(names.service_queue("generate-info")),
                Refused,
            ),
            (
                "deleting a dead-letter queue",
                DeleteQueue(names.dead_letter_queue("generate-info")),
                Refused,
            ),
        ],
    )
    .await;
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
    run(&mut db_init(&env, &prefix))
        .await
        .failed_saying(&["ORDERFLOW_DB_PASSWORD_ORDERS"]);
    let out = provision_roles(&env, &prefix).await.succeeded();
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
    let out = provision_roles(&env, &prefix).await.succeeded();
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

/// `orderflow db init` for `env`'s database with roles
/// `<prefix>orderflow_<context>`, without their passwords.
fn db_init(env: &TestEnv, prefix: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["db", "init", "--role-prefix", prefix])
        .env("ORDERFLOW_DATABASE_URL", env.database_url.expose_secret());
    command
}

/// Runs `orderflow db init` for `env`'s database with roles `<prefix>orderflow_<context>`.
async fn provision_roles(env: &TestEnv, prefix: &str) -> Ended {
    let mut command = db_init(env, prefix);
    for context in Context::ALL {
        command.env(
            format!(
                "ORDERFLOW_DB_PASSWORD_{}",
                context.schema().to_ascii_uppercase()
            ),
            "pw",
        );
    }
    run(&mut command).await
}

#[tokio::test]
async fn the_saga_runs_with_each_service_as_its_own_broker_user_and_database_role() {
    let env = TestEnv::deployment().await;
    let users = import_users(&env).await;
    let prefix = format!("{}_", env.namespace);
    provision_roles(&env, &prefix).await.succeeded();
    let (namespace, amqp, database) = (
        env.namespace.clone(),
        env.amqp_url.expose_secret().to_owned(),
        env.database_url.expose_secret().to_owned(),
    );
    let roles = prefix.clone();
    let per_service = move |service: &str, settings: &mut orderflow_shared::config::Settings| {
        settings.amqp_url = SecretString::from(broker_url_as(&amqp, &namespace, service));
        // payment-wait keeps no state: it gets the least of the roles.
        let context = Context::of_service(service).unwrap_or(Context::Pricing);
        settings.database_url =
            SecretString::from(with_user(&database, &context.role(&roles), "pw"));
        // The console acts as the console user.
        if service == "order-api" {
            settings.operator_amqp_url = Some(SecretString::from(broker_url_as(
                &amqp, &namespace, "console",
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
    let (status, body) = system.get(&format!("/orders/{order_id}/history")).await;
    assert_eq!(status, 200, "{body}");
    // The console reads the saga's state with the API's role, and pauses,
    // lists dead letters and resumes as the console user.
    let (status, body) = system.get(&format!("/orders/{order_id}/saga")).await;
    assert_eq!(status, 200, "{body}");
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
    system
        .wait_for_depth(&dead, 1, "generate-info dead-letters the poison")
        .await;
    system.stop().await;
    drop_users(&users).await;
    orderflow_shared::store::roles::drop_roles(&admin_url(), &prefix)
        .await
        .unwrap();
}
