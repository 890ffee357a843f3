//! `orderflow saga history|stuck`: the saga coordinator's view of sagas, read
//! straight from its schema for operators (no API, no broker). Reads only:
//! it never runs migrations.

use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, Utc};
use orderflow_shared::config::Settings;
use orderflow_shared::store::{Context, Db};
use saga_coordinator::history::{self, Entry, Stuck};
use serde_json::Value;

use crate::cli::{DatabaseArgs, HistoryArgs, SagaCommand, StuckArgs};

/// Longest short detail in the history table.
const DETAIL_WIDTH: usize = 60;

/// How many characters of an id the tables show.
const SHORT_ID: usize = 8;

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

pub async fn run(command: SagaCommand) -> anyhow::Result<ExitCode> {
    match command {
        SagaCommand::History(args) => show_history(&args).await,
        SagaCommand::Stuck(args) => show_stuck(&args).await,
    }
}

/// The coordinator's schema, not migrated (an operator command leaves the
/// schema to the coordinator), and the database URL with its password masked.
async fn connect(args: &DatabaseArgs) -> anyhow::Result<(Db, String)> {
    let settings = Settings::load(args.config.as_deref())?;
    let url = settings.database_url_redacted();
    let db = Db::open(&settings.database_url, Context::Coordinator.schema(), 2)
        .await
        .context("opening the coordinator's schema")?;
    Ok((db, url))
}

/// A read error, with a missing table explained: the coordinator has never
/// run against this database.
fn read_error(error: sqlx::Error, what: &str, url: &str) -> anyhow::Error {
    let missing = error
        .as_database_error()
        .and_then(sqlx::error::DatabaseError::code)
        .is_some_and(|code| code == UNDEFINED_TABLE);
    if missing {
        anyhow!(
            "the database {url} has no saga coordinator tables (schema `coordinator`): the \
             coordinator has never run against it. Check ORDERFLOW_DATABASE_URL, or start \
             `orderflow up` / the saga-coordinator once to create them"
        )
    } else {
        anyhow::Error::new(error).context(format!("reading {what} from {url}"))
    }
}

async fn show_history(args: &HistoryArgs) -> anyhow::Result<ExitCode> {
    let (db, url) = connect(&args.database).await?;
    let entries = history::read(db.pool(), &args.order_id).await;
    db.close().await;
    let entries = entries.map_err(|e| read_error(e, "the saga history", &url))?;
    if entries.is_empty() {
        bail!("no history for order {}", args.order_id);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        print!("{}", history_table(&args.order_id, &entries));
    }
    Ok(ExitCode::SUCCESS)
}

async fn show_stuck(args: &StuckArgs) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let before = chrono::Duration::from_std(args.older_than)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
        .with_context(|| {
            format!(
                "--older-than {} reaches before the beginning of time",
                humantime::format_duration(args.older_than)
            )
        })?;
    let (db, url) = connect(&args.database).await?;
    let stuck = history::stuck(db.pool(), before, args.limit).await;
    db.close().await;
    let stuck = stuck.map_err(|e| read_error(e, "the running sagas", &url))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stuck)?);
    } else if stuck.is_empty() {
        println!(
            "no stuck sagas (older than {})",
            humantime::format_duration(args.older_than)
        );
    } else {
        print!("{}", stuck_table(&stuck, now));
    }
    if usize::try_from(args.limit).is_ok_and(|limit| stuck.len() >= limit) {
        eprintln!(
            "showing the first {} (--limit); there may be more",
            stuck.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The history as an aligned table, under a line naming the order and the
/// day it started.
fn history_table(order_id: &str, entries: &[Entry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            vec![
                (index + 1).to_string(),
                entry.recorded_at.format("%H:%M:%S%.3f").to_string(),
                entry.kind.clone(),
                clean(&entry.name),
                short_detail(&entry.detail),
                short_id(&entry.message_id),
                entry
                    .causation_id
                    .as_deref()
                    .map_or("-".to_owned(), short_id),
            ]
        })
        .collect();
    let first = entries.first().map_or_else(String::new, |e| {
        e.recorded_at.format(", from %Y-%m-%d").to_string()
    });
    format!(
        "order {} ({} entries{first}, times UTC)\n{}",
        clean(order_id),
        entries.len(),
        table(
            &[
                "#",
                "TIME",
                "KIND",
                "EVENT",
                "DETAIL",
                "MESSAGE",
                "CAUSED BY"
            ],
            &rows
        )
    )
}

fn stuck_table(stuck: &[Stuck], now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = stuck
        .iter()
        .map(|saga| {
            let idle = (now - saga.updated_at).num_seconds().max(0);
            vec![
                clean(&saga.order_id),
                saga.step.map_or("-", |step| step.as_str()).to_owned(),
                format!("{} ({idle} s ago)", utc(saga.updated_at)),
                utc(saga.created_at),
            ]
        })
        .collect();
    table(
        &["ORDER", "WAITS ON", "LAST PROGRESS (UTC)", "STARTED (UTC)"],
        &rows,
    )
}

fn utc(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Left-aligned columns two spaces apart, no trailing spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.zip(&widths).enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        let mut text = text.trim_end().to_owned();
        text.push('\n');
        text
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `text` with control characters (a newline in a reason typed into the
/// RabbitMQ UI) made harmless for a one-line cell.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The last [`SHORT_ID`] characters of an id: a UUID v7 begins with its
/// timestamp, the same for messages of one order (derived ids even share
/// their cause's), so its end is what tells messages apart.
fn short_id(id: &str) -> String {
    let id = clean(id);
    let count = id.chars().count();
    id.chars().skip(count.saturating_sub(SHORT_ID)).collect()
}

fn money(cents: &Value) -> String {
    cents.as_i64().map_or_else(
        || cents.to_string(),
        |c| {
            let sign = if c < 0 { "-" } else { "" };
            format!("{sign}{}.{:02}", (c / 100).abs(), (c % 100).abs())
        },
    )
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// What an event says in a few words: supplier, items, method, amounts,
/// step, reason, offered methods; never the payment token (a credential).
fn short_detail(detail: &Value) -> String {
    let field = |key: &str| detail.get(key).filter(|v| !v.is_null());
    let mut parts: Vec<String> = Vec::new();
    if let Some(supplier) = field("supplier") {
        parts.push(text(supplier));
    }
    if let Some(products) = field("products").and_then(Value::as_array) {
        // Saturating: a detail is any JSON, and `sum` panics on overflow.
        let items = products
            .iter()
            .filter_map(|line| line.get("quantity").and_then(Value::as_u64))
            .fold(0_u64, u64::saturating_add);
        parts.push(format!("{items} item{}", if items == 1 { "" } else { "s" }));
    }
    if let Some(method) = field("method").or_else(|| field("provider")) {
        parts.push(text(method));
    }
    for (key, label) in [
        ("amount_cents", "amount"),
        ("charged_cents", "charged"),
        ("refunded_cents", "refunded"),
    ] {
        if let Some(cents) = field(key) {
            parts.push(format!("{label} {}", money(cents)));
        }
    }
    if let Some(step) = field("step") {
        parts.push(format!("step {}", text(step)));
    }
    if let Some(reason) = field("reason") {
        parts.push(format!("reason: {}", text(reason)));
    }
    if let Some(methods) = field("payment_methods").and_then(Value::as_array) {
        let methods: Vec<String> = methods.iter().map(text).collect();
        parts.push(format!("methods {}", methods.join("/")));
    }
    truncate(&clean(&parts.join(", ")), DETAIL_WIDTH)
}

/// At most `max` characters, an ellipsis marking a cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(id: i64, name: &str, message_id: &str, causation_id: Option<&str>) -> Entry {
        Entry {
            id,
            recorded_at: DateTime::parse_from_rfc3339("2025-03-04T05:06:07.089Z")
                .unwrap()
                .with_timezone(&Utc),
            kind: "event".to_owned(),
            name: name.to_owned(),
            message_id: message_id.to_owned(),
            causation_id: causation_id.map(str::to_owned),
            detail: json!({"order_id": "o1", "method": "zhifubao", "amount_cents": 10240}),
        }
    }

    #[test]
    fn short_ids_keep_the_distinguishing_end() {
        assert_eq!(short_id("0195f3c2-1a2b-7c3d-8e4f-0123456789ab"), "456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id("a\nb"), "a b");
    }

    #[test]
    fn details_are_short_and_never_show_the_token() {
        assert_eq!(
            short_detail(&json!({"order_id": "o", "method": "weixin", "amount_cents": 12800})),
            "weixin, amount 128.00"
        );
        assert_eq!(
            short_detail(&json!({
                "order_id": "o", "token": "v1.secret.mac",
                "payment_methods": ["zhifubao", "weixin"], "amount_cents": 905
            })),
            "amount 9.05, methods zhifubao/weixin"
        );
        assert_eq!(
            short_detail(&json!({
                "supplier": "haidilao", "address": "1 Road",
                "products": [{"sku": "a", "quantity": 2}, {"sku": "b", "quantity": 1}]
            })),
            "haidilao, 3 items"
        );
        assert_eq!(
            short_detail(&json!({"order_id": "o", "step": "payment"})),
            "step payment"
        );
        let long = short_detail(&json!({"reason": "x".repeat(200)}));
        assert_eq!(long.chars().count(), DETAIL_WIDTH);
        assert!(long.ends_with('…'));
        assert_eq!(short_detail(&json!({"reason": "a\nb"})), "reason: a b");
    }

    #[test]
    fn the_history_table_is_aligned() {
        let entries = [
            entry(
                1,
                "order.started",
                "0195f3c2-1a2b-7c3d-8e4f-000000000001",
                None,
            ),
            entry(
                2,
                "payment.selected.zhifubao",
                "0195f3c2-1a2b-7c3d-8e4f-000000000002",
                Some("0195f3c2-1a2b-7c3d-8e4f-000000000001"),
            ),
        ];
        let text = history_table("o1", &entries);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "order o1 (2 entries, from 2025-03-04, times UTC)");
        assert!(
            lines[1].starts_with("#  TIME          KIND   EVENT"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("1  05:06:07.089  event  order.started  "),
            "{text}"
        );
        assert!(lines[2].ends_with("00000001  -"), "{text}");
        assert!(lines[3].ends_with("00000002  00000001"), "{text}");
        let column = lines[1].find("DETAIL").unwrap();
        assert_eq!(lines[2].find("zhifubao, amount 102.40"), Some(column));
        assert!(text.lines().all(|l| l == l.trim_end()), "{text}");
    }

    #[test]
    fn money_handles_negative_amounts() {
        assert_eq!(money(&json!(-5)), "-0.05");
        assert_eq!(money(&json!(12345)), "123.45");
        assert_eq!(money(&json!(i64::MIN)), "-92233720368547758.08");
        assert_eq!(money(&json!(i64::MAX)), "92233720368547758.07");
    }

    #[test]
    fn quantities_beyond_u64_saturate() {
        let detail = json!({"products": [{"quantity": u64::MAX}, {"quantity": u64::MAX}]});
        assert_eq!(short_detail(&detail), format!("{} items", u64::MAX));
    }

    proptest::proptest! {
        /// Any JSON as an entry's detail (the history keeps what the
        /// coordinator was sent): a short one-line cell, never a panic, and
        /// nothing of the payment token.
        #[test]
        fn any_detail_renders_as_one_short_line(
            detail in orderflow_shared::strategies::json_value(),
            (kind, object) in orderflow_shared::strategies::keyed_event_object(),
        ) {
            for detail in [detail, Value::Object(object)] {
                let cell = short_detail(&detail);
                proptest::prop_assert!(cell.chars().count() <= DETAIL_WIDTH, "{kind}: {cell}");
                proptest::prop_assert!(!cell.chars().any(char::is_control), "{kind}: {cell:?}");
                let mut without_token = detail.clone();
                if let Some(fields) = without_token.as_object_mut() {
                    fields.remove("token");
                }
                proptest::prop_assert_eq!(&cell, &short_detail(&without_token), "{}", kind);
            }
        }
    }
}
