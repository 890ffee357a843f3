//! The docker-compose deployment fails closed: no secret has a default, the
//! example environment lists exactly the secrets it needs (with empty
//! placeholders that do not work), every service has its own broker user
//! and connects to the database as its context's role. Docker compose
//! itself (`./scripts/test` installs Debian's docker-compose when no compose
//! is there) is asked to render the file without the secrets, and refuses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use orderflow_shared::metadata::Metadata;
use orderflow_shared::store::Context;
use orderflow_shared::topology::orderflow_services;

fn repository_file(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every `${...}` of `text`: (variable, what follows its name).
fn references(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap();
        let inner = &after[..end];
        let name_end = inner
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(inner.len());
        found.push((inner[..name_end].to_owned(), inner[name_end..].to_owned()));
        rest = &after[end..];
    }
    found
}

fn is_secret(variable: &str) -> bool {
    variable.contains("PASSWORD")
        || variable == "ORDERFLOW_TOKEN_KEYS"
        || variable == "ORDERFLOW_OPERATOR_TOKEN"
}

/// The lines of service `name` in docker-compose.yml: from its header
/// (`  name:`) to the next line indented by two spaces or less.
fn service_block(compose: &str, name: &str) -> String {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|line| *line != header);
    assert!(lines.next().is_some(), "no service {name}");
    lines
        .take_while(|line| line.is_empty() || line.starts_with("   "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_secret_has_a_default_and_the_example_lists_exactly_the_secrets() {
    let compose = repository_file("docker-compose.yml");
    assert!(
        !compose.contains("dev-password"),
        "a development password is left"
    );
    let mut secrets = BTreeSet::new();
    for (variable, rest) in references(&compose) {
        if is_secret(&variable) {
            assert!(
                rest.starts_with(":?"),
                "${{{variable}{rest}}} must fail closed (`${{{variable}:?message}}`)"
            );
            secrets.insert(variable);
        }
    }
    let example = repository_file(".env.example");
    let mut listed = BTreeSet::new();
    for line in example.lines().filter(|l| l.starts_with("ORDERFLOW_")) {
        let (variable, value) = line.split_once('=').unwrap();
        assert_eq!(value, "", "{variable}: the example holds no working value");
        listed.insert(variable.to_owned());
    }
    assert_eq!(
        listed, secrets,
        ".env.example lists exactly the secrets compose needs"
    );
    // Every broker user of the topology model has its password here.
    let metadata = Metadata::embedded().unwrap();
    for service in orderflow_services(&metadata.methods()) {
        let variable = format!(
            "ORDERFLOW_BROKER_PASSWORD_{}",
            service.name.to_ascii_uppercase().replace('-', "_")
        );
        assert!(
            secrets.contains(&variable),
            "no {variable} for {}",
            service.name
        );
    }
}

#[test]
fn each_worker_has_its_own_broker_user_and_its_contexts_database_role() {
    let compose = repository_file("docker-compose.yml");
    let metadata = Metadata::embedded().unwrap();
    for service in orderflow_services(&metadata.methods()) {
        let block = service_block(&compose, &service.name);
        assert!(
            block.contains(&format!(
                "://{}:${{ORDERFLOW_BROKER_PASSWORD_",
                service.name
            )),
            "{} connects to the broker as itself:\n{block}",
            service.name
        );
        match Context::of_service(&service.name) {
            Some(context) => assert!(
                block.contains(&format!("postgres://{}:", context.role(""))),
                "{} connects to the database as {}:\n{block}",
                service.name,
                context.role("")
            ),
            None => assert!(
                !block.contains("ORDERFLOW_DATABASE_URL"),
                "{} keeps no state and gets no database:\n{block}",
                service.name
            ),
        }
    }
}

#[test]
fn only_the_order_api_gets_the_operator_token_and_the_console_user() {
    let compose = repository_file("docker-compose.yml");
    let api = service_block(&compose, "order-api");
    assert!(api.contains("ORDERFLOW_OPERATOR_TOKEN: \"${ORDERFLOW_OPERATOR_TOKEN:?"));
    assert!(
        api.contains("ORDERFLOW_OPERATOR_AMQP_URL: \"${ORDERFLOW_BROKER_SCHEME:-amqp}://console:")
    );
    let metadata = Metadata::embedded().unwrap();
    for service in orderflow_services(&metadata.methods()) {
        if service.name == "order-api" {
            continue;
        }
        let block = service_block(&compose, &service.name);
        assert!(
            !block.contains("OPERATOR") && !block.contains("PASSWORD_CONSOLE"),
            "{} gets no operator credential:\n{block}",
            service.name
        );
    }
}

#[test]
fn docker_compose_refuses_to_render_the_deployment_without_its_secrets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tool: Option<Vec<&str>> = [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|tool| {
            Command::new(tool[0])
                .args(&tool[1..])
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let tool = tool.expect(
        "neither `docker compose` nor `docker-compose` is installed; ./scripts/test installs \
         Debian's docker-compose",
    );
    let example = repository_file(".env.example");
    let secrets: Vec<&str> = example
        .lines()
        .filter_map(|l| l.strip_suffix('='))
        .collect();
    let render = |with_secrets: bool| {
        let mut command = Command::new(tool[0]);
        command.args(&tool[1..]).current_dir(&root).args([
            "-f",
            "docker-compose.yml",
            "config",
            "-q",
        ]);
        for secret in &secrets {
            command.env_remove(secret);
            if with_secrets {
                command.env(secret, "k1:0123456789abcdef0123");
            }
        }
        command.output().unwrap()
    };
    let refused = render(false);
    assert!(!refused.status.success(), "rendered without secrets");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("ORDERFLOW_"), "{message}");
    assert!(render(true).status.success());
}
