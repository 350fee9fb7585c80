//! One live feed across instances (`[cluster] feed = "redis" | "nats"`).
//!
//! Storage already scales out (idempotency lives in the table's key); the
//! live feed did not: a subscriber saw only the events its own instance
//! committed. With the feed on, every instance puts each committed batch on
//! a bus once and takes the other instances' batches off it, so a
//! subscriber anywhere sees every instance's events through its own
//! filters, rooms and token prefixes.
//!
//! Why the shape:
//!
//! - **An existing engine, not a protocol of our own.** Redis pub/sub or
//!   NATS core subjects fan a message out to every instance; both are
//!   at-most-once, which is what the local feed promises too (a slow
//!   subscriber is told what it missed, not replayed).
//! - **One thread, `cluster-bus`, owns the bus.** It runs the clients' own
//!   runtime (tokio, current-thread) with two tasks: the publisher takes
//!   batches from the broadcaster through a queue bounded in batches and
//!   bytes (`broadcast::Outlet`, `try_send`: nobody upstream ever waits on
//!   the bus) and the receiver hands other instances' batches to the shards'
//!   inboxes exactly as the broadcaster does (`broadcast::deliver`).
//! - **The same bytes.** A message carries the JSON the broadcaster already
//!   made for local subscribers plus the keys shards filter on (`wire`), so
//!   the receiving side neither parses nor re-serialises an event.
//! - **Loss is counted, exactly, on both sides.** A batch not sent within
//!   `publish_timeout_ms` (bus down, slow, queue full) is dropped and
//!   counted here; every message carries its instance's running count of
//!   committed events, so a receiver that finds a gap (dropped there, or lost
//!   while its own connection was down) tells its subscribers how many events
//!   they missed, by the same overflow policy as local overflow
//!   (`{"dropped": N}` or close 1013). Heartbeats carry the count once a
//!   second when no batch does.
//! - **Never twice.** An instance leaves its own messages (its subscribers
//!   had them from the broadcaster) and any message whose number it has seen
//!   (`peers`).
//! - **Order.** Batches of one instance go out in commit order on one
//!   connection, and both buses keep a publisher's order per subscriber, so
//!   events that went through one instance arrive in the order they did
//!   locally. Across instances there is no order: two devices' events, or
//!   one device's events sent through two instances, interleave as the bus
//!   delivers them.
//! - **Connections heal themselves.** Redis connections are redialled by
//!   the two tasks with backoff (50 ms doubling to `reconnect_max_ms`), a
//!   quiet subscription is pinged; the NATS client reconnects and
//!   resubscribes by itself with the same backoff. `/health` (its status
//!   code does not depend on the bus) and `/metrics` show the state.

mod bus;
mod peers;
mod wire;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;

use crate::broadcast::{self, BusDrop, CommittedBatch, Hub, InboxSender, Outgoing, Outlet, OutletReceiver};
use crate::budget::Budget;
use crate::config::{ClusterConfig, Feed};
use bus::{Bus, BusError, Sender, backoff, within};
use peers::{Peers, Verdict};
use wire::Encoder;

/// How often an instance says where its count stands when it sends nothing else.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A Redis subscription quiet this long is pinged (heartbeats make that rare).
const QUIET: Duration = Duration::from_secs(3);
/// Room kept under the bus's own message limit for the header.
const HEADER_ROOM: usize = 512;

/// What `/health` and `/metrics` show of the bus.
pub struct Status {
    pub feed: Feed,
    pub instance: String,
    ever_up: AtomicBool,
    publisher_up: AtomicBool,
    receiver_up: AtomicBool,
    /// Messages with events sent, and their events.
    pub published_batches: AtomicU64,
    pub published_events: AtomicU64,
    /// Other instances' messages with events taken, and their events.
    pub received_batches: AtomicU64,
    pub received_events: AtomicU64,
    /// Other instances' events found missing (gaps in their counts).
    pub missed_events: AtomicU64,
    /// Messages on the channel that were not ours or were damaged.
    pub foreign_messages: AtomicU64,
    /// Connections made again after one was lost.
    pub reconnects: Arc<AtomicU64>,
    /// Other instances heard from in the last minute.
    pub peers: AtomicUsize,
    /// The latest message's age when it arrived (its sender's clock).
    pub lag_us: AtomicI64,
}

impl Status {
    pub fn new(feed: Feed, instance: String) -> Status {
        Status {
            feed,
            instance,
            ever_up: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            receiver_up: AtomicBool::new(false),
            published_batches: AtomicU64::new(0),
            published_events: AtomicU64::new(0),
            received_batches: AtomicU64::new(0),
            received_events: AtomicU64::new(0),
            missed_events: AtomicU64::new(0),
            foreign_messages: AtomicU64::new(0),
            reconnects: Arc::new(AtomicU64::new(0)),
            peers: AtomicUsize::new(0),
            lag_us: AtomicI64::new(0),
        }
    }

    /// Both directions connected.
    pub fn is_up(&self) -> bool {
        self.publisher_up.load(Ordering::Relaxed) && self.receiver_up.load(Ordering::Relaxed)
    }

    /// `up`, `connecting` (never up yet) or `down`.
    pub fn bus(&self) -> &'static str {
        if self.is_up() {
            "up"
        } else if self.ever_up.load(Ordering::Relaxed) {
            "down"
        } else {
            "connecting"
        }
    }

    fn set(&self, side: &AtomicBool, up: bool) {
        side.store(up, Ordering::Relaxed);
        if self.is_up() {
            self.ever_up.store(true, Ordering::Relaxed);
        }
    }
}

/// Why the feed could not start.
#[derive(Debug)]
pub enum StartError {
    /// `cluster.url` is not a URL the client takes.
    Url(String),
    Io(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Url(why) => write!(f, "cluster.url: {why}"),
            StartError::Io(e) => write!(f, "cluster-bus thread: {e}"),
        }
    }
}

/// A running feed: its status, the broadcaster's way in, and the thread.
pub struct Cluster {
    pub status: Arc<Status>,
    pub outlet: Outlet,
    pub thread: JoinHandle<()>,
}

/// Starts the `cluster-bus` thread. It connects in the background (an
/// unreachable bus never stops ingestd) and ends once `outlet` is dropped
/// and what was queued is sent or timed out.
pub fn start(config: &ClusterConfig, hub: Arc<Hub>, inboxes: Vec<InboxSender>) -> Result<Cluster, StartError> {
    let instance = if config.instance_id.is_empty() { generated_id() } else { config.instance_id.clone() };
    let status = Arc::new(Status::new(config.feed, instance));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Io)?;
    let bus =
        runtime.block_on(Bus::open(config, status.reconnects.clone())).map_err(|e| StartError::Url(e.to_string()))?;
    let (outlet, queue) =
        broadcast::outlet(config.queue_batches, Budget::new("cluster.queue_bytes", config.queue_bytes));
    hub.export_to_bus();
    let (config, shared) = (config.clone(), status.clone());
    let thread = std::thread::Builder::new()
        .name("cluster-bus".into())
        .spawn(move || {
            let link = Link { bus, hub, status: shared, config };
            runtime.block_on(link.run(queue, inboxes));
        })
        .map_err(StartError::Io)?;
    crate::info!("live feed across instances on", feed = status.feed.as_str(), instance = status.instance);
    Ok(Cluster { status, outlet, thread })
}

/// `<hostname>-<pid>-<8 hex>`: unique per start, readable in logs.
fn generated_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_graphic()).take(100).collect();
    // A v7 id's last hex digits are random.
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{}-{}-{}", if host.is_empty() { "ingestd" } else { &host }, std::process::id(), &random[24..])
}

/// What the two tasks share (one thread: no locks).
struct Link {
    bus: Bus,
    hub: Arc<Hub>,
    status: Arc<Status>,
    config: ClusterConfig,
}

impl Link {
    /// Runs until the publisher is done; the receiver is dropped with it.
    async fn run(self, queue: OutletReceiver, inboxes: Vec<InboxSender>) {
        let peers = RefCell::new(Peers::default());
        let receive = self.receive(inboxes, &peers);
        tokio::pin!(receive);
        tokio::select! {
            () = self.publish(queue, &peers) => {}
            () = &mut receive => {}
        }
    }

    /// The publisher: every batch the broadcaster queued, in order, each
    /// within `publish_timeout_ms` of its commit or dropped; a heartbeat
    /// when nothing else went out.
    async fn publish(&self, mut queue: OutletReceiver, peers: &RefCell<Peers>) {
        let (status, export) = (&*self.status, &self.hub.export);
        let limit = Duration::from_millis(self.config.publish_timeout_ms);
        let max_backoff = Duration::from_millis(self.config.reconnect_max_ms);
        let mut encoder = Encoder::new(&status.instance);
        let mut sender: Option<Sender> = None;
        let (mut failures, mut next_dial) = (0usize, Instant::now());
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let item = tokio::select! {
                item = queue.next() => match item {
                    Some(item) => Some(item),
                    None => return,
                },
                _ = beat.tick() => None,
            };
            if item.is_none() {
                let now = Instant::now();
                let mut peers = peers.borrow_mut();
                peers.forget(now);
                status.peers.store(peers.recent(now), Ordering::Relaxed);
            }
            if sender.is_none() && Instant::now() >= next_dial {
                match self.bus.sender().await {
                    Ok(s) => {
                        if failures > 0 {
                            status.reconnects.fetch_add(1, Ordering::Relaxed);
                            crate::info!("live feed: publishing again", feed = status.feed.as_str());
                        }
                        failures = 0;
                        sender = Some(s);
                    }
                    Err(e) => {
                        if failures == 0 {
                            crate::warn!(
                                "live feed: cannot reach the bus to publish; batches are dropped and counted until \
                                 it is back",
                                feed = status.feed.as_str(),
                                url = self.config.url_masked(),
                                error = e,
                            );
                        }
                        failures += 1;
                        next_dial = Instant::now() + backoff(failures, max_backoff);
                    }
                }
            }
            let up = sender.is_some() && self.bus.nats_up().unwrap_or(true);
            status.set(&status.publisher_up, up);
            if let Some(nats_up) = self.bus.nats_up() {
                status.set(&status.receiver_up, nats_up);
            }
            let Some(s) = sender.as_mut() else {
                if let Some(item) = item {
                    export.lost(BusDrop::BusDown, item.batch.len() as u64);
                }
                continue;
            };
            encoder.skip(export.take_lost());
            let sent = match item {
                Some(item) => self.send_batch(s, &mut encoder, item, limit).await,
                None => within(limit, s.send(encoder.heartbeat(unix_us(SystemTime::now())))).await,
            };
            if let Err(e) = sent {
                crate::warn!("live feed: publish failed; reconnecting", feed = status.feed.as_str(), error = e);
                if matches!(self.bus, Bus::Redis { .. }) {
                    sender = None;
                    failures = 1;
                    next_dial = Instant::now() + backoff(failures, max_backoff);
                    status.set(&status.publisher_up, false);
                }
            }
        }
    }

    /// Sends one batch as one or more messages; on a failure the rest of
    /// it is dropped (counted, and stepped over in the running count).
    async fn send_batch(
        &self,
        s: &mut Sender,
        encoder: &mut Encoder,
        item: Outgoing,
        limit: Duration,
    ) -> Result<(), BusError> {
        let (status, export) = (&*self.status, &self.hub.export);
        let batch = &item.batch;
        let age = batch.committed_at.elapsed();
        if age >= limit {
            export.lost(BusDrop::Timeout, batch.len() as u64);
            return Ok(());
        }
        let committed = unix_us(SystemTime::now() - age);
        let max = match s.max_message() {
            Some(bus_max) => self.config.max_message_bytes.min(bus_max.saturating_sub(HEADER_ROOM).max(1024)),
            None => self.config.max_message_bytes,
        };
        let mut from = 0;
        while from < batch.len() {
            let (msg, next) = encoder.chunk(batch, from, committed, max);
            let left = limit.saturating_sub(batch.committed_at.elapsed()).max(Duration::from_millis(1));
            match within(left, s.send(msg)).await {
                Ok(()) => {
                    status.published_batches.fetch_add(1, Ordering::Relaxed);
                    status.published_events.fetch_add((next - from) as u64, Ordering::Relaxed);
                    from = next;
                }
                Err(e) => {
                    let why = if e == BusError::Timeout { BusDrop::Timeout } else { BusDrop::BusDown };
                    // This message's events are in the count already (it
                    // may have arrived); the rest are stepped over.
                    export.note(why, (next - from) as u64);
                    export.lost(why, (batch.len() - next) as u64);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The receiver: other instances' messages, to the shards' inboxes.
    async fn receive(&self, mut inboxes: Vec<InboxSender>, peers: &RefCell<Peers>) {
        let status = &*self.status;
        let max_backoff = Duration::from_millis(self.config.reconnect_max_ms);
        let mut failures = 0usize;
        loop {
            let mut rx = match self.bus.receiver().await {
                Ok(rx) => rx,
                Err(e) => {
                    if failures == 0 {
                        crate::warn!(
                            "live feed: cannot subscribe to the bus; other instances' events are missed until it is \
                             back",
                            feed = status.feed.as_str(),
                            url = self.config.url_masked(),
                            error = e,
                        );
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures, max_backoff)).await;
                    continue;
                }
            };
            if self.bus.nats_up().is_none() {
                if failures > 0 {
                    status.reconnects.fetch_add(1, Ordering::Relaxed);
                    crate::info!("live feed: subscribed again", feed = status.feed.as_str());
                }
                status.set(&status.receiver_up, true);
            }
            loop {
                match rx.next(QUIET, |msg| !wire::is_from(msg, &status.instance)).await {
                    Ok(msg) => self.take(msg, &mut inboxes, &mut peers.borrow_mut()),
                    Err(e) => {
                        crate::warn!(
                            "live feed: subscription lost; resubscribing",
                            feed = status.feed.as_str(),
                            error = e
                        );
                        break;
                    }
                }
            }
            if self.bus.nats_up().is_none() {
                status.set(&status.receiver_up, false);
            }
            failures = 1;
            tokio::time::sleep(backoff(failures, max_backoff)).await;
        }
    }

    /// One message off the bus: accounted for, then its events to the shards.
    fn take(&self, msg: bytes::Bytes, inboxes: &mut [InboxSender], peers: &mut Peers) {
        let (status, hub) = (&*self.status, &*self.hub);
        let Ok((header, at)) = wire::header(&msg) else {
            status.foreign_messages.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if header.instance == status.instance {
            return;
        }
        let now = Instant::now();
        let events = u64::from(header.events);
        let Verdict::Take { missed } = peers.observe(&header.instance, header.seq, header.events_before, events, now)
        else {
            return;
        };
        // Once per message (a batch or a heartbeat), over a handful of
        // peers: /health shows a new instance as soon as it is heard.
        status.peers.store(peers.recent(now), Ordering::Relaxed);
        let lag_us = unix_us(SystemTime::now()).saturating_sub(header.committed_unix_us).max(0);
        status.lag_us.store(lag_us, Ordering::Relaxed);
        if missed > 0 {
            status.missed_events.fetch_add(missed, Ordering::Relaxed);
            hub.missed(missed);
            if events == 0 {
                // Nothing follows at once to carry the news: wake the shards.
                broadcast::deliver(hub, inboxes, &Arc::new(CommittedBatch::empty(now)));
            }
        }
        if events == 0 {
            return;
        }
        status.received_batches.fetch_add(1, Ordering::Relaxed);
        status.received_events.fetch_add(events, Ordering::Relaxed);
        if hub.subscribers() == 0 {
            return;
        }
        let Ok(lease) = hub.budget.try_lease(msg.len() + 16 * events as usize) else {
            return hub.missed(events);
        };
        let committed_at = now.checked_sub(Duration::from_micros(lag_us as u64)).unwrap_or(now);
        match wire::batch(&msg, &header, at, committed_at, lease) {
            Ok(batch) => broadcast::deliver(hub, inboxes, &Arc::new(batch)),
            Err(e) => {
                status.foreign_messages.fetch_add(1, Ordering::Relaxed);
                crate::warn!("live feed: a message was not taken", instance = header.instance, error = e);
                hub.missed(events);
            }
        }
    }
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}
