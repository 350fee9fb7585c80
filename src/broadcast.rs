//! Committed events, fanned out to WebSocket subscribers.
//!
//! The path, and why each hop is shaped so:
//!
//! 1. A writer, once a batch is committed and *before* answering its
//!    clients, hands ([`Publisher`]) the rows that were actually inserted (duplicates of
//!    stored rows are not events anew) to the broadcaster ring with
//!    `try_send`. Publishing before acknowledging means a client that sends
//!    its next event after an ack can never see the two pushed out of order.
//!    Nothing is published while nobody subscribes (and the bus is off).
//! 2. The `broadcaster` thread serialises each event to JSON once per batch
//!    into one shared buffer ([`CommittedBatch`]) and sends an `Arc` of it to
//!    every shard that has subscribers, through that shard's bounded inbox.
//! 3. Each shard's fan-out task offers the batch to the subscribers it owns;
//!    each subscriber copies the events its filter matches into its own
//!    bounded queue (so a slow subscriber holds its events, not whole
//!    batches). See `shard::ws`.
//!
//! No lock is taken per event or per batch on this path. When a ring or an
//! inbox is full, events are not queued without bound: the count of events
//! missed is recorded ([`Hub`]'s lag counters) and every affected subscriber
//! is told, by its overflow policy (close 1013, or a `{"dropped": N}` notice).
//!
//! With `[cluster] feed` on (see `cluster`), the broadcaster also offers
//! every batch to the bus ([`Outlet`]), whether or not anyone here
//! subscribes, and batches other instances published come back through
//! [`deliver`] into the same inboxes. Events lost before the bus (a full
//! ring or outlet, no budget) are counted in [`Export`] so that the bus's
//! sequence tells the other instances exactly how many they missed.
//!
//! Counts alone do not bound memory (1,024 batches of up to 16 MiB each), so
//! every hop also holds a lease in the live feed's byte budget
//! (`websocket.fanout_budget_bytes`, [`Hub::budget`]): the published rows,
//! the serialised batch until its last shard lets it go, and each
//! subscriber's queue. A hop that cannot get its bytes counts the events as
//! missed, exactly like a full ring.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::budget::{Budget, Lease};
use crate::row::{PG_EPOCH_UNIX_SECS, RowBuf};

/// One committed batch, serialised once and shared by every shard.
pub struct CommittedBatch {
    /// The JSON text of every event, back to back.
    text: Bytes,
    /// `device_id` and `type` of every event, back to back, for filtering.
    keys: String,
    events: Vec<EventIndex>,
    /// When the writer committed it, for the commit → frame latency.
    pub committed_at: Instant,
    /// Its bytes in the live feed's budget, released with the last `Arc`.
    lease: Lease,
}

#[derive(Debug, Clone)]
struct EventIndex {
    json: Range<u32>,
    device: Range<u32>,
    kind: Range<u32>,
}

/// One event of a [`CommittedBatch`].
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    pub device_id: &'a str,
    pub event_type: &'a str,
    pub json: &'a [u8],
}

impl CommittedBatch {
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn events(&self) -> impl Iterator<Item = EventRef<'_>> {
        self.events.iter().map(|e| EventRef {
            device_id: &self.keys[e.device.start as usize..e.device.end as usize],
            event_type: &self.keys[e.kind.start as usize..e.kind.end as usize],
            json: &self.text[e.json.start as usize..e.json.end as usize],
        })
    }

    /// Bytes [`CommittedBatch::build`] will need for `published`, at most.
    fn estimate(published: &Published) -> usize {
        published.rows.iter().map(|r| r.bytes().len() + 160 * r.len()).sum()
    }

    /// Heap bytes this batch holds.
    fn memory_bytes(&self) -> usize {
        self.text.len() + self.keys.capacity() + self.events.capacity() * std::mem::size_of::<EventIndex>()
    }

    /// Serialises the rows of `published` that were inserted.
    pub fn build(published: &Published) -> CommittedBatch {
        let mut text = Vec::with_capacity(published.rows.iter().map(|r| r.bytes().len() + 64 * r.len()).sum());
        let mut keys = String::new();
        let mut events = Vec::new();
        for (j, rows) in published.rows.iter().enumerate() {
            for r in 0..rows.len() {
                if published.mask.as_ref().is_some_and(|m| !m[j][r]) {
                    continue;
                }
                let Some(view) = rows.view(r) else { continue };
                let (Ok(device), Ok(kind)) =
                    (std::str::from_utf8(view.device_id), std::str::from_utf8(view.event_type))
                else {
                    continue;
                };
                let start = text.len() as u32;
                text.extend_from_slice(b"{\"event_id\":");
                json_string(&mut text, view.event_id);
                text.extend_from_slice(b",\"device_id\":");
                json_string(&mut text, view.device_id);
                text.extend_from_slice(b",\"type\":");
                json_string(&mut text, view.event_type);
                text.extend_from_slice(b",\"ts\":\"");
                rfc3339(&mut text, view.ts);
                text.extend_from_slice(b"\",\"received_at\":\"");
                rfc3339(&mut text, view.received_at);
                text.push(b'"');
                if let Some(payload) = view.payload {
                    text.extend_from_slice(b",\"payload\":");
                    text.extend_from_slice(payload);
                }
                text.push(b'}');
                let d = keys.len() as u32;
                keys.push_str(device);
                let k = keys.len() as u32;
                keys.push_str(kind);
                events.push(EventIndex { json: start..text.len() as u32, device: d..k, kind: k..keys.len() as u32 });
            }
        }
        CommittedBatch {
            text: Bytes::from(text),
            keys,
            events,
            committed_at: published.committed_at,
            lease: Lease::detached(),
        }
    }
}

impl CommittedBatch {
    /// A batch of no events: wakes shards to tell their subscribers of
    /// events missed upstream when no batch follows at once.
    pub fn empty(committed_at: Instant) -> CommittedBatch {
        CommittedBatch {
            text: Bytes::new(),
            keys: String::new(),
            events: Vec::new(),
            committed_at,
            lease: Lease::detached(),
        }
    }

    /// A batch another instance serialised: `text` is its events' JSON back
    /// to back, `keys` their `device_id`s and `type`s back to back, `lens`
    /// each event's (JSON, device, type) lengths in bytes. `None` when the
    /// lengths do not add up or cut text that is not UTF-8 (a foreign or
    /// damaged message).
    pub fn from_wire(
        text: Bytes,
        keys: String,
        lens: impl ExactSizeIterator<Item = (u32, u16, u16)>,
        committed_at: Instant,
        lease: Lease,
    ) -> Option<CommittedBatch> {
        let utf8 = std::str::from_utf8(&text).ok()?;
        let mut events = Vec::with_capacity(lens.len());
        let (mut t, mut k) = (0u32, 0u32);
        for (json, device, kind) in lens {
            let json = t..t.checked_add(json)?;
            let device = k..k.checked_add(u32::from(device))?;
            let kind = device.end..device.end.checked_add(u32::from(kind))?;
            // Out of range is not a char boundary either.
            if !utf8.is_char_boundary(json.end as usize)
                || ![device.end, kind.end].iter().all(|at| keys.is_char_boundary(*at as usize))
            {
                return None;
            }
            (t, k) = (json.end, kind.end);
            events.push(EventIndex { json, device, kind });
        }
        if t as usize != text.len() || k as usize != keys.len() {
            return None;
        }
        Some(CommittedBatch { text, keys, events, committed_at, lease })
    }

    /// Bytes of this batch's JSON text.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Rows hold validated UTF-8 text; serde_json does the escaping.
    let s = std::str::from_utf8(bytes).unwrap_or_default();
    let _ = serde_json::to_writer(&mut *out, s);
}

fn rfc3339(out: &mut Vec<u8>, pg_micros: i64) {
    use std::io::Write as _;
    let unix_us = pg_micros.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000);
    if let Some(t) = chrono::DateTime::from_timestamp_micros(unix_us) {
        let _ = write!(out, "{}", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    }
}

/// What a writer hands over after a commit: the requests' rows, and which
/// of them were inserted (`None`: all of them).
pub struct Published {
    pub rows: Vec<RowBuf>,
    /// Per request, per row: inserted now (publish) or already stored (skip).
    pub mask: Option<Vec<Vec<bool>>>,
    pub committed_at: Instant,
    /// The rows' bytes in the live feed's budget (taken by [`Publisher::publish`]).
    pub lease: Lease,
}

impl Published {
    /// Rows committed at `committed_at`; the publisher takes their lease.
    pub fn new(rows: Vec<RowBuf>, mask: Option<Vec<Vec<bool>>>, committed_at: Instant) -> Published {
        Published { rows, mask, committed_at, lease: Lease::detached() }
    }

    pub fn events(&self) -> u64 {
        match &self.mask {
            None => self.rows.iter().map(|r| r.len() as u64).sum(),
            Some(m) => m.iter().flatten().filter(|k| **k).count() as u64,
        }
    }
}

/// Per shard: what the broadcaster and the shard need to agree on.
#[derive(Default)]
pub struct ShardSlot {
    /// Subscribers this shard owns; written by the shard only.
    pub subscribers: AtomicUsize,
    /// Events this shard's subscribers missed because its inbox was full or
    /// the broadcaster ring overflowed; taken (swapped to 0) by the shard.
    pub lagged: AtomicU64,
}

/// Why events did not reach the bus (`ingestd_cluster_publish_dropped_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusDrop {
    /// The broadcaster ring or the bus's queue was full.
    QueueFull,
    /// No room in the live feed's budget or the bus queue's bytes.
    Budget,
    /// Not sent within `cluster.publish_timeout_ms`.
    Timeout,
    /// The bus was not connected.
    BusDown,
}

impl BusDrop {
    pub const ALL: [BusDrop; 4] = [BusDrop::QueueFull, BusDrop::Budget, BusDrop::Timeout, BusDrop::BusDown];

    pub fn label(self) -> &'static str {
        match self {
            BusDrop::QueueFull => "queue_full",
            BusDrop::Budget => "budget",
            BusDrop::Timeout => "timeout",
            BusDrop::BusDown => "bus_down",
        }
    }
}

/// The bus's share of the hub: whether batches go out to other instances,
/// and the events that were lost on the way there.
#[derive(Default)]
pub struct Export {
    on: AtomicBool,
    /// Lost events not yet folded into the bus's running count (the
    /// publisher takes them before its next message, so that every other
    /// instance sees the gap).
    pending: AtomicU64,
    dropped: [AtomicU64; 4],
}

impl Export {
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// `events` committed here that will never reach the bus.
    pub fn lost(&self, why: BusDrop, events: u64) {
        if self.is_on() && events > 0 {
            self.note(why, events);
            self.pending.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// Counts `events` as dropped that are already in the bus's running
    /// count (a message whose send failed: it may have arrived).
    pub fn note(&self, why: BusDrop, events: u64) {
        self.dropped[why as usize].fetch_add(events, Ordering::Relaxed);
    }

    /// Lost events since the last call, for the publisher's running count.
    pub fn take_lost(&self) -> u64 {
        self.pending.swap(0, Ordering::Relaxed)
    }

    /// Events lost for `why` since start.
    pub fn dropped(&self, why: BusDrop) -> u64 {
        self.dropped[why as usize].load(Ordering::Relaxed)
    }
}

/// Shared subscription state: counts, limits and lag.
pub struct Hub {
    pub slots: Box<[ShardSlot]>,
    /// What goes out to the other instances (`[cluster] feed`).
    pub export: Export,
    /// Bytes the live feed may hold: `websocket.fanout_budget_bytes`.
    pub budget: Budget,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_total: usize,
    max_per_ip: usize,
}

/// A writer's sending side of the broadcaster ring. Only writers hold one,
/// so when the last writer returns the broadcaster sees the ring close.
pub struct Publisher {
    pub hub: Arc<Hub>,
    ring: Sender<Published>,
}

impl Clone for Publisher {
    fn clone(&self) -> Self {
        Self { hub: self.hub.clone(), ring: self.ring.clone() }
    }
}

impl Publisher {
    /// Called by a writer after a commit, before answering. Never blocks.
    pub fn publish(&self, mut published: Published) {
        if !self.hub.wanted() {
            return;
        }
        let bytes = published.rows.iter().map(RowBuf::memory_bytes).sum();
        match self.hub.budget.try_lease(bytes) {
            Ok(lease) => published.lease = lease,
            Err(_) => return self.hub.lost(published.events(), BusDrop::Budget),
        }
        if let Err(e) = self.ring.try_send(published) {
            self.hub.lost(e.into_inner().events(), BusDrop::QueueFull);
        }
    }
}

/// Why an upgrade is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `websocket.max_subscribers` (or the shard's share) reached: 503.
    Full,
    /// `websocket.max_per_ip` reached for this address: 429.
    PerIp,
}

/// A subscription slot held by one WebSocket connection; dropping it frees it.
pub struct Admission {
    hub: Arc<Hub>,
    shard: usize,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.hub.total.fetch_sub(1, Ordering::Relaxed);
        self.hub.slots[self.shard].subscribers.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.hub.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Hub {
    /// The hub, the writers' publisher and the broadcaster's end of the ring.
    pub fn new(
        shards: usize,
        max_total: usize,
        max_per_ip: usize,
        ring_capacity: usize,
        budget: Budget,
    ) -> (Arc<Hub>, Publisher, Receiver<Published>) {
        let (ring, rx) = crossbeam_channel::bounded(ring_capacity);
        let hub = Arc::new(Hub {
            slots: (0..shards).map(|_| ShardSlot::default()).collect(),
            budget,
            export: Export::default(),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            max_total,
            max_per_ip,
        });
        (hub.clone(), Publisher { hub, ring }, rx)
    }

    /// Records `events` that no subscriber will get, for every shard with
    /// subscribers (each tells its own by their overflow policy).
    pub fn missed(&self, events: u64) {
        for slot in self.slots.iter().filter(|s| s.subscribers.load(Ordering::Relaxed) > 0) {
            slot.lagged.fetch_add(events, Ordering::Relaxed);
        }
    }

    /// `events` lost before the broadcaster: missed here and on the bus.
    fn lost(&self, events: u64, why: BusDrop) {
        self.missed(events);
        self.export.lost(why, events);
    }

    /// Sends every batch to the bus from now on, subscribers here or not.
    pub fn export_to_bus(&self) {
        self.export.on.store(true, Ordering::Relaxed);
    }

    /// Whether committed batches are wanted: subscribers here, or the bus.
    pub fn wanted(&self) -> bool {
        self.subscribers() > 0 || self.export.is_on()
    }

    /// Subscribers across all shards.
    pub fn subscribers(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Admits one more connection on `shard` from `ip`, within the limits.
    /// Called once per upgrade, never per event.
    pub fn admit(self: &Arc<Self>, shard: usize, ip: IpAddr, max_per_shard: usize) -> Result<Admission, Refusal> {
        if self.slots[shard].subscribers.load(Ordering::Relaxed) >= max_per_shard {
            return Err(Refusal::Full);
        }
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Full);
        }
        {
            let mut per_ip = self.per_ip.lock();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        self.slots[shard].subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(Admission { hub: self.clone(), shard, ip })
    }
}

/// The shard side of an inbox.
pub type Inbox = futures_channel::mpsc::Receiver<Arc<CommittedBatch>>;
/// The broadcaster's (and the bus receiver's) side of a shard's inbox.
pub type InboxSender = futures_channel::mpsc::Sender<Arc<CommittedBatch>>;

/// Offers `batch` to every shard that has subscribers; a full inbox counts
/// the batch's events as missed for that shard.
pub fn deliver(hub: &Hub, inboxes: &mut [InboxSender], batch: &Arc<CommittedBatch>) {
    for (shard, inbox) in inboxes.iter_mut().enumerate() {
        let slot = &hub.slots[shard];
        if slot.subscribers.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if inbox.try_send(batch.clone()).is_err() {
            slot.lagged.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}

/// One batch on its way to the bus, with its bytes in the bus queue's bound.
pub struct Outgoing {
    pub batch: Arc<CommittedBatch>,
    pub lease: Lease,
}

/// The broadcaster's side of the queue to the bus (`cluster`): bounded in
/// batches (`cluster.queue_batches`) and bytes (`cluster.queue_bytes`).
pub struct Outlet {
    tx: futures_channel::mpsc::Sender<Outgoing>,
    budget: Budget,
}

/// The bus publisher's side of the queue.
pub type OutletReceiver = futures_channel::mpsc::Receiver<Outgoing>;

/// A queue to the bus of `batches` batches and `budget` bytes.
pub fn outlet(batches: usize, budget: Budget) -> (Outlet, OutletReceiver) {
    // futures' channel holds `buffer + senders`; one sender, so `batches - 1`.
    let (tx, rx) = futures_channel::mpsc::channel(batches.saturating_sub(1));
    (Outlet { tx, budget }, rx)
}

impl Outlet {
    /// Queues `batch` for the bus, or counts its events as lost there.
    fn offer(&mut self, hub: &Hub, batch: &Arc<CommittedBatch>) {
        let Ok(lease) = self.budget.try_lease(batch.memory_bytes()) else {
            return hub.export.lost(BusDrop::Budget, batch.len() as u64);
        };
        if self.tx.try_send(Outgoing { batch: batch.clone(), lease }).is_err() {
            hub.export.lost(BusDrop::QueueFull, batch.len() as u64);
        }
    }
}

/// One inbox per shard: senders for the broadcaster, receivers for shards.
pub fn inboxes(shards: usize, capacity: usize) -> (Vec<InboxSender>, Vec<Inbox>) {
    (0..shards).map(|_| futures_channel::mpsc::channel(capacity)).unzip()
}

/// Runs the `broadcaster` thread until every writer is gone; dropping
/// `outlet` then tells the bus publisher to finish.
pub fn run(hub: Arc<Hub>, ring: Receiver<Published>, mut inboxes: Vec<InboxSender>, mut outlet: Option<Outlet>) {
    loop {
        let published = match ring.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // The serialised batch is leased before it is built (then trued up);
        // the published rows are let go right after.
        let Ok(lease) = hub.budget.try_lease(CommittedBatch::estimate(&published)) else {
            hub.lost(published.events(), BusDrop::Budget);
            continue;
        };
        let mut batch = CommittedBatch::build(&published);
        drop(published);
        if batch.is_empty() {
            continue;
        }
        batch.lease = lease;
        batch.lease.set(batch.memory_bytes());
        let batch = Arc::new(batch);
        deliver(&hub, &mut inboxes, &batch);
        if let Some(outlet) = outlet.as_mut() {
            outlet.offer(&hub, &batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::RowFields;

    fn rows() -> RowBuf {
        let mut rows = RowBuf::default();
        rows.push(&RowFields {
            event_id: b"e1",
            device_id: "d\"1",
            event_type: "t",
            ts: 0,
            received_at: 1_000,
            payload: Some(b"{\"a\":1.50}"),
        });
        rows.push(&RowFields {
            event_id: b"e2",
            device_id: "d2",
            event_type: "u",
            ts: 1,
            received_at: 2,
            payload: None,
        });
        rows
    }

    #[test]
    fn events_serialise_once_as_json() {
        let p = Published { rows: vec![rows()], mask: None, committed_at: Instant::now(), lease: Lease::detached() };
        let batch = CommittedBatch::build(&p);
        let events: Vec<_> = batch.events().collect();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].device_id, events[0].event_type), ("d\"1", "t"));
        let v: serde_json::Value = serde_json::from_slice(events[0].json).unwrap();
        assert_eq!(v["device_id"], "d\"1");
        assert_eq!(v["ts"], "2000-01-01T00:00:00Z");
        assert_eq!(v["received_at"], "2000-01-01T00:00:00.001Z");
        assert!(std::str::from_utf8(events[0].json).unwrap().contains("1.50"), "payload text kept");
        let v: serde_json::Value = serde_json::from_slice(events[1].json).unwrap();
        assert!(v.get("payload").is_none());
    }

    #[test]
    fn mask_skips_rows_already_stored() {
        let p = Published::new(vec![rows()], Some(vec![vec![false, true]]), Instant::now());
        assert_eq!(p.events(), 1);
        let batch = CommittedBatch::build(&p);
        assert_eq!(batch.events().map(|e| e.device_id).collect::<Vec<_>>(), ["d2"]);
    }

    #[test]
    fn admission_limits_and_release() {
        let (hub, _publisher, _rx) = Hub::new(2, 3, 2, 4, Budget::unlimited());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = hub.admit(0, ip, 10).unwrap();
        let _b = hub.admit(1, ip, 10).unwrap();
        assert_eq!(hub.admit(0, ip, 10).err(), Some(Refusal::PerIp));
        let _c = hub.admit(0, other, 10).unwrap();
        assert_eq!(hub.admit(1, "127.0.0.3".parse().unwrap(), 10).err(), Some(Refusal::Full));
        drop(a);
        assert_eq!(hub.subscribers(), 2);
        assert!(hub.admit(0, ip, 10).is_ok(), "released slots are reusable");
        assert_eq!(hub.admit(0, "127.0.0.9".parse().unwrap(), 1).err(), Some(Refusal::Full), "per-shard cap");
    }

    #[test]
    fn publish_without_subscribers_is_free_and_overflow_is_counted() {
        let (hub, publisher, rx) = Hub::new(1, 10, 10, 1, Budget::unlimited());
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert!(rx.is_empty(), "nobody listens: nothing sent");
        let _sub = hub.admit(0, "127.0.0.1".parse().unwrap(), 10).unwrap();
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert_eq!(rx.len(), 1);
        assert_eq!(hub.slots[0].lagged.load(Ordering::Relaxed), 2, "overflowed events are counted for the shard");
    }

    #[test]
    fn publishing_past_the_byte_budget_counts_the_events_as_missed() {
        let budget = Budget::new("websocket.fanout_budget_bytes", 1);
        let (hub, publisher, rx) = Hub::new(1, 10, 10, 8, budget.clone());
        let _sub = hub.admit(0, "127.0.0.1".parse().unwrap(), 10).unwrap();
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert!(rx.is_empty(), "no room in the budget: nothing queued");
        assert_eq!(hub.slots[0].lagged.load(Ordering::Relaxed), 2);
        budget.set_limit(1 << 20);
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert!(budget.used() > 0, "queued rows hold their bytes");
        drop(rx.recv().unwrap());
        assert_eq!(budget.used(), 0, "and give them back when dropped");
    }

    #[test]
    fn with_the_bus_on_batches_go_out_without_local_subscribers_and_losses_are_counted_for_it() {
        let (hub, publisher, rx) = Hub::new(1, 10, 10, 1, Budget::unlimited());
        hub.export_to_bus();
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert_eq!(rx.len(), 1, "published for the bus although nobody subscribes here");
        publisher.publish(Published::new(vec![rows()], None, Instant::now()));
        assert_eq!(hub.export.dropped(BusDrop::QueueFull), 2, "the ring was full");
        assert_eq!(hub.export.take_lost(), 2);
        assert_eq!(hub.export.take_lost(), 0, "taken once");
        // The outlet: two batches fit, the third is lost to the bus.
        let (mut out, mut queue) = outlet(2, Budget::unlimited());
        let batch = Arc::new(CommittedBatch::build(&rx.recv().unwrap()));
        for _ in 0..3 {
            out.offer(&hub, &batch);
        }
        assert_eq!(hub.export.dropped(BusDrop::QueueFull), 4);
        assert!(queue.try_recv().is_ok() && queue.try_recv().is_ok());
        let (mut tight, _q) = outlet(8, Budget::new("cluster.queue_bytes", 1));
        tight.offer(&hub, &batch);
        assert_eq!(hub.export.dropped(BusDrop::Budget), 2, "past the queue's bytes");
    }
}
