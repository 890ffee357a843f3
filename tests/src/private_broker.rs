//! A RabbitMQ node of the test's own, beside the machine's broker: its own
//! node name, loopback ports, Erlang cookie, data and logs in a temporary
//! directory, and no plugins (the management plugin would clash with the
//! machine broker's UI port). Run as a child process (the server script
//! `exec`s the Erlang VM), so [`PrivateNode::kill`] is a real SIGKILL of the
//! node; dropped, the node is killed and its directory removed.
//!
//! For tests that must take a broker away (failover) without touching the
//! shared broker other tests use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The installed RabbitMQ's `sbin` (the scripts themselves: the `/usr/sbin`
/// wrappers switch to the `rabbitmq` user).
pub fn rabbitmq_sbin() -> PathBuf {
    let lib = Path::new("/usr/lib/rabbitmq/lib");
    std::fs::read_dir(lib)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("rabbitmq_server-"))
        })
        .max()
        .map_or_else(
            || {
                panic!(
                    "no RabbitMQ server under {}; install rabbitmq-server",
                    lib.display()
                )
            },
            |path| path.join("sbin"),
        )
}

/// A free TCP port on the loopback interface (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub struct PrivateNode {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateNode {
    /// Starts a node and waits (up to 2 minutes) until it accepts AMQP.
    pub fn start() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("orderflow-rmq-{}", &id[16..]));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("node directory");
        let cookie = home.join(".erlang.cookie");
        std::fs::write(
            &cookie,
            format!("ORDERFLOWTEST{}", &id[16..]).to_uppercase(),
        )
        .expect("cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .expect("cookie mode");
        let port = free_port();
        // The distribution port and, 10,000 above it, the CLI tools' range.
        let dist_port = loop {
            let candidate = 20_000 + fastrand_u16() % 10_000;
            if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
                break candidate;
            }
        };
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(dir.join("env.conf"), "").expect("env file");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("config file");
        let mut node = Self {
            name: format!("t{}@localhost", &id[20..]),
            port,
            dist_port,
            dir,
            child: None,
        };
        node.spawn();
        node
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(rabbitmq_sbin().join(program));
        let d = &self.dir;
        command
            .current_dir(d)
            .env("HOME", d.join("home"))
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
                (self.dist_port + 10_010).to_string(),
            )
            .env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
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
            // The server script then `exec`s the VM: the child is the node.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdin(Stdio::null());
        command
    }

    /// Starts (or restarts) the node's process and waits for AMQP.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("node.pid"));
        let log = std::fs::File::create(self.dir.join("server.out")).expect("server log");
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "RabbitMQ node {} exited ({status}) before it listened; see {}",
                    self.name,
                    self.dir.join("server.out").display()
                );
            }
            assert!(
                started.elapsed() < Duration::from_mins(2),
                "RabbitMQ node {} did not listen on {} within 2 minutes",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// guest/guest on the default vhost of this node.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// SIGKILL of the node's process (no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 16 random bits (the random tail of a v7 UUID).
fn fastrand_u16() -> u16 {
    let id = uuid::Uuid::now_v7();
    u16::from_le_bytes([id.as_bytes()[14], id.as_bytes()[15]])
}
