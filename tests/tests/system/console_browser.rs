//! The console in a real browser: headless Chromium from Debian's packages
//! (`chromium`, `chromium-driver`; `./scripts/test` installs them), driven
//! over WebDriver with fantoccini. A customer places an order through the
//! form, pays it, and sees its timeline reach `order.completed` without a
//! reload; an operator pauses a step from the choreography page and the
//! customer's order times out there and shows its refund on the timeline;
//! an operator sees a stopped service's queue depth rise on the
//! choreography page and drain when it comes back, and a message that
//! failed while its cause lasted under dead letters with its reason,
//! replayed after a confirmation.
//!
//! `ORDERFLOW_CONSOLE_SCREENSHOTS=DIR` (absolute: tests run in `tests/`)
//! saves a screenshot of each page there.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::Shutdown;
use orderflow_shared::bus::Outgoing;
use orderflow_shared::envelope::headers;
use orderflow_shared::events::{Event, OrderStarted, ProductLine};
use orderflow_tests::system::{System, Workers};
use orderflow_tests::{TEST_OPERATOR_TOKEN, eventually};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long the page may take to show what the system did.
const PATIENCE: Duration = Duration::from_secs(30);

/// A chromedriver on a free port with one headless Chromium session; both
/// end with [`Browser::close`] (or when dropped: the driver is killed).
struct Browser {
    client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver \
             (./scripts/test installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let webdriver = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver listens", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let profile =
            std::env::temp_dir().join(format!("orderflow-chromium-{}", uuid::Uuid::now_v7()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1280,1100",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        // Plain HTTP to the local driver: no TLS stack in the tests.
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .unwrap();
        Self {
            client,
            driver,
            profile,
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(error) => {
                let page = self
                    .client
                    .execute("return document.body.innerText;", vec![])
                    .await
                    .unwrap_or_default();
                panic!("{css} never showed ({error}); the page says: {page}")
            }
        }
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    /// Saves a screenshot as `name`.png when ORDERFLOW_CONSOLE_SCREENSHOTS is set.
    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("ORDERFLOW_CONSOLE_SCREENSHOTS") {
            let png = self.client.screenshot().await.unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Waits until the script `condition` (a JavaScript expression) is true.
    async fn until(&self, what: &str, condition: &str) {
        let script = format!("return Boolean({condition});");
        eventually(PATIENCE, what, || async {
            self.client
                .execute(&script, vec![])
                .await
                .is_ok_and(|v| v == Value::Bool(true))
        })
        .await;
    }
}

#[tokio::test]
async fn a_customer_places_and_pays_an_order_and_sees_its_timeline_complete_without_a_reload() {
    let system = System::start().await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/console", system.api))
        .await
        .unwrap();
    browser.find("#order-form").await;
    assert!(
        browser
            .text("#merchant-methods")
            .await
            .contains("Zhifubao (Alipay) (pays 80 %)")
    );
    let quantity = browser.find("#qty-hotpot-set").await;
    quantity.clear().await.unwrap();
    quantity.send_keys("2").await.unwrap();
    browser.screenshot("place-an-order").await;
    browser.find("#place").await.click().await.unwrap();

    // The order's page, with the payment form once it awaits payment.
    browser
        .until(
            "the order page opens",
            "location.hash.startsWith('#/orders/')",
        )
        .await;
    let url = browser.client.current_url().await.unwrap();
    let order_id = url
        .fragment()
        .unwrap()
        .trim_start_matches("/orders/")
        .to_owned();
    // Marks this page load: a reload would lose it.
    browser
        .client
        .execute("window.orderflowMarker = 'same page'; return true;", vec![])
        .await
        .unwrap();
    browser.find("#pay").await;
    browser
        .until(
            "the saga waits on the payment",
            "document.querySelector('#waits-on')?.textContent === 'payment'",
        )
        .await;
    browser
        .find("#pay-method")
        .await
        .select_by_value("zhifubao")
        .await
        .unwrap();
    browser.find("#pay").await.click().await.unwrap();

    browser
        .until(
            "the timeline reaches order.completed",
            "document.querySelector('#timeline li[data-name=\"order.completed\"]')",
        )
        .await;
    browser
        .until(
            "the status badge says completed",
            "document.querySelector('#status').textContent.includes('completed')",
        )
        .await;
    let marker = browser
        .client
        .execute("return window.orderflowMarker || null;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, json!("same page"), "the page was reloaded");
    let names: Vec<String> = serde_json::from_value(
        browser
            .client
            .execute(
                "return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.name);",
                vec![],
            )
            .await
            .unwrap(),
    )
    .unwrap();
    for expected in [
        "order.started",
        "order.info-generated",
        "payment.awaiting",
        "payment.submitted",
        "payment.selected.zhifubao",
        "payment.captured",
        "order.completed",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    browser.screenshot("order-completed").await;
    let order = system.get_order(&order_id, None).await;
    assert_eq!(order["status"], "completed");
    assert_eq!(order["charged_cents"], 2 * 12_800 * 80 / 100);
    browser.close().await;
    system.stop().await;
}

#[tokio::test]
async fn an_operator_sees_a_stopped_service_back_up_and_replays_a_dead_letter() {
    let system = System::start_without(|w| w.generate_info = false).await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/console#/choreography", system.api))
        .await
        .unwrap();
    // Without the token: the page says what to do.
    assert!(
        browser
            .text("#operator-problem")
            .await
            .contains("ORDERFLOW_OPERATOR_TOKEN")
    );
    browser
        .find("#token")
        .await
        .send_keys(TEST_OPERATOR_TOKEN)
        .await
        .unwrap();
    browser.find("#token-save").await.click().await.unwrap();
    browser.find("#sound").await;

    // generate-info is stopped: its queue's depth rises on the page.
    let generate_info_row = "#queues tr[data-service=\"generate-info\"]";
    browser.find(generate_info_row).await;
    assert_eq!(
        browser.text(&format!("{generate_info_row} .status")).await,
        "no_consumer"
    );
    for _ in 0..3 {
        system.place("haidilao", &[("tea", 1)]).await;
    }
    browser
        .until(
            "three orders wait for generate-info",
            &format!("document.querySelector('{generate_info_row} .depth').textContent === '3'"),
        )
        .await;
    browser.screenshot("choreography").await;

    // generate-info comes back: the page shows the queue drain.
    let worker = Shutdown::new();
    let generate_info = tokio::spawn(generate_info::run(
        system.env.ctx("generate-info"),
        worker.clone(),
    ));
    browser
        .until(
            "generate-info drains its queue",
            &format!(
                "document.querySelector('{generate_info_row} .depth').textContent === '0' && \
                 document.querySelector('{generate_info_row} .status').textContent === 'ok'"
            ),
        )
        .await;

    // An order that failed while its cause lasted (as the runtime leaves it
    // in generate-info's dead letters, with the reason), replayed from the
    // page after a confirmation once the cause is fixed.
    let dead = system.env.dead_letter_queue("generate-info");
    let failed = Outgoing::event(
        &Event::OrderStarted(OrderStarted {
            order_id: "order-replayed-from-the-console".into(),
            supplier: "haidilao".into(),
            products: vec![ProductLine {
                sku: "tea".into(),
                quantity: 1,
            }],
            address: "6 Dock".into(),
        }),
        None,
    );
    let mut reason = FieldTable::default();
    reason.insert(
        headers::REASON.into(),
        AMQPValue::LongString("catalogue unavailable".into()),
    );
    system
        .ctx
        .broker
        .publisher()
        .publish_raw(
            &dead,
            "order.started",
            &failed.body,
            failed.envelope.to_properties(reason).unwrap(),
        )
        .await
        .unwrap();
    browser
        .client
        .goto(&format!("{}/console#/dead-letters", system.api))
        .await
        .unwrap();
    let card = "div[data-service=\"generate-info\"]";
    assert_eq!(
        browser.text(&format!("{card} .reason")).await,
        "catalogue unavailable"
    );
    browser.screenshot("dead-letters").await;
    browser
        .find(&format!("{card} .replay-one"))
        .await
        .click()
        .await
        .unwrap();
    assert!(
        browser
            .text("#confirm-text")
            .await
            .contains("Replay message")
    );
    browser.find("#confirm-yes").await.click().await.unwrap();
    let result = browser.text("#replay-result").await;
    assert!(result.starts_with("1 message(s) replayed"), "{result}");
    browser.find("#no-dead-letters").await;
    // generate-info prices it now.
    let order = system
        .get_order("order-replayed-from-the-console", Some("awaiting_payment"))
        .await;
    assert_eq!(order["amount_cents"], 900, "{order:#}");
    worker.cancel();
    generate_info.await.unwrap().unwrap();
    browser.close().await;
    system.stop().await;
}

#[tokio::test]
async fn a_paused_step_times_out_and_the_refund_shows_on_the_timeline() {
    let system = System::start_with(
        |settings| {
            settings.pause_check_ms = 100;
            settings.flow_timeout_secs = 12;
        },
        Workers::default(),
    )
    .await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/console#/choreography", system.api))
        .await
        .unwrap();
    browser
        .find("#token")
        .await
        .send_keys(TEST_OPERATOR_TOKEN)
        .await
        .unwrap();
    browser.find("#token-save").await.click().await.unwrap();
    // Pause order-completed from the page: captures wait in its queue.
    let row = "#queues tr[data-service=\"order-completed\"]";
    browser
        .find(&format!("{row} button[data-action=\"pause\"]"))
        .await
        .click()
        .await
        .unwrap();
    assert!(
        browser
            .text("#confirm-text")
            .await
            .contains("Pause order-completed")
    );
    browser.find("#confirm-yes").await.click().await.unwrap();
    browser
        .until(
            "order-completed shows paused",
            &format!("document.querySelector('{row} .status')?.textContent === 'paused'"),
        )
        .await;
    let queue = system.env.queue("order-completed");
    eventually(PATIENCE, "order-completed stops consuming", || async {
        system.env.consumer_count(&queue).await == 0
    })
    .await;

    // A customer places and pays an order; it is captured, then its flow
    // timer fires while the completion waits, and the capture is refunded.
    browser
        .client
        .goto(&format!("{}/console#/", system.api))
        .await
        .unwrap();
    let quantity = browser.find("#qty-tea").await;
    quantity.clear().await.unwrap();
    quantity.send_keys("1").await.unwrap();
    browser.find("#place").await.click().await.unwrap();
    browser.find("#pay").await;
    browser
        .find("#pay-method")
        .await
        .select_by_value("weixin")
        .await
        .unwrap();
    browser.find("#pay").await.click().await.unwrap();
    browser
        .until(
            "the capture shows",
            "document.querySelector('#timeline li[data-name=\"payment.captured\"]')",
        )
        .await;
    browser
        .until(
            "the saga waits on the paused step",
            "document.querySelector('#waits-on')?.textContent === 'paying'",
        )
        .await;
    browser
        .until(
            "the flow timer fires and the refund follows",
            "document.querySelector('#timeline li[data-kind=\"timer\"][data-name=\"saga.timed-out\"]') \
             && document.querySelector('#timeline li[data-kind=\"compensation\"][data-name=\"payment.refunded\"]') \
             && document.querySelector('#status').textContent.includes('cancelled')",
        )
        .await;
    assert!(browser.text("#facts").await.contains("Refunded"));
    browser.screenshot("order-cancelled-refunded").await;
    let (status, body) = system
        .operator(
            reqwest::Method::POST,
            "/services/order-completed/resume",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(PATIENCE, "order-completed drains its queue", || async {
        system.env.message_count(&queue).await == 0
    })
    .await;
    browser.close().await;
    system.stop().await;
}
