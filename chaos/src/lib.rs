//! `orderflow chaos`: the whole system run as in production while faults
//! are injected, then checked from outside (docs/chaos.md).
//!
//! The run starts its own PostgreSQL ([`postgres`]) and its own RabbitMQ, one
//! node or a three-node cluster ([`rabbit`]), beside the machine's (never
//! touching them), migrates the database and declares the topology as an
//! operator does, and starts every worker as its own process, two of some
//! ([`workers`]). It drives orders through the API and straight onto the
//! exchange and pays them ([`load`]) while it injects faults ([`faults`]):
//! connections closed, the broker stopped and started, a cluster node
//! killed, PostgreSQL restarted fast and immediate, each worker type killed
//! and restarted, duplicates and malformed messages. Then it checks the
//! invariants ([`check`]), prints one JSON summary on stdout and exits 1 on
//! any violation (2 when the run itself could not run).
//!
//! Every process of the run carries `ORDERFLOW_CHAOS_RUN=<run id>` in its
//! environment, so that whatever a killed run leaves behind can be found.

mod check;
mod faults;
mod load;
mod postgres;
pub mod rabbit;
mod workers;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use orderflow_shared::bus::Broker;
use orderflow_shared::metadata::Metadata;
use orderflow_shared::topology::{DEFAULT_RETRY_TIERS, Names, Topology, orderflow_services};
use secrecy::SecretString;
use serde_json::json;
use tokio::time::Instant;

use self::faults::{Clock, Rig};
use self::load::{Load, Placed, Via};
use self::postgres::Postgres;
use self::rabbit::{Rabbit, free_port_in};
use self::workers::Workers;

/// The environment variable every process of a run carries (its run id).
pub const RUN_MARKER: &str = "ORDERFLOW_CHAOS_RUN";

/// `orderflow chaos` arguments.
#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// A three-node RabbitMQ cluster (quorum queues on all three), one node
    /// killed with SIGKILL mid-run; one node otherwise.
    #[arg(long)]
    pub cluster: bool,
    /// Seed of every random choice (orders, methods, which instance is
    /// killed); random when not given, printed in the summary.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Orders placed per second at most (0: no limit): spreads a small run
    /// over its faults.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Each fault once (a reduced run), instead of rounds of faults for as
    /// long as orders are placed.
    #[arg(long)]
    pub once: bool,
    /// Pause between two faults of a track, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub fault_gap_ms: u64,
    /// How long a broker or node stays down, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub down_ms: u64,
    /// The payment step's timeout (ORDERFLOW_PAYMENT_TIMEOUT_SECS of the workers).
    #[arg(long, default_value_t = 20)]
    pub payment_timeout_secs: u64,
    /// Gives up (exit 2) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// The run's directory (data, logs); a fresh one under the temporary
    /// directory when not given. Removed at the end unless --keep.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The run's id (order ids start with it; every process of the run
    /// carries it as ORDERFLOW_CHAOS_RUN).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Keep the run's directory (logs of every worker and node).
    #[arg(long)]
    pub keep: bool,
}

pub fn run(args: &ChaosArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.orders > 0, "--orders must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    // Not from the seed: two runs with one seed must not share names.
    let run_id = args.run_id.clone().unwrap_or_else(|| {
        format!(
            "chaos{}",
            (0..8).map(|_| fastrand::lowercase()).collect::<String>()
        )
    });
    anyhow::ensure!(
        !run_id.is_empty()
            && run_id.len() <= 40
            && run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "--run-id takes 1 to 40 letters, digits or `-`"
    );
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("orderflow-{run_id}")));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the run's directory {}", dir.display()))?;
    let outcome = runtime.block_on(async {
        let timeout = Duration::from_secs(args.timeout_secs);
        tokio::select! {
            result = tokio::time::timeout(timeout, chaos(args, seed, &run_id, &dir)) => {
                result.unwrap_or_else(|_| Err(anyhow::anyhow!("the run took longer than --timeout-secs {}", args.timeout_secs)))
            }
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Whatever is left (the parts' own Drop killed them already).
    runtime.shutdown_timeout(Duration::from_secs(5));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let summary = outcome?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(if summary["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Kills and reaps the process in each slot that has one (the end of a
/// run, or a run that failed).
fn kill_and_reap<'a>(slots: impl IntoIterator<Item = &'a mut Option<std::process::Child>>) {
    for slot in slots {
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The workers of the run and how many processes of each.
fn worker_plan(metadata: &Metadata) -> Vec<(String, usize)> {
    orderflow_workers::names(metadata)
        .into_iter()
        .map(|name| {
            let instances = match name.as_str() {
                order_api::SERVICE | saga_coordinator::SERVICE | generate_info::SERVICE => 2,
                name if name == payment_provider::service_name("zhifubao") => 2,
                _ => 1,
            };
            (name, instances)
        })
        .collect()
}

async fn chaos(
    args: &ChaosArgs,
    seed: u64,
    run_id: &str,
    dir: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let clock = Clock::new();
    let nodes = if args.cluster { 3 } else { 1 };
    eprintln!(
        "chaos run {run_id}: seed {seed}, {} orders, concurrency {}, {nodes} broker node(s), in {}",
        args.orders,
        args.concurrency,
        dir.display()
    );
    // The broker nodes boot while PostgreSQL is made and started.
    // Names, ports and secrets are this run's own whatever the seed: two runs
    // with one seed at once (a test beside a full run) must not share a node
    // name in epmd or a port. The seed decides the load and the faults only.
    let mut fresh = fastrand::Rng::new();
    let mut rabbit = Rabbit::prepare(&dir.join("rabbit"), nodes, &mut fresh, run_id)?;
    for i in 0..nodes {
        rabbit.spawn(i)?;
    }
    let mut pg = Postgres::init(
        &dir.join("pg"),
        free_port_in(25_000..27_000, &mut fresh),
        run_id,
    )?;
    pg.start().await?;
    let db_url = SecretString::from(pg.url("orderflow"));
    orderflow_shared::store::Db::migrate_all(&db_url)
        .await
        .context("migrating the run's database")?;
    rabbit.wait_all(Duration::from_mins(3)).await?;
    let urls = rabbit.urls();
    eprintln!(
        "[{:7.1}s] PostgreSQL on {}, RabbitMQ on {urls}",
        clock.secs(),
        pg.port
    );

    // The operator's step, as an operator runs it.
    let exe = std::env::current_exe()?;
    let declared = tokio::process::Command::new(&exe)
        .args(["topology", "declare"])
        .env("ORDERFLOW_AMQP_URL", &urls)
        .env(RUN_MARKER, run_id)
        .output()
        .await?;
    if !declared.status.success() {
        bail!(
            "orderflow topology declare failed: {}",
            String::from_utf8_lossy(&declared.stderr)
        );
    }
    let metadata = Metadata::from_env()?;
    let topology = Topology::build(
        Names::new(""),
        &orderflow_services(&metadata.methods()),
        &DEFAULT_RETRY_TIERS,
    );
    let broker = Broker::new(
        &SecretString::from(urls.clone()),
        &format!("{run_id}-harness"),
        topology,
        Duration::from_secs(10),
    )?;
    let tap = declare_tap(&broker).await?;

    let api_addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port_in(27_000..29_000, &mut fresh)))
        .collect();
    let token_keys: String = (0..32).map(|_| fresh.alphanumeric()).collect();
    let env = vec![
        ("ORDERFLOW_AMQP_URL".to_owned(), urls.clone()),
        ("ORDERFLOW_DATABASE_URL".to_owned(), pg.url("orderflow")),
        (
            "ORDERFLOW_TOKEN_KEYS".to_owned(),
            format!("chaos:{token_keys}"),
        ),
        (
            "ORDERFLOW_PAYMENT_TIMEOUT_SECS".to_owned(),
            args.payment_timeout_secs.to_string(),
        ),
        ("ORDERFLOW_GATEWAY_LATENCY_MS".to_owned(), "5".to_owned()),
        ("ORDERFLOW_LOG".to_owned(), "warn".to_owned()),
        (RUN_MARKER.to_owned(), run_id.to_owned()),
    ];
    let mut workers = Workers::new(dir, &worker_plan(&metadata), &api_addrs, env)?;
    workers.spawn_all()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let apis: Vec<String> = api_addrs.iter().map(|a| format!("http://{a}")).collect();
    for api in &apis {
        wait_healthy(&http, api, &mut workers, Duration::from_mins(3)).await?;
    }
    eprintln!(
        "[{:7.1}s] {} worker processes up; placing orders",
        clock.secs(),
        workers.procs.len()
    );

    let rig = Arc::new(Rig {
        clock,
        rabbit: tokio::sync::Mutex::new(rabbit),
        postgres: tokio::sync::Mutex::new(pg),
        workers: tokio::sync::Mutex::new(workers),
        broker: broker.clone(),
        log: std::sync::Mutex::new(Vec::new()),
        poison: std::sync::Mutex::new(BTreeMap::new()),
        duplicates: std::sync::Mutex::new(BTreeMap::new()),
        samples: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let events = Arc::new(std::sync::Mutex::new(
        BTreeMap::<String, HashSet<String>>::new(),
    ));
    let stop = orderflow_shared::Shutdown::new();
    let tapping = tokio::spawn(run_tap(
        broker.clone(),
        tap,
        rig.clone(),
        events.clone(),
        stop.clone(),
    ));
    let reaping = tokio::spawn({
        let (rig, stop) = (rig.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let at = rig.clock.secs();
                rig.workers.lock().await.reap(at);
            }
        }
    });

    // The load, and the faults while orders are being placed.
    let load = Arc::new(Load {
        http: http.clone(),
        apis: apis.clone(),
        publisher: broker.publisher(),
        run_id: run_id.to_owned(),
        patience: Duration::from_secs(args.payment_timeout_secs * 3 + 300),
        payment_timeout: Duration::from_secs(args.payment_timeout_secs),
    });
    let started = Arc::new(AtomicUsize::new(0));
    let load_began = Instant::now();
    let driving = tokio::spawn({
        let (load, started) = (load.clone(), started.clone());
        let (orders, concurrency, rate) = (args.orders, args.concurrency, args.rate);
        async move {
            futures::stream::iter(0..orders)
                .map(|i| {
                    let (load, started) = (load.clone(), started.clone());
                    async move {
                        if rate > 0.0 {
                            tokio::time::sleep_until(
                                load_began + Duration::from_secs_f64(i as f64 / rate),
                            )
                            .await;
                        }
                        started.fetch_add(1, Ordering::SeqCst);
                        load.drive(i, seed).await
                    }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<Placed>>()
                .await
        }
    });
    let plan = Plan {
        once: args.once,
        cluster: args.cluster,
        gap: Duration::from_millis(args.fault_gap_ms),
        down: Duration::from_millis(args.down_ms),
        orders: args.orders,
        started: started.clone(),
        seed,
    };
    let tracks = vec![
        tokio::spawn(broker_track(rig.clone(), plan.clone())),
        tokio::spawn(database_track(rig.clone(), plan.clone())),
        tokio::spawn(worker_track(rig.clone(), plan.clone())),
        tokio::spawn(message_track(rig.clone(), plan.clone(), run_id.to_owned())),
    ];
    let mut placed = driving.await.context("the load task")?;
    let load_secs = load_began.elapsed().as_secs_f64();
    for track in tracks {
        track.await.context("a fault track")?;
    }
    placed.sort_by(|a, b| a.order_id.cmp(&b.order_id));
    eprintln!(
        "[{:7.1}s] load over ({load_secs:.1} s); checking",
        rig.clock.secs()
    );

    // Settle: every accepted order terminal, every queue drained.
    let accepted: Vec<String> = placed
        .iter()
        .filter(|p| p.accepted)
        .map(|p| p.order_id.clone())
        .collect();
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&rig.postgres.lock().await.url("orderflow"))
        .await?;
    let open = check::settle(
        &admin,
        &accepted,
        Duration::from_secs(args.payment_timeout_secs + 60),
    )
    .await;
    let phase = |what: &str| eprintln!("[{:7.1}s] {what}", rig.clock.secs());
    phase(&format!("settled ({} not terminal)", open.len()));
    let (mut invariants, outcomes) = tokio::time::timeout(
        Duration::from_mins(3),
        check::orders(&admin, &metadata, &placed, &http, &apis),
    )
    .await
    .context("checking the orders took over 3 minutes")??;
    phase("orders checked");
    let (drained, remaining) = check::queues_drained(&broker, Duration::from_mins(1)).await;
    invariants.insert("no_queue_left_with_messages", drained);
    phase("queues counted");
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(15), tapping)
        .await
        .is_err()
    {
        tracing::warn!("chaos: the tap did not stop within 15 s");
    }
    let _ = reaping.await;
    let poison = rig.poison.lock().expect("poison").clone();
    let (dead, dead_letters) = tokio::time::timeout(
        Duration::from_mins(1),
        check::dead_letters(&broker, &poison),
    )
    .await
    .context("reading the dead letters took over a minute")??;
    invariants.insert("dead_letters_exactly_the_injected_poison", dead);
    phase("dead letters read");

    let faults = rig.log.lock().expect("fault log").clone();
    let duplicates = rig.duplicates.lock().expect("duplicates").clone();
    let mut injected = check_faults(&faults, &duplicates, &poison, args.cluster, &metadata);
    let mut exits = check::Invariant::default();
    let unexpected = rig.workers.lock().await.unexpected_exits.clone();
    exits.ok = unexpected.is_empty();
    exits.checked = rig.workers.lock().await.procs.len();
    exits.violations = unexpected.len();
    exits.examples = unexpected
        .iter()
        .map(|e| {
            format!(
                "{} ended by itself at {:.1} s ({})",
                e.worker, e.at_secs, e.status
            )
        })
        .collect();
    invariants.insert("no_worker_ended_by_itself", exits);
    let mut clients = check::Invariant {
        ok: true,
        ..check::Invariant::default()
    };
    for order in &placed {
        clients.checked += 1;
        if let Some(error) = &order.error {
            clients.ok = false;
            clients.violations += 1;
            if clients.examples.len() < 10 {
                clients.examples.push(error.clone());
            }
        }
    }
    invariants.insert("every_client_saw_its_order_end", clients);
    injected.checked += faults.len();
    invariants.insert("every_fault_injected", injected);

    rig.workers
        .lock()
        .await
        .stop_all(Duration::from_secs(10))
        .await;
    broker.close();
    admin.close().await;
    rig.rabbit.lock().await.kill_all();
    rig.postgres.lock().await.kill();

    let ok = invariants.values().all(|i| i.ok) && open.is_empty();
    let mut fault_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for fault in faults.iter().filter(|f| f.injected) {
        *fault_counts.entry(fault.kind.as_str()).or_default() += 1;
    }
    let events: BTreeMap<String, usize> = events
        .lock()
        .expect("events")
        .iter()
        .map(|(k, ids)| (k.clone(), ids.len()))
        .collect();
    let queues = routed_per_queue(&broker, &events, &duplicates, &poison, &remaining);
    let completed = placed
        .iter()
        .filter(|p| p.status.as_deref() == Some("completed"))
        .count();
    let cancelled = placed
        .iter()
        .filter(|p| p.status.as_deref() == Some("cancelled"))
        .count();
    let worker_logs: BTreeMap<String, String> = if ok {
        BTreeMap::new()
    } else {
        rig.workers
            .lock()
            .await
            .procs
            .iter()
            .map(|w| (w.label(), w.log_tail(600)))
            .collect()
    };
    Ok(json!({
        "ok": ok,
        "run_id": run_id,
        "seed": seed,
        "cluster": args.cluster,
        "broker_nodes": nodes,
        "started_at": rig.clock.started_at().to_rfc3339(),
        "duration_secs": rig.clock.secs(),
        "orders": {
            "requested": args.orders,
            "accepted": accepted.len(),
            "via_api": placed.iter().filter(|p| p.accepted && p.via == Via::Api).count(),
            "via_exchange": placed.iter().filter(|p| p.accepted && p.via == Via::Exchange).count(),
            "completed": completed,
            "cancelled": cancelled,
            "not_terminal_after_settling": open,
            "by_scenario": outcomes,
            "load_secs": load_secs,
            "orders_per_sec_under_faults": accepted.len() as f64 / load_secs.max(0.001),
        },
        "faults": faults,
        "fault_counts": fault_counts,
        "duplicates_published": duplicates,
        "poison_published": poison.iter().map(|(q, ids)| (q.clone(), ids.len())).collect::<BTreeMap<_, _>>(),
        "dead_letters": dead_letters,
        "events_published": events,
        "queues": queues,
        "worker_exits": unexpected,
        "worker_log_tails": worker_logs,
        "invariants": invariants,
        "violations": invariants.values().map(|i| i.violations).sum::<usize>() + open.len(),
    }))
}

/// Per service queue, the messages routed to it (the distinct events
/// published with a routing key it is bound to, the duplicates of those,
/// the poison sent to it) and what it still holds: everything routed was
/// consumed (or dead-lettered) when nothing remains.
fn routed_per_queue(
    broker: &Broker,
    events: &BTreeMap<String, usize>,
    duplicates: &BTreeMap<String, u64>,
    poison: &BTreeMap<String, Vec<String>>,
    remaining: &BTreeMap<String, u32>,
) -> serde_json::Value {
    let topology = broker.topology();
    let mut queues = serde_json::Map::new();
    for service in topology.services() {
        let queue = topology.names.service_queue(service);
        let patterns: Vec<&str> = topology
            .event_bindings(service)
            .map(|b| b.routing_key.as_str())
            .collect();
        let bound = |key: &str| patterns.iter().any(|p| topic_matches(p, key));
        let events: usize = events
            .iter()
            .filter(|(k, _)| bound(k))
            .map(|(_, n)| n)
            .sum();
        let copies: u64 = duplicates
            .iter()
            .filter(|(k, _)| bound(k))
            .map(|(_, n)| n)
            .sum();
        let poisoned = poison
            .get(&topology.names.dead_letter_queue(service))
            .map_or(0, Vec::len);
        queues.insert(
            queue.clone(),
            json!({
                "events": events,
                "duplicates": copies,
                "poison": poisoned,
                "routed": events as u64 + copies + poisoned as u64,
                "remaining": remaining.get(&queue),
            }),
        );
    }
    serde_json::Value::Object(queues)
}

/// Whether the topic `pattern` (`*` one word, `#` any number) matches `key`.
fn topic_matches(pattern: &str, key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.first(), key.first()) {
            (None, None) => true,
            (Some(&"#"), _) => {
                matches(&pattern[1..], key) || (!key.is_empty() && matches(pattern, &key[1..]))
            }
            (Some(p), Some(k)) if *p == "*" || p == k => matches(&pattern[1..], &key[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    matches(&pattern, &key)
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_patterns_match_as_rabbitmq_matches_them() {
        use super::topic_matches as m;
        assert!(m("payment.selected.*", "payment.selected.zhifubao"));
        assert!(!m("payment.selected.*", "payment.selected"));
        assert!(m("#", "order.started"));
        assert!(m("order.#", "order.started"));
        assert!(m("order.started", "order.started"));
        assert!(!m("order.started", "order.cancelled"));
    }
}

/// Every kind of fault the run promised was injected, and none failed.
fn check_faults(
    faults: &[faults::Fault],
    duplicates: &BTreeMap<String, u64>,
    poison: &BTreeMap<String, Vec<String>>,
    cluster: bool,
    metadata: &Metadata,
) -> check::Invariant {
    let mut invariant = check::Invariant {
        ok: true,
        ..check::Invariant::default()
    };
    let mut expected: Vec<String> = [
        "close_all_connections",
        "broker_stop_start_app",
        "postgres_restart_fast",
        "postgres_restart_immediate",
        "poison",
    ]
    .map(str::to_owned)
    .to_vec();
    if cluster {
        expected.push("broker_node_sigkill".to_owned());
    }
    for (name, _) in worker_plan(metadata) {
        expected.push(format!("sigkill:{name}"));
    }
    let mut fail = |why: String| {
        invariant.ok = false;
        invariant.violations += 1;
        if invariant.examples.len() < 10 {
            invariant.examples.push(why);
        }
    };
    for kind in &expected {
        let found = faults.iter().any(|f| {
            f.injected
                && (f.kind == *kind
                    || kind
                        .strip_prefix("sigkill:")
                        .is_some_and(|name| f.kind == "worker_sigkill" && f.target == name))
        });
        if !found {
            fail(format!("no {kind} was injected"));
        }
    }
    for fault in faults.iter().filter(|f| !f.injected) {
        fail(format!(
            "{} on {} at {:.1} s: {}",
            fault.kind, fault.target, fault.at_secs, fault.evidence
        ));
    }
    if duplicates.is_empty() {
        fail("no duplicate was published".to_owned());
    }
    if poison.is_empty() {
        fail("no malformed message was published".to_owned());
    }
    invariant
}

/// How the fault tracks run.
#[derive(Clone)]
struct Plan {
    once: bool,
    cluster: bool,
    gap: Duration,
    down: Duration,
    orders: usize,
    started: Arc<AtomicUsize>,
    seed: u64,
}

impl Plan {
    /// Orders are still being placed.
    fn placing(&self) -> bool {
        self.started.load(Ordering::SeqCst) < self.orders
    }

    /// Another round: the first always; more only while orders are placed
    /// and the run is not `once`.
    fn another_round(&self, round: usize) -> bool {
        round == 0 || (!self.once && self.placing())
    }

    /// Injects a fault (`inject`, recorded as `kind` on `target`), then
    /// leaves the system the plan's gap to recover before the next one.
    async fn fault_then_gap<F>(&self, rig: &Rig, kind: &str, target: &str, inject: F)
    where
        F: std::future::Future<Output = anyhow::Result<String>>,
    {
        rig.record(kind, target, inject).await;
        tokio::time::sleep(self.gap).await;
    }

    /// Waits until a tenth of the orders (at least a few) are under way, so
    /// that faults meet traffic.
    async fn wait_for_traffic(&self) {
        let enough = (self.orders / 10).clamp(1, 20);
        while self.started.load(Ordering::SeqCst) < enough {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connections closed, the broker stopped and started, a cluster node
/// killed: one after another (a cluster keeps its majority).
async fn broker_track(rig: Arc<Rig>, plan: Plan) {
    plan.wait_for_traffic().await;
    let nodes = rig.rabbit.lock().await.nodes.len();
    let mut round = 0;
    while plan.another_round(round) {
        let closing = rig.close_all_connections();
        plan.fault_then_gap(&rig, "close_all_connections", "every node", closing)
            .await;
        if plan.cluster {
            // The node the clients are on first (the list's order), then the others.
            let victim = round % nodes;
            let name = rig.rabbit.lock().await.nodes[victim].name.clone();
            let killing = rig.kill_node(victim, plan.down);
            plan.fault_then_gap(&rig, "broker_node_sigkill", &name, killing)
                .await;
        }
        let node = (round + usize::from(plan.cluster)) % nodes;
        let name = rig.rabbit.lock().await.nodes[node].name.clone();
        let stopping = rig.stop_start_app(node, plan.down);
        plan.fault_then_gap(&rig, "broker_stop_start_app", &name, stopping)
            .await;
        round += 1;
    }
}

/// PostgreSQL restarted, fast then immediate.
async fn database_track(rig: Arc<Rig>, plan: Plan) {
    plan.wait_for_traffic().await;
    tokio::time::sleep(plan.gap / 2).await;
    let mut round = 0;
    while plan.another_round(round) {
        for mode in ["fast", "immediate"] {
            let kind = format!("postgres_restart_{mode}");
            let restarting = rig.restart_postgres(mode);
            plan.fault_then_gap(&rig, &kind, "postgresql", restarting)
                .await;
        }
        round += 1;
    }
}

/// Each worker type killed with SIGKILL (one instance, chosen at random)
/// and restarted.
async fn worker_track(rig: Arc<Rig>, plan: Plan) {
    plan.wait_for_traffic().await;
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x5EED);
    let mut names: Vec<String> = {
        let workers = rig.workers.lock().await;
        let mut names: Vec<String> = workers.procs.iter().map(|w| w.name.clone()).collect();
        names.dedup();
        names
    };
    let mut round = 0;
    while plan.another_round(round) {
        rng.shuffle(&mut names);
        for name in &names {
            let down = Duration::from_millis(rng.u64(200..800));
            rig.record(
                "worker_sigkill",
                name,
                rig.kill_worker(name, down, rng.usize(..)),
            )
            .await;
            tokio::time::sleep(plan.gap / 3).await;
        }
        round += 1;
    }
}

/// Malformed messages on every service queue (once), and duplicates of
/// messages seen on the tap for as long as orders are placed.
async fn message_track(rig: Arc<Rig>, plan: Plan, run_id: String) {
    plan.wait_for_traffic().await;
    rig.record("poison", "every service queue", rig.poison(&run_id))
        .await;
    let mut duplicated: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(plan.gap / 2).await;
        let keys: Vec<String> = {
            let samples = rig.samples.lock().expect("samples");
            samples
                .keys()
                .filter(|k| !plan.once || !duplicated.contains(*k))
                .cloned()
                .collect()
        };
        if !keys.is_empty() {
            rig.record("duplicate_delivery", &keys.join(","), rig.duplicate(&keys))
                .await;
            duplicated.extend(keys);
        }
        if !plan.placing() {
            break;
        }
    }
}

/// A quorum queue bound to every event: the run's own view of what was
/// published (counts per routing key, samples to duplicate).
async fn declare_tap(broker: &Broker) -> anyhow::Result<String> {
    let name = "chaos.tap".to_owned();
    let channel = broker.channel().await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            name.as_str().into(),
            broker.names().events_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "tap declared".into()).await;
    Ok(name)
}

/// Consumes the tap until `stop`, re-subscribing after a broker fault.
async fn run_tap(
    broker: Broker,
    tap: String,
    rig: Arc<Rig>,
    events: Arc<std::sync::Mutex<BTreeMap<String, HashSet<String>>>>,
    stop: orderflow_shared::Shutdown,
) {
    while !stop.is_cancelled() {
        let subscribed = async {
            let channel = broker.channel().await?;
            channel.basic_qos(500, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    tap.as_str().into(),
                    "chaos-tap".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, anyhow::Error>((channel, consumer))
        }
        .await;
        let Ok((channel, mut consumer)) = subscribed else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        loop {
            let delivery = tokio::select! {
                () = stop.cancelled() => break,
                next = consumer.next() => next,
            };
            let Some(Ok(delivery)) = delivery else { break };
            let key = delivery.routing_key.as_str().to_owned();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            events
                .lock()
                .expect("events")
                .entry(key.clone())
                .or_default()
                .insert(id);
            rig.samples
                .lock()
                .expect("samples")
                .insert(key, (delivery.properties.clone(), delivery.data.clone()));
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(5), channel.close(200, "tap".into())).await;
    }
    // The tap is the run's own: gone with the run.
    if let Ok(channel) = broker.channel().await {
        let _ = channel
            .queue_delete(
                tap.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
}

/// Waits until `api` answers `/healthz` with 200, watching that no worker
/// dies meanwhile.
async fn wait_healthy(
    http: &reqwest::Client,
    api: &str,
    workers: &mut Workers,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        if http
            .get(format!("{api}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        workers.reap(0.0);
        if let Some(exit) = workers.unexpected_exits.first() {
            bail!(
                "worker {} ended at start ({}): {}",
                exit.worker,
                exit.status,
                exit.log_tail
            );
        }
        if Instant::now() > deadline {
            bail!("the order API at {api} was not healthy within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
