//! Wake-ups for long-polling readers (`GET /orders/{id}?wait_for=`): one
//! PostgreSQL `LISTEN orderflow_orders` per server (the orders table's trigger
//! notifies the order id on every insert and update, from any process),
//! fanned out to the waiters through a broadcast channel.
//!
//! A waiter subscribes before it reads the row, so a change between its read
//! and its wait still wakes it. When the listener is down (or notifications
//! may have been missed while it reconnected) every waiter is woken to read
//! again, and waiters fall back to reading every 500 ms until it is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orderflow_shared::Shutdown;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// The NOTIFY channel of `shared/migrations/orders/0001_orders.sql`.
pub const CHANNEL: &str = "orderflow_orders";

/// How often waiters read the row themselves while the listener is down.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// Broadcast buffer; a waiter that falls further behind re-reads its order.
const BUFFER: usize = 1024;

#[derive(Clone, Debug)]
enum Wake {
    /// This order changed.
    Order(Arc<str>),
    /// Anything may have changed (notifications may have been lost).
    Everyone,
}

/// The shared listener's handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Watcher {
    wakes: broadcast::Sender<Wake>,
    listening: Arc<AtomicBool>,
}

/// One waiter's view of the wake-ups, created before it reads the row.
#[derive(Debug)]
pub struct Subscription {
    wakes: broadcast::Receiver<Wake>,
    listening: Arc<AtomicBool>,
    closed: bool,
}

impl Watcher {
    /// Starts the listener task on `pool`; it ends with `shutdown`.
    pub fn spawn(pool: PgPool, shutdown: Shutdown) -> (Self, JoinHandle<()>) {
        let (wakes, _) = broadcast::channel(BUFFER);
        let watcher = Self {
            wakes,
            listening: Arc::new(AtomicBool::new(false)),
        };
        let task = tokio::spawn(watcher.clone().listen(pool, shutdown));
        (watcher, task)
    }

    pub fn subscribe(&self) -> Subscription {
        Subscription {
            wakes: self.wakes.subscribe(),
            listening: self.listening.clone(),
            closed: false,
        }
    }

    fn set_listening(&self, listening: bool) {
        let was = self.listening.swap(listening, Ordering::SeqCst);
        if was != listening {
            // Up: changes before LISTEN took effect were missed. Down: waiters
            // switch to polling. Either way, everyone reads again.
            let _ = self.wakes.send(Wake::Everyone);
        }
    }

    async fn listen(self, pool: PgPool, shutdown: Shutdown) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let connected = tokio::select! {
                () = shutdown.cancelled() => break,
                connected = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(CHANNEL).await?;
                    Ok::<_, sqlx::Error>(listener)
                } => connected,
            };
            let error = match connected {
                Ok(mut listener) => {
                    failures = 0;
                    self.set_listening(true);
                    loop {
                        let received = tokio::select! {
                            () = shutdown.cancelled() => break None,
                            received = listener.try_recv() => received,
                        };
                        match received {
                            Ok(Some(notification)) => {
                                let _ = self.wakes.send(Wake::Order(notification.payload().into()));
                            }
                            // The connection was lost and is back (sqlx reconnects
                            // eagerly): what was notified meanwhile is gone.
                            Ok(None) => {
                                tracing::warn!("LISTEN connection lost and re-established");
                                let _ = self.wakes.send(Wake::Everyone);
                            }
                            Err(error) => break Some(error),
                        }
                    }
                }
                Err(error) => Some(error),
            };
            let Some(error) = error else { break };
            self.set_listening(false);
            failures = failures.saturating_add(1);
            let delay = Duration::from_millis(250 * 2u64.pow(failures.min(5)));
            tracing::warn!(%error, ?delay, "LISTEN {CHANNEL} failed; long polls re-read every 500 ms meanwhile");
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.set_listening(false);
    }
}

impl Subscription {
    /// Waits until `order_id` may have changed: it was notified, notifications
    /// may have been missed, or (listener down) the fallback interval passed.
    pub async fn changed(&mut self, order_id: &str) {
        loop {
            if self.closed || !self.listening.load(Ordering::SeqCst) {
                // Still take wake-ups meanwhile: the listener coming back says so.
                tokio::select! {
                    () = tokio::time::sleep(FALLBACK_POLL) => return,
                    woke = self.wakes.recv(), if !self.closed => {
                        if self.is_for(woke, order_id) {
                            return;
                        }
                    }
                }
            } else {
                let woke = self.wakes.recv().await;
                if self.is_for(woke, order_id) {
                    return;
                }
            }
        }
    }

    fn is_for(&mut self, woke: Result<Wake, broadcast::error::RecvError>, order_id: &str) -> bool {
        match woke {
            Ok(Wake::Order(id)) => *id == *order_id,
            Ok(Wake::Everyone) | Err(broadcast::error::RecvError::Lagged(_)) => true,
            Err(broadcast::error::RecvError::Closed) => {
                self.closed = true;
                true
            }
        }
    }
}
