//! The chaos run's own RabbitMQ: one node, or a cluster of three formed at
//! boot (classic-config peer discovery), beside the machine's broker and
//! never touching it: own node names, own loopback ports (AMQP,
//! distribution, the CLI tools' range), own Erlang cookie under a private
//! HOME, data and logs in the run's directory, no plugins (the management
//! plugin would clash with the machine broker's UI port). Each node runs as
//! a child process: the server script `exec`s the Erlang VM when
//! `RUNNING_UNDER_SYSTEMD` is set, so killing the child is a real SIGKILL of
//! the node. `rabbitmqctl` drives `stop_app`, `start_app` and
//! `close_all_connections`. Two pitfalls of running nodes this way: delete a
//! killed node's pid file before restarting it, and never let the Erlang
//! tools make a cookie in root's HOME (each node gets a private HOME).

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The installed RabbitMQ's `sbin` (the scripts themselves: the `/usr/sbin`
/// wrappers switch to the `rabbitmq` user).
fn sbin() -> anyhow::Result<PathBuf> {
    let lib = Path::new("/usr/lib/rabbitmq/lib");
    std::fs::read_dir(lib)
        .with_context(|| {
            format!(
                "no RabbitMQ under {}; install rabbitmq-server",
                lib.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("rabbitmq_server-"))
        })
        .max()
        .map(|path| path.join("sbin"))
        .with_context(|| format!("no rabbitmq_server-* under {}", lib.display()))
}

/// A port nothing listens on now, in `range`.
pub fn free_port_in(range: std::ops::Range<u16>, rng: &mut fastrand::Rng) -> u16 {
    loop {
        let port = rng.u16(range.clone());
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Node {
    pub name: String,
    run_id: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    home: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn command(&self, sbin: &Path, program: &str) -> Command {
        let d = &self.dir;
        let mut command = Command::new(sbin.join(program));
        command
            .current_dir(d)
            .env("HOME", &self.home)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env(
                "RABBITMQ_CTL_DIST_PORT_MIN",
                (self.dist_port + 10_000).to_string(),
            )
            .env(
                "RABBITMQ_CTL_DIST_PORT_MAX",
                (self.dist_port + 10_020).to_string(),
            )
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("node.pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_CRASH_DUMP", d.join("erl_crash.dump"))
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .env(super::RUN_MARKER, &self.run_id)
            .stdin(Stdio::null());
        command
    }

    /// guest/guest on the default vhost of this node.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The node's OS process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn accepts(&self) -> bool {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        )
        .is_ok()
    }
}

pub struct Rabbit {
    pub nodes: Vec<Node>,
    sbin: PathBuf,
}

impl Rabbit {
    /// Prepares `count` nodes (1, or 3 for a cluster) under `dir`.
    pub fn prepare(
        dir: &Path,
        count: usize,
        rng: &mut fastrand::Rng,
        run_id: &str,
    ) -> anyhow::Result<Self> {
        let sbin = sbin()?;
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        let secret: String = (0..20).map(|_| rng.uppercase()).collect();
        std::fs::write(&cookie, secret)?;
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        // Node names from the run id: unique per run on the machine's epmd.
        let tag: String = run_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let mut nodes = Vec::with_capacity(count);
        for n in 1..=count {
            let node_dir = dir.join(format!("node{n}"));
            std::fs::create_dir_all(&node_dir)?;
            // Distribution ports below the ephemeral range; the CLI tools'
            // range 10,000 above.
            let dist_port = free_port_in(20_000..22_700, rng);
            let port = free_port_in(22_700..25_000, rng);
            nodes.push(Node {
                name: format!("{tag}n{n}@localhost"),
                run_id: run_id.to_owned(),
                port,
                dist_port,
                dir: node_dir,
                home: home.clone(),
                child: None,
            });
        }
        let mut peers = String::new();
        for (i, node) in nodes.iter().enumerate() {
            let _ = writeln!(
                peers,
                "cluster_formation.classic_config.nodes.{} = {}",
                i + 1,
                node.name
            );
        }
        for node in &nodes {
            let mut config = format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nloopback_users = none\n\
                 cluster_partition_handling = pause_minority\n",
                node.port
            );
            if count > 1 {
                config.push_str(
                    "cluster_formation.peer_discovery_backend = classic_config\n\
                     cluster_formation.randomized_startup_delay_range.min = 0\n\
                     cluster_formation.randomized_startup_delay_range.max = 1\n",
                );
                config.push_str(&peers);
            }
            std::fs::write(node.dir.join("rabbitmq.conf"), config)?;
            std::fs::write(node.dir.join("enabled_plugins"), "[].\n")?;
            std::fs::write(node.dir.join("advanced.config"), "[].\n")?;
            std::fs::write(node.dir.join("env.conf"), "")?;
        }
        Ok(Self { nodes, sbin })
    }

    /// Every node's AMQP URL, comma-separated: what the workers get as
    /// `ORDERFLOW_AMQP_URL`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i`'s process (deleting a pid file a killed node left).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let _ = std::fs::remove_file(node.dir.join("node.pid"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("server.out"))?;
        let child = node
            .command(&self.sbin, "rabbitmq-server")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting RabbitMQ node {}", node.name))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `i` accepts AMQP connections.
    pub async fn wait_listening(&mut self, i: usize, patience: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            if tokio::task::block_in_place(|| node.accepts()) {
                return Ok(());
            }
            if let Some(child) = &mut node.child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "RabbitMQ node {} exited ({status}) before it listened; see {}",
                    node.name,
                    node.dir.join("server.out").display()
                );
            }
            if started.elapsed() > patience {
                bail!(
                    "RabbitMQ node {} did not listen on {} within {patience:?}",
                    node.name,
                    node.port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for every node (spawned already); with several nodes, until
    /// the cluster runs them all (quorum queues declared then get a member
    /// on each).
    pub async fn wait_all(&mut self, patience: Duration) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.wait_listening(i, patience).await?;
        }
        if self.nodes.len() > 1 {
            let started = Instant::now();
            loop {
                let running = self.running_nodes(0).await.unwrap_or_default();
                if running.len() == self.nodes.len() {
                    break;
                }
                if started.elapsed() > patience {
                    bail!(
                        "the cluster runs {} of {} nodes after {patience:?}: {running:?}",
                        running.len(),
                        self.nodes.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    /// `rabbitmqctl -n <node i> args…`; its standard output, or an error
    /// with its standard error.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let node = &self.nodes[i];
        let mut command = tokio::process::Command::from(node.command(&self.sbin, "rabbitmqctl"));
        command.arg("-n").arg(&node.name).args(args);
        let output = tokio::time::timeout(Duration::from_mins(2), command.output())
            .await
            .with_context(|| format!("rabbitmqctl {args:?} on {} took over 2 minutes", node.name))?
            .context("running rabbitmqctl")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {} on {} failed: {}{}",
                args.join(" "),
                node.name,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The nodes the cluster runs, as node `i` sees them.
    pub async fn running_nodes(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let out = self
            .ctl(i, &["cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value =
            serde_json::from_str(&out).context("cluster_status is not JSON")?;
        Ok(status["running_nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// SIGKILL of node `i`'s process; its process id.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<u32> {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .with_context(|| format!("node {} is not running", node.name))?;
        let pid = child.id();
        child.kill().context("SIGKILL")?;
        let status = child.wait()?;
        if std::os::unix::process::ExitStatusExt::signal(&status) != Some(9) {
            bail!("node {} ended with {status}, not by SIGKILL", node.name);
        }
        Ok(pid)
    }

    /// Kills every node (the end of the run, or a run that failed).
    pub fn kill_all(&mut self) {
        crate::kill_and_reap(self.nodes.iter_mut().map(|node| &mut node.child));
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.kill_all();
    }
}
