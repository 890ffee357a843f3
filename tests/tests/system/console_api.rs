//! The console's API on the real broker and database: its page and assets
//! come from the binary; customers read the catalogue, the saga's state and
//! a live stream of the order without a credential; every operator route
//! answers 401 without the operator token, 403 with another (or when none is
//! configured) and works with it: the choreography and its lint (also of a
//! model broken on purpose), queues with or without the management API,
//! dead letters listed with their reasons and replayed, stuck sagas.

use std::time::Duration;

use lapin::BasicProperties;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::topology::{ServiceSpec, orderflow_services};
use orderflow_tests::api::{Instance, element_with, texts_of};
use orderflow_tests::system::{System, Workers};
use orderflow_tests::{TEST_OPERATOR_TOKEN, TestEnv, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every operator route, with a body for the POSTs.
const OPERATOR_ROUTES: [(&str, &str); 7] = [
    ("GET", "/console/api/choreography"),
    ("GET", "/console/api/queues"),
    ("POST", "/console/api/services/generate-info/pause"),
    ("POST", "/console/api/services/generate-info/resume"),
    ("GET", "/console/api/dead-letters"),
    ("POST", "/console/api/dead-letters/generate-info/replay"),
    ("GET", "/console/api/sagas/stuck"),
];

async fn call(
    system: &System,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = system
        .client
        .request(method.parse().unwrap(), format!("{}{path}", system.api));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if method == "POST" {
        request = request.json(&json!({}));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The `Content-Type` of `response`.
fn content_type(response: &reqwest::Response) -> &str {
    response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary() {
    let system = System::start().await;
    let page = system.get_response("/console").await;
    assert_eq!(page.status(), 200);
    assert!(content_type(&page).starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/console/app.js") && html.contains("/console/style.css"));
    for (asset, kind) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let response = system.get_response(&format!("/console/{asset}")).await;
        assert_eq!(response.status(), 200, "{asset}");
        assert!(content_type(&response).starts_with(kind), "{asset}");
    }
    // The root leads to the console.
    let root = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/", system.api))
        .send()
        .await
        .unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()[reqwest::header::LOCATION], "/console");
    system.stop().await;
}

#[tokio::test]
async fn the_catalogue_lists_merchants_with_their_methods_and_products_with_prices() {
    let system = System::start().await;
    let (status, catalogue) = system.get("/catalogue").await;
    assert_eq!(status, 200, "{catalogue}");
    let haidilao = element_with(&catalogue["merchants"], "supplier", "haidilao");
    assert_eq!(
        texts_of(&haidilao["payment_methods"], "method"),
        ["zhifubao", "weixin"]
    );
    assert_eq!(haidilao["payment_methods"][0]["discount_percent"], 80);
    assert_eq!(
        catalogue["default_payment_methods"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let tea = element_with(&catalogue["products"], "sku", "tea");
    assert_eq!(tea["price_cents"], 900);
    system.stop().await;
}

#[tokio::test]
async fn every_operator_route_needs_the_operator_token() {
    let system = System::start().await;
    for (method, path) in OPERATOR_ROUTES {
        let (status, headers, body) = call(&system, method, path, None).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert!(
            headers[reqwest::header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{method} {path}"
        );
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("ORDERFLOW_OPERATOR_TOKEN")
        );
        let (status, _, body) = call(&system, method, path, Some("not-the-operator-token")).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        let (status, _, body) = call(&system, method, path, Some(TEST_OPERATOR_TOKEN)).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    // The customers' side needs none.
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    for path in [
        "/catalogue".to_owned(),
        "/console".to_owned(),
        format!("/orders/{order_id}"),
    ] {
        assert_eq!(system.get_response(&path).await.status(), 200, "{path}");
    }
    system.stop().await;
}

#[tokio::test]
async fn without_a_configured_token_the_operator_side_is_off() {
    let system = System::start_with(
        |settings| settings.operator_token = None,
        Workers::default(),
    )
    .await;
    for (method, path) in OPERATOR_ROUTES {
        for token in [None, Some(TEST_OPERATOR_TOKEN)] {
            let (status, _, body) = call(&system, method, path, token).await;
            assert_eq!(status, 403, "{method} {path}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("set ORDERFLOW_OPERATOR_TOKEN"),
                "{body}"
            );
        }
    }
    system.stop().await;
}

/// The events of a server-sent event stream: (event, id, data).
#[derive(Debug, Default)]
struct Sse {
    buffer: String,
    events: Vec<(String, Option<String>, String)>,
}

impl Sse {
    fn feed(&mut self, chunk: &[u8]) {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    value.clone_into(&mut event);
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            if !event.is_empty() {
                self.events.push((event, id, data));
            }
        }
    }

    /// The data of the last event named `event`.
    fn last(&self, event: &str) -> Option<Value> {
        self.events
            .iter()
            .rfind(|(name, _, _)| name == event)
            .map(|(_, _, data)| serde_json::from_str(data).unwrap())
    }

    fn entries(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|(event, _, _)| event == "entry")
            .map(|(_, _, data)| serde_json::from_str(data).unwrap())
            .collect()
    }
}

/// Reads the live stream of `order_id` until `done` holds for what came.
async fn read_live(
    system: &System,
    order_id: &str,
    last_event_id: Option<&str>,
    done: impl Fn(&Sse) -> bool,
) -> Sse {
    let mut request = system
        .client
        .get(format!("{}/orders/{order_id}/live", system.api));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[reqwest::header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut sse = Sse::default();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !done(&sse) {
            let chunk = response.chunk().await.unwrap().expect("the stream goes on");
            sse.feed(&chunk);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the live stream did not get there: {sse:#?}"));
    sse
}

#[tokio::test]
async fn an_orders_live_stream_sends_its_state_saga_and_each_history_entry_once() {
    let system = System::start().await;
    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let (status, _) = system.get("/orders/unknown-order/live").await;
    assert_eq!(status, 404);

    // Open while the order waits for its payment, then pay it.
    let awaiting = system.wait_for(&order_id, "awaiting_payment").await;
    // The saga and its history are read apart: the saga that follows an
    // entry may come a tick later.
    let sse = read_live(&system, &order_id, None, |sse| {
        sse.entries()
            .iter()
            .any(|e| e["name"] == "payment.awaiting")
            && sse
                .last("saga")
                .is_some_and(|saga| saga["step"] == "payment")
    })
    .await;
    let order = sse
        .events
        .iter()
        .find(|(event, _, _)| event == "order")
        .map(|(_, _, data)| serde_json::from_str::<Value>(data).unwrap())
        .unwrap();
    assert_eq!(order["status"], "awaiting_payment");
    let saga = sse.last("saga").unwrap();
    assert_eq!(saga["step"], "payment", "{saga}");
    let steps = texts_of(&saga["deadlines"], "step");
    assert!(
        steps.contains(&"payment") && steps.contains(&"flow"),
        "{saga}"
    );
    assert!(saga["deadlines"][0]["seconds_left"].as_i64().unwrap() > 0);
    let last_id = sse
        .events
        .iter()
        .filter_map(|(_, id, _)| id.clone())
        .next_back()
        .unwrap();

    let token = awaiting["payment_token"].as_str().unwrap();
    assert_eq!(system.submit(&order_id, token, "zhifubao").await, 202);
    // A reconnecting browser resumes after the last entry it saw.
    let resumed = read_live(&system, &order_id, Some(&last_id), |sse| {
        sse.entries().iter().any(|e| e["name"] == "order.completed")
    })
    .await;
    let names: Vec<String> = resumed
        .entries()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !names.contains(&"order.started".to_owned()),
        "entries before Last-Event-ID come again: {names:?}"
    );
    assert!(names.contains(&"payment.captured".to_owned()), "{names:?}");
    let completed = resumed
        .entries()
        .into_iter()
        .find(|e| e["name"] == "order.completed")
        .unwrap();
    assert!(completed["causation_id"].is_string(), "{completed}");

    let (status, saga) = system.get(&format!("/orders/{order_id}/saga")).await;
    assert_eq!(status, 200);
    assert_eq!(saga["status"], "completed");
    assert_eq!(saga["step"], Value::Null, "an ended saga waits on nothing");
    assert_eq!(saga["deadlines"], json!([]));
    let (status, body) = system.get("/orders/unknown-order/saga").await;
    assert_eq!(status, 404, "{body}");
    system.stop().await;
}

#[tokio::test]
async fn the_choreography_shows_the_model_and_no_finding() {
    let system = System::start().await;
    let (status, body) = system.operator(Method::GET, "/choreography", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["findings"], json!([]));
    let coordinator = element_with(&body["services"], "name", "saga-coordinator");
    assert!(
        coordinator["publishes"]
            .as_array()
            .unwrap()
            .contains(&json!("saga.timed-out"))
    );
    assert_eq!(
        texts_of(&body["waits"], "step"),
        ["generate-info", "payment", "paying"]
    );
    assert_eq!(body["clients"][0]["publishes"], json!(["order.started"]));
    system.stop().await;
}

#[tokio::test]
async fn the_choreography_of_a_model_broken_on_purpose_shows_its_findings() {
    // A model with an event nobody consumes and a binding nobody feeds.
    let methods = Metadata::embedded().unwrap().methods();
    let mut services = orderflow_services(&methods);
    services.push(ServiceSpec::new("audit", &["inventory.counted"]).publishing(&["order.shipped"]));
    let env = TestEnv::new(&services).await;
    orderflow_shared::store::Db::migrate_all(&env.database_url)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let api = Instance::start(&env, env.settings(), "order-api", &client).await;
    let body: Value = client
        .get(api.url("/console/api/choreography"))
        .bearer_auth(TEST_OPERATOR_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let findings: Vec<(&str, &str)> = body["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["kind"].as_str().unwrap(), f["subject"].as_str().unwrap()))
        .collect();
    assert_eq!(
        findings,
        [
            ("unconsumed", "order.shipped"),
            ("unpublished", "inventory.counted")
        ],
        "{body:#}"
    );
    api.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn queues_show_depth_consumers_and_status_without_the_management_api() {
    let system = System::start_with(
        // Nothing listens there: passive declarations instead.
        |settings| "http://127.0.0.1:9".clone_into(&mut settings.management_url),
        Workers::all_but(|w| w.generate_info = false),
    )
    .await;
    system.place("haidilao", &[("tea", 1)]).await;
    let queue = system.env.queue("generate-info");
    system
        .wait_for_depth(&queue, 1, "order.started waits")
        .await;
    let (status, body) = system.operator(Method::GET, "/queues", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "passive", "{body}");
    assert!(
        body["management_error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:9")
    );
    let by_service = |name: &str| element_with(&body["queues"], "service", name);
    let stopped = by_service("generate-info");
    assert_eq!(stopped["messages_ready"], 1, "{stopped}");
    assert_eq!(stopped["consumers"], 0);
    assert_eq!(
        stopped["status"], "no_consumer",
        "a queue without consumer is flagged"
    );
    assert_eq!(
        stopped["publish_rate"],
        Value::Null,
        "no rates without the API"
    );
    let running = by_service("payment-wait");
    assert_eq!(running["consumers"], 1);
    assert_eq!(running["status"], "ok");
    assert_eq!(
        body["queues"].as_array().unwrap().len(),
        system.env.topology.services().len()
    );
    system.stop().await;
}

#[tokio::test]
async fn queues_come_from_the_management_api_when_it_answers() {
    let management_on = reqwest::get("http://127.0.0.1:15672/api/overview")
        .await
        .is_ok();
    let system = System::start().await;
    let (status, body) = system.operator(Method::GET, "/queues", None).await;
    assert_eq!(status, 200, "{body}");
    if management_on {
        assert_eq!(body["source"], "management", "{body}");
        // Rates from the API; depth and consumers exact all the same.
        let queue = &body["queues"][0];
        assert!(queue["publish_rate"].is_number(), "{queue}");
        assert_eq!(queue["consumers"], 1, "{queue}");
    } else {
        // The plugin is off on this broker: the console falls back.
        assert_eq!(body["source"], "passive", "{body}");
    }
    system.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_listed_with_its_reason_and_replayed_from_the_console() {
    let system = System::start().await;
    let dead = system.env.dead_letter_queue("generate-info");
    for body in [&b"{broken"[..], &b"{also broken"[..]] {
        system
            .env
            .publish_bare("order.started", body, BasicProperties::default())
            .await;
    }
    system
        .wait_for_depth(&dead, 2, "both are dead-lettered")
        .await;
    let (status, listed) = system
        .operator(Method::GET, "/dead-letters?service=generate-info", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let service = &listed["services"][0];
    assert_eq!(service["count"], 2, "{listed}");
    let first = &service["messages"][0];
    assert_eq!(first["routing_key"], "order.started");
    assert!(
        first["reason"].as_str().unwrap().contains("not valid JSON"),
        "{first}"
    );
    assert_eq!(first["body"], "{broken");
    // Listing is a peek.
    assert_eq!(system.env.message_count(&dead).await, 2);
    let (status, body) = system
        .operator(Method::GET, "/dead-letters?limit=1000", None)
        .await;
    assert_eq!(status, 400, "{body}");

    // One message by id; an unknown id is a 404 and moves nothing.
    let message_id = first["message_id"].as_str().unwrap().to_owned();
    let (status, body) = system
        .replay("generate-info", &json!({"message_id": "no-such-message"}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(system.env.message_count(&dead).await, 2);
    let (status, body) = system
        .replay("generate-info", &json!({ "message_id": message_id }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["report"]["replayed"][0]["message_id"],
        message_id.as_str()
    );
    assert!(
        body["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 message(s) replayed"),
        "{body}"
    );
    // Still poison: generate-info dead-letters it again, so it came back
    // through the service itself; then all of them at once.
    system
        .wait_for_depth(&dead, 2, "replayed and dead again")
        .await;
    let (status, body) = system.replay("generate-info", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["report"]["replayed"].as_array().unwrap().len(), 2);
    let (status, body) = system.replay("no-such-service", &json!({})).await;
    assert_eq!(status, 404, "{body}");
    system.stop().await;
}

#[tokio::test]
async fn stuck_sagas_are_listed_with_the_step_they_wait_on() {
    let system = System::start_without(|w| w.generate_info = false).await;
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    eventually(Duration::from_secs(10), "the saga is stuck", || async {
        let (_, body) = system
            .operator(Method::GET, "/sagas/stuck?older_than_secs=0", None)
            .await;
        body["sagas"]
            .as_array()
            .is_some_and(|sagas| sagas.iter().any(|s| s["order_id"] == order_id.as_str()))
    })
    .await;
    let (_, body) = system
        .operator(Method::GET, "/sagas/stuck?older_than_secs=0", None)
        .await;
    assert_eq!(body["sagas"][0]["step"], "generate-info", "{body}");
    let (_, body) = system
        .operator(Method::GET, "/sagas/stuck?older_than_secs=3600", None)
        .await;
    assert_eq!(body["sagas"], json!([]));
    let (status, _) = system
        .operator(Method::GET, "/sagas/stuck?limit=0", None)
        .await;
    assert_eq!(status, 400);
    system.stop().await;
}

#[tokio::test]
async fn a_dead_letter_older_than_the_retention_is_replayed_from_the_console_only_with_force() {
    let system = System::start().await;
    let dead = system.env.dead_letter_queue("generate-info");
    system.publish_expired_dead_letter("replay-old").await;
    system.wait_for_depth(&dead, 1, "the dead letter").await;
    let (status, body) = system.replay("generate-info", &json!({})).await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("retention of 30 day(s)"), "{error}");
    assert!(
        body["report"]["refused"][0]
            .as_str()
            .unwrap()
            .contains("replay-old"),
        "{body}"
    );
    assert_eq!(
        system.env.message_count(&dead).await,
        1,
        "left where it was"
    );
    let (status, body) = system
        .replay("generate-info", &json!({"force": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["report"]["replayed"][0]["forced"].is_string(),
        "{body}"
    );
    system.wait_for("replay-old", "awaiting_payment").await;
    // A body the endpoint does not know is refused.
    let (status, body) = system.replay("generate-info", &json!({"all": true})).await;
    assert_eq!(status, 422, "{body}");
    system.stop().await;
}

#[tokio::test]
async fn a_broker_the_operator_cannot_reach_is_a_503_that_says_so() {
    let system = System::start_with(
        |settings| {
            settings.operator_amqp_url = Some(secrecy::SecretString::from(
                "amqp://nobody:wrong@127.0.0.1:5672/%2f".to_owned(),
            ));
        },
        Workers::default(),
    )
    .await;
    for (method, path) in [
        (Method::GET, "/dead-letters"),
        (Method::POST, "/services/generate-info/pause"),
        (Method::GET, "/queues"),
    ] {
        let (status, body) = system.operator(method, path, None).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("RabbitMQ"),
            "{path}: {body}"
        );
    }
    // The customers' side does not depend on it.
    let order_id = system.place("haidilao", &[("tea", 1)]).await;
    system.wait_for(&order_id, "awaiting_payment").await;
    system.stop().await;
}
