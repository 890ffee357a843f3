//! What a PostgreSQL restart does to the workers, found by the chaos run
//! (`orderflow chaos`) and fixed:
//!
//! - a worker started while PostgreSQL is still starting up ("the database
//!   system is starting up", SQLSTATE 57P03) waits for it, as it waits for the
//!   broker, instead of exiting;
//! - a payment whose gateway call finds the gateway's ledger (which lives in
//!   the same PostgreSQL) unreachable is tried again with the same key, not
//!   failed: the order completes with exactly one charge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orderflow_shared::app::run_worker;
use orderflow_shared::store::{Context, Db};
use orderflow_tests::proxy::StallingProxy;
use orderflow_tests::system::{System, Worker};
use orderflow_tests::{TestEnv, admin_database_url, eventually};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A PostgreSQL that is still starting: for `starting_for` it answers every
/// connection with `FATAL 57P03 the database system is starting up`, as a
/// server in recovery does; then it forwards to `upstream`. Counts the
/// refusals.
async fn starting_server(
    upstream: String,
    starting_for: Duration,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    let ready_at = Instant::now() + starting_for;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if Instant::now() < ready_at {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // The startup packet (after an SSL request, answered "no").
                    loop {
                        let Ok(len) = client.read_u32().await else {
                            return;
                        };
                        let mut rest = vec![0u8; (len as usize).saturating_sub(4)];
                        if client.read_exact(&mut rest).await.is_err() {
                            return;
                        }
                        if len == 8 && rest == [0x04, 0xd2, 0x16, 0x2f] {
                            let _ = client.write_all(b"N").await;
                            continue;
                        }
                        break;
                    }
                    let mut fields = Vec::new();
                    for (kind, value) in [
                        (b'S', "FATAL"),
                        (b'V', "FATAL"),
                        (b'C', "57P03"),
                        (b'M', "the database system is starting up"),
                    ] {
                        fields.push(kind);
                        fields.extend_from_slice(value.as_bytes());
                        fields.push(0);
                    }
                    fields.push(0);
                    let mut packet = vec![b'E'];
                    packet.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
                    packet.extend_from_slice(&fields);
                    let _ = client.write_all(&packet).await;
                });
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, refused)
}

#[tokio::test]
async fn a_worker_started_while_postgresql_is_starting_up_waits_for_it() {
    let env = TestEnv::orderflow().await;
    let upstream = {
        let url = admin_database_url();
        let authority = url
            .split("://")
            .nth(1)
            .unwrap()
            .split(['/', '?'])
            .next()
            .unwrap();
        let host = authority.rsplit('@').next().unwrap().to_owned();
        if host.contains(':') {
            host
        } else {
            format!("{host}:5432")
        }
    };
    let (addr, refused) = starting_server(upstream, Duration::from_secs(3)).await;
    let mut settings = env.settings();
    let url = env.database_url.expose_secret().to_owned();
    let start = url.find("://").unwrap() + 3;
    let end = start + url[start..].find('/').unwrap();
    let host_start = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    settings.database_url =
        SecretString::from(format!("{}{addr}{}", &url[..host_start], &url[end..]));
    let ctx = env.ctx_with(settings, "generate-info");
    let started = Instant::now();
    let worker = Worker::spawn(|shutdown| generate_info::run(ctx, shutdown));

    env.publish_json(
        "order.started",
        &json!({"order_id": "o-patient", "supplier": "haidilao",
                "products": [{"sku": "tea", "quantity": 1}], "address": "1 Road"}),
    )
    .await;
    let pricing = env.db("pricing").await;
    eventually(
        Duration::from_mins(1),
        "generate-info priced the order once PostgreSQL was up",
        || async {
            assert!(
                !worker.is_finished(),
                "the worker exited while PostgreSQL was starting up"
            );
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM priced_orders WHERE order_id = 'o-patient'",
            )
            .fetch_one(pricing.pool())
            .await
            .unwrap_or(0)
                == 1
        },
    )
    .await;
    assert!(
        refused.load(Ordering::SeqCst) >= 1,
        "the worker met a server that was starting up"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));

    worker.stop().await;
    pricing.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_payment_whose_gateway_ledger_is_unreachable_is_retried_not_failed() {
    let system = System::start_without(|w| w.without_providers = vec!["zhifubao"]).await;
    // The zhifubao provider, its gateway's ledger behind a proxy that can be
    // cut, as a database restart cuts it.
    let service = payment_provider::service_name("zhifubao");
    let ctx = system
        .env
        .ctx_with(system.ctx.settings.as_ref().clone(), &service);
    let db = ctx.db(Context::Payments).await.unwrap();
    let proxy = StallingProxy::in_front_of(&admin_database_url()).await;
    let gateway_db = Db::open(
        &SecretString::from(proxy.url_through(system.env.database_url.expose_secret())),
        Context::Payments.schema(),
        4,
    )
    .await
    .unwrap();
    let worker = Arc::new(
        payment_provider::ProviderHandler::new(&ctx, "zhifubao", db.clone(), gateway_db).unwrap(),
    );
    let provider = Worker::spawn(|shutdown| {
        let (ctx, service) = (ctx.clone(), service.clone());
        async move { run_worker(&ctx, &service, worker, Some(db), shutdown).await }
    });

    let order_id = system.place("haidilao", &[("hotpot-set", 1)]).await;
    let token = system.payment_token(&order_id).await;
    proxy.cut();
    assert_eq!(system.submit(&order_id, &token, "zhifubao").await, 202);
    let payments = system.db("payments").await;
    eventually(
        Duration::from_secs(30),
        "the provider committed its intent to charge",
        || async {
            sqlx::query_scalar::<_, String>("SELECT status FROM captures WHERE order_id = $1")
                .bind(&order_id)
                .fetch_optional(payments.pool())
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    // Longer than the provider's own retries of the gateway (about 0.4 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.resume();

    let order = system.ended(&order_id).await;
    assert_eq!(order["status"], "completed", "{order:#}");
    // 80 % of 12,800 with zhifubao, charged once.
    assert_eq!(order["charged_cents"], 10_240, "{order:#}");
    assert_eq!(system.gateway(&order_id).await, (1, 0));

    provider.stop().await;
    payments.close().await;
    system.stop().await;
}
