//! What the command line tests share: the `orderflow` binary pointed at a
//! test's broker, namespace and database; a command run to its end and how
//! it ended checked, or spawned as a process the test stops; and waiting
//! for a queue to reach a count.

use std::process::Stdio;
use std::time::Duration;

use orderflow_tests::{TestEnv, eventually, run_to_end};
use secrecy::ExposeSecret;
use tokio::process::{Child, Command};

/// The `orderflow` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// `orderflow` pointed at `env`'s broker and namespace (and at no database).
pub fn orderflow_on_broker(env: &TestEnv) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("ORDERFLOW_AMQP_URL", env.amqp_url.expose_secret())
        .env("ORDERFLOW_NAMESPACE", &env.namespace);
    command
}

/// `orderflow` pointed at `env`'s broker, namespace and database.
pub fn orderflow_in(env: &TestEnv) -> Command {
    let mut command = orderflow_on_broker(env);
    command.env("ORDERFLOW_DATABASE_URL", env.database_url.expose_secret());
    command
}

/// How a command ended: its arguments, exit code (-1 when killed by a
/// signal), stdout and stderr.
pub struct Ended {
    pub args: String,
    pub code: i32,
    pub out: String,
    pub err: String,
}

/// Runs `command` to its end.
pub async fn run(command: &mut Command) -> Ended {
    let args = format!("{:?}", command.as_std().get_args().collect::<Vec<_>>());
    let (code, out, err) = run_to_end(command).await;
    Ended {
        args,
        code,
        out,
        err,
    }
}

impl Ended {
    /// Asserts the command succeeded (exit code 0; its arguments, stdout and
    /// stderr in the failure); its stdout.
    pub fn succeeded(self) -> String {
        assert_eq!(
            self.code, 0,
            "{}\nstdout: {}\nstderr: {}",
            self.args, self.out, self.err
        );
        self.out
    }

    /// Asserts the command was refused as the user's mistake (exit code 2)
    /// and that its stderr says each of `expected`; its stderr.
    pub fn failed_saying(self, expected: &[&str]) -> String {
        assert_eq!(
            self.code, 2,
            "{}\nstdout: {}\nstderr: {}",
            self.args, self.out, self.err
        );
        assert!(
            expected.iter().all(|text| self.err.contains(text)),
            "{:?} in: {}",
            expected,
            self.err
        );
        self.err
    }
}

/// Spawns `command` as a process the test stops (killed if dropped),
/// logging warnings and worse to the test's stderr, its stdout to `stdout`.
pub fn spawn_logging_warnings(command: &mut Command, stdout: Stdio) -> Child {
    command
        .env("ORDERFLOW_LOG", "warn")
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits on a queue of a test's namespace for a count to be reached.
pub trait WaitForQueue {
    /// Waits up to `patience` until `queue` holds `count` ready messages;
    /// `what` names the wait in its failure.
    async fn wait_for_messages(&self, queue: &str, count: u32, patience: Duration, what: &str);

    /// Waits up to `patience` until `queue` has `count` consumers; `what`
    /// names the wait in its failure.
    async fn wait_for_consumers(&self, queue: &str, count: u32, patience: Duration, what: &str);
}

impl WaitForQueue for TestEnv {
    async fn wait_for_messages(&self, queue: &str, count: u32, patience: Duration, what: &str) {
        eventually(patience, what, || async {
            self.message_count(queue).await == count
        })
        .await;
    }

    async fn wait_for_consumers(&self, queue: &str, count: u32, patience: Duration, what: &str) {
        eventually(patience, what, || async {
            self.consumer_count(queue).await == count
        })
        .await;
    }
}

/// Sends SIGTERM to `child` and waits up to `patience` for it to end; how
/// it ended. `what` names the program in the failure.
pub async fn stop_with_sigterm(
    child: &mut Child,
    patience: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let pid = child.id().expect("the process is still running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(patience, child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} did not stop within {patience:?} of SIGTERM"))
        .unwrap()
}
