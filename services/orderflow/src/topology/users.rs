//! `orderflow topology users`: the deployment's broker users as a RabbitMQ
//! definitions file. One user per service with the least-privilege
//! permissions of the topology model (`orderflow_topology::service_permissions`),
//! plus an administrator for operators and the console's user (replaying
//! dead letters and pausing services, nothing else: the order API's
//! `ORDERFLOW_OPERATOR_AMQP_URL`). Passwords come from the environment
//! and must all be given (no defaults: a deployment fails closed); the file
//! holds only RabbitMQ's salted SHA-256 hashes.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{deployment_model, render_definitions, write_file, write_stdout};
use crate::cli::UsersArgs;

/// The hashing algorithm RabbitMQ reads from a definitions file.
const ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// The environment variable holding `user`'s password
/// (`generate-info` → `ORDERFLOW_BROKER_PASSWORD_GENERATE_INFO`).
pub fn password_variable(user: &str) -> String {
    let name: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("ORDERFLOW_BROKER_PASSWORD_{name}")
}

/// RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt ‖ sha256(salt ‖ password)),
/// with a 4-byte salt.
fn password_hash(password: &str, salt: [u8; 4]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&hasher.finalize());
    STANDARD.encode(bytes)
}

/// A fresh random salt (the random tail of a UUID v7).
fn salt() -> [u8; 4] {
    let id = uuid::Uuid::now_v7();
    let bytes = id.as_bytes();
    [bytes[12], bytes[13], bytes[14], bytes[15]]
}

/// The users document; `password` gives each user's password (by its
/// service name, `admin` for the administrator) or `None` when missing.
pub fn users_document(
    args: &UsersArgs,
    password: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Value> {
    let topology = deployment_model(&args.deployment)?;
    let services = orderflow_topology::service_permissions(&topology);
    let mut missing = Vec::new();
    let mut user = |service: &str, tags: &[&str]| -> Value {
        let hash = match password(service) {
            Some(password) if !password.is_empty() => password_hash(&password, salt()),
            _ => {
                missing.push(password_variable(service));
                String::new()
            }
        };
        json!({
            "name": format!("{}{service}", args.user_prefix),
            "password_hash": hash,
            "hashing_algorithm": ALGORITHM,
            "tags": tags,
        })
    };
    let admin = args.admin.as_str();
    let mut users = vec![user(admin, &["administrator"])];
    let mut permissions = vec![json!({
        "user": format!("{}{admin}", args.user_prefix), "vhost": args.vhost,
        "configure": ".*", "write": ".*", "read": ".*",
    })];
    // The operators' console (the order API's ORDERFLOW_OPERATOR_AMQP_URL):
    // replays and pauses, nothing else; `management` to read queue rates.
    let console = orderflow_topology::console_permissions(&topology, &args.console);
    users.push(user(&args.console, &["management"]));
    permissions.push(json!({
        "user": format!("{}{}", args.user_prefix, args.console), "vhost": args.vhost,
        "configure": console.configure, "write": console.write, "read": console.read,
    }));
    let mut topic_permissions = Vec::new();
    let events = topology.names.events_exchange();
    for service in &services {
        users.push(user(&service.service, &[]));
        let name = format!("{}{}", args.user_prefix, service.service);
        permissions.push(json!({
            "user": name, "vhost": args.vhost,
            "configure": service.configure, "write": service.write, "read": service.read,
        }));
        topic_permissions.push(json!({
            "user": name, "vhost": args.vhost, "exchange": events,
            "write": service.topic_write, "read": service.topic_read,
        }));
    }
    if !missing.is_empty() {
        bail!(
            "no password given for {} broker user(s); set {} (there are no default passwords)",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(json!({
        "users": users,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }))
}

pub fn run(args: &UsersArgs) -> anyhow::Result<ExitCode> {
    let document = users_document(args, |user| std::env::var(password_variable(user)).ok())?;
    let text = render_definitions(&document)?;
    if args.out == Path::new("-") {
        write_stdout(&text)?;
    } else {
        write_file(&args.out, &text)?;
        eprintln!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cli::DeploymentArgs;

    fn args() -> UsersArgs {
        UsersArgs {
            out: PathBuf::from("-"),
            vhost: "/".into(),
            user_prefix: "p-".into(),
            admin: "admin".into(),
            console: "console".into(),
            deployment: DeploymentArgs {
                namespace: "ns".into(),
            },
        }
    }

    #[test]
    fn the_hash_is_rabbitmqs_salted_sha256() {
        // RabbitMQ's own documented example: salt 908D C60A, password "test12".
        assert_eq!(
            password_hash("test12", [0x90, 0x8D, 0xC6, 0x0A]),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
    }

    #[test]
    fn every_user_needs_a_password_and_the_error_names_each_variable() {
        let error = users_document(&args(), |user| {
            (user != "payment-wait").then(|| "pw".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("ORDERFLOW_BROKER_PASSWORD_PAYMENT_WAIT"),
            "{error}"
        );
        assert!(!error.contains("GENERATE_INFO"), "{error}");
    }

    #[test]
    fn services_get_their_model_permissions_and_no_default_exchange() {
        let document = users_document(&args(), |_| Some("secret".into())).unwrap();
        let permissions = document["permissions"].as_array().unwrap();
        let of = |list: &[Value], user: &str| {
            list.iter()
                .find(|p| p["user"] == user)
                .unwrap_or_else(|| panic!("no entry for {user}"))
                .clone()
        };
        let coordinator = of(permissions, "p-saga-coordinator");
        assert_eq!(coordinator["configure"], "^$");
        assert!(!coordinator["write"].as_str().unwrap().contains("amq"));
        let topics = document["topic_permissions"].as_array().unwrap();
        let wait = of(topics, "p-payment-wait");
        assert_eq!(wait["write"], "^(payment\\.awaiting)$");
        assert_eq!(wait["exchange"], "ns.orderflow.events");
        let console = of(permissions, "p-console");
        assert_eq!(console["configure"], "^$");
        assert!(
            !console["write"].as_str().unwrap().contains("events"),
            "{console}"
        );
        let users = document["users"].as_array().unwrap();
        let console = users.iter().find(|u| u["name"] == "p-console").unwrap();
        assert_eq!(console["tags"], serde_json::json!(["management"]));
        let printed = document.to_string();
        assert!(!printed.contains("secret"), "only hashes");
    }
}
