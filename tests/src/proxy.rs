//! A TCP proxy in front of the broker or the database that can stall or be
//! cut. Stalled, it holds everything the server sends (confirms, channel-open
//! answers, query results), as a hung server or a half-dead network link
//! would; the client's bytes still flow. Cut, it closes every open
//! connection and closes new ones at once, as a server that went away would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct StallingProxy {
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    /// The copying tasks of the open connections (aborting them closes both sides).
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl StallingProxy {
    /// Proxies 127.0.0.1:<random> to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stalled = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let flag = stalled.clone();
        let refusing = cut.clone();
        let open = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upward = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let flag = flag.clone();
                let downward = tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(n) = server_read.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut open = open.lock().expect("connections lock");
                open.retain(|task: &AbortHandle| !task.is_finished());
                open.extend([upward.abort_handle(), downward.abort_handle()]);
            }
        });
        Self {
            addr,
            stalled,
            cut,
            connections,
            task,
        }
    }

    /// Proxies 127.0.0.1:<random> to the server `url` names (host:port,
    /// with the scheme's default port when it names none).
    pub async fn in_front_of(url: &str) -> Self {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host = authority.rsplit('@').next().unwrap_or_default();
        if host.contains(':') {
            Self::start(host).await
        } else {
            let port = if scheme.starts_with("amqp") {
                5672
            } else {
                5432
            };
            Self::start(&format!("{host}:{port}")).await
        }
    }

    /// An AMQP URL through the proxy (guest/guest, vhost /).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// `url` (`scheme://[user[:password]@]host[:port][/path][?query]`) with
    /// its host and port replaced by the proxy's.
    pub fn url_through(&self, url: &str) -> String {
        let start = url.find("://").expect("a URL with a scheme") + 3;
        let end = url[start..]
            .find(['/', '?'])
            .map_or(url.len(), |i| start + i);
        let host_start = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
        format!("{}{}{}", &url[..host_start], self.addr, &url[end..])
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Closes every open connection; new ones are closed at once until
    /// [`resume`](Self::resume).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().expect("connections lock").drain(..) {
            task.abort();
        }
    }

    /// Ends a stall or a cut.
    pub fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
