//! The faults of a chaos run and their record. Every injection is logged
//! with its time (wall clock and seconds into the run), how long it took and
//! the evidence that it really happened (a process that ended by SIGKILL, a
//! node that refused connections while stopped, a PostgreSQL that came back
//! with another process id, connections the broker says it closed,
//! messages the broker confirmed), so that a run without faults cannot pass
//! for one with them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use orderflow_shared::bus::{Broker, MANDATORY};
use tokio::time::Instant;

use super::postgres::Postgres;
use super::rabbit::Rabbit;
use super::workers::Workers;

/// Time since the run started, and the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    wall: DateTime<Utc>,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            wall: Utc::now(),
        }
    }

    pub fn secs(&self) -> f64 {
        (self.start.elapsed().as_millis() as f64 / 1000.0 * 1000.0).round() / 1000.0
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.wall
    }
}

/// One injected fault.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fault {
    pub kind: String,
    pub target: String,
    /// When it began (RFC 3339) and seconds into the run.
    pub at: String,
    pub at_secs: f64,
    pub duration_ms: u64,
    /// It happened, as the evidence shows; false with the reason otherwise.
    pub injected: bool,
    pub evidence: String,
}

/// The parts the faults act on, and their record.
pub struct Rig {
    pub clock: Clock,
    pub rabbit: tokio::sync::Mutex<Rabbit>,
    pub postgres: tokio::sync::Mutex<Postgres>,
    pub workers: tokio::sync::Mutex<Workers>,
    /// The run's own broker handle (fails over like the workers').
    pub broker: Broker,
    pub log: Mutex<Vec<Fault>>,
    /// Poison published per dead-letter queue: message ids.
    pub poison: Mutex<BTreeMap<String, Vec<String>>>,
    /// Duplicates published per routing key.
    pub duplicates: Mutex<BTreeMap<String, u64>>,
    /// The last message seen per routing key on the tap (properties, body).
    pub samples: Mutex<HashMap<String, (BasicProperties, Vec<u8>)>>,
}

impl Rig {
    /// Runs `inject` and records it as `kind` on `target`.
    pub async fn record<F>(&self, kind: &str, target: &str, inject: F) -> bool
    where
        F: std::future::Future<Output = anyhow::Result<String>>,
    {
        let at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let at_secs = self.clock.secs();
        let began = Instant::now();
        let result = inject.await;
        let injected = result.is_ok();
        let evidence = match result {
            Ok(evidence) => evidence,
            Err(error) => format!("NOT injected: {error:#}"),
        };
        tracing::warn!(kind, target, injected, %evidence, "chaos: fault");
        eprintln!("[{at_secs:7.1}s] fault {kind} on {target}: {evidence}");
        self.log.lock().expect("fault log").push(Fault {
            kind: kind.to_owned(),
            target: target.to_owned(),
            at,
            at_secs,
            duration_ms: began.elapsed().as_millis() as u64,
            injected,
            evidence,
        });
        injected
    }

    /// `rabbitmqctl close_all_connections` on every running node (each
    /// closes its own), after counting the cluster's connections.
    pub async fn close_all_connections(&self) -> anyhow::Result<String> {
        let rabbit = self.rabbit.lock().await;
        let running: Vec<usize> = (0..rabbit.nodes.len())
            .filter(|i| rabbit.nodes[*i].pid().is_some())
            .collect();
        let first = *running.first().context("no node running")?;
        let before = rabbit
            .ctl(
                first,
                &["list_connections", "-q", "--no-table-headers", "name"],
            )
            .await?;
        let open = before.lines().filter(|l| !l.trim().is_empty()).count();
        anyhow::ensure!(open > 0, "no connection was open to close");
        let closing = running.iter().map(|i| {
            rabbit.ctl(
                *i,
                &["close_all_connections", "chaos: every connection closed"],
            )
        });
        for closed in futures::future::join_all(closing).await {
            closed?;
        }
        Ok(format!(
            "{open} connections open in the broker; close_all_connections on {} node(s)",
            running.len()
        ))
    }

    /// `stop_app`, `down`, `start_app` on node `i`, checking that it
    /// refused AMQP while stopped.
    pub async fn stop_start_app(&self, i: usize, down: Duration) -> anyhow::Result<String> {
        let mut rabbit = self.rabbit.lock().await;
        rabbit.ctl(i, &["stop_app"]).await?;
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", rabbit.nodes[i].port))
            .await
            .is_err();
        tokio::time::sleep(down).await;
        rabbit.ctl(i, &["start_app"]).await?;
        rabbit.wait_listening(i, Duration::from_mins(2)).await?;
        anyhow::ensure!(
            refused,
            "node {} still took connections after stop_app",
            rabbit.nodes[i].name
        );
        Ok(format!(
            "stop_app on {}: AMQP refused while stopped; start_app after {down:?}",
            rabbit.nodes[i].name
        ))
    }

    /// SIGKILL of node `i`, `down`, started again and back in the cluster.
    pub async fn kill_node(&self, i: usize, down: Duration) -> anyhow::Result<String> {
        let mut rabbit = self.rabbit.lock().await;
        let pid = rabbit.kill(i)?;
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", rabbit.nodes[i].port))
            .await
            .is_err();
        anyhow::ensure!(
            refused,
            "node {} took connections after SIGKILL",
            rabbit.nodes[i].name
        );
        tokio::time::sleep(down).await;
        let began = Instant::now();
        rabbit.spawn(i)?;
        rabbit.wait_listening(i, Duration::from_mins(2)).await?;
        let count = rabbit.nodes.len();
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let running = rabbit.running_nodes(i).await.unwrap_or_default();
            if running.len() == count {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {} did not rejoin: {running:?}",
                rabbit.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(format!(
            "pid {pid} of {} ended by SIGKILL; AMQP refused; restarted and back in the cluster after {:.1} s",
            rabbit.nodes[i].name,
            began.elapsed().as_secs_f64()
        ))
    }

    /// PostgreSQL stopped with `mode` and started again.
    pub async fn restart_postgres(&self, mode: &str) -> anyhow::Result<String> {
        let mut postgres = self.postgres.lock().await;
        let began = Instant::now();
        let (old, new) = postgres.restart(mode).await?;
        anyhow::ensure!(old != new, "the same postmaster {old} after the restart");
        Ok(format!(
            "pg_ctl stop -m {mode}: postmaster {old} ended; {new} took connections after {:.2} s",
            began.elapsed().as_secs_f64()
        ))
    }

    /// SIGKILL of one instance of worker `name`, started again after `down`.
    pub async fn kill_worker(
        &self,
        name: &str,
        down: Duration,
        pick: usize,
    ) -> anyhow::Result<String> {
        let mut workers = self.workers.lock().await;
        let instances: Vec<usize> = workers
            .procs
            .iter()
            .enumerate()
            .filter(|(_, w)| w.name == name)
            .map(|(i, _)| i)
            .collect();
        anyhow::ensure!(!instances.is_empty(), "no worker {name}");
        let i = instances[pick % instances.len()];
        let label = workers.procs[i].label();
        let pid = workers.kill(i)?;
        drop(workers);
        tokio::time::sleep(down).await;
        let new = self.workers.lock().await.spawn(i)?;
        Ok(format!(
            "{label}: pid {pid} ended by SIGKILL; started again as {new} after {down:?}"
        ))
    }

    /// Malformed messages on every service queue: through its redeliver
    /// exchange (which leads to that queue only), with a routing key it
    /// reads, one body that is not JSON and one that does not fit its
    /// event; each must end in the service's dead letters with its reason.
    pub async fn poison(&self, run_id: &str) -> anyhow::Result<String> {
        let topology = self.broker.topology().clone();
        let names = &topology.names;
        let mut published = 0;
        for service in &topology.services {
            let Some(key) = service
                .routing_keys
                .iter()
                .find(|k| !k.contains(['*', '#']))
            else {
                continue;
            };
            let dead = names.dead_letter_queue(&service.name);
            for (kind, body) in [
                ("json", &b"{not json"[..]),
                ("schema", &br#"{"order_id": 42}"#[..]),
            ] {
                let id = format!("{run_id}-poison-{}-{kind}", service.name);
                let properties = BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into());
                self.publish_raw(
                    &names.redeliver_exchange(&service.name),
                    key,
                    body,
                    properties,
                )
                .await?;
                self.poison
                    .lock()
                    .expect("poison")
                    .entry(dead.clone())
                    .or_default()
                    .push(id);
                published += 1;
            }
        }
        Ok(format!(
            "{published} malformed messages confirmed on {} service queues",
            published / 2
        ))
    }

    /// Publishes again the last message seen with each routing key in
    /// `keys` (same properties, message id and body): a duplicate delivery
    /// on every queue bound to it.
    pub async fn duplicate(&self, keys: &[String]) -> anyhow::Result<String> {
        let events = self.broker.names().events_exchange();
        let mut done = Vec::new();
        for key in keys {
            let sample = self.samples.lock().expect("samples").get(key).cloned();
            let Some((properties, body)) = sample else {
                continue;
            };
            self.publish_raw(&events, key, &body, properties).await?;
            *self
                .duplicates
                .lock()
                .expect("duplicates")
                .entry(key.clone())
                .or_default() += 1;
            done.push(key.as_str());
        }
        anyhow::ensure!(!done.is_empty(), "no message seen yet to duplicate");
        Ok(format!(
            "published again (same message id): {}",
            done.join(", ")
        ))
    }

    /// Publishes with confirms on a fresh channel, retrying until confirmed.
    async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            let attempt = async {
                let channel = self.broker.confirm_channel().await?;
                let confirm = channel
                    .basic_publish(
                        ShortString::from(exchange),
                        ShortString::from(routing_key),
                        MANDATORY,
                        body,
                        properties.clone(),
                    )
                    .await?
                    .await?;
                let _ = channel.close(200, "published".into()).await;
                let acked = confirm.is_ack();
                let returned = confirm.take_message().is_some();
                anyhow::ensure!(
                    acked && !returned,
                    "not confirmed (acked {acked}, returned {returned})"
                );
                Ok::<(), anyhow::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) if Instant::now() < deadline => {
                    tracing::warn!(%error, "chaos: raw publish failed; retrying");
                }
                Err(_) if Instant::now() < deadline => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => anyhow::bail!("no confirm within 10 s"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A header of `properties` as text.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// An empty field table (for declarations).
pub fn no_arguments() -> FieldTable {
    FieldTable::default()
}
