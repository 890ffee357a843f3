//! Benchmark of the durable timers (`src/timers.rs`), on the real local
//! PostgreSQL: how fast a million pending timers are armed, and how late a
//! burst of timers that fall due at the same instant fires.
//!
//! ```sh
//! cargo bench -p saga-coordinator --bench timers
//! cargo bench -p saga-coordinator --bench timers -- --pending 100000 --burst 2000
//! ```
//!
//! Sizes come from the arguments or the environment (arguments win):
//!
//! | argument | variable | default | meaning |
//! | --- | --- | --- | --- |
//! | `--pending N` | `TIMERS_BENCH_PENDING` | 1000000 | timers armed far in the future (1–2 h) |
//! | `--burst N` | `TIMERS_BENCH_BURST` | 10000 | timers due at the same instant, per burst |
//! | `--arm-tx N` | `TIMERS_BENCH_ARM_TX` | 1000 | `timers::arm` calls per transaction |
//! | `--connections N` | `TIMERS_BENCH_CONNECTIONS` | 2 | connections arming at once |
//! | `--unnest-batch N` | `TIMERS_BENCH_UNNEST_BATCH` | 10000 | rows per `INSERT … SELECT FROM UNNEST` (the ceiling) |
//! | `--lead-ms N` | `TIMERS_BENCH_LEAD_MS` | 2000 | how long after the burst is armed it falls due |
//! | `--loops A,B` | `TIMERS_BENCH_LOOPS` | 1,2 | one burst per entry, fired by that many `TimerLoop`s |
//! | `--no-what-if` | `TIMERS_BENCH_WHAT_IF=0` | on | skip the last burst, fired by a set-based prototype of `fire_due` |
//! | `--what-if-batch N` | `TIMERS_BENCH_WHAT_IF_BATCH` | 500 | the prototype's claim batch (`TimerLoop`'s is 500) |
//!
//! The server is `ORDERFLOW_BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the benchmark creates a
//! database `orderflow_bench_<random>` on it and drops it at the end, also
//! when a phase fails, panics or the run is interrupted (Ctrl-C, SIGTERM).
//!
//! Lateness is measured two ways: `settled_at − due_at` (`fire` sets
//! `settled_at = now()`, which PostgreSQL fixes at the *start* of the firing
//! transaction, i.e. when the batch was claimed), and commit − `due_at`: the
//! moment the timer's `saga.timed-out` row became visible in the outbox, which
//! is when a relay could publish it. The commit moments are observed by reading
//! `clock_timestamp()` and the count of committed `saga.timed-out` rows every
//! 2 ms, so they are upper bounds by about 2 ms plus one round trip. Both clocks are the database server's.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::bus::Outgoing;
use orderflow_shared::config::Settings;
use orderflow_shared::events::{Event, SagaTimedOut, Step};
use orderflow_shared::store::{Context, Db};
use saga_coordinator::timers::{self, TimerLoop, TimerWake};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The claim query of `TimerLoop::fire_due` (kept identical to `src/timers.rs`,
/// with its batch of 500 written in), for `EXPLAIN ANALYZE`.
const CLAIM: &str = "SELECT order_id, step FROM timers WHERE state = 'armed' AND due_at <= now() \
                     ORDER BY due_at LIMIT 500 FOR UPDATE SKIP LOCKED";
/// `TimerLoop::until_next`'s query.
const UNTIL_NEXT: &str = "SELECT min(due_at) FROM timers WHERE state = 'armed'";
/// The batched insert whose speed is the ceiling for arming.
const UNNEST_INSERT: &str = "INSERT INTO timers (order_id, step, due_at) \
                             SELECT o, 'flow', d FROM UNNEST($1::text[], $2::timestamptz[]) AS u(o, d) \
                             ON CONFLICT (order_id, step) DO NOTHING";
/// A scratch schema (same migrations) for the batched-insert ceiling.
const CEILING_SCHEMA: &str = "timers_ceiling";
/// How long a burst may take to fire before the benchmark gives up.
const BURST_PATIENCE: Duration = Duration::from_mins(5);
/// How often the burst phase reads the count of committed `saga.timed-out` rows.
const COMMIT_POLL: Duration = Duration::from_millis(2);

#[derive(Clone, Debug)]
struct Options {
    pending: usize,
    burst: usize,
    arm_tx: usize,
    connections: usize,
    unnest_batch: usize,
    lead: Duration,
    loops: Vec<usize>,
    what_if: bool,
    what_if_batch: usize,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        fn number(name: &str, value: &str) -> anyhow::Result<usize> {
            let digits: String = value.chars().filter(|c| !matches!(c, '_' | ',')).collect();
            let n: usize = digits
                .parse()
                .with_context(|| format!("{name}: `{value}` is not a number"))?;
            Ok(n)
        }
        fn list(name: &str, value: &str) -> anyhow::Result<Vec<usize>> {
            value
                .split(',')
                .filter(|part| !part.trim().is_empty())
                .map(|part| number(name, part.trim()))
                .collect()
        }
        let env = |name: &str| std::env::var(name).ok();
        let mut options = Self {
            pending: env("TIMERS_BENCH_PENDING")
                .map_or(Ok(1_000_000), |v| number("pending", &v))?,
            burst: env("TIMERS_BENCH_BURST").map_or(Ok(10_000), |v| number("burst", &v))?,
            arm_tx: env("TIMERS_BENCH_ARM_TX").map_or(Ok(1_000), |v| number("arm-tx", &v))?,
            connections: env("TIMERS_BENCH_CONNECTIONS")
                .map_or(Ok(2), |v| number("connections", &v))?,
            unnest_batch: env("TIMERS_BENCH_UNNEST_BATCH")
                .map_or(Ok(10_000), |v| number("unnest-batch", &v))?,
            lead: Duration::from_millis(
                env("TIMERS_BENCH_LEAD_MS").map_or(Ok(2_000), |v| number("lead-ms", &v))? as u64,
            ),
            loops: env("TIMERS_BENCH_LOOPS").map_or(Ok(vec![1, 2]), |v| list("loops", &v))?,
            what_if: env("TIMERS_BENCH_WHAT_IF").is_none_or(|v| v != "0"),
            what_if_batch: env("TIMERS_BENCH_WHAT_IF_BATCH")
                .map_or(Ok(500), |v| number("what-if-batch", &v))?,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            // `cargo bench` passes `--bench`; filters and other flags are not ours.
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let known = [
                "--pending",
                "--burst",
                "--arm-tx",
                "--connections",
                "--unnest-batch",
                "--lead-ms",
                "--loops",
                "--what-if-batch",
            ];
            if flag == "--no-what-if" {
                options.what_if = false;
                continue;
            }
            if !known.contains(&flag.as_str()) {
                continue;
            }
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .with_context(|| format!("{flag} needs a value"))?,
            };
            let name = flag.trim_start_matches('-');
            match name {
                "pending" => options.pending = number(name, &value)?,
                "burst" => options.burst = number(name, &value)?,
                "arm-tx" => options.arm_tx = number(name, &value)?,
                "connections" => options.connections = number(name, &value)?,
                "unnest-batch" => options.unnest_batch = number(name, &value)?,
                "lead-ms" => options.lead = Duration::from_millis(number(name, &value)? as u64),
                "what-if-batch" => options.what_if_batch = number(name, &value)?,
                _ => options.loops = list(name, &value)?,
            }
        }
        if options.arm_tx == 0
            || options.connections == 0
            || options.unnest_batch == 0
            || options.burst == 0
            || options.what_if_batch == 0
            || options.loops.contains(&0)
        {
            bail!("arm-tx, connections, unnest-batch, burst and loops must be at least 1");
        }
        Ok(options)
    }
}

/// `url` (a server URL) pointing at database `database` instead.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A random 64-bit number (std only: the hasher's per-process random keys).
fn random_u64() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one((nanos, std::process::id()))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The order id of the `n`-th timer: shaped like the UUID v7 order ids the API
/// mints (a millisecond prefix that grows with `n`, 16 orders per
/// millisecond, then random bits), distinct for distinct `n`.
fn order_id(seed: u64, base_ms: u64, n: u64) -> String {
    let millis = base_ms + n / 16;
    let random = splitmix64(seed ^ n);
    format!(
        "{:08x}-{:04x}-7{:01x}{:02x}-{:04x}-{:012x}",
        (millis >> 16) & 0xffff_ffff,
        millis & 0xffff,
        n & 0xf,
        random & 0xff,
        0x8000 | ((random >> 8) & 0x3fff),
        (random >> 22) & 0xffff_ffff_ffff,
    )
}

/// Identifies the timers of one run.
#[derive(Clone, Copy, Debug)]
struct Ids {
    seed: u64,
    base_ms: u64,
}

impl Ids {
    fn get(self, n: u64) -> String {
        order_id(self.seed, self.base_ms, n)
    }
}

/// Connects a pool to `schema` of the benchmark database.
async fn connect(url: &str, schema: &str, max_connections: u32) -> anyhow::Result<Db> {
    let mut settings = Settings::defaults()?;
    settings.database_url = url.to_owned().into();
    Ok(Db::connect(&settings.database_url, schema, max_connections).await?)
}

/// `percentile_cont` of sorted `values`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[derive(Clone, Copy, Debug)]
enum ArmPath {
    /// `timers::arm`, one statement per timer, `arm_tx` per transaction.
    PerCall,
    /// One `INSERT … SELECT FROM UNNEST` per `unnest_batch` timers.
    Unnest,
}

/// Arms `options.pending` timers (due between 1 h and 2 h from now) on
/// `options.connections` connections at once; returns the elapsed time.
async fn arm_pending(
    db: &Db,
    options: &Options,
    ids: Ids,
    path: ArmPath,
) -> anyhow::Result<Duration> {
    let pending = options.pending;
    let chunk = match path {
        ArmPath::PerCall => options.arm_tx,
        ArmPath::Unnest => options.unnest_batch,
    };
    let base_due = Utc::now() + chrono::Duration::hours(1);
    let spread_us = 3_600_000_000_i64 / pending.max(1) as i64;
    let due = move |n: usize| base_due + chrono::Duration::microseconds(n as i64 * spread_us);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.connections {
        let pool = db.pool().clone();
        let next = next.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(1, Ordering::Relaxed) * chunk;
                if start >= pending {
                    return Ok::<(), anyhow::Error>(());
                }
                let end = (start + chunk).min(pending);
                match path {
                    ArmPath::PerCall => {
                        let mut tx = pool.begin().await?;
                        for n in start..end {
                            timers::arm(&mut tx, &ids.get(n as u64), Step::Flow, due(n)).await?;
                        }
                        tx.commit().await?;
                    }
                    ArmPath::Unnest => {
                        let order_ids: Vec<String> =
                            (start..end).map(|n| ids.get(n as u64)).collect();
                        let due_ats: Vec<DateTime<Utc>> = (start..end).map(due).collect();
                        sqlx::query(UNNEST_INSERT)
                            .bind(&order_ids)
                            .bind(&due_ats)
                            .execute(&pool)
                            .await?;
                    }
                }
                let before = done.fetch_add(end - start, Ordering::Relaxed);
                let tenth = (pending / 10).max(1);
                if (before + end - start) / tenth > before / tenth {
                    eprintln!(
                        "  {path:?}: {:>9} armed, {:>8.0} timers/s",
                        before + end - start,
                        rate(before + end - start, started.elapsed())
                    );
                }
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(started.elapsed())
}

/// Heap, indexes and total size of `timers` in the pool's schema.
async fn sizes(db: &Db) -> anyhow::Result<Value> {
    let (total, heap, pkey, due): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('timers'), pg_relation_size('timers'), \
         pg_relation_size('timers_pkey'), pg_relation_size('timers_due')",
    )
    .fetch_one(db.pool())
    .await?;
    Ok(json!({
        "total_mib": mib(total),
        "heap_mib": mib(heap),
        "pkey_mib": mib(pkey),
        "due_index_mib": mib(due),
    }))
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of `query`, line by line.
async fn explain(conn: &mut PgConnection, query: &str) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {query}")))
            .fetch_all(conn)
            .await?,
    )
}

fn execution_ms(plan: &[String]) -> Option<f64> {
    plan.iter().find_map(|line| {
        line.trim()
            .strip_prefix("Execution Time: ")?
            .strip_suffix(" ms")?
            .parse()
            .ok()
    })
}

fn uses_due_index(plan: &[String]) -> bool {
    plan.iter().any(|line| line.contains("using timers_due"))
}

/// Mean latency of one trivial statement on one pooled connection.
async fn round_trip_us(db: &Db) -> anyhow::Result<f64> {
    let mut conn = db.pool().acquire().await?;
    let rounds = 2_000;
    let started = Instant::now();
    for _ in 0..rounds {
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds))
}

/// What fires a burst.
#[derive(Clone, Copy, Debug)]
enum Firing {
    /// This many real `TimerLoop`s, each with its own pool, as separate
    /// coordinators would run them.
    TimerLoops(usize),
    /// One loop running [`set_based_fire_due`], the what-if prototype, with
    /// this claim batch.
    SetBased(usize),
}

/// What-if prototype of `TimerLoop::fire_due` doing per batch what the real
/// one does per timer, in one statement: claim the due timers, read their
/// sagas, mark them (fired if the saga runs, else disarmed; of one order's
/// claimed timers only the earliest fires) and disarm the fired orders' other
/// armed timers; the `UnitOfWork` then writes the `saga.timed-out` outbox rows
/// in the same transaction. Not used by the service; here to measure what
/// `src/timers.rs` would gain.
const SET_BASED_FIRE: &str = "\
    WITH claimed AS ( \
        SELECT order_id, step, due_at FROM timers WHERE state = 'armed' AND due_at <= now() \
        ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED \
    ), decided AS ( \
        SELECT c.order_id, c.step, \
               (s.status IS NULL OR s.status = 'running') \
               AND row_number() OVER (PARTITION BY c.order_id ORDER BY c.due_at, c.step) = 1 AS fire \
        FROM claimed c LEFT JOIN sagas s ON s.order_id = c.order_id \
    ), settled AS ( \
        UPDATE timers t SET state = CASE WHEN d.fire THEN 'fired' ELSE 'disarmed' END, \
                            settled_at = now() \
        FROM decided d WHERE t.order_id = d.order_id AND t.step = d.step AND t.state = 'armed' \
        RETURNING t.order_id, t.step, t.state \
    ), others AS ( \
        UPDATE timers t SET state = 'disarmed', settled_at = now() \
        FROM (SELECT DISTINCT order_id FROM decided WHERE fire) f \
        WHERE t.order_id = f.order_id AND t.state = 'armed' \
          AND NOT EXISTS (SELECT 1 FROM claimed c WHERE c.order_id = t.order_id AND c.step = t.step) \
    ) \
    SELECT order_id, step, state FROM settled";

/// One batch of the what-if prototype; returns how many timers it claimed.
async fn set_based_fire_due(db: &Db, batch: usize) -> Result<usize, sqlx::Error> {
    let mut unit = db.begin_unit_without_inbox().await?;
    let settled: Vec<(String, String, String)> = sqlx::query_as(SET_BASED_FIRE)
        .bind(batch as i64)
        .fetch_all(unit.conn())
        .await?;
    let claimed = settled.len();
    for (order_id, step, state) in settled {
        if state != "fired" {
            continue;
        }
        let step = match step.as_str() {
            "generate-info" => Step::GenerateInfo,
            "payment" => Step::Payment,
            _ => Step::Flow,
        };
        unit.emit(Outgoing::event(
            &Event::SagaTimedOut(SagaTimedOut { order_id, step }),
            None,
        ));
    }
    unit.commit().await?;
    Ok(claimed)
}

/// `TimerLoop::run`'s schedule around [`set_based_fire_due`].
async fn set_based_loop(db: Db, batch: usize, wake: Arc<TimerWake>, shutdown: Shutdown) {
    let max_sleep = Duration::from_secs(1);
    loop {
        match set_based_fire_due(&db, batch).await {
            Ok(n) if n >= batch => continue,
            Ok(_) => {}
            Err(error) => {
                eprintln!("set-based firing failed: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let next: Option<DateTime<Utc>> = sqlx::query_scalar(UNTIL_NEXT)
            .fetch_one(db.pool())
            .await
            .ok()
            .flatten();
        let sleep = next.map_or(max_sleep, |due| {
            (due - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(max_sleep)
        });
        if sleep.is_zero() {
            continue;
        }
        let woken = wake.notified();
        wake.sleeping_until(Utc::now() + chrono::Duration::from_std(sleep).unwrap_or_default());
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = woken => {}
            () = tokio::time::sleep(sleep) => {}
        }
        wake.awake();
    }
}

/// Median round trip (ms) of one statement whose parameter is 1 to 128 KiB.
/// sqlx 0.9.0 does not set `TCP_NODELAY` (sqlx issue #4335) and writes a
/// message in pieces of about 16 KiB: the last piece of a longer one waits
/// (Nagle) for the server's delayed ACK, about 40 ms on Linux. Every batch the
/// timer loop fires ends with such a message (the outbox rows).
async fn large_message_ms(db: &Db) -> anyhow::Result<Value> {
    let mut conn = db.pool().acquire().await?;
    let mut out = serde_json::Map::new();
    for kib in [1, 15, 17, 64, 128] {
        let payload = "x".repeat(kib * 1024);
        let mut times = Vec::new();
        for _ in 0..7 {
            let started = Instant::now();
            sqlx::query("SELECT length($1::text)")
                .bind(&payload)
                .execute(&mut *conn)
                .await?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        out.insert(format!("{kib}_kib"), json!(times[times.len() / 2]));
    }
    Ok(Value::Object(out))
}

/// Arms `options.burst` timers due at one instant, fires them with `firing`
/// and measures their lateness.
async fn burst(
    url: &str,
    db: &Db,
    options: &Options,
    ids: Ids,
    first: u64,
    firing: Firing,
    arm_rate: f64,
) -> anyhow::Result<Value> {
    let loops = match firing {
        Firing::TimerLoops(loops) => loops,
        Firing::SetBased(_) => 1,
    };
    let size = options.burst;
    let order_ids: Vec<String> = (0..size as u64).map(|j| ids.get(first + j)).collect();
    let outbox_before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
        .fetch_one(db.pool())
        .await?;
    // The loops start before the burst is armed, as a running coordinator's
    // would be: connected, idle, sleeping until the next deadline (capped at 1 s).
    let shutdown = Shutdown::new();
    let mut wakes = Vec::new();
    let mut loop_dbs = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..loops {
        let loop_db = connect(url, Context::Coordinator.schema(), 4).await?;
        let wake = Arc::new(TimerWake::default());
        handles.push(match firing {
            Firing::TimerLoops(_) => {
                tokio::spawn(TimerLoop::new(loop_db.clone(), wake.clone()).run(shutdown.clone()))
            }
            Firing::SetBased(batch) => tokio::spawn(set_based_loop(
                loop_db.clone(),
                batch,
                wake.clone(),
                shutdown.clone(),
            )),
        });
        loop_dbs.push(loop_db);
        wakes.push(wake);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Due after the expected arming time (twice the phase-1 rate) + the lead.
    let expected_arming = Duration::from_secs_f64(2.0 * size as f64 / arm_rate.max(1.0));
    let armed_from = Utc::now();
    let due_at = armed_from + chrono::Duration::from_std(expected_arming + options.lead)?;
    let mut tx = db.pool().begin().await?;
    for order_id in &order_ids {
        timers::arm(&mut tx, order_id, Step::Flow, due_at).await?;
    }
    tx.commit().await?;
    let armed_at = Utc::now();
    // A coordinator tells its loop about the deadline it armed.
    for wake in &wakes {
        wake.armed(due_at);
    }
    if armed_at >= due_at {
        bail!("arming the burst took longer than its lead; raise --lead-ms");
    }

    // Commit observations: (server clock, saga.timed-out rows committed).
    let mut observed: Vec<(DateTime<Utc>, i64)> = Vec::new();
    let give_up = Instant::now() + (due_at - Utc::now()).to_std()? + BURST_PATIENCE;
    loop {
        tokio::time::sleep(COMMIT_POLL).await;
        let (at, count): (DateTime<Utc>, i64) = sqlx::query_as(
            "SELECT clock_timestamp(), count(*) FROM outbox \
             WHERE id > $1 AND routing_key = 'saga.timed-out'",
        )
        .bind(outbox_before)
        .fetch_one(db.pool())
        .await?;
        if observed.last().is_none_or(|&(_, last)| count > last) {
            observed.push((at, count));
        }
        if count >= size as i64 {
            break;
        }
        if Instant::now() > give_up {
            bail!(
                "only {count} of {size} timers fired within {BURST_PATIENCE:?} of their due time"
            );
        }
    }
    shutdown.cancel();
    for handle in handles {
        handle.await?;
    }
    for loop_db in loop_dbs {
        loop_db.close().await;
    }

    // Lateness of each timer's commit, from the step function of the count.
    let mut commit_lateness = Vec::with_capacity(size);
    let mut previous = 0_i64;
    for &(at, count) in &observed {
        let late = (at - due_at).as_seconds_f64() * 1e3;
        for _ in previous..count.min(size as i64) {
            commit_lateness.push(late);
        }
        previous = count;
    }
    commit_lateness.sort_by(f64::total_cmp);
    let first_commit = observed
        .iter()
        .find(|&&(_, count)| count > 0)
        .map_or(f64::NAN, |&(at, _)| (at - due_at).as_seconds_f64() * 1e3);
    let all_committed = commit_lateness.last().copied().unwrap_or(f64::NAN);

    // Lateness of settled_at (the start of each firing transaction), in SQL.
    let stats: (i64, i64, Vec<f64>, f64, f64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'fired'), count(*), \
         percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP \
             (ORDER BY extract(epoch FROM settled_at - due_at) * 1000), \
         min(extract(epoch FROM settled_at - due_at) * 1000)::float8, \
         max(extract(epoch FROM settled_at - due_at) * 1000)::float8, \
         count(DISTINCT settled_at) \
         FROM timers WHERE order_id = ANY($1) AND due_at = $2",
    )
    .bind(&order_ids)
    .bind(due_at)
    .fetch_one(db.pool())
    .await?;
    let (fired, burst_rows, settled_pcts, settled_min, settled_max, transactions) = stats;
    let (outbox_rows, outbox_distinct, outbox_ours): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT correlation_id), \
         count(*) FILTER (WHERE correlation_id = ANY($2)) \
         FROM outbox WHERE id > $1 AND routing_key = 'saga.timed-out'",
    )
    .bind(outbox_before)
    .bind(&order_ids)
    .fetch_one(db.pool())
    .await?;
    let exactly_once = fired == size as i64
        && burst_rows == size as i64
        && outbox_rows == size as i64
        && outbox_distinct == size as i64
        && outbox_ours == size as i64;
    let drain = Duration::from_secs_f64((all_committed / 1e3).max(0.0));
    let pct = |i: usize| settled_pcts.get(i).copied().unwrap_or(f64::NAN);
    Ok(json!({
        "firing": match firing {
            Firing::TimerLoops(_) => "timer_loop",
            Firing::SetBased(_) => "set_based_prototype",
        },
        "claim_batch": match firing {
            Firing::TimerLoops(_) => 500,
            Firing::SetBased(batch) => batch,
        },
        "loops": loops,
        "burst": size,
        "armed_before_due_ms": (due_at - armed_at).as_seconds_f64() * 1e3,
        "arm_burst_timers_per_s": rate(size, (armed_at - armed_from).to_std()?),
        "settled_lateness_ms": {
            "min": settled_min, "p50": pct(0), "p95": pct(1), "p99": pct(2), "max": settled_max,
        },
        "commit_lateness_ms": {
            "first": first_commit,
            "p50": percentile(&commit_lateness, 0.5),
            "p95": percentile(&commit_lateness, 0.95),
            "p99": percentile(&commit_lateness, 0.99),
            "max": all_committed,
        },
        "all_fired_after_due_ms": all_committed,
        "fire_rate_per_s": rate(size, drain),
        "firing_transactions": transactions,
        "commit_observations": observed.len(),
        "fired": fired,
        "outbox_timed_out_rows": outbox_rows,
        "outbox_distinct_orders": outbox_distinct,
        "exactly_once": exactly_once,
    }))
}

/// Plans of the loop's two queries: idle (nothing due, `pending` armed) and
/// with `due` timers due, the latter inside a transaction that is rolled back.
async fn plans(db: &Db, ids: Ids, first: u64, due: usize) -> anyhow::Result<Value> {
    let mut conn = db.pool().acquire().await?;
    let idle_claim = explain(&mut conn, CLAIM).await?;
    let idle_next = explain(&mut conn, UNTIL_NEXT).await?;
    let mut tx = conn.begin().await?;
    let order_ids: Vec<String> = (0..due as u64).map(|j| ids.get(first + j)).collect();
    let due_ats = vec![Utc::now() - chrono::Duration::seconds(1); due];
    sqlx::query(UNNEST_INSERT)
        .bind(&order_ids)
        .bind(&due_ats)
        .execute(&mut *tx)
        .await?;
    let due_claim = explain(&mut tx, CLAIM).await?;
    let due_next = explain(&mut tx, UNTIL_NEXT).await?;
    tx.rollback().await?;
    for (title, plan) in [
        ("claim, nothing due", &idle_claim),
        ("until_next, nothing due", &idle_next),
        ("claim, burst due", &due_claim),
        ("until_next, burst due", &due_next),
    ] {
        println!("\n-- EXPLAIN (ANALYZE, BUFFERS): {title}");
        for line in plan {
            println!("   {line}");
        }
    }
    Ok(json!({
        "claim_uses_due_index": uses_due_index(&idle_claim) && uses_due_index(&due_claim),
        "claim_idle_ms": execution_ms(&idle_claim),
        "claim_due_ms": execution_ms(&due_claim),
        "until_next_idle_ms": execution_ms(&idle_next),
        "until_next_due_ms": execution_ms(&due_next),
    }))
}

/// The 1-, 5- and 15-minute load averages (other work on the machine skews
/// every figure).
fn load_average() -> Option<Vec<f64>> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace()
        .take(3)
        .map(|part| part.parse().ok())
        .collect()
}

/// What the benchmark ran on.
async fn machine(db: &Db) -> anyhow::Result<Value> {
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(db.pool())
        .await?;
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / (1024.0 * 1024.0))
        });
    Ok(json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "memory_gib": memory_gib,
        "postgres": postgres,
        "rustc": rustc,
        "load_average_at_start": load_average(),
        // A TCP_NODELAY shim, when the run measures what sqlx's fix would change.
        "ld_preload": std::env::var("LD_PRELOAD").ok(),
    }))
}

/// The whole benchmark, on the fresh database at `url`.
async fn run(options: Options, url: String) -> anyhow::Result<Value> {
    let mut settings = Settings::defaults()?;
    settings.database_url = url.clone().into();
    let pool_size = options.connections as u32 + 4;
    let db = Db::for_context(&settings.database_url, Context::Coordinator, pool_size).await?;
    let machine = machine(&db).await?;
    let round_trip = round_trip_us(&db).await?;
    let large_message = large_message_ms(&db).await?;
    let ids = Ids {
        seed: random_u64(),
        base_ms: Utc::now().timestamp_millis() as u64,
    };

    println!(
        "phase 1: arming {} timers through timers::arm ({} per transaction, {} connections)",
        options.pending, options.arm_tx, options.connections
    );
    let per_call = arm_pending(&db, &options, ids, ArmPath::PerCall).await?;
    let per_call_sizes = sizes(&db).await?;
    println!(
        "phase 1b: the same {} timers through INSERT … SELECT FROM UNNEST ({} per statement) \
         into a scratch schema",
        options.pending, options.unnest_batch
    );
    let scratch = connect(&url, CEILING_SCHEMA, pool_size).await?;
    scratch
        .migrate(Some(&Context::Coordinator.migrator()))
        .await?;
    let unnest = arm_pending(&scratch, &options, ids, ArmPath::Unnest).await?;
    let unnest_sizes = sizes(&scratch).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA \"{CEILING_SCHEMA}\" CASCADE"
    )))
    .execute(scratch.pool())
    .await?;
    scratch.close().await;
    // A settled table, as autovacuum would leave it, so that it does not run
    // in the middle of a burst.
    let vacuum_started = Instant::now();
    sqlx::query("VACUUM (ANALYZE) timers")
        .execute(db.pool())
        .await?;
    let vacuum = vacuum_started.elapsed();

    let per_call_rate = rate(options.pending, per_call);
    let mut bursts = Vec::new();
    for (i, &loops) in options.loops.iter().enumerate() {
        println!(
            "phase 2.{}: a burst of {} timers due at one instant, {loops} TimerLoop(s), \
             {} pending",
            i + 1,
            options.burst,
            options.pending
        );
        let first = (options.pending + i * options.burst) as u64;
        let firing = Firing::TimerLoops(loops);
        bursts.push(burst(&url, &db, &options, ids, first, firing, per_call_rate).await?);
    }
    let mut first = (options.pending + options.loops.len() * options.burst) as u64;
    if options.what_if {
        println!(
            "phase 2.{}: what-if: a burst of {} timers fired by one loop of the set-based \
             prototype of fire_due (claim batch {})",
            options.loops.len() + 1,
            options.burst,
            options.what_if_batch
        );
        let firing = Firing::SetBased(options.what_if_batch);
        bursts.push(burst(&url, &db, &options, ids, first, firing, per_call_rate).await?);
        first += options.burst as u64;
    }
    let plans = plans(&db, ids, first, options.burst).await?;
    db.close().await;
    let mut machine = machine;
    machine["load_average_at_end"] = json!(load_average());

    Ok(json!({
        "benchmark": "timers",
        "machine": machine,
        "options": {
            "pending": options.pending,
            "burst": options.burst,
            "arm_tx": options.arm_tx,
            "connections": options.connections,
            "unnest_batch": options.unnest_batch,
            "lead_ms": options.lead.as_millis() as u64,
            "loops": options.loops,
            "what_if": options.what_if,
            "what_if_batch": options.what_if_batch,
        },
        "round_trip_us": round_trip,
        "large_message_round_trip_ms": large_message,
        "arm": {
            "per_call": {
                "seconds": per_call.as_secs_f64(),
                "timers_per_s": per_call_rate,
                "size": per_call_sizes,
            },
            "unnest": {
                "seconds": unnest.as_secs_f64(),
                "timers_per_s": rate(options.pending, unnest),
                "size": unnest_sizes,
            },
            "vacuum_analyze_s": vacuum.as_secs_f64(),
        },
        "bursts": bursts,
        "plans": plans,
    }))
}

fn f(value: &Value) -> String {
    match value.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => value.to_string(),
    }
}

fn print_summary(report: &Value) {
    let arm = &report["arm"];
    println!("\n== timers benchmark ==");
    println!(
        "machine: {} cpus, {} GiB, PostgreSQL {}, {}",
        report["machine"]["cpus"],
        f(&report["machine"]["memory_gib"]),
        report["machine"]["postgres"].as_str().unwrap_or("?"),
        report["machine"]["rustc"].as_str().unwrap_or("?"),
    );
    println!(
        "load average at start {}, at end {}",
        report["machine"]["load_average_at_start"], report["machine"]["load_average_at_end"]
    );
    println!("round trip (SELECT 1): {} µs", f(&report["round_trip_us"]));
    let large = &report["large_message_round_trip_ms"];
    println!(
        "round trip with a 1 / 15 / 17 / 64 / 128 KiB parameter: {} / {} / {} / {} / {} ms{}",
        f(&large["1_kib"]),
        f(&large["15_kib"]),
        f(&large["17_kib"]),
        f(&large["64_kib"]),
        f(&large["128_kib"]),
        report["machine"]["ld_preload"]
            .as_str()
            .map_or(String::new(), |preload| format!(" (LD_PRELOAD={preload})")),
    );
    println!(
        "\n{:<44} {:>10} {:>12} {:>12}",
        "arming", "seconds", "timers/s", "table MiB"
    );
    for (name, key) in [
        ("timers::arm, per call", "per_call"),
        ("INSERT … SELECT FROM UNNEST (ceiling)", "unnest"),
    ] {
        println!(
            "{:<44} {:>10} {:>12} {:>12}",
            name,
            f(&arm[key]["seconds"]),
            f(&arm[key]["timers_per_s"]),
            f(&arm[key]["size"]["total_mib"]),
        );
    }
    let size = &arm["per_call"]["size"];
    println!(
        "timers after per-call arming: heap {} MiB, timers_pkey {} MiB, timers_due {} MiB; \
         VACUUM ANALYZE {} s",
        f(&size["heap_mib"]),
        f(&size["pkey_mib"]),
        f(&size["due_index_mib"]),
        f(&arm["vacuum_analyze_s"]),
    );
    println!(
        "\n{:<14} {:<22} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11} {:>7}",
        "firing", "lateness (ms)", "p50", "p95", "p99", "max", "all in", "fired/s", "once"
    );
    for burst in report["bursts"].as_array().into_iter().flatten() {
        let firing = if burst["firing"] == "timer_loop" {
            format!("{} loop(s)", burst["loops"])
        } else {
            format!("set-based/{}", burst["claim_batch"])
        };
        for (name, key) in [
            ("settled_at − due_at", "settled_lateness_ms"),
            ("commit − due_at", "commit_lateness_ms"),
        ] {
            println!(
                "{:<14} {:<22} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11} {:>7}",
                firing,
                name,
                f(&burst[key]["p50"]),
                f(&burst[key]["p95"]),
                f(&burst[key]["p99"]),
                f(&burst[key]["max"]),
                f(&burst["all_fired_after_due_ms"]),
                f(&burst["fire_rate_per_s"]),
                burst["exactly_once"],
            );
        }
    }
    let plans = &report["plans"];
    println!(
        "\nclaim query: partial index timers_due used: {}; {} ms with nothing due, {} ms with a \
         burst due; until_next {} / {} ms",
        plans["claim_uses_due_index"],
        f(&plans["claim_idle_ms"]),
        f(&plans["claim_due_ms"]),
        f(&plans["until_next_idle_ms"]),
        f(&plans["until_next_due_ms"]),
    );
    println!("\n{report}");
}

async fn drop_database(admin_url: &str, database: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("timers benchmark: {error:#}");
            return ExitCode::from(2);
        }
    };
    let admin_url = std::env::var("ORDERFLOW_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let database = format!("orderflow_bench_{:012x}", random_u64() & 0xffff_ffff_ffff);
    let created = async {
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = created {
        eprintln!("timers benchmark: cannot create database {database}: {error:#}");
        return ExitCode::FAILURE;
    }
    eprintln!("timers benchmark: database {database}");

    // The phases run in their own task, so that a panic or an interruption
    // still reaches the cleanup below.
    let mut work = tokio::spawn(run(options, with_database(&admin_url, &database)));
    let outcome = tokio::select! {
        joined = &mut work => match joined {
            Ok(result) => result,
            Err(error) => Err(anyhow::anyhow!("benchmark task failed: {error}")),
        },
        () = interrupted() => {
            work.abort();
            let _ = work.await;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    match drop_database(&admin_url, &database).await {
        Ok(()) => eprintln!("timers benchmark: dropped database {database}"),
        Err(error) => eprintln!(
            "timers benchmark: could not drop database {database}: {error:#}; \
             drop it by hand"
        ),
    }
    match outcome {
        Ok(report) => {
            print_summary(&report);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("timers benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}
