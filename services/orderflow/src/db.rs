//! `orderflow db init`: provisions the database of a deployment with least
//! privilege, run once by an operator with an administrator's URL (and again
//! after an upgrade: it is idempotent). Each context gets a role that owns
//! its schema and runs its migrations; services connect as their context's
//! role (`ORDERFLOW_DATABASE_URL` with that user), never as the administrator.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use orderflow_shared::config::Settings;
use orderflow_shared::store::Context;
use orderflow_shared::store::roles::provision;
use secrecy::SecretString;

use crate::cli::{DbCommand, DbInitArgs};

pub fn run(command: DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Init(args) => init(&args),
    }
}

/// The environment variable holding `context`'s role password
/// (`ORDERFLOW_DB_PASSWORD_ORDERS`, ...).
pub fn password_variable(context: Context) -> String {
    format!(
        "ORDERFLOW_DB_PASSWORD_{}",
        context.schema().to_ascii_uppercase()
    )
}

fn init(args: &DbInitArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env()?;
    let missing: Vec<String> = Context::ALL
        .into_iter()
        .map(password_variable)
        .filter(|var| std::env::var(var).map_or(true, |v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "no password for {} database role(s): set {} (there are no default passwords)",
            missing.len(),
            missing.join(", ")
        );
    }
    let done = crate::block_on(provision(
        &settings.database_url,
        &args.role_prefix,
        |context| SecretString::from(std::env::var(password_variable(context)).unwrap_or_default()),
    ))?
    .with_context(|| {
        format!(
            "provisioning {} (ORDERFLOW_DATABASE_URL must be an administrator's: a superuser, \
                 or a role that may create roles and owns the database)",
            settings.database_url_redacted()
        )
    })?;
    for provisioned in &done {
        let reads: Vec<String> = provisioned
            .context
            .reads()
            .iter()
            .map(|(owner, table)| format!("{}.{table}", owner.schema()))
            .collect();
        println!(
            "{:<12} role {:<28} {}{}{}",
            provisioned.context.schema(),
            provisioned.role,
            if provisioned.created {
                "created"
            } else {
                "updated"
            },
            if provisioned.reassigned > 0 {
                format!(", {} object(s) handed over", provisioned.reassigned)
            } else {
                String::new()
            },
            if reads.is_empty() {
                String::new()
            } else {
                format!(", may read {}", reads.join(", "))
            },
        );
    }
    println!(
        "database {} provisioned; connect each service as its context's role",
        settings.database_url_redacted()
    );
    Ok(ExitCode::SUCCESS)
}
