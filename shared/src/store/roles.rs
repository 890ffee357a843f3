//! Least privilege in PostgreSQL: a role per context that owns its schema
//! (and so may run its migrations), connects to the database, and may read
//! the few tables of other contexts `Context::reads` lists, and nothing
//! else. [`provision`] is the operator's step (`orderflow db init`), run with
//! an administrator's connection; the services then connect as their
//! context's role.

use secrecy::{ExposeSecret, SecretString};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::{Context, Db, StoreError, check_name, connect_one, parse_url};

/// What [`provision`] did for one context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provisioned {
    pub context: Context,
    pub role: String,
    /// The role was created (not only given a new password).
    pub created: bool,
    /// Objects of the schema that belonged to another role (created by an
    /// older version as the administrator) and now belong to the role.
    pub reassigned: u64,
}

/// Runs `sql` built on the server with `format()`, so identifiers and
/// literals are quoted by PostgreSQL itself.
async fn execute_formatted(
    conn: &mut PgConnection,
    template: &str,
    args: &[&str],
) -> Result<(), sqlx::Error> {
    let placeholders: Vec<String> = (1..=args.len()).map(|i| format!("${i}::text")).collect();
    let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(format!(
        "SELECT format('{template}', {})",
        placeholders.join(", ")
    )));
    for arg in args {
        query = query.bind(*arg);
    }
    let statement = query.fetch_one(&mut *conn).await?;
    sqlx::query(AssertSqlSafe(statement)).execute(conn).await?;
    Ok(())
}

/// Creates (or updates) the role of every context with its password, makes
/// it the owner of its schema (created if missing; objects an older version
/// created as the administrator are handed over), runs the context's
/// migrations as that role, and grants the cross-context reads. Idempotent.
/// `url` must be an administrator's (CREATEROLE, and the owner of the
/// database or a superuser).
pub async fn provision(
    url: &SecretString,
    prefix: &str,
    password: impl Fn(Context) -> SecretString,
) -> Result<Vec<Provisioned>, StoreError> {
    super::ensure_database(url).await?;
    let options = parse_url(url)?;
    let mut admin = connect_one(&options, url).await?;
    let mut done = Vec::new();
    for context in Context::ALL {
        let role = context.role(prefix);
        check_name(&role)?;
        let schema = context.schema();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(&role)
                .fetch_one(&mut admin)
                .await?;
        let secret = password(context);
        let verb = if exists { "ALTER" } else { "CREATE" };
        execute_formatted(
            &mut admin,
            &format!(
                "{verb} ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD %L"
            ),
            &[&role, secret.expose_secret()],
        )
        .await?;
        execute_formatted(
            &mut admin,
            "CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I",
            &[schema, &role],
        )
        .await?;
        execute_formatted(&mut admin, "ALTER SCHEMA %I OWNER TO %I", &[schema, &role]).await?;
        let reassigned = reassign_schema_objects(&mut admin, schema, &role).await?;
        done.push(Provisioned {
            context,
            role,
            created: !exists,
            reassigned,
        });
    }
    for context in Context::ALL {
        // Migrations as the owner: every object they create belongs to it.
        let db = Db::for_context_as(url, context, &context.role(prefix)).await?;
        db.close().await;
    }
    for context in Context::ALL {
        let reader = context.role(prefix);
        for (owner, table) in context.reads() {
            execute_formatted(
                &mut admin,
                "GRANT USAGE ON SCHEMA %I TO %I",
                &[owner.schema(), &reader],
            )
            .await?;
            execute_formatted(
                &mut admin,
                "GRANT SELECT ON %I.%I TO %I",
                &[owner.schema(), table, &reader],
            )
            .await?;
        }
    }
    admin.close().await?;
    Ok(done)
}

/// Hands the tables, sequences and views of `schema` that belong to anyone
/// else to `role`; how many.
async fn reassign_schema_objects(
    admin: &mut PgConnection,
    schema: &str,
    role: &str,
) -> Result<u64, sqlx::Error> {
    let foreign: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname, CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' \
           ELSE 'TABLE' END \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'S', 'v') \
           AND pg_get_userbyid(c.relowner) <> $2",
    )
    .bind(schema)
    .bind(role)
    .fetch_all(&mut *admin)
    .await?;
    for (name, kind) in &foreign {
        execute_formatted(
            admin,
            &format!("ALTER {kind} %I.%I OWNER TO %I"),
            &[schema, name, role],
        )
        .await?;
    }
    Ok(foreign.len() as u64)
}

/// Drops the roles of `prefix` (after their objects: drop the database
/// first). For throwaway deployments (tests); missing ones are fine.
pub async fn drop_roles(admin_url: &SecretString, prefix: &str) -> Result<(), StoreError> {
    let options = parse_url(admin_url)?.database("postgres");
    let mut admin = connect_one(&options, admin_url).await?;
    for context in Context::ALL {
        let role = context.role(prefix);
        check_name(&role)?;
        execute_formatted(&mut admin, "DROP ROLE IF EXISTS %I", &[&role]).await?;
    }
    admin.close().await?;
    Ok(())
}
