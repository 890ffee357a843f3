//! Connections to one broker among several: the deadpool [`Manager`] behind
//! [`Broker`](super::Broker)'s pool. `ORDERFLOW_AMQP_URL` may list several
//! nodes of a cluster, comma-separated; a new connection goes to the node
//! that answered last, and when that one does not answer, to the next in the
//! list, round the list once. A connection the broker closed is dropped by
//! the pool ([`Manager::recycle`]), so a process whose node went away gets
//! its next connection from a surviving node: its consumers re-subscribe
//! and its publishers retry there (docs/design.md §11).
//!
//! Written here rather than taken from `deadpool-lapin`: its manager holds a
//! single address. This one keeps deadpool's pool (sizes, timeouts, recycling)
//! and only chooses the address.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

use crate::config::redact_url;

/// The broker URLs of `list` (comma-separated, blanks ignored), checked:
/// each must parse as an AMQP URI. The error names the (redacted) URL and
/// why.
pub fn parse_urls(list: &SecretString) -> Result<Vec<SecretString>, String> {
    let urls: Vec<SecretString> = list
        .expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| SecretString::from(url.to_owned()))
        .collect();
    if urls.is_empty() {
        return Err("no broker URL given (ORDERFLOW_AMQP_URL is empty)".to_owned());
    }
    for url in &urls {
        AMQPUri::from_str(url.expose_secret()).map_err(|e| {
            format!(
                "`{}` is not an AMQP URL ({e}); expected amqp://user:password@host:port/vhost, \
                 several separated by commas",
                redact_url(url.expose_secret())
            )
        })?;
    }
    Ok(urls)
}

/// Why no node gave a connection: each node's answer, in the order tried.
#[derive(Debug, thiserror::Error)]
#[error("no broker node answered: {}", .0.join("; "))]
pub struct NoNode(Vec<String>);

/// Chooses the node of each new connection (see the module's documentation).
pub struct FailoverManager {
    urls: Vec<SecretString>,
    redacted: Vec<String>,
    /// The node to try first: the one that answered last.
    current: AtomicUsize,
    properties: Box<dyn Fn() -> ConnectionProperties + Send + Sync>,
    /// How long one node may take to open a connection before the next is tried.
    connect_timeout: Duration,
}

impl std::fmt::Debug for FailoverManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverManager")
            .field("urls", &self.redacted)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FailoverManager {
    /// A manager over `urls` (at least one), trying them in order from the first.
    pub fn new(
        urls: Vec<SecretString>,
        properties: impl Fn() -> ConnectionProperties + Send + Sync + 'static,
        connect_timeout: Duration,
    ) -> Self {
        assert!(!urls.is_empty(), "a broker needs at least one URL");
        let redacted = urls.iter().map(|u| redact_url(u.expose_secret())).collect();
        Self {
            urls,
            redacted,
            current: AtomicUsize::new(0),
            properties: Box::new(properties),
            connect_timeout,
        }
    }

    /// The (redacted) URL of the node new connections go to first.
    pub fn current(&self) -> &str {
        &self.redacted[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }
}

impl Manager for FailoverManager {
    type Type = Connection;
    type Error = NoNode;

    async fn create(&self) -> Result<Connection, NoNode> {
        let count = self.urls.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let attempt = tokio::time::timeout(
                self.connect_timeout,
                Connection::connect(self.urls[index].expose_secret(), (self.properties)()),
            )
            .await;
            match attempt {
                Ok(Ok(connection)) => {
                    if index != first {
                        self.current.store(index, Ordering::Relaxed);
                        tracing::warn!(
                            from = %self.redacted[first],
                            to = %self.redacted[index],
                            "broker node did not answer; failed over to the next one"
                        );
                    }
                    return Ok(connection);
                }
                Ok(Err(error)) => failures.push(format!("{}: {error}", self.redacted[index])),
                Err(_) => failures.push(format!(
                    "{}: no connection within {:?}",
                    self.redacted[index], self.connect_timeout
                )),
            }
        }
        Err(NoNode(failures))
    }

    async fn recycle(&self, connection: &mut Connection, _: &Metrics) -> RecycleResult<NoNode> {
        if connection.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!(
                "the broker connection is not connected ({:?}); opening another",
                connection.status()
            )))
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn a_list_of_urls_is_split_trimmed_and_checked() {
        let urls = parse_urls(&SecretString::from(
            " amqp://u:p@127.0.0.1:5701/%2f, ,amqp://u:p@127.0.0.1:5702/%2f ".to_owned(),
        ))
        .unwrap();
        let urls: Vec<&str> = urls.iter().map(ExposeSecret::expose_secret).collect();
        assert_eq!(
            urls,
            [
                "amqp://u:p@127.0.0.1:5701/%2f",
                "amqp://u:p@127.0.0.1:5702/%2f"
            ]
        );
        let error = parse_urls(&SecretString::from(
            "amqp://u:secret@127.0.0.1:5701/%2f,http://u:secret@h:x".to_owned(),
        ))
        .unwrap_err();
        assert!(error.contains("http://u:***@h:x"), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(parse_urls(&SecretString::from(" , ".to_owned())).is_err());
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_is_skipped_and_the_answer_names_every_node() {
        // Two ports nothing listens on: both refused, both named, no password.
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (a, b) = (free(), free());
        let manager = FailoverManager::new(
            vec![
                SecretString::from(format!("amqp://u:secret@127.0.0.1:{a}/%2f")),
                SecretString::from(format!("amqp://u:secret@127.0.0.1:{b}/%2f")),
            ],
            ConnectionProperties::default,
            Duration::from_secs(2),
        );
        let error = manager.create().await.unwrap_err().to_string();
        assert!(
            error.contains(&format!(":{a}/")) && error.contains(&format!(":{b}/")),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
    }
}
