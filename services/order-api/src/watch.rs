//! Wake-ups for long-polling readers (`GET /orders/{id}?wait_for=`), routed
//! to the waiters of the changed order only. Whoever changes `orders`
//! announces it after the commit: the order API (its HTTP handlers and its
//! read-model consumer) through [`Watcher::changed`], which wakes this
//! server's waiters at once and queues the order id; the terminal workers
//! (order-completed, order-cancelled) through their own
//! [`Announcer`](orderflow_shared::store::orders::Announcer). Queued ids go
//! out in one batched `NOTIFY orderflow_orders` that reaches every API
//! instance through its `LISTEN` (one notifying transaction per batch, not
//! per change: each NOTIFY holds PostgreSQL's database-wide notification
//! lock until its commit is flushed). An instance's own announcements come
//! back to it too; it tells them by their tag and ignores them (its waiters
//! were woken when the change was queued). No trigger notifies: a change made
//! any other way wakes no one, and its long polls answer at their timeout.
//!
//! A waiter subscribes before it reads the row, so a change between its read
//! and its wait still wakes it. A change the read model makes comes with the
//! row its upsert returned ([`Known`]): a waiter it satisfies answers with
//! that row instead of reading it again. When the listener is down (or notifications
//! may have been missed while it reconnected) every waiter is woken to read
//! again, and waiters fall back to reading every 500 ms until it is back.
//!
//! Waiters are kept per order id: a notification wakes only the readers of
//! its order, so N waiting clients cost O(1) per change, not O(N).
//!
//! An instance announces its own changes only while another API instance
//! may be listening: every instance says so on [`PEERS_CHANNEL`] each
//! [`HELLO_EVERY`], and one that heard no other for [`PEER_WINDOW`] keeps
//! its changes to itself (one `NOTIFY` transaction per change saved, about
//! seven per order, when it runs alone). It announces anyway while it is not
//! *settled*: its listener came up less than a window ago, is down, or its
//! hellos are not getting out. Until settled, its own waiters also read
//! every 500 ms, so a change another instance made before it heard of this
//! one is still seen. The terminal workers announce always.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use orderflow_shared::Shutdown;
use orderflow_shared::store::orders::{Announcement, Announcer, CHANGES_CHANNEL};

use crate::orders::OrderView;
use crate::status::Status;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The channel committed changes to orders are announced on.
pub const CHANNEL: &str = CHANGES_CHANNEL;

/// How often waiters read the row themselves while the listener is down
/// (or not settled yet).
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// The channel on which API instances say that they listen; the payload is
/// the instance's announcer tag.
pub const PEERS_CHANNEL: &str = "orderflow_orders_peers";

/// How often a listening instance says so on [`PEERS_CHANNEL`].
pub const HELLO_EVERY: Duration = Duration::from_secs(1);

/// How long another instance's hello counts, and how long a listener must
/// have been up (saying hello) before the others surely heard of it.
pub const PEER_WINDOW: Duration = Duration::from_secs(3);

/// What an instance knows of its own listening and of the other instances.
#[derive(Debug, Default)]
struct Peers {
    /// When the listener came up; `None` while it is down.
    listening_since: Option<Instant>,
    /// When this instance's last hello went out.
    hello_sent: Option<Instant>,
    /// When another instance's hello last came in.
    heard: Option<Instant>,
}

impl Peers {
    /// Listening for a whole window and saying so: every other instance has
    /// heard of this one, and this one of every other.
    fn settled(&self, now: Instant) -> bool {
        self.listening_since
            .is_some_and(|since| now.saturating_duration_since(since) >= PEER_WINDOW)
            && self
                .hello_sent
                .is_some_and(|sent| now.saturating_duration_since(sent) < 2 * HELLO_EVERY)
    }

    /// Whether another instance may be waiting for this one's announcements.
    fn others_may_listen(&self, now: Instant) -> bool {
        !self.settled(now)
            || self
                .heard
                .is_some_and(|heard| now.saturating_duration_since(heard) < PEER_WINDOW)
    }
}

/// The waiters of one order: a change counter and how many subscriptions
/// watch it (the entry goes when the last one does).
#[derive(Debug)]
struct Waiters {
    /// A change counter, and what the one who made the latest change knew
    /// of the order after it (`None`: read it).
    changes: watch::Sender<(u64, Option<Known>)>,
    subscriptions: usize,
}

#[derive(Debug)]
struct Shared {
    orders: Mutex<HashMap<Arc<str>, Waiters>>,
    /// Bumped when anything may have changed (notifications may be lost).
    everyone: watch::Sender<u64>,
    peers: Mutex<Peers>,
}

impl Shared {
    fn new(listening: bool) -> Self {
        Self {
            orders: Mutex::new(HashMap::new()),
            everyone: watch::channel(0).0,
            peers: Mutex::new(Peers {
                listening_since: listening.then(Instant::now),
                ..Peers::default()
            }),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        // Plain timestamps: consistent even if a holder panicked.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn orders(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Waiters>> {
        // The map stays consistent even if a holder panicked: every critical
        // section is a single insert, update or remove.
        self.orders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_order(&self, order_id: &str, change: Option<Known>) {
        if let Some(waiters) = self.orders().get(order_id) {
            waiters
                .changes
                .send_modify(|(n, known)| (*n, *known) = (n.wrapping_add(1), change));
        }
    }

    fn wake_everyone(&self) {
        self.everyone.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What the maker of a change knew of the order after it: its status, and
/// the whole row when its statement returned it (a waiter it satisfies
/// answers with that row instead of reading it).
#[derive(Clone, Debug)]
pub struct Known {
    pub status: Status,
    pub row: Option<Arc<OrderView>>,
}

/// The shared listener's handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Watcher {
    shared: Arc<Shared>,
    /// Tells the other API instances (their `LISTEN`).
    announcer: Announcer,
}

/// One waiter's view of one order's changes, created before it reads the row.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    order_id: Arc<str>,
    changes: watch::Receiver<(u64, Option<Known>)>,
    /// The change counter this waiter last saw.
    seen: u64,
    everyone: watch::Receiver<u64>,
}

impl Watcher {
    /// Starts the listener task on `pool`; it ends with `shutdown`.
    pub fn spawn(pool: PgPool, shutdown: Shutdown) -> (Self, JoinHandle<()>) {
        let (announcer, announcing) = Announcer::spawn(pool.clone(), shutdown.clone());
        let watcher = Self {
            shared: Arc::new(Shared::new(false)),
            announcer,
        };
        let hellos = tokio::spawn(watcher.clone().say_hello(pool.clone(), shutdown.clone()));
        let listener = watcher.clone().listen(pool, shutdown);
        let task = tokio::spawn(async move {
            listener.await;
            let _ = hellos.await;
            let _ = announcing.await;
        });
        (watcher, task)
    }

    /// Says on [`PEERS_CHANNEL`] that this instance listens, every
    /// [`HELLO_EVERY`] while it does, until `shutdown`.
    async fn say_hello(self, pool: PgPool, shutdown: Shutdown) {
        let mut every = tokio::time::interval(HELLO_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            if self.shared.peers().listening_since.is_some() {
                self.hello(&pool).await;
            }
        }
    }

    /// One hello (its own transaction, not waiting for the WAL flush: a lost
    /// one is said again a second later).
    async fn hello(&self, pool: &PgPool) {
        let sent = sqlx::query(
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
             SELECT pg_notify($1, $2) FROM relaxed",
        )
        .bind(PEERS_CHANNEL)
        .bind(self.announcer.tag())
        .execute(pool)
        .await;
        match sent {
            Ok(_) => self.shared.peers().hello_sent = Some(Instant::now()),
            Err(error) => {
                tracing::warn!(%error, "cannot tell the other API instances that this one listens; announcing every change meanwhile");
            }
        }
    }

    /// `order_id` changed (committed): wakes its waiters here and, through
    /// the next batched NOTIFY, in the other API instances.
    /// `status`: the order's status after the change, when the caller knows
    /// it (its statement returned it): waiters for a later status then need
    /// not read the row.
    pub fn changed(&self, order_id: &str, status: Option<Status>) {
        self.announce(order_id, status.map(|status| Known { status, row: None }));
    }

    /// `order_id` changed (committed) to `row`, as the change's statement
    /// returned it: like [`changed`](Self::changed), and the waiters it
    /// satisfies answer with `row` without reading it again.
    pub fn changed_to(&self, order_id: &str, row: Arc<OrderView>) {
        let known = row.status().map(|status| Known {
            status,
            row: Some(row),
        });
        self.announce(order_id, known);
    }

    fn announce(&self, order_id: &str, known: Option<Known>) {
        self.shared.wake_order(order_id, known);
        if self.shared.peers().others_may_listen(Instant::now()) {
            self.announcer.changed(order_id);
        }
    }

    /// Watches `order_id` from now on.
    pub fn subscribe(&self, order_id: &str) -> Subscription {
        let everyone = self.shared.everyone.subscribe();
        let order_id: Arc<str> = order_id.into();
        let mut orders = self.shared.orders();
        let waiters = orders.entry(order_id.clone()).or_insert_with(|| Waiters {
            changes: watch::channel((0, None)).0,
            subscriptions: 0,
        });
        waiters.subscriptions += 1;
        let changes = waiters.changes.subscribe();
        drop(orders);
        let seen = changes.borrow().0;
        Subscription {
            shared: self.shared.clone(),
            order_id,
            changes,
            seen,
            everyone,
        }
    }

    /// How many orders have waiters right now.
    #[cfg(test)]
    fn watched_orders(&self) -> usize {
        self.shared.orders().len()
    }

    /// A notification on [`CHANNEL`] with `payload` came in: wakes the
    /// order's waiters, unless this instance announced it itself (their
    /// waiters were woken, with the status, when it was queued: reading the
    /// order again would find nothing new).
    fn notified(&self, payload: &str) {
        let announced = Announcement::parse(payload);
        if announced.from != Some(self.announcer.tag()) {
            self.shared.wake_order(announced.order_id, None);
        }
    }

    /// A hello on [`PEERS_CHANNEL`] came in: another instance listens,
    /// unless it is this one's own.
    fn heard(&self, payload: &str) {
        if payload != self.announcer.tag() {
            self.shared.peers().heard = Some(Instant::now());
        }
    }

    fn set_listening(&self, listening: bool) {
        let was = std::mem::replace(
            &mut self.shared.peers().listening_since,
            listening.then(Instant::now),
        )
        .is_some();
        if was != listening {
            // Up: changes before LISTEN took effect were missed. Down: waiters
            // switch to polling. Either way, everyone reads again.
            self.shared.wake_everyone();
        }
    }

    async fn listen(self, pool: PgPool, shutdown: Shutdown) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let connected = tokio::select! {
                () = shutdown.cancelled() => break,
                connected = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen_all([CHANNEL, PEERS_CHANNEL]).await?;
                    Ok::<_, sqlx::Error>(listener)
                } => connected,
            };
            let error = match connected {
                Ok(mut listener) => {
                    failures = 0;
                    self.set_listening(true);
                    // The others hear of this instance now, not at the next tick.
                    self.hello(&pool).await;
                    loop {
                        let received = tokio::select! {
                            () = shutdown.cancelled() => break None,
                            received = listener.try_recv() => received,
                        };
                        match received {
                            Ok(Some(notification)) if notification.channel() == PEERS_CHANNEL => {
                                self.heard(notification.payload());
                            }
                            Ok(Some(notification)) => self.notified(notification.payload()),
                            // The connection was lost and is back (sqlx reconnects
                            // eagerly): what was notified meanwhile is gone.
                            Ok(None) => {
                                tracing::warn!("LISTEN connection lost and re-established");
                                // Hellos were missed too: settle again.
                                self.set_listening(true);
                                self.shared.wake_everyone();
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
        // Nobody will be notified any more: let every waiter read once and
        // then poll.
        self.shared.wake_everyone();
    }
}

impl Subscription {
    /// Waits until the order may have changed: it was notified, notifications
    /// may have been missed, or (listener down or not settled yet) the
    /// fallback interval passed.
    /// What the one who changed the order knew of it after the change (its
    /// status, maybe its row); `None` when the row must be read to know.
    ///
    /// What it knew is only trusted when it belongs to the one change since
    /// this waiter last looked: with more, an earlier one may have been another
    /// process's (whose status is not known) and the status reported with a
    /// later one may be older than it (the reporter looked before that
    /// process committed, and reported after its notification came in).
    pub async fn changed(&mut self) -> Option<Known> {
        let polling = !self.shared.peers().settled(Instant::now());
        // The senders live as long as this subscription (in `shared`), so
        // `changed` only returns when a value was sent.
        tokio::select! {
            _ = self.changes.changed() => {
                let (n, known) = self.changes.borrow_and_update().clone();
                let missed = n.wrapping_sub(self.seen) != 1;
                self.seen = n;
                if missed { None } else { known }
            }
            _ = self.everyone.changed() => None,
            () = tokio::time::sleep(FALLBACK_POLL), if polling => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut orders = self.shared.orders();
        if let Some(waiters) = orders.get_mut(&*self.order_id) {
            waiters.subscriptions -= 1;
            if waiters.subscriptions == 0 {
                orders.remove(&*self.order_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status the next change of `subscription` carries.
    async fn status(subscription: &mut Subscription) -> Option<Status> {
        subscription.changed().await.map(|known| known.status)
    }

    fn watcher() -> Watcher {
        Watcher {
            shared: Arc::new(Shared::new(true)),
            announcer: Announcer::unsent(),
        }
    }

    async fn woke(subscription: &mut Subscription) -> bool {
        tokio::time::timeout(Duration::from_millis(50), subscription.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_change_wakes_only_the_waiters_of_its_order() {
        let watcher = watcher();
        let mut a1 = watcher.subscribe("a");
        let mut a2 = watcher.subscribe("a");
        let mut b = watcher.subscribe("b");
        watcher.shared.wake_order("a", None);
        assert!(woke(&mut a1).await);
        assert!(woke(&mut a2).await);
        assert!(!woke(&mut b).await, "b was not notified");
        // Seen once: no second wake-up without a second change.
        assert!(!woke(&mut a1).await);
    }

    #[tokio::test]
    async fn a_local_change_wakes_at_once_and_is_queued_for_the_others() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        watcher.changed("a", None);
        assert!(woke(&mut a).await);
        assert_eq!(watcher.announcer.queued(), vec!["a".to_owned()]);
    }

    #[tokio::test]
    async fn a_change_carries_the_status_its_maker_knew_and_a_notification_none() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        watcher.changed("a", Some(Status::Paying));
        assert_eq!(status(&mut a).await, Some(Status::Paying));
        // From another instance (LISTEN) the status is not known: read it.
        watcher.shared.wake_order("a", None);
        assert_eq!(status(&mut a).await, None);
        watcher.shared.wake_everyone();
        assert_eq!(status(&mut a).await, None);
    }

    #[tokio::test]
    async fn its_own_announcements_coming_back_wake_no_one_and_others_do() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        watcher.notified(&format!("{}/a", watcher.announcer.tag()));
        assert!(!woke(&mut a).await, "its own announcement came back");
        // Another announcer's (a terminal worker, another API instance).
        watcher.notified(&format!("{}/a", Announcer::unsent().tag()));
        assert_eq!(
            status(&mut a).await,
            None,
            "read the order: the status is not known"
        );
        // A payload without a tag (a sender before tags, a NOTIFY by hand).
        watcher.notified("a");
        assert!(woke(&mut a).await);
    }

    #[tokio::test]
    async fn a_status_is_not_trusted_when_other_changes_came_since_the_waiter_looked() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        // Another process completed the order (status unknown here), then a
        // local change reports the status it saw before that commit.
        watcher.notified(&format!("{}/a", Announcer::unsent().tag()));
        watcher.changed("a", Some(Status::Paying));
        assert_eq!(
            status(&mut a).await,
            None,
            "read the order: it may be completed"
        );
        // One change since it looked: its status is trusted.
        watcher.changed("a", Some(Status::Paying));
        assert_eq!(status(&mut a).await, Some(Status::Paying));
        watcher.changed("a", Some(Status::Paying));
        watcher.changed("a", Some(Status::Completed));
        assert_eq!(status(&mut a).await, None, "two local changes: read it too");
    }

    /// An order `a` row with `status`, as an upsert returns it.
    fn row(status: &str) -> OrderView {
        let now = chrono::Utc::now();
        OrderView {
            order_id: "a".to_owned(),
            status: status.to_owned(),
            supplier: None,
            products: None,
            address: None,
            payment_methods: None,
            amount_cents: Some(26_500),
            payment_token: Some("v1.token".to_owned()),
            token_expires_at: None,
            method: None,
            charged_cents: None,
            capture_id: None,
            refunded_cents: None,
            cancel_reason: None,
            last_rejection: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[tokio::test]
    async fn a_change_with_its_row_hands_the_row_to_the_waiter_only_when_it_is_the_one_change() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        watcher.changed_to("a", Arc::new(row("awaiting_payment")));
        let known = a.changed().await.unwrap();
        assert_eq!(known.status, Status::AwaitingPayment);
        let handed = known.row.unwrap();
        assert_eq!(
            (handed.status.as_str(), handed.amount_cents),
            ("awaiting_payment", Some(26_500))
        );
        assert_eq!(watcher.announcer.queued(), vec!["a".to_owned()]);

        // A row that came after a change nobody described: read it.
        watcher.notified(&format!("{}/a", Announcer::unsent().tag()));
        watcher.changed_to("a", Arc::new(row("paying")));
        assert!(a.changed().await.is_none(), "another change came between");
    }

    #[test]
    fn an_instance_announces_until_settled_and_then_only_while_another_says_hello() {
        let t0 = Instant::now();
        let at = |d: Duration| t0 + d;
        let mut peers = Peers::default();
        assert!(peers.others_may_listen(t0), "listener down: announce");
        peers.listening_since = Some(t0);
        peers.hello_sent = Some(t0);
        assert!(
            peers.others_may_listen(at(Duration::from_secs(1))),
            "the others may not have heard of it yet"
        );
        peers.hello_sent = Some(at(PEER_WINDOW));
        assert!(peers.settled(at(PEER_WINDOW)));
        assert!(!peers.others_may_listen(at(PEER_WINDOW)), "alone");
        // Another instance says hello: announce for a window after it.
        peers.heard = Some(at(PEER_WINDOW));
        let last = PEER_WINDOW + PEER_WINDOW.saturating_sub(Duration::from_millis(1));
        peers.hello_sent = Some(at(last));
        assert!(peers.others_may_listen(at(last)));
        peers.hello_sent = Some(at(2 * PEER_WINDOW));
        assert!(
            !peers.others_may_listen(at(2 * PEER_WINDOW)),
            "the other went quiet"
        );
        // Its own hellos stop getting out: not settled, so it announces
        // (and its waiters read for themselves).
        let stale = 2 * PEER_WINDOW + 2 * HELLO_EVERY;
        assert!(!peers.settled(at(stale)));
        assert!(peers.others_may_listen(at(stale)));
    }

    #[test]
    fn its_own_hello_is_not_another_instance() {
        let watcher = watcher();
        watcher.heard(watcher.announcer.tag());
        assert_eq!(watcher.shared.peers().heard, None);
        watcher.heard(Announcer::unsent().tag());
        assert!(watcher.shared.peers().heard.is_some());
    }

    #[tokio::test]
    async fn a_change_before_the_wait_is_not_lost() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        watcher.shared.wake_order("a", None);
        tokio::task::yield_now().await;
        assert!(woke(&mut a).await);
    }

    #[tokio::test]
    async fn everyone_is_woken_when_notifications_may_be_lost() {
        let watcher = watcher();
        let mut a = watcher.subscribe("a");
        let mut b = watcher.subscribe("b");
        watcher.set_listening(false);
        assert!(woke(&mut a).await);
        assert!(woke(&mut b).await);
    }

    #[tokio::test]
    async fn the_last_subscription_removes_its_order() {
        let watcher = watcher();
        let a1 = watcher.subscribe("a");
        let a2 = watcher.subscribe("a");
        assert_eq!(watcher.watched_orders(), 1);
        drop(a1);
        assert_eq!(watcher.watched_orders(), 1);
        drop(a2);
        assert_eq!(watcher.watched_orders(), 0);
        // A change for an order nobody watches is a no-op.
        watcher.shared.wake_order("a", None);
    }
}
