//! Storage in PostgreSQL: one database, one schema per bounded context
//! (docs/design.md §6). A [`Db`] is a pool whose connections have their
//! `search_path` set to the context's schema, so every query is written
//! unqualified and a service cannot wander into another context by accident.

mod context;
pub mod orders;
mod outbox;
pub mod retention;
pub mod roles;
mod text;
mod unit;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};

pub use context::Context;
use outbox::HandOver;
pub use outbox::{
    DEAD_AFTER_AGE, DEAD_AFTER_REFUSALS, DeadRow, HAND_OVER_LIMIT, Relay, RelayError,
};
pub use retention::Retention;
pub use unit::{ADMIT_ALL, ADMITTED, Admission, OutboxQuery, UnitOfWork, admitted_now};

use crate::config::redact_url;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{0}` is not a valid schema or database name (lowercase letters, digits, `_`)")]
    BadName(String),
    #[error("database URL `{url}` is invalid: {cause}")]
    BadUrl { url: String, cause: sqlx::Error },
    #[error(
        "cannot reach PostgreSQL at {url}: {cause}; is it running and ORDERFLOW_DATABASE_URL right?"
    )]
    Connect { url: String, cause: sqlx::Error },
    #[error("migrating schema `{schema}` failed: {cause}")]
    Migrate {
        schema: String,
        cause: sqlx::migrate::MigrateError,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

impl StoreError {
    /// The server is not there, or not yet or no longer taking work: it
    /// cannot be reached, it is starting up or shutting down (SQLSTATE class
    /// 08, 57P01-57P03), it has no connection slot left (53300), or the pool
    /// gave up waiting. Waiting may heal these; nothing else here.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Sql(error)
            | Self::Migrate {
                cause: sqlx::migrate::MigrateError::Execute(error),
                ..
            } => sql_unavailable(error),
            _ => false,
        }
    }
}

/// See [`StoreError::is_unavailable`].
pub fn sql_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// How long a worker waits for PostgreSQL at start before it gives up, as
/// long as it waits for the broker.
pub const START_PATIENCE: Duration = Duration::from_mins(1);

/// Runs `attempt` until it succeeds, fails with an error that waiting will
/// not heal, or `patience` is over (then the last error): a worker started
/// while PostgreSQL is still starting up ("the database system is starting
/// up"), restarting or briefly away waits for it, with the broker's backoff
/// (100 ms doubling to 5 s), instead of exiting.
pub async fn patiently<T, F, Fut>(
    what: &str,
    patience: Duration,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut delays = crate::bus::reconnect_backoff();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_unavailable() => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                if tokio::time::Instant::now() + delay > deadline {
                    return Err(error);
                }
                tracing::warn!(%error, ?delay, "{what}: PostgreSQL is not available yet; trying again");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if valid {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

/// `result`, with the database errors whose SQLSTATE is in `codes` treated as success.
fn tolerate<T>(result: Result<T, sqlx::Error>, codes: &[&str]) -> Result<(), StoreError> {
    match result {
        Ok(_) => Ok(()),
        Err(error)
            if error
                .as_database_error()
                .and_then(sqlx::error::DatabaseError::code)
                .is_some_and(|code| codes.contains(&code.as_ref())) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Connection options for `url`. TLS to a database on this machine (a
/// loopback address or a Unix socket) is off unless the URL or `PGSSLMODE`
/// asks for it: it protects nothing there and cost about 7 % of the machine
/// under load (both sides' crypto). Any other host keeps the driver's default
/// (`prefer`) or what the URL says (`?sslmode=require`).
fn parse_url(url: &SecretString) -> Result<PgConnectOptions, StoreError> {
    let options =
        PgConnectOptions::from_str(url.expose_secret()).map_err(|source| StoreError::BadUrl {
            url: redact_url(url.expose_secret()),
            cause: source,
        })?;
    let asked = url.expose_secret().contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    let local = options.get_socket().is_some()
        || matches!(
            options.get_host(),
            "localhost" | "127.0.0.1" | "::1" | "[::1]"
        )
        || options.get_host().starts_with('/');
    Ok(if local && !asked {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    })
}

/// A pool of at most `max_connections`: a connection is handed out without
/// a ping first (`test_before_acquire` would cost a round trip per unit of
/// work; a broken connection fails its statement and the unit retries).
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
}

/// Connection options for `url` with the `search_path` set to `schema` and
/// [`NO_SEQUENTIAL_SCANS`].
fn schema_options(url: &SecretString, schema: &str) -> Result<PgConnectOptions, StoreError> {
    check_name(schema)?;
    Ok(parse_url(url)?.options([("search_path", schema), NO_SEQUENTIAL_SCANS]))
}

/// `enable_seqscan = off` on every service connection. Each statement a
/// service runs finds its rows by a key or by an index made for it (the
/// migrations create one for every other lookup), but PostgreSQL keeps a
/// prepared statement's generic plan for the connection's life, and a plan
/// made while a table was nearly empty (a new deployment, the first minute
/// of a benchmark) scans the whole table, dead rows included, on every
/// execution as it grows, until autovacuum next analyzes it: on a fresh
/// database the coordinator's sagas write read ≈ 2,000 rows per batch
/// after 4,000 orders. Off, the planner takes the index whenever there is
/// one and still scans a table that has none. Measured at concurrency 200
/// on a fresh database: 222–251 → 247–278 orders/s over 6,000 orders, 179
/// → 273 over 15,000 (BENCHMARKS.md, fifth sitting).
pub const NO_SEQUENTIAL_SCANS: (&str, &str) = ("enable_seqscan", "off");

/// One connection (for administrative statements), with an error that names
/// the server.
async fn connect_one(
    options: &PgConnectOptions,
    url: &SecretString,
) -> Result<sqlx::PgConnection, StoreError> {
    options
        .connect()
        .await
        .map_err(|source| StoreError::Connect {
            url: redact_url(url.expose_secret()),
            cause: source,
        })
}

/// Creates the database named in `url` if it does not exist yet (connecting to
/// the `postgres` maintenance database to do so).
pub async fn ensure_database(url: &SecretString) -> Result<(), StoreError> {
    let options = parse_url(url)?;
    // Usually it exists: then the maintenance database is not needed at all
    // (a deployment's user may not be allowed into it).
    match options.connect().await {
        Ok(connection) => {
            connection.close().await?;
            return Ok(());
        }
        Err(error)
            if error
                .as_database_error()
                .and_then(sqlx::error::DatabaseError::code)
                .is_some_and(|code| code == "3D000") => {}
        Err(cause) => {
            return Err(StoreError::Connect {
                url: redact_url(url.expose_secret()),
                cause,
            });
        }
    }
    let name = options.get_database().unwrap_or("postgres").to_owned();
    check_name(&name)?;
    let mut admin = connect_one(&options.clone().database("postgres"), url).await?;
    let created = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await;
    // Another process may have created it meanwhile (42P04 duplicate_database).
    tolerate(created, &["42P04"])?;
    tracing::info!(database = %name, "created database");
    admin.close().await?;
    Ok(())
}

/// Drops the database named in `url` (connecting to the `postgres`
/// maintenance database), closing its connections first. For throwaway
/// databases (benchmarks); a missing one is fine.
pub async fn drop_database(url: &SecretString) -> Result<(), StoreError> {
    let options = parse_url(url)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    check_name(&name)?;
    let mut admin = connect_one(&options.clone().database("postgres"), url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// `url` with its database replaced by `name`: same server, user, password
/// and parameters.
pub fn url_with_database(url: &SecretString, name: &str) -> Result<SecretString, StoreError> {
    check_name(name)?;
    let url = url.expose_secret();
    let bad = || StoreError::BadUrl {
        url: redact_url(url),
        cause: sqlx::Error::Configuration(
            "expected postgres://[user@]host[:port][/database]".into(),
        ),
    };
    let authority = url.find("://").ok_or_else(bad)? + 3;
    let path = url[authority..].find('/').map(|i| authority + i);
    let query = url[authority..].find('?').map(|i| authority + i);
    let (head, tail) = match (path, query) {
        (Some(path), Some(query)) if path < query => (&url[..path], &url[query..]),
        (Some(path), None) => (&url[..path], ""),
        (_, Some(query)) => (&url[..query], &url[query..]),
        (None, None) => (url, ""),
    };
    Ok(SecretString::from(format!("{head}/{name}{tail}")))
}

/// Migrations whose text changed after they were released, in comments
/// only: (version, SHA-384 of the released text). sqlx refuses to run when
/// an applied migration's checksum differs from its file's, so a database
/// migrated with the released text has that checksum replaced by the
/// file's before the migrator runs. Only these exact checksums are
/// replaced: any other difference is still refused as a changed migration.
const COMMENT_ONLY_EDITS: &[(i64, &str)] = &[
    // orders/0001: its opening comment pointed to a file outside the repository.
    (
        1,
        "e4dd510f14fb10b12b2acb269dc582c7da7719866ae49584a0cf871d86a9d0135516698015bd7df1a2a243adfb63e8a0",
    ),
];

/// Replaces the released checksum of each [`COMMENT_ONLY_EDITS`] entry by
/// the current file's, in `migrator`'s table (when it exists yet).
async fn accept_comment_edits(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), sqlx::Error> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(migrator.table_name.as_ref())
        .fetch_one(pool)
        .await?;
    let Some(table) = table else {
        return Ok(());
    };
    for (version, released) in COMMENT_ONLY_EDITS {
        let Some(migration) = migrator.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {table} SET checksum = $1 WHERE version = $2 AND checksum = decode($3, 'hex')"
        )))
        .bind(migration.checksum.as_ref())
        .bind(version)
        .bind(released)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A pool scoped to one context's schema, plus the in-process hand-over of
/// committed outbox rows to the relay running on it.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    schema: String,
    hand_over: Arc<HandOver>,
}

impl Db {
    /// Connects to `url` with every connection's `search_path` set to `schema`,
    /// and creates the schema if missing. An existing schema is left as it is
    /// (a context's role, which owns its schema but may not create schemas in
    /// the database, connects through here too).
    pub async fn connect(
        url: &SecretString,
        schema: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let options = schema_options(url, schema)?;
        let mut admin = connect_one(&options, url).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut admin)
                .await?;
        if !exists {
            let created = sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&mut admin)
            .await;
            // Two processes creating the schema at once: the loser sees 23505/42P06.
            tolerate(created, &["23505", "42P06"])?;
        }
        admin.close().await?;
        Self::open(url, schema, max_connections).await
    }

    /// Connects to an existing `schema` without creating or changing
    /// anything: for operator commands, which may run with a read-only role.
    pub async fn open(
        url: &SecretString,
        schema: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        Self::with_options(url, schema_options(url, schema)?, schema, max_connections).await
    }

    /// A pool of at most `max_connections` on `options`, which reach `schema`.
    async fn with_options(
        url: &SecretString,
        options: PgConnectOptions,
        schema: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = pool_options(max_connections)
            .connect_with(options)
            .await
            .map_err(|cause| StoreError::Connect {
                url: redact_url(url.expose_secret()),
                cause,
            })?;
        Ok(Self {
            pool,
            schema: schema.to_owned(),
            hand_over: Arc::new(HandOver::new(schema)),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub(crate) fn hand_over(&self) -> &Arc<HandOver> {
        &self.hand_over
    }

    /// Outbox rows committed on this `Db` and handed over to its running
    /// relay that are not yet published and marked sent: what the relay
    /// holds in memory, never more than its hand-over limit.
    pub fn pending_hand_over(&self) -> usize {
        self.hand_over.held_len()
    }

    /// Applies the runtime migrations (inbox, outbox) and then the context's
    /// own, each tracked in its own table inside the schema.
    pub async fn migrate(
        &self,
        context: Option<&sqlx::migrate::Migrator>,
    ) -> Result<(), StoreError> {
        let failed = |source| StoreError::Migrate {
            schema: self.schema.clone(),
            cause: source,
        };
        // The runtime's own tables (inbox, outbox), applied to every context schema.
        let mut runtime = sqlx::migrate!("./migrations/runtime");
        runtime.dangerous_set_table_name("_orderflow_runtime_migrations");
        runtime.run(&self.pool).await.map_err(failed)?;
        if let Some(context) = context {
            accept_comment_edits(&self.pool, context)
                .await
                .map_err(|error| failed(sqlx::migrate::MigrateError::Execute(error)))?;
            context.run(&self.pool).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Connects to `context`'s schema as `role` (an administrator's URL,
    /// `SET ROLE` on every connection) and applies its migrations: what
    /// they create belongs to `role`.
    pub(crate) async fn for_context_as(
        url: &SecretString,
        context: Context,
        role: &str,
    ) -> Result<Self, StoreError> {
        check_name(role)?;
        let options = schema_options(url, context.schema())?.options([("role", role)]);
        let db = Self::with_options(url, options, context.schema(), 1).await?;
        db.migrate(Some(&context.migrator())).await?;
        Ok(db)
    }

    /// Creates every context's schema and applies its migrations, as an
    /// operator does before starting the workers (`orderflow up`, the
    /// tests): a service that reads another context's table (the API, the
    /// providers) then finds it there whichever service starts first. A
    /// deployment does this with `orderflow db init`.
    pub async fn migrate_all(url: &SecretString) -> Result<(), StoreError> {
        ensure_database(url).await?;
        for context in Context::ALL {
            Self::for_context(url, context, 1).await?.close().await;
        }
        Ok(())
    }

    /// Connects to `context`'s schema and applies its migrations.
    pub async fn for_context(
        url: &SecretString,
        context: Context,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let db = Self::connect(url, context.schema(), max_connections).await?;
        db.migrate(Some(&context.migrator())).await?;
        Ok(db)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};

    use super::check_name;

    #[test]
    fn the_database_of_a_url_is_replaced_and_nothing_else() {
        let with = |url: &str| {
            super::url_with_database(&SecretString::from(url.to_owned()), "other")
                .map(|url| url.expose_secret().to_owned())
        };
        assert_eq!(
            with("postgres://u:p@h:5432/orderflow").unwrap(),
            "postgres://u:p@h:5432/other"
        );
        assert_eq!(
            with("postgres://h/orderflow?sslmode=require").unwrap(),
            "postgres://h/other?sslmode=require"
        );
        assert_eq!(with("postgres://h").unwrap(), "postgres://h/other");
        assert_eq!(with("postgres://h?x=1").unwrap(), "postgres://h/other?x=1");
        assert!(with("not a url").is_err());
        assert!(
            super::url_with_database(&SecretString::from("postgres://h/x"), "Bad-Name").is_err()
        );
    }

    #[test]
    fn tls_is_off_for_a_local_database_unless_the_url_asks_for_it() {
        use sqlx::postgres::PgSslMode;
        let mode = |url: &str| {
            super::parse_url(&SecretString::from(url.to_owned()))
                .unwrap()
                .get_ssl_mode()
        };
        // (URL, mode, whether only without PGSSLMODE in the environment)
        let table = [
            ("postgres://u@127.0.0.1/x", "Disable", true),
            ("postgres://u@localhost:5432/x", "Disable", true),
            ("postgres://u@db.example/x", "Prefer", true),
            ("postgres://u@127.0.0.1/x?sslmode=require", "Require", false),
        ];
        let environment_default = std::env::var_os("PGSSLMODE").is_none();
        for (url, expected, by_default) in table {
            if by_default && !environment_default {
                continue;
            }
            let mode: PgSslMode = mode(url);
            assert_eq!(format!("{mode:?}"), expected, "{url}");
        }
    }

    #[test]
    fn schema_names_are_checked_before_they_reach_sql() {
        assert!(check_name("orders").is_ok());
        assert!(check_name("t_0192_ab").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Orders").is_err());
        assert!(check_name("a\"; DROP SCHEMA x; --").is_err());
        assert!(check_name("9lives").is_err());
    }
}
