//! The workers of a chaos run, as in production: one process per service
//! (`orderflow worker NAME`, this very binary), two of some, each with its
//! own log file in the run's directory. A worker can be killed with SIGKILL
//! and started again; one that ends by itself (not killed by the run) is
//! started again too, and counted: the run reports it as a violation.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// One worker process.
pub struct Worker {
    pub name: String,
    pub instance: usize,
    /// The order API's listening address (order-api only).
    pub http_addr: Option<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Worker {
    pub fn label(&self) -> String {
        format!("{}#{}", self.name, self.instance)
    }

    /// The last `bytes` of its log.
    pub fn log_tail(&self, bytes: usize) -> String {
        tail(&self.log, bytes)
    }
}

/// An unexpected end of a worker: which, how, and the end of its log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Exit {
    pub worker: String,
    pub status: String,
    pub at_secs: f64,
    pub log_tail: String,
}

pub struct Workers {
    pub procs: Vec<Worker>,
    exe: PathBuf,
    env: Vec<(String, String)>,
    pub unexpected_exits: Vec<Exit>,
}

impl Workers {
    /// The workers `names` (each `(name, instances)`) with `env`; the order
    /// API's instances listen on `api_addrs`, in turn.
    pub fn new(
        dir: &Path,
        names: &[(String, usize)],
        api_addrs: &[String],
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the orderflow binary")?;
        let mut workers = Vec::new();
        let mut apis = api_addrs.iter();
        for (name, instances) in names {
            for instance in 1..=*instances {
                let http_addr = (name == order_api::SERVICE)
                    .then(|| apis.next().cloned())
                    .flatten();
                workers.push(Worker {
                    name: name.clone(),
                    instance,
                    http_addr,
                    child: None,
                    log: dir.join(format!("{name}-{instance}.log")),
                });
            }
        }
        Ok(Self {
            procs: workers,
            exe,
            env,
            unexpected_exits: Vec::new(),
        })
    }

    /// Starts worker `i`.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<u32> {
        let worker = &mut self.procs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&worker.log)?;
        let mut command = Command::new(&self.exe);
        command
            .args(["worker", &worker.name])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(addr) = &worker.http_addr {
            command.env("ORDERFLOW_HTTP_ADDR", addr);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting worker {}", worker.label()))?;
        let pid = child.id();
        worker.child = Some(child);
        Ok(pid)
    }

    pub fn spawn_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.procs.len() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// SIGKILL of worker `i`; its process id. Errors when it was not running
    /// or did not end by the signal.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<u32> {
        let worker = &mut self.procs[i];
        let mut child = worker
            .child
            .take()
            .with_context(|| format!("worker {} is not running", worker.label()))?;
        let pid = child.id();
        child.kill()?;
        let status = child.wait()?;
        anyhow::ensure!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
            "worker {} ended with {status}, not by SIGKILL",
            worker.label()
        );
        Ok(pid)
    }

    /// Workers that ended by themselves since the last look: recorded and
    /// started again.
    pub fn reap(&mut self, at_secs: f64) {
        for i in 0..self.procs.len() {
            let worker = &mut self.procs[i];
            let ended = worker
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = ended {
                worker.child = None;
                let log_tail = tail(&worker.log, 1200);
                tracing::error!(worker = %worker.label(), %status, "worker ended by itself; starting it again");
                self.unexpected_exits.push(Exit {
                    worker: worker.label(),
                    status: status.to_string(),
                    at_secs,
                    log_tail,
                });
                if let Err(error) = self.spawn(i) {
                    tracing::error!(%error, "cannot restart the worker");
                }
            }
        }
    }

    /// Asks every worker to stop (SIGTERM: in-flight work finishes), waits
    /// up to `patience`, then kills what is left.
    pub async fn stop_all(&mut self, patience: std::time::Duration) {
        for worker in &self.procs {
            if let Some(child) = &worker.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let running = self
                .procs
                .iter_mut()
                .filter_map(|w| w.child.as_mut())
                .map(|c| usize::from(c.try_wait().ok().flatten().is_none()))
                .sum::<usize>();
            if running == 0 || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.kill_all();
    }

    pub fn kill_all(&mut self) {
        crate::kill_and_reap(self.procs.iter_mut().map(|worker| &mut worker.child));
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The last `bytes` of the file at `path` (lossy UTF-8).
pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[start..]).into_owned()
}
