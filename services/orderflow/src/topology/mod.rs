//! `orderflow topology export|lint|diagram|declare|users`: builds the topology
//! model from the payment methods and turns it into a definitions file, a check
//! of the committed file, a Mermaid diagram, the topology on a live broker, or
//! the deployment's broker users.

mod diagram;
mod lint;
mod users;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use orderflow_topology::{DEFAULT_RETRY_TIERS, Names, Topology, orderflow_services};
use serde_json::Value;

use crate::cli::{
    DeclareArgs, DeploymentArgs, DiagramArgs, ExportArgs, LintArgs, ModelArgs, TopologyCommand,
};
use crate::providers::load_payment_methods;

/// The vhost the exported definitions declare everything on.
const VHOST: &str = "/";

pub fn run(command: TopologyCommand) -> anyhow::Result<ExitCode> {
    match command {
        TopologyCommand::Export(args) => export(&args),
        TopologyCommand::Lint(args) => lint(&args),
        TopologyCommand::Diagram(args) => diagram(&args),
        TopologyCommand::Declare(args) => declare(&args),
        TopologyCommand::Users(args) => users::run(&args),
    }
}

/// The topology of orderflow for the configured payment methods.
fn build_model(args: &ModelArgs) -> anyhow::Result<Topology> {
    let methods = load_payment_methods(&args.providers)?;
    Ok(Topology::build(
        Names::new(args.namespace.as_str()),
        &orderflow_services(&methods),
        &DEFAULT_RETRY_TIERS,
    ))
}

/// The definitions document exactly as `export` writes it: pretty JSON with a
/// trailing newline.
pub(crate) fn render_definitions(definitions: &Value) -> anyhow::Result<String> {
    let mut text =
        serde_json::to_string_pretty(definitions).context("cannot serialise the definitions")?;
    text.push('\n');
    Ok(text)
}

fn export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let topology = build_model(&args.model)?;
    let text = render_definitions(&orderflow_topology::to_definitions(&topology, VHOST))?;
    if args.out == Path::new("-") {
        write_stdout(&text)?;
    } else {
        write_file(&args.out, &text)?;
        write_stdout(&format!(
            "wrote {} ({}, {}, {})\n",
            args.out.display(),
            count(topology.exchanges.len(), "exchange"),
            count(topology.queues.len(), "queue"),
            count(topology.bindings.len(), "binding"),
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn lint(args: &LintArgs) -> anyhow::Result<ExitCode> {
    let methods = load_payment_methods(&args.model.providers)?;
    let topology = build_model(&args.model)?;
    let model = orderflow_topology::to_definitions(&topology, VHOST);
    let text = std::fs::read_to_string(&args.file).with_context(|| {
        format!(
            "cannot read {} (create it with `orderflow topology export`)",
            args.file.display()
        )
    })?;
    let committed: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", args.file.display()))?;
    let differences = lint::diff(&committed, &model);
    let findings = orderflow_topology::lint(
        &topology.services,
        &orderflow_topology::orderflow_choreography(&methods),
    );
    if differences.is_empty() {
        write_stdout(&format!("{} matches the model\n", args.file.display()))?;
    } else {
        write_stdout(&lint::report(&args.file, &differences))?;
    }
    write_stdout(&lint::choreography_report(&findings))?;
    if differences.is_empty() && findings.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

fn diagram(args: &DiagramArgs) -> anyhow::Result<ExitCode> {
    let topology = build_model(&args.model)?;
    write_stdout(&diagram::mermaid(&topology))?;
    Ok(ExitCode::SUCCESS)
}

/// The topology of the deployment `args` names, with the payment methods of
/// its configuration (as its workers build it).
pub(crate) fn deployment_model(args: &DeploymentArgs) -> anyhow::Result<Topology> {
    let metadata = orderflow_shared::metadata::Metadata::from_env()?;
    Ok(Topology::build(
        Names::new(args.namespace.as_str()),
        &orderflow_services(&metadata.methods()),
        &DEFAULT_RETRY_TIERS,
    ))
}

fn declare(args: &DeclareArgs) -> anyhow::Result<ExitCode> {
    let topology = deployment_model(&args.deployment)?;
    let settings = orderflow_shared::config::Settings::from_env()?;
    crate::block_on(async {
        let broker = orderflow_shared::bus::Broker::new(
            &settings.amqp_url,
            "orderflow-topology-declare",
            topology.clone(),
            std::time::Duration::from_millis(settings.publish_timeout_ms),
        )?;
        let declared = broker
            .declare_topology(std::time::Duration::from_secs(30))
            .await;
        broker.close();
        declared.with_context(|| {
            format!(
                "declaring the topology on {} (the broker user must be allowed to configure \
                 every orderflow name)",
                settings.amqp_url_redacted()
            )
        })
    })??;
    write_stdout(&format!(
        "declared on {}: {}, {}, {} (namespace `{}`)\n",
        settings.amqp_url_redacted(),
        count(topology.exchanges.len(), "exchange"),
        count(topology.queues.len(), "queue"),
        count(topology.bindings.len(), "binding"),
        args.deployment.namespace,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `1 queue`, `45 queues`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub(crate) fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// Replaces `path` with `text` through a temporary file in the same directory,
/// so that an interrupted export never leaves a half-written file behind.
pub(crate) fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut temporary_name = file_name.to_owned();
    temporary_name.push(format!(".tmp-{}", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_definitions_match_the_model() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let methods = load_payment_methods(&root.join("config/providers.toml")).expect("providers");
        let topology = Topology::build(
            Names::default(),
            &orderflow_services(&methods),
            &DEFAULT_RETRY_TIERS,
        );
        let model = orderflow_topology::to_definitions(&topology, VHOST);
        let committed = std::fs::read_to_string(root.join("topology/definitions.json"))
            .expect("topology/definitions.json exists");
        assert_eq!(
            committed,
            render_definitions(&model).expect("renders"),
            "run `cargo run -p orderflow -- topology export`"
        );
    }
}
