//! A RabbitMQ node of the test's own, beside the machine's broker: the chaos
//! run's private nodes (`orderflow_chaos::rabbit`: own node name, loopback
//! ports, Erlang cookie, data and logs in a temporary directory, no plugins,
//! a child process so that [`PrivateNode::kill`] is a real SIGKILL), one of
//! them, removed when dropped.
//!
//! For tests that must take a broker away (failover) without touching the
//! shared broker other tests use.

use std::path::PathBuf;
use std::time::Duration;

use orderflow_chaos::rabbit::Rabbit;

pub struct PrivateNode {
    rabbit: Rabbit,
    dir: PathBuf,
}

impl PrivateNode {
    /// Starts a node and waits (up to 2 minutes) until it accepts AMQP.
    pub async fn start() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let run_id = format!("t{}", &id[20..]);
        let dir = std::env::temp_dir().join(format!("orderflow-rmq-{run_id}"));
        let rabbit = Rabbit::prepare(&dir, 1, &mut fastrand::Rng::new(), &run_id)
            .unwrap_or_else(|error| panic!("preparing a private RabbitMQ node: {error:#}"));
        let mut node = Self { rabbit, dir };
        node.rabbit
            .spawn(0)
            .unwrap_or_else(|error| panic!("{error:#}"));
        node.rabbit
            .wait_listening(0, Duration::from_mins(2))
            .await
            .unwrap_or_else(|error| panic!("{error:#}"));
        node
    }

    /// guest/guest on the default vhost of this node.
    pub fn amqp_url(&self) -> String {
        self.rabbit.urls()
    }

    /// SIGKILL of the node's process (no goodbye to its clients).
    pub fn kill(&mut self) {
        self.rabbit
            .kill(0)
            .unwrap_or_else(|error| panic!("{error:#}"));
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        self.rabbit.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
