//! Benchmark of the durable timers (`saga_coordinator::timers`), on the real
//! PostgreSQL: how fast a million pending timers are armed, and how late a
//! burst of timers that fall due at the same instant fires.
//!
//! ```sh
//! cargo bench -p orderflow-bench --bench timers
//! cargo bench -p orderflow-bench --bench timers -- --pending 100000 --burst 2000
//! ```
//!
//! Sizes come from the arguments or from `TIMERS_BENCH_*` variables (see
//! `--help`). The server is `ORDERFLOW_BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the benchmark creates a
//! database `orderflow_bench_timers_<tag>` on it and drops it at the end, also
//! when a phase fails or the run is interrupted (Ctrl-C, SIGTERM).
//!
//! Lateness is measured two ways: `settled_at − due_at` (`fire` sets
//! `settled_at = now()`, which PostgreSQL fixes at the *start* of the firing
//! transaction, i.e. when the batch was claimed), and commit − `due_at`: the
//! moment the timer's `saga.timed-out` row became visible in the outbox, which
//! is when a relay could publish it. The commit moments are observed by reading
//! `clock_timestamp()` and the count of committed `saga.timed-out` rows every
//! 2 ms, so they are upper bounds by about 2 ms plus one round trip. Both
//! clocks are the database server's. The plans are those of the service's own
//! queries (`timers::FIRE_DUE`, `timers::UNTIL_NEXT`).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use orderflow_shared::Shutdown;
use orderflow_shared::app::shutdown_on_signal;
use orderflow_shared::events::Step;
use orderflow_shared::store::{Context, Db};
use saga_coordinator::timers::{self, FIRE_DUE, TimerLoop, TimerWake, UNTIL_NEXT};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::scratch::ScratchDatabase;
use crate::stats::{percentile, rate};

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

/// The sizes of one run.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "timers",
    about = "Benchmark of the saga coordinator's durable timers on the real PostgreSQL"
)]
pub struct Options {
    /// Timers armed far in the future (1–2 h) before the bursts
    #[arg(long, env = "TIMERS_BENCH_PENDING", default_value_t = 1_000_000)]
    pub pending: usize,
    /// Timers due at the same instant, per burst
    #[arg(long, env = "TIMERS_BENCH_BURST", default_value_t = 10_000, value_parser = at_least_one)]
    pub burst: usize,
    /// `timers::arm` calls per transaction
    #[arg(long, env = "TIMERS_BENCH_ARM_TX", default_value_t = 1_000, value_parser = at_least_one)]
    pub arm_tx: usize,
    /// Connections arming at once
    #[arg(long, env = "TIMERS_BENCH_CONNECTIONS", default_value_t = 2, value_parser = at_least_one)]
    pub connections: usize,
    /// Rows per `INSERT … SELECT FROM UNNEST` (the ceiling for arming)
    #[arg(long, env = "TIMERS_BENCH_UNNEST_BATCH", default_value_t = 10_000, value_parser = at_least_one)]
    pub unnest_batch: usize,
    /// How long after the burst is armed it falls due (ms)
    #[arg(long = "lead-ms", env = "TIMERS_BENCH_LEAD_MS", default_value = "2000", value_parser = parse_millis)]
    pub lead: Duration,
    /// One burst per entry, fired by that many `TimerLoop`s (e.g. 1,2)
    #[arg(long, env = "TIMERS_BENCH_LOOPS", value_delimiter = ',', default_value = "1,2", value_parser = at_least_one)]
    pub loops: Vec<usize>,
    /// The server the benchmark's throwaway database is created on
    #[arg(
        long,
        env = "ORDERFLOW_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub server: SecretString,
    /// `cargo bench` passes `--bench` to every benchmark; ignored
    #[arg(long, hide = true)]
    pub bench: bool,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.replace(['_', ','], "").parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(error) => Err(format!("`{value}` is not a number: {error}")),
    }
}

fn parse_millis(value: &str) -> Result<Duration, String> {
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|error| format!("`{value}` is not a number of milliseconds: {error}"))
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
async fn connect(url: &SecretString, schema: &str, max_connections: u32) -> anyhow::Result<Db> {
    Ok(Db::connect(url, schema, max_connections).await?)
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
                            timers::arm(&mut tx, &ids.get(n as u64), &[(Step::Flow, due(n))])
                                .await?;
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

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of `query` (bound to the
/// service's claim batch when it takes one): the plan as PostgreSQL gives it.
async fn explain(
    conn: &mut PgConnection,
    query: &str,
    batch: Option<i64>,
) -> anyhow::Result<Value> {
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}");
    let mut statement = sqlx::query_scalar::<_, Value>(AssertSqlSafe(explain));
    if let Some(batch) = batch {
        statement = statement.bind(batch);
    }
    let plan = statement.fetch_one(conn).await?;
    Ok(plan.get(0).cloned().unwrap_or(plan))
}

/// The execution time a JSON plan reports.
fn execution_ms(plan: &Value) -> Option<f64> {
    plan["Execution Time"].as_f64()
}

/// Whether any node of a JSON plan reads the partial index `timers_due`.
fn uses_due_index(plan: &Value) -> bool {
    match plan {
        Value::Object(node) => {
            node.get("Index Name")
                .is_some_and(|name| name == "timers_due")
                || node.values().any(uses_due_index)
        }
        Value::Array(nodes) => nodes.iter().any(uses_due_index),
        _ => false,
    }
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
    url: &SecretString,
    db: &Db,
    options: &Options,
    ids: Ids,
    first: u64,
    loops: usize,
    arm_rate: f64,
) -> anyhow::Result<Value> {
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
        handles.push(tokio::spawn(
            TimerLoop::new(loop_db.clone(), wake.clone()).run(shutdown.clone()),
        ));
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
        timers::arm(&mut tx, order_id, &[(Step::Flow, due_at)]).await?;
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
        "loops": loops,
        "burst": size,
        "armed_before_due_ms": (due_at - armed_at).as_seconds_f64() * 1e3,
        "arm_burst_timers_per_s": rate(size, (armed_at - armed_from).to_std()?),
        "settled_lateness_ms": {
            "min": settled_min, "p50": pct(0), "p95": pct(1), "p99": pct(2), "max": settled_max,
        },
        "commit_lateness_ms": {
            "first": first_commit,
            "p50": percentile(&commit_lateness, 50.0),
            "p95": percentile(&commit_lateness, 95.0),
            "p99": percentile(&commit_lateness, 99.0),
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

/// The whole benchmark, on the fresh database at `url`.
async fn run(options: Options, url: SecretString) -> anyhow::Result<Value> {
    let pool_size = options.connections as u32 + 4;
    let db = Db::for_context(&url, Context::Coordinator, pool_size).await?;
    let machine = machine(&db).await?;
    let round_trip = round_trip_us(&db).await?;
    let large_message = large_message_ms(&db).await?;
    let ids = Ids {
        seed: fastrand::u64(..),
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
        bursts.push(burst(&url, &db, &options, ids, first, loops, per_call_rate).await?);
    }
    let first = (options.pending + options.loops.len() * options.burst) as u64;
    let plans = plans(&db, ids, first, options.burst).await?;
    db.close().await;
    let mut machine = machine;
    machine["load_average_at_end"] = json!(crate::machine::load_average());

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
        "machine: {} cpus, {} GiB, PostgreSQL {}",
        report["machine"]["cpus"],
        f(&report["machine"]["memory_gib"]),
        report["machine"]["postgres"].as_str().unwrap_or("?"),
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
        let firing = format!("{} loop(s)", burst["loops"]);
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

/// Plans of the loop's two queries (the service's own): idle (nothing due,
/// `pending` armed) and with `due` timers due, inside a transaction that is
/// rolled back (the claim's `EXPLAIN ANALYZE` fires them).
async fn plans(db: &Db, ids: Ids, first: u64, due: usize) -> anyhow::Result<Value> {
    let mut conn = db.pool().acquire().await?;
    let batch = Some(timers::FIRE_BATCH);
    let mut idle = conn.begin().await?;
    let idle_claim = explain(&mut idle, FIRE_DUE, batch).await?;
    let idle_next = explain(&mut idle, UNTIL_NEXT, None).await?;
    idle.rollback().await?;
    let mut tx = conn.begin().await?;
    let order_ids: Vec<String> = (0..due as u64).map(|j| ids.get(first + j)).collect();
    let due_ats = vec![Utc::now() - chrono::Duration::seconds(1); due];
    sqlx::query(UNNEST_INSERT)
        .bind(&order_ids)
        .bind(&due_ats)
        .execute(&mut *tx)
        .await?;
    let due_claim = explain(&mut tx, FIRE_DUE, batch).await?;
    let due_next = explain(&mut tx, UNTIL_NEXT, None).await?;
    tx.rollback().await?;
    Ok(json!({
        "claim_uses_due_index": uses_due_index(&idle_claim) && uses_due_index(&due_claim),
        "claim_idle_ms": execution_ms(&idle_claim),
        "claim_due_ms": execution_ms(&due_claim),
        "until_next_idle_ms": execution_ms(&idle_next),
        "until_next_due_ms": execution_ms(&due_next),
    }))
}

/// What the benchmark ran on.
async fn machine(db: &Db) -> anyhow::Result<Value> {
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(db.pool())
        .await?;
    let mut facts = crate::machine::facts();
    facts["postgres"] = json!(postgres);
    facts["load_average_at_start"] = facts["load_average"].take();
    // A TCP_NODELAY shim, when the run measures what sqlx's fix would change.
    facts["ld_preload"] = json!(std::env::var("LD_PRELOAD").ok());
    Ok(facts)
}

/// The whole benchmark: a throwaway database on `options.server`, the
/// phases, the database dropped (also on failure or Ctrl-C), the summary.
pub async fn main(options: Options) -> ExitCode {
    let scratch = match ScratchDatabase::create(&options.server, "orderflow_bench_timers").await {
        Ok(scratch) => scratch,
        Err(error) => {
            eprintln!("timers benchmark: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("timers benchmark: database {}", scratch.name());
    // The phases run in their own task, so that a failure or an interruption
    // still reaches the cleanup below.
    let interrupted = shutdown_on_signal();
    let mut work = tokio::spawn(run(options, scratch.url().clone()));
    let outcome = tokio::select! {
        joined = &mut work => match joined {
            Ok(result) => result,
            Err(error) => Err(anyhow::anyhow!("benchmark task failed: {error}")),
        },
        () = interrupted.cancelled() => {
            work.abort();
            let _ = work.await;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    let name = scratch.name().to_owned();
    match scratch.drop_now().await {
        Ok(()) => eprintln!("timers benchmark: dropped database {name}"),
        Err(error) => eprintln!("timers benchmark: {error:#}"),
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
