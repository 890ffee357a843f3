//! The chaos run's own PostgreSQL: a cluster made with `initdb` in the run's
//! directory, listening on its own loopback port (never the machine's 5432,
//! which other tests use), run as a child process so that it can be stopped
//! with `pg_ctl stop -m fast` or `-m immediate` (a crash, recovered at the
//! next start) and started again in a second. When the run is root,
//! PostgreSQL (which refuses root) runs as the `postgres` user.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sqlx::Connection as _;

/// Where Debian's PostgreSQL 15 keeps its programs.
const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    pub port: u16,
    run_id: String,
    dir: PathBuf,
    /// Uid and gid to run as (`postgres` when the run is root).
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// Uid and gid of `name` in /etc/passwd.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

impl Postgres {
    /// Makes a cluster under `dir` (initdb, trust on loopback) for `port`.
    pub fn init(dir: &Path, port: u16, run_id: &str) -> anyhow::Result<Self> {
        let user = if is_root() {
            Some(lookup_user("postgres").context(
                "running as root, PostgreSQL needs the `postgres` user, and there is none",
            )?)
        } else {
            None
        };
        std::fs::create_dir_all(dir)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        let pg = Self {
            port,
            run_id: run_id.to_owned(),
            dir: dir.to_owned(),
            user,
            child: None,
        };
        let output = pg
            .command("initdb")
            .args(["-D", &pg.data().to_string_lossy()])
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .with_context(|| format!("running {BIN}/initdb; is PostgreSQL 15 installed?"))?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let config = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 400\nshared_buffers = 128MB\nfsync = off\nfull_page_writes = off\n\
             logging_collector = off\n",
            dir.display()
        );
        let conf = pg.data().join("postgresql.auto.conf");
        std::fs::write(&conf, config)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&conf, Some(uid), Some(gid))?;
        }
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(Path::new(BIN).join(program));
        command
            .current_dir(&self.dir)
            .env(super::RUN_MARKER, &self.run_id)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// The administrator's URL of `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server and waits until it takes connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))?;
        let child = self
            .command("postgres")
            .args(["-D", &self.data().to_string_lossy()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_mins(1)).await
    }

    async fn wait_ready(&mut self, patience: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(connection) = sqlx::PgConnection::connect(&self.url("postgres")).await {
                let _ = connection.close().await;
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "postgres exited ({status}) before it took connections; see {}",
                    self.dir.join("postgres.log").display()
                );
            }
            if started.elapsed() > patience {
                bail!("postgres did not take connections within {patience:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `pg_ctl stop -m <mode>` (fast: connections closed, a clean
    /// checkpoint; immediate: a crash, recovered at the next start) and waits
    /// for the server's process to end. The old process id, or an error
    /// when it was not running.
    pub fn stop(&mut self, mode: &str) -> anyhow::Result<u32> {
        let mut child = self.child.take().context("postgres is not running")?;
        let pid = child.id();
        let output = self
            .command("pg_ctl")
            .args(["stop", "-D", &self.data().to_string_lossy(), "-m", mode])
            .args(["-t", "30"])
            .output()
            .context("running pg_ctl stop")?;
        if !output.status.success() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "pg_ctl stop -m {mode} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let _ = child.wait();
        Ok(pid)
    }

    /// Stops with `mode`, then starts again; the old and new process ids.
    pub async fn restart(&mut self, mode: &str) -> anyhow::Result<(u32, u32)> {
        let old = tokio::task::block_in_place(|| self.stop(mode))?;
        self.start().await?;
        Ok((old, self.pid().unwrap_or_default()))
    }

    /// Kills the server (the end of the run, or a run that failed).
    pub fn kill(&mut self) {
        crate::kill_and_reap([&mut self.child]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}
