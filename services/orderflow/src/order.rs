//! `orderflow order start|pay|show`: a client of the order API, for people
//! and scripts.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::cli::{ApiArgs, OrderCommand, PayArgs, ShowArgs, StartArgs};

pub async fn run(command: OrderCommand) -> anyhow::Result<ExitCode> {
    match command {
        OrderCommand::Start(args) => start(&args).await,
        OrderCommand::Pay(args) => pay(&args).await,
        OrderCommand::Show(args) => show(&args).await,
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    json: bool,
}

impl Api {
    fn new(args: &ApiArgs) -> anyhow::Result<Self> {
        let base = args.api.clone().unwrap_or_else(|| {
            let addr = std::env::var("ORDERFLOW_HTTP_ADDR")
                .unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
            format!("http://{addr}")
        });
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            json: args.json,
        })
    }

    /// Sends `request`; an error status becomes an error with the API's message.
    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the order API at {} ({what}); is `orderflow up` running? (--api / ORDERFLOW_API_URL)",
                self.base
            )
        })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| body.to_string(), str::to_owned);
            bail!("{what}: the API answered {status}: {message}");
        }
        Ok(body)
    }

    /// GET /orders/{id}, long-polling for `wait_for` when given.
    async fn order(
        &self,
        order_id: &str,
        wait_for: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .client
            .get(format!("{}/orders/{}", self.base, encode(order_id)));
        if let Some(status) = wait_for {
            let timeout_ms = timeout.as_millis().to_string();
            request = request
                .query(&[("wait_for", status), ("timeout_ms", timeout_ms.as_str())])
                .timeout(timeout + Duration::from_secs(5));
        }
        self.send(request, &format!("reading order {order_id}"))
            .await
    }

    fn print(&self, order: &Value) {
        if self.json {
            println!("{order:#}");
        } else {
            print!("{}", summary(order));
        }
    }
}

/// Percent-encodes an order id for a URL path.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn field<'a>(order: &'a Value, key: &str) -> Option<&'a Value> {
    order.get(key).filter(|v| !v.is_null())
}

fn cents(value: &Value) -> String {
    value.as_i64().map_or_else(
        || value.to_string(),
        |c| format!("{}.{:02}", c / 100, c % 100),
    )
}

/// A readable summary of an order: one `label value` line per known field.
fn summary(order: &Value) -> String {
    let text = |key: &str| {
        field(order, key).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    };
    let money = |key: &str| field(order, key).map(cents);
    let methods = field(order, "payment_methods")
        .and_then(Value::as_array)
        .map(|methods| {
            methods
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        });
    [
        ("order", text("order_id")),
        ("status", text("status")),
        ("supplier", text("supplier")),
        ("amount", money("amount_cents")),
        ("methods", methods),
        ("paid by", text("method")),
        ("charged", money("charged_cents")),
        ("refunded", money("refunded_cents")),
        ("reason", text("cancel_reason")),
        ("rejected", text("last_rejection")),
    ]
    .into_iter()
    .filter_map(|(label, value)| value.map(|value| format!("{label:<8} {value}\n")))
    .collect()
}

/// `SKU:QTY` → `{sku, quantity}`.
fn product_line(spec: &str) -> anyhow::Result<Value> {
    let Some((sku, quantity)) = spec.rsplit_once(':') else {
        bail!("product `{spec}` must be SKU:QUANTITY, e.g. hotpot-set:2");
    };
    let quantity: u32 = quantity.parse().with_context(|| {
        format!("quantity of `{sku}` must be a positive whole number, not `{quantity}`")
    })?;
    Ok(json!({ "sku": sku, "quantity": quantity }))
}

fn is_terminal(order: &Value) -> bool {
    matches!(
        order.get("status").and_then(Value::as_str),
        Some("completed" | "cancelled")
    )
}

async fn start(args: &StartArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let products = args
        .products
        .iter()
        .map(|spec| product_line(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut body =
        json!({ "supplier": args.supplier, "products": products, "address": args.address });
    if let Some(order_id) = &args.order_id {
        body["order_id"] = json!(order_id);
    }
    let created = api
        .send(
            api.client.post(format!("{}/orders", api.base)).json(&body),
            "placing the order",
        )
        .await?;
    let order_id = created
        .get("order_id")
        .and_then(Value::as_str)
        .context("the API's answer has no order_id")?
        .to_owned();
    let order = if args.wait {
        api.order(
            &order_id,
            Some("awaiting_payment"),
            Duration::from_secs(args.timeout_secs),
        )
        .await?
    } else {
        created
    };
    api.print(&order);
    Ok(ExitCode::SUCCESS)
}

async fn pay(args: &PayArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let order = api
        .order(&args.order_id, Some("awaiting_payment"), timeout)
        .await?;
    if is_terminal(&order) {
        api.print(&order);
        bail!("order {} has already ended; nothing to pay", args.order_id);
    }
    let Some(token) = order.get("payment_token").and_then(Value::as_str) else {
        bail!(
            "order {} is `{}` and has no payment token yet; try again when it awaits payment",
            args.order_id,
            order
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
        );
    };
    api.send(
        api.client
            .post(format!(
                "{}/orders/{}/payment",
                api.base,
                encode(&args.order_id)
            ))
            .json(&json!({ "token": token, "method": args.method })),
        "submitting the payment",
    )
    .await?;
    if args.no_wait {
        println!(
            "payment submitted for order {} with {}",
            args.order_id, args.method
        );
        return Ok(ExitCode::SUCCESS);
    }
    let order = api
        .order(&args.order_id, Some("completed"), timeout)
        .await?;
    api.print(&order);
    if is_terminal(&order) {
        Ok(ExitCode::SUCCESS)
    } else {
        bail!(
            "order {} did not finish within {}s; check it with `orderflow order show {}`",
            args.order_id,
            args.timeout_secs,
            args.order_id
        )
    }
}

async fn show(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.api)?;
    let order = api.order(&args.order_id, None, Duration::ZERO).await?;
    api.print(&order);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_lines_parse_or_explain() {
        assert_eq!(
            product_line("hotpot-set:2").unwrap(),
            json!({"sku": "hotpot-set", "quantity": 2})
        );
        assert!(
            product_line("hotpot-set")
                .unwrap_err()
                .to_string()
                .contains("SKU:QUANTITY")
        );
        assert!(
            product_line("tea:-1")
                .unwrap_err()
                .to_string()
                .contains("positive")
        );
    }

    #[test]
    fn summaries_show_money_as_decimal() {
        let text = summary(&json!({
            "order_id": "o1", "status": "completed", "amount_cents": 12800,
            "charged_cents": 10240, "method": "zhifubao"
        }));
        assert!(text.contains("amount   128.00"), "{text}");
        assert!(text.contains("charged  102.40"), "{text}");
        assert!(text.contains("paid by  zhifubao"), "{text}");
    }

    #[test]
    fn order_ids_are_encoded_in_paths() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
