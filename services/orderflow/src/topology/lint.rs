//! Comparison of a RabbitMQ definitions document with the one of the model, as
//! data: entries are matched by identity (an exchange or queue by vhost and name,
//! a binding by vhost, source, destination and routing key), so order and
//! formatting do not matter, and each difference names the entry it is about.
//! Also the report of the choreography's own findings
//! (`orderflow_topology::lint`: unconsumed and unpublished events, waits
//! without a timer or a compensation).

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

/// One way in which the file differs from the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// In the model, not in the file.
    Missing(String),
    /// In the file, not in the model.
    Extra(String),
    /// In both, with other contents: what, and how.
    Changed(String, String),
    /// The same entry several times in the file.
    Duplicate(String, usize),
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(what) => write!(f, "missing    {what}"),
            Self::Extra(what) => write!(f, "extra      {what}"),
            Self::Changed(what, how) => write!(f, "different  {what}: {how}"),
            Self::Duplicate(what, count) => {
                write!(f, "duplicate  {what} appears {count} times in the file")
            }
        }
    }
}

/// Every difference between `file` and `model`, section by section in the order
/// vhosts, exchanges, queues, bindings, then any other top-level key.
pub fn diff(file: &Value, model: &Value) -> Vec<Difference> {
    let mut differences = Vec::new();
    let (Some(file), Some(model)) = (file.as_object(), model.as_object()) else {
        if file != model {
            differences.push(Difference::Changed(
                "the document".to_owned(),
                "it is not a JSON object".to_owned(),
            ));
        }
        return differences;
    };
    let mut keys: Vec<&String> = model.keys().chain(file.keys()).collect();
    keys.sort_by_key(|key| (section_rank(key), key.as_str()));
    keys.dedup();
    for key in keys {
        match (file.get(key), model.get(key)) {
            (Some(Value::Array(in_file)), Some(Value::Array(in_model))) => {
                diff_section(key, in_file, in_model, &mut differences);
            }
            (Some(in_file), Some(in_model)) => {
                diff_values(
                    &format!("top-level `{key}`"),
                    "",
                    in_file,
                    in_model,
                    &mut differences,
                );
            }
            (None, Some(_)) => differences.push(Difference::Missing(format!("top-level `{key}`"))),
            (Some(_), None) => differences.push(Difference::Extra(format!("top-level `{key}`"))),
            (None, None) => {}
        }
    }
    differences
}

/// How many differences `report` lists before it only counts the rest (a file of
/// another namespace differs in every entry).
const MAX_REPORTED: usize = 40;

/// The text `lint` prints when the file differs from the model.
pub fn report(path: &Path, differences: &[Difference]) -> String {
    let mut text = format!(
        "{} differs from the model ({} difference{}):\n",
        path.display(),
        differences.len(),
        if differences.len() == 1 { "" } else { "s" }
    );
    for difference in differences.iter().take(MAX_REPORTED) {
        let _ = writeln!(text, "  {difference}");
    }
    if differences.len() > MAX_REPORTED {
        let _ = writeln!(text, "  ... and {} more", differences.len() - MAX_REPORTED);
    }
    text.push_str("Regenerate it with `orderflow topology export` (and commit it).\n");
    text
}

/// The text `lint` prints about the choreography: that it is sound, or each
/// finding on a line.
pub fn choreography_report(findings: &[orderflow_topology::Finding]) -> String {
    if findings.is_empty() {
        return "the choreography is sound: every event published is consumed, every event \
                consumed is published, every wait has a timer and a compensation\n"
            .to_owned();
    }
    let mut text = format!(
        "the choreography has {} finding{}:\n",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    );
    for finding in findings {
        let kind = serde_json::to_value(finding.kind)
            .ok()
            .and_then(|kind| kind.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(text, "  {kind:<26} {}", finding.message);
    }
    text
}

fn section_rank(key: &str) -> usize {
    ["vhosts", "exchanges", "queues", "bindings"]
        .iter()
        .position(|&section| section == key)
        .unwrap_or(usize::MAX)
}

fn diff_section(section: &str, file: &[Value], model: &[Value], differences: &mut Vec<Difference>) {
    let file = index(section, file);
    let model = index(section, model);
    for (identity, entries) in &file {
        if entries.len() > 1 {
            differences.push(Difference::Duplicate(identity.clone(), entries.len()));
        }
    }
    for (identity, in_model) in &model {
        match file.get(identity) {
            None => differences.push(Difference::Missing(identity.clone())),
            Some(in_file) => {
                diff_values(identity, "", in_file[0], in_model[0], differences);
            }
        }
    }
    for identity in file.keys() {
        if !model.contains_key(identity) {
            differences.push(Difference::Extra(identity.clone()));
        }
    }
}

/// The entries of a section by their readable identity (`queue orderflow.x`).
fn index<'a>(section: &str, entries: &'a [Value]) -> BTreeMap<String, Vec<&'a Value>> {
    let mut index: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for entry in entries {
        index
            .entry(identity(section, entry))
            .or_default()
            .push(entry);
    }
    index
}

fn identity(section: &str, entry: &Value) -> String {
    let Some(fields) = entry.as_object() else {
        return format!("{section} entry {entry}");
    };
    let text = |key: &str| fields.get(key).map_or_else(|| "?".to_owned(), show);
    let vhost = match fields.get("vhost").and_then(Value::as_str) {
        None | Some("/") => String::new(),
        Some(vhost) => format!(" on vhost {vhost}"),
    };
    match section {
        "vhosts" => format!("vhost {}", text("name")),
        "exchanges" => format!("exchange {}{vhost}", text("name")),
        "queues" => format!("queue {}{vhost}", text("name")),
        "bindings" => format!(
            "binding {} -> {} {} (routing key {}){vhost}",
            text("source"),
            text("destination_type"),
            text("destination"),
            fields
                .get("routing_key")
                .map_or_else(|| "?".to_owned(), Value::to_string),
        ),
        "permissions" | "topic_permissions" => {
            format!("{section} of user {}{vhost}", text("user"))
        }
        _ if fields.contains_key("name") => format!("{section} {}{vhost}", text("name")),
        _ => format!("{section} entry {entry}"),
    }
}

/// A string as itself, anything else as JSON.
fn show(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), ToOwned::to_owned)
}

fn diff_values(what: &str, path: &str, file: &Value, model: &Value, out: &mut Vec<Difference>) {
    if file == model {
        return;
    }
    if let (Value::Object(file), Value::Object(model)) = (file, model) {
        diff_objects(what, path, file, model, out);
        return;
    }
    let field = if path.is_empty() {
        String::new()
    } else {
        format!("{path} ")
    };
    out.push(Difference::Changed(
        what.to_owned(),
        format!("{field}is {file} in the file, {model} in the model"),
    ));
}

fn diff_objects(
    what: &str,
    path: &str,
    file: &Map<String, Value>,
    model: &Map<String, Value>,
    out: &mut Vec<Difference>,
) {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    for (key, in_model) in model {
        match file.get(key) {
            None => out.push(Difference::Changed(
                what.to_owned(),
                format!("{} (= {in_model}) is missing from the file", join(key)),
            )),
            Some(in_file) => diff_values(what, &join(key), in_file, in_model, out),
        }
    }
    for (key, in_file) in file {
        if !model.contains_key(key) {
            out.push(Difference::Changed(
                what.to_owned(),
                format!("{} (= {in_file}) is not in the model", join(key)),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use orderflow_topology::{DEFAULT_RETRY_TIERS, Names, Topology, orderflow_services};
    use serde_json::json;

    use super::*;

    fn model() -> Value {
        let topology = Topology::build(
            Names::default(),
            &orderflow_services(&["zhifubao", "weixin"]),
            &DEFAULT_RETRY_TIERS,
        );
        orderflow_topology::to_definitions(&topology, "/")
    }

    fn queues(definitions: &mut Value) -> &mut Vec<Value> {
        definitions["queues"].as_array_mut().expect("queues")
    }

    #[test]
    fn the_model_matches_itself_in_any_order() {
        let mut file = model();
        queues(&mut file).reverse();
        assert_eq!(diff(&file, &model()), []);
    }

    #[test]
    fn a_removed_queue_is_reported_missing() {
        let mut file = model();
        queues(&mut file).retain(|q| q["name"] != "orderflow.payment-wait.dead");
        assert_eq!(
            diff(&file, &model()),
            [Difference::Missing(
                "queue orderflow.payment-wait.dead".to_owned()
            )]
        );
        let report = report(
            Path::new("topology/definitions.json"),
            &diff(&file, &model()),
        );
        assert!(
            report.contains("missing    queue orderflow.payment-wait.dead"),
            "{report}"
        );
    }

    #[test]
    fn extra_changed_and_duplicate_entries_are_reported() {
        let mut file = model();
        let first = queues(&mut file)[0].clone();
        queues(&mut file).push(first);
        queues(&mut file).push(json!({"name": "orderflow.legacy", "vhost": "/"}));
        file["queues"][1]["arguments"]["x-queue-type"] = json!("classic");
        file["bindings"].as_array_mut().expect("bindings").pop();
        file["users"] = json!([]);

        let differences = diff(&file, &model());
        assert!(differences.contains(&Difference::Duplicate(
            "queue orderflow.order-api".to_owned(),
            2
        )));
        assert!(differences.contains(&Difference::Extra("queue orderflow.legacy".to_owned())));
        assert!(differences.contains(&Difference::Changed(
            "queue orderflow.order-api.dead".to_owned(),
            "arguments.x-queue-type is \"classic\" in the file, \"quorum\" in the model".to_owned()
        )));
        assert!(differences.contains(&Difference::Missing(
            "binding orderflow.events -> queue orderflow.payment-provider-weixin (routing key \"order.cancelled\")".to_owned()
        )));
        assert!(differences.contains(&Difference::Extra("top-level `users`".to_owned())));
        assert_eq!(differences.len(), 5, "{differences:#?}");
    }

    #[test]
    fn choreography_findings_are_reported_one_per_line() {
        let methods = ["zhifubao"];
        let mut services = orderflow_services(&methods);
        services[0].publishes.push("order.shipped".to_owned());
        let mut choreography = orderflow_topology::orderflow_choreography(&methods);
        choreography.waits[0].timer = None;
        let findings = orderflow_topology::lint(&services, &choreography);
        let text = choreography_report(&findings);
        assert!(
            text.starts_with("the choreography has 2 findings:\n"),
            "{text}"
        );
        assert!(text.contains("  unconsumed "), "{text}");
        assert!(
            text.contains("order.shipped is published by order-api"),
            "{text}"
        );
        assert!(text.contains("  wait-without-timer "), "{text}");
        assert!(choreography_report(&[]).starts_with("the choreography is sound"));
    }

    #[test]
    fn a_document_that_is_not_an_object_is_reported() {
        assert_eq!(diff(&json!([1, 2]), &model()).len(), 1);
    }
}
