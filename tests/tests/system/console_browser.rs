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
use orderflow_tests::system::{System, Worker, order_started};
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

    /// Clicks the element `css` once it shows.
    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Types `text` into the field `css`.
    async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.send_keys(text).await.unwrap();
    }

    /// Replaces the text of the field `css` with `text`.
    async fn fill(&self, css: &str, text: &str) {
        self.find(css).await.clear().await.unwrap();
        self.type_into(css, text).await;
    }

    /// Opens `page` (a path with its fragment) of `system`'s API.
    async fn open(&self, system: &System, page: &str) {
        self.client
            .goto(&format!("{}{page}", system.api))
            .await
            .unwrap();
    }

    /// Gives the page the operator token.
    async fn sign_in_as_operator(&self) {
        self.type_into("#token", TEST_OPERATOR_TOKEN).await;
        self.click("#token-save").await;
    }

    /// Answers yes to the confirmation, once it asks for `question`.
    async fn confirm(&self, question: &str) {
        let text = self.text("#confirm-text").await;
        assert!(text.contains(question), "{text}");
        self.click("#confirm-yes").await;
    }

    /// Pays the order on the page with `method`.
    async fn pay_with(&self, method: &str) {
        self.find("#pay-method")
            .await
            .select_by_value(method)
            .await
            .unwrap();
        self.click("#pay").await;
    }

    /// Waits until the order's timeline shows the entry named `name`.
    async fn until_timeline_shows(&self, name: &str) {
        self.until(
            &format!("the timeline shows {name}"),
            &format!("document.querySelector('#timeline li[data-name=\"{name}\"]')"),
        )
        .await;
    }

    /// Waits until the order's page says its saga waits on `step`.
    async fn until_waiting_on(&self, step: &str) {
        self.until(
            &format!("the saga waits on {step}"),
            &format!("document.querySelector('#waits-on')?.textContent === '{step}'"),
        )
        .await;
    }

    /// Runs `script` on the page; what it returns.
    async fn run(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
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
    browser.open(&system, "/console").await;
    browser.find("#order-form").await;
    assert!(
        browser
            .text("#merchant-methods")
            .await
            .contains("Zhifubao (Alipay) (pays 80 %)")
    );
    browser.fill("#qty-hotpot-set", "2").await;
    browser.screenshot("place-an-order").await;
    browser.click("#place").await;

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
        .run("window.orderflowMarker = 'same page'; return true;")
        .await;
    browser.find("#pay").await;
    browser.until_waiting_on("payment").await;
    browser.pay_with("zhifubao").await;

    browser.until_timeline_shows("order.completed").await;
    browser
        .until(
            "the status badge says completed",
            "document.querySelector('#status').textContent.includes('completed')",
        )
        .await;
    let marker = browser.run("return window.orderflowMarker || null;").await;
    assert_eq!(marker, json!("same page"), "the page was reloaded");
    let names: Vec<String> = serde_json::from_value(
        browser
            .run(
                "return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.name);",
            )
            .await,
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
    browser.open(&system, "/console#/choreography").await;
    // Without the token: the page says what to do.
    assert!(
        browser
            .text("#operator-problem")
            .await
            .contains("ORDERFLOW_OPERATOR_TOKEN")
    );
    browser.sign_in_as_operator().await;
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
    let generate_info =
        Worker::spawn(|shutdown| generate_info::run(system.env.ctx("generate-info"), shutdown));
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
    let failed = order_started("order-replayed-from-the-console");
    system
        .publish_dead_letter("generate-info", &failed, "catalogue unavailable")
        .await;
    browser.open(&system, "/console#/dead-letters").await;
    let card = "div[data-service=\"generate-info\"]";
    assert_eq!(
        browser.text(&format!("{card} .reason")).await,
        "catalogue unavailable"
    );
    browser.screenshot("dead-letters").await;
    browser.click(&format!("{card} .replay-one")).await;
    browser.confirm("Replay message").await;
    let result = browser.text("#replay-result").await;
    assert!(result.starts_with("1 message(s) replayed"), "{result}");
    browser.find("#no-dead-letters").await;
    // generate-info prices it now.
    let order = system
        .get_order("order-replayed-from-the-console", Some("awaiting_payment"))
        .await;
    assert_eq!(order["amount_cents"], 900, "{order:#}");
    generate_info.stop().await;
    browser.close().await;
    system.stop().await;
}

#[tokio::test]
async fn a_paused_step_times_out_and_the_refund_shows_on_the_timeline() {
    let system = System::start_pausable(|settings| settings.flow_timeout_secs = 12).await;
    let browser = Browser::start().await;
    browser.open(&system, "/console#/choreography").await;
    browser.sign_in_as_operator().await;
    // Pause order-completed from the page: captures wait in its queue.
    let row = "#queues tr[data-service=\"order-completed\"]";
    browser
        .click(&format!("{row} button[data-action=\"pause\"]"))
        .await;
    browser.confirm("Pause order-completed").await;
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
    browser.open(&system, "/console#/").await;
    browser.fill("#qty-tea", "1").await;
    browser.click("#place").await;
    browser.find("#pay").await;
    browser.pay_with("weixin").await;
    browser.until_timeline_shows("payment.captured").await;
    // The paused step.
    browser.until_waiting_on("paying").await;
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
