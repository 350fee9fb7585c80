//! WebSocket sessions on a shard: live subscriptions and ingest over a socket.
//!
//! `tungstenite` does the protocol (frames, masking, fragmentation, ping/pong,
//! close handshake) through its sans-I/O `WebSocketContext`: bytes read from
//! the socket are fed into an in-memory stream, frames it writes land in an
//! in-memory buffer that the session writes to the socket. Each session runs
//! two tasks on its shard — a reader (client frames: ingest, control, ping,
//! close) and a writer (queued events, answers, pings) — sharing one
//! `Rc<Session>` whose `RefCell`s are never held across an `.await`.
//!
//! What each subscriber selects lives in the shard's [`Rooms`] index (see
//! `rooms`): the fan-out task walks a committed batch once, and for each
//! event finds the subscribers of its device and of its prefixes, so the
//! cost follows the subscribers an event reaches, not the shard's total.
//! Control frames (`{"op":"subscribe",…}`) change a subscriber's rooms from
//! its reader task, on the same thread: no lock.
//!
//! A subscriber's queue is bounded by `websocket.queue_messages` and
//! `queue_bytes`. Events its rooms match are copied into it from the
//! shared batch (so a slow subscriber pins its own events, never whole
//! batches). When it is full the overflow policy applies: close with 1013,
//! or drop the oldest and report `{"dropped": N}` before the next event.
//! Missed batches (a full inbox upstream) are reported the same way.
//!
//! A snapshot (`snapshot=true`, `"snapshot": true`) holds the queue while
//! the rooms' state is read and sent, then releases it without what the
//! snapshot already showed; `snapshot` has the hand-over.
//!
//! Ingest frames (one event or an array, as text) are answered in order with
//! `{"seq": n, "accepted": N, "rejected": [...]}` after commit; `seq` counts
//! the client's data frames from 1, control frames left out (their answers
//! take their place in the same order). The reader handles one frame at a time,
//! which keeps answers in order and pushes back on a client that outruns the
//! database.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Message, Utf8Bytes};

use super::ShardCtx;
use super::accept::{self, Ingested};
use super::devices;
use super::io::{IDLE_READ_BYTES, LocalNotify, READ_CHUNK_BYTES, ReadOutcome};
use super::rooms::{self, Control, ControlError, Op, RoomLimits, Rooms, Selection};
use super::snapshot::{self, Seen, Settling};
use super::transport::{ReadHalf, Transport, WriteHalf};
use crate::auth::{Grant, Scope};
use crate::broadcast::{Admission, CommittedBatch, EventRef};
use crate::budget::Lease;
use crate::config::{Overflow, WebSocketConfig as WsConfig};
use crate::ingest::BodyKind;
use crate::ingest::event::{MAX_ID_BYTES, MAX_TYPE_BYTES};
use crate::limits::IpPass;
use crate::read::{DeviceFilter, Query};

/// Ingest answers a session holds unsent; past this the reader stops
/// taking frames until the client reads (a client that sends and never
/// reads cannot grow memory).
const MAX_PENDING_ANSWERS: usize = 64;
/// Frames tungstenite wrote on its own while reading (pongs, close replies)
/// that the writer has not taken yet. A client that floods pings and never
/// reads stops being read past this, instead of growing the output.
const MAX_PENDING_OUTPUT_BYTES: usize = 64 * 1024;

/// Most bytes of queued events encoded into one socket write.
const WRITE_CHUNK_BYTES: usize = 64 * 1024;

/// What a queued event costs besides its text: its queue slot and the
/// `Bytes` header (charged to the live feed's budget with the text).
const QUEUED_EVENT_OVERHEAD: usize = 64;
/// A subscriber's lease grows a quarter (and at least this much) ahead of
/// its queue, so that queueing an event is rarely an atomic operation on the
/// shared counter, while 100,000 idle subscribers still hold nothing.
const LEASE_SLACK_BYTES: usize = 512;

/// What a subscriber asked for in its `GET /ws` query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WsRequest {
    /// `device_id`, `device_prefix`, `type`: each repeatable, accumulating
    /// (see `rooms` for what they select together).
    pub devices: Vec<Box<str>>,
    pub prefixes: Vec<Box<str>>,
    pub types: Vec<Box<str>>,
    /// `coalesce_ms`: at most the latest event per device, this often.
    pub coalesce: Option<Duration>,
    /// `subscribe=false`: an ingest-only socket that gets no pushed events.
    pub ingest_only: bool,
    /// `snapshot=true`: the rooms' current state first (see `snapshot`).
    pub snapshot: bool,
    /// Set from the token (not the query): everything the socket selects
    /// lies within it; `""` without a token prefix.
    pub scope: Box<str>,
}

impl WsRequest {
    /// Parses `device_id=…&device_prefix=…&type=…&coalesce_ms=…` (all optional).
    pub fn parse(query: &str) -> Result<WsRequest, String> {
        let mut request = WsRequest::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let too_long = |max: usize| value.len() > max;
            match &*key {
                "device_id" | "type" if value.is_empty() => return Err(format!("{key} must not be empty")),
                "device_id" | "device_prefix" if too_long(MAX_ID_BYTES) => {
                    return Err(format!("{key} must be at most {MAX_ID_BYTES} bytes"));
                }
                "type" if too_long(MAX_TYPE_BYTES) => {
                    return Err(format!("type must be at most {MAX_TYPE_BYTES} bytes"));
                }
                "device_id" => request.devices.push(value.into()),
                "device_prefix" => request.prefixes.push(value.into()),
                "type" => request.types.push(value.into()),
                "coalesce_ms" => {
                    let ms: u64 = value
                        .parse()
                        .ok()
                        .filter(|ms| (1..=60_000).contains(ms))
                        .ok_or_else(|| "coalesce_ms must be an integer from 1 to 60000".to_string())?;
                    request.coalesce = Some(Duration::from_millis(ms));
                }
                "subscribe" | "snapshot" => {
                    let on = match &*value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("{key} must be true or false")),
                    };
                    if key == "subscribe" {
                        request.ingest_only = !on;
                    } else {
                        request.snapshot = on;
                    }
                }
                // Read by `routes::admit`; never kept.
                "access_token" => {}
                other => {
                    return Err(format!(
                        "unknown query parameter `{other}`; use device_id, device_prefix, type, coalesce_ms, snapshot, \
                         subscribe, access_token"
                    ));
                }
            }
        }
        Ok(request)
    }

    /// The first selection of the socket.
    pub fn selection(&self) -> Selection {
        Selection::new(&self.scope, &self.devices, &self.prefixes, &self.types)
    }
}

/// The per-subscriber limits, from `[websocket]`.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    pub max_per_shard: usize,
    pub queue_messages: usize,
    pub queue_bytes: usize,
    pub overflow: Overflow,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub max_message_bytes: usize,
    pub rooms: RoomLimits,
}

impl WsLimits {
    pub fn from_config(c: &WsConfig) -> Self {
        Self {
            max_per_shard: c.max_subscribers_per_shard,
            queue_messages: c.queue_messages,
            queue_bytes: c.queue_bytes,
            overflow: c.overflow,
            ping_interval: Duration::from_millis(c.ping_interval_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            max_message_bytes: c.max_message_bytes,
            rooms: RoomLimits {
                max_devices: c.max_devices_per_socket,
                max_prefixes: c.max_prefixes_per_socket,
                max_types: c.max_types_per_socket,
                max_control_frame_bytes: c.max_control_frame_bytes,
            },
        }
    }
}

struct Queued {
    json: Bytes,
    committed_at: Instant,
}

/// One subscriber's bounded queue (its selection is in the shard's rooms).
pub struct Subscriber {
    /// `coalesce_ms`.
    coalesce: Option<Duration>,
    queue: RefCell<VecDeque<Queued>>,
    queued_bytes: Cell<usize>,
    /// Bytes its queued and coalesced events cost, overhead included.
    held: Cell<usize>,
    /// `held`'s share of the live feed's budget, taken in steps.
    lease: RefCell<Lease>,
    /// Coalescing: the latest event per device since the last tick.
    latest: RefCell<HashMap<Box<str>, Queued>>,
    /// Events dropped and not yet reported (`drop_oldest`).
    dropped: Cell<u64>,
    /// The close policy tripped: the session closes with 1013.
    overflowed: Cell<bool>,
    wake: LocalNotify,
    /// The last batch that offered it an event (`Subscribers::deliver`).
    batch_seen: Cell<u64>,
    /// A snapshot is being sent: events queue but are not sent yet.
    holding: Cell<bool>,
    /// After a snapshot: its state events, still recognised for a while,
    /// and their bytes in the memory budget.
    settling: RefCell<Option<(Settling, Lease)>>,
}

impl Subscriber {
    fn new(coalesce: Option<Duration>, lease: Lease) -> Self {
        Self {
            coalesce,
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            held: Cell::new(0),
            lease: RefCell::new(lease),
            latest: RefCell::new(HashMap::new()),
            dropped: Cell::new(0),
            overflowed: Cell::new(false),
            wake: LocalNotify::default(),
            batch_seen: Cell::new(0),
            holding: Cell::new(false),
            settling: RefCell::new(None),
        }
    }

    /// Whether `e` is a state event a recent snapshot already sent
    /// (`snapshot`, step 4). Costs nothing once the settling time is over.
    fn already_sent(&self, e: &EventRef<'_>, now: Instant) -> bool {
        let mut settling = self.settling.borrow_mut();
        let Some((s, _)) = settling.as_mut() else { return false };
        if now >= s.until || s.seen.is_empty() {
            *settling = None;
            return false;
        }
        s.seen.recognises(e.device_id, e.json)
    }

    /// Ends a snapshot (`snapshot`, step 3): drops the held events it
    /// already showed, keeps `seen` for the settling time, sends the rest.
    fn release(&self, mut seen: Seen, lease: Lease) {
        let drop = {
            let queue = self.queue.borrow();
            seen.release(queue.iter().map(|q| &q.json[..]))
        };
        let mut at = 0;
        self.queue.borrow_mut().retain(|q| {
            let keep = !drop.get(at).copied().unwrap_or(false);
            at += 1;
            if !keep {
                self.queued_bytes.set(self.queued_bytes.get() - q.json.len());
                self.held.set(self.held.get() - q.json.len() - QUEUED_EVENT_OVERHEAD);
            }
            keep
        });
        self.latest.borrow_mut().retain(|device, q| {
            let keep = !seen.recognises(device, &q.json);
            if !keep {
                self.held.set(self.held.get() - q.json.len() - QUEUED_EVENT_OVERHEAD);
            }
            keep
        });
        *self.settling.borrow_mut() = (!seen.is_empty()).then(|| (Settling::new(seen, Instant::now()), lease));
        self.holding.set(false);
        self.give_back();
        self.wake.notify();
    }

    /// Takes one event its selection matched. Returns how many events
    /// were dropped or lost to an overflow.
    fn take(&self, e: &EventRef<'_>, committed_at: Instant, limits: &WsLimits) -> u64 {
        if self.already_sent(e, committed_at) {
            return 0;
        }
        let item = Queued { json: Bytes::copy_from_slice(e.json), committed_at };
        if self.coalesce.is_none() {
            return self.push(item, limits);
        }
        let mut latest = self.latest.borrow_mut();
        let replaced = latest.get(e.device_id).map_or(0, |q| q.json.len() + QUEUED_EVENT_OVERHEAD);
        if (latest.len() >= limits.queue_messages && replaced == 0)
            || !self.charge(self.held.get() - replaced + item.json.len() + QUEUED_EVENT_OVERHEAD)
        {
            drop(latest);
            return self.missed(1, limits);
        }
        self.held.set(self.held.get() - replaced + item.json.len() + QUEUED_EVENT_OVERHEAD);
        latest.insert(e.device_id.into(), item);
        0
    }

    fn push(&self, item: Queued, limits: &WsLimits) -> u64 {
        let cost = item.json.len() + QUEUED_EVENT_OVERHEAD;
        let mut queue = self.queue.borrow_mut();
        let mut lost = 0;
        loop {
            let fits = queue.len() < limits.queue_messages
                && self.queued_bytes.get() + item.json.len() <= limits.queue_bytes
                && self.charge(self.held.get() + cost);
            if fits {
                break;
            }
            if limits.overflow == Overflow::Close {
                drop(queue);
                // The queued events and this one are lost with the close.
                return lost + self.trip() + 1;
            }
            let Some(old) = queue.pop_front() else {
                // A single event larger than the whole queue (or the budget).
                self.dropped.set(self.dropped.get() + 1);
                return lost + 1;
            };
            self.queued_bytes.set(self.queued_bytes.get() - old.json.len());
            self.held.set(self.held.get() - old.json.len() - QUEUED_EVENT_OVERHEAD);
            self.dropped.set(self.dropped.get() + 1);
            lost += 1;
        }
        self.queued_bytes.set(self.queued_bytes.get() + item.json.len());
        self.held.set(self.held.get() + cost);
        queue.push_back(item);
        lost
    }

    /// Makes sure the lease covers `needed` bytes, growing it a quarter
    /// ahead; false when the live feed's budget has no room.
    fn charge(&self, needed: usize) -> bool {
        let mut lease = self.lease.borrow_mut();
        lease.try_reserve(needed, needed + needed / 4 + LEASE_SLACK_BYTES).is_ok()
    }

    /// Gives back what the lease holds well beyond `held` (a drained queue
    /// holds nothing).
    fn give_back(&self) {
        let mut lease = self.lease.borrow_mut();
        let held = self.held.get();
        if lease.bytes() > 2 * held + 8 * LEASE_SLACK_BYTES {
            lease.set(if held == 0 { 0 } else { held + held / 4 + LEASE_SLACK_BYTES });
        }
    }

    /// Takes the oldest queued event.
    fn pop(&self) -> Option<Queued> {
        let q = self.queue.borrow_mut().pop_front()?;
        self.queued_bytes.set(self.queued_bytes.get() - q.json.len());
        self.held.set(self.held.get() - q.json.len() - QUEUED_EVENT_OVERHEAD);
        Some(q)
    }

    /// Events this subscriber will never get (upstream overflow).
    pub fn missed(&self, n: u64, limits: &WsLimits) -> u64 {
        match limits.overflow {
            Overflow::Close => self.trip() + n,
            Overflow::DropOldest => {
                self.dropped.set(self.dropped.get() + n);
                self.wake.notify();
                n
            }
        }
    }

    /// The close policy: empty the queue and have the session close (1013).
    fn trip(&self) -> u64 {
        let pending = self.queue.borrow().len() as u64;
        self.overflowed.set(true);
        self.queue.borrow_mut().clear();
        self.latest.borrow_mut().clear();
        self.queued_bytes.set(0);
        self.held.set(0);
        self.lease.borrow_mut().set(0);
        self.wake.notify();
        pending
    }
}

/// The subscribers a shard owns, in rooms, for its fan-out task.
#[derive(Default)]
pub struct Subscribers {
    rooms: RefCell<Rooms<Rc<Subscriber>>>,
    next_id: Cell<u64>,
    /// Batches delivered so far (for `Subscriber::batch_seen`).
    batches: Cell<u64>,
    /// The subscribers the current batch reached (kept for its capacity).
    reached: RefCell<Vec<Rc<Subscriber>>>,
}

/// What one delivery cost the subscribers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Events dropped or lost to an overflow.
    pub lost: u64,
    /// Subscribers the close policy tripped.
    pub slow_closes: u64,
}

impl Subscribers {
    fn register(&self, s: Rc<Subscriber>, selection: Selection) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.rooms.borrow_mut().insert(id, s, selection);
        id
    }

    fn unregister(&self, id: u64) {
        self.rooms.borrow_mut().remove(id);
    }

    /// Subscriber `id`'s selection now.
    fn selection(&self, id: u64) -> Option<Selection> {
        self.rooms.borrow().selection(id).map(|s| s.clone())
    }

    /// Applies a control frame to subscriber `id`'s selection; the new one,
    /// or why not (then nothing changed). `afford` may refuse its bytes.
    fn apply(
        &self,
        id: u64,
        c: &Control,
        limits: &RoomLimits,
        afford: impl FnOnce(&Selection) -> Result<(), String>,
    ) -> Result<String, String> {
        let next = {
            let rooms = self.rooms.borrow();
            let Some(now) = rooms.selection(id) else { return Err("this socket is closing".into()) };
            now.apply(c, limits)?
        };
        afford(&next)?;
        let answer = c.answer(&next);
        self.rooms.borrow_mut().replace(id, next);
        Ok(answer)
    }

    /// Offers a committed batch to the subscribers whose rooms match each
    /// event (found through the index); `missed` events are reported to
    /// every subscriber first.
    pub fn deliver(&self, batch: Option<&CommittedBatch>, missed: u64, limits: &WsLimits) -> Delivered {
        let rooms = self.rooms.borrow();
        let mut d = Delivered::default();
        let mut count = |s: &Subscriber, lost: u64, was_overflowed: bool| {
            d.lost += lost;
            if s.overflowed.get() && !was_overflowed {
                d.slow_closes += 1;
            }
        };
        if missed > 0 {
            for s in rooms.values() {
                let was = s.overflowed.get();
                count(s, s.missed(missed, limits), was);
            }
        }
        let Some(batch) = batch else { return d };
        let stamp = self.batches.get() + 1;
        self.batches.set(stamp);
        let mut reached = self.reached.borrow_mut();
        for e in batch.events() {
            rooms.for_each_match(e.device_id, e.event_type, |s| {
                if s.overflowed.get() {
                    return;
                }
                if s.batch_seen.replace(stamp) != stamp {
                    reached.push(s.clone());
                }
                count(s, s.take(&e, batch.committed_at, limits), false);
            });
        }
        for s in reached.drain(..) {
            // A coalescing subscriber sends on its own ticks.
            if s.coalesce.is_none() {
                s.wake.notify();
            }
        }
        if reached.capacity() > 4096 {
            *reached = Vec::new();
        }
        d
    }

    /// [`Subscribers::deliver`], counted in the shard's stats.
    pub fn fan_out(&self, batch: Option<&CommittedBatch>, missed: u64, ctx: &ShardCtx) {
        let d = self.deliver(batch, missed, &ctx.ws_limits());
        let stats = ctx.stats();
        stats.ws_dropped.add(d.lost);
        stats.ws_slow_closes.add(d.slow_closes);
    }
}

/// Runs the shard's fan-out: committed batches from the broadcaster to the
/// subscribers this shard owns. Ends at shutdown (subscribers are being
/// closed then), which also releases its hold on the shard's context.
pub async fn fan_out_task(ctx: Rc<ShardCtx>, mut inbox: crate::broadcast::Inbox) {
    use futures_util::StreamExt as _;
    loop {
        let shutdown = ctx.shutdown.clone();
        let batch = monoio::select! {
            b = inbox.next() => b,
            _ = shutdown => None,
        };
        let Some(batch) = batch else { return };
        let missed = ctx.hub.slots[ctx.id].lagged.swap(0, std::sync::atomic::Ordering::Relaxed);
        ctx.ws.fan_out(Some(&batch), missed, &ctx);
    }
}

/// tungstenite's view of the socket: what was read, and where frames go.
struct Mem<'a> {
    input: &'a [u8],
    pos: &'a mut usize,
    output: &'a mut Vec<u8>,
}

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.input[*self.pos..];
        if rest.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        *self.pos += n;
        Ok(n)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Protocol {
    ws: WebSocketContext,
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl Protocol {
    fn with<T>(&mut self, f: impl FnOnce(&mut WebSocketContext, &mut Mem<'_>) -> T) -> T {
        let mut mem = Mem { input: &self.input, pos: &mut self.pos, output: &mut self.output };
        f(&mut self.ws, &mut mem)
    }
}

/// What both tasks of one session share.
struct Session {
    protocol: RefCell<Protocol>,
    sub: Rc<Subscriber>,
    /// Ingest answers and error notices, sent before queued events; at most
    /// `MAX_PENDING_ANSWERS`.
    control: RefCell<VecDeque<String>>,
    /// The writer has taken the pending answers.
    answered: LocalNotify,
    /// A close the server decided on (code, reason), not yet sent.
    close: Cell<Option<(u16, &'static str)>>,
    /// The peer is gone or has closed: flush what tungstenite queued, end.
    peer_done: Cell<bool>,
    last_heard: Cell<Instant>,
    /// The writer has finished: the reader stops.
    stopped: LocalNotify,
    /// The upgrade request's id, for log lines about this socket.
    request_id: String,
    /// Its id in the shard's rooms; `None` for an ingest-only socket.
    room: Option<u64>,
    /// The selection's bytes in the memory budget.
    selection_lease: RefCell<Lease>,
}

impl Session {
    fn request_close(&self, code: u16, reason: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some((code, reason)));
        }
        self.sub.wake.notify();
    }
}

/// Who is on the other end of a WebSocket: its IP's pass, its token, and
/// the upgrade request's id (the 101 carries it; log lines name it).
pub struct Client {
    pub ip: IpPass,
    pub grant: Option<std::sync::Arc<Grant>>,
    pub request_id: String,
}

/// Answers the upgrade with 101 and serves the connection until either side
/// closes. The subscriber is registered before the 101 goes out, so every
/// event committed after the client sees the handshake reaches it.
pub async fn serve(
    mut stream: Transport,
    leftover: Vec<u8>,
    ctx: Rc<ShardCtx>,
    request: WsRequest,
    admission: Admission,
    client: Client,
    accept_key: &str,
) {
    let limits = ctx.ws_limits();
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes));
    let sub = Rc::new(Subscriber::new(request.coalesce, ctx.hub.budget.lease()));
    let selection = request.selection();
    // With snapshot=true (the upgrade checked that [state] is on), events
    // queue from the registration on and wait for the snapshot.
    let initial = (request.snapshot && !request.ingest_only).then(|| {
        sub.holding.set(true);
        Snapshot { filter: snapshot::filter(&selection, None), id: None }
    });
    // The URL's filters are bounded (websocket.max_*_per_socket, checked at
    // the upgrade); their bytes are held without a refusal, like a request head's.
    let mut selection_lease = ctx.budget.lease();
    selection_lease.set(selection.memory_bytes());
    // An ingest-only socket is not offered committed events.
    let id = (!request.ingest_only).then(|| ctx.ws.register(sub.clone(), selection));
    let session = Rc::new(Session {
        protocol: RefCell::new(Protocol {
            ws: WebSocketContext::new(Role::Server, Some(config)),
            // The HTTP buffer may be large; keep only the bytes.
            input: leftover.as_slice().to_vec(),
            pos: 0,
            output: Vec::new(),
        }),
        sub,
        control: RefCell::new(VecDeque::new()),
        answered: LocalNotify::default(),
        close: Cell::new(None),
        peer_done: Cell::new(false),
        last_heard: Cell::new(Instant::now()),
        stopped: LocalNotify::default(),
        request_id: client.request_id.clone(),
        room: id,
        selection_lease: RefCell::new(selection_lease),
    });
    let switching = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: \
         {accept_key}\r\nX-Request-Id: {}\r\n\r\n",
        client.request_id
    );
    let deadline = Instant::now() + ctx.config().server.write_timeout();
    let (written, _) = stream.write_all_by(switching.into_bytes(), deadline).await;
    if !written {
        if let Some(id) = id {
            ctx.ws.unregister(id);
        }
        return;
    }
    let (reader, writer) = stream.into_split();
    let read_task = monoio::spawn(read_loop(reader, session.clone(), ctx.clone(), client, initial));
    write_loop(writer, &session, &ctx).await;
    session.stopped.notify();
    read_task.await;
    if let Some(id) = id {
        ctx.ws.unregister(id);
    }
    drop(admission);
}

async fn read_loop(
    mut reader: ReadHalf,
    session: Rc<Session>,
    ctx: Rc<ShardCtx>,
    client: Client,
    initial: Option<Snapshot>,
) {
    let limits = ctx.ws_limits();
    if let Some(s) = initial {
        send_snapshot(&ctx, &session, s).await;
    }
    let mut buf = Vec::new();
    // Reads start small (an idle subscriber pins little) and double while
    // they come back full (a client streaming ingest frames).
    let mut want = IDLE_READ_BYTES;
    let mut seq = 0u64;
    // Bytes that arrived with the upgrade request are processed first.
    let mut fresh = !session.protocol.borrow().input.is_empty();
    // Bytes fed to tungstenite since its last complete message (a partial
    // frame it holds), in the memory budget. Once a message completes,
    // tungstenite holds at most the rest of the last read; a text message
    // then gets a lease of its own while it is ingested.
    let mut partial = ctx.budget.lease();
    let mut last_read = session.protocol.borrow().input.len();
    partial.set(last_read);
    loop {
        if !fresh {
            let deadline = session.last_heard.get() + limits.idle_timeout;
            match reader.read_more(&mut buf, want, deadline, session.stopped.wait()).await {
                ReadOutcome::Data => {}
                ReadOutcome::TimedOut => {
                    session.request_close(1001, "idle timeout");
                    return;
                }
                _ => {
                    session.peer_done.set(true);
                    session.sub.wake.notify();
                    return;
                }
            }
            session.last_heard.set(Instant::now());
            if partial.try_grow(buf.len()).is_err() {
                session.request_close(1013, "server over its memory budget (limits.memory_budget_bytes); retry later");
                return;
            }
            last_read = buf.len();
            let mut p = session.protocol.borrow_mut();
            if p.pos == p.input.len() {
                p.input.clear();
                p.pos = 0;
            }
            p.input.extend_from_slice(&buf);
            let filled = buf.len() >= want;
            want = if filled { (want * 2).min(READ_CHUNK_BYTES * 4) } else { IDLE_READ_BYTES };
            buf.clear();
            if !filled && buf.capacity() > IDLE_READ_BYTES {
                buf = Vec::new();
            }
        }
        fresh = false;
        loop {
            if !room_for_answer(&session).await {
                return;
            }
            let message = session.protocol.borrow_mut().with(|ws, mem| ws.read(mem));
            if message.is_ok() {
                // A message is complete; tungstenite holds at most the rest of the last read.
                let held = partial.bytes().min(last_read);
                partial.set(held);
            }
            match message {
                Ok(Message::Text(text)) => {
                    if let Some(control) = rooms::classify(&text, limits.rooms.max_control_frame_bytes) {
                        drop(text);
                        let (answer, snapshot) = match control_frame(&ctx, &session, control, &client) {
                            Ok((answer, snapshot)) => (answer, snapshot),
                            Err(e) => (e.answer(), None),
                        };
                        session.control.borrow_mut().push_back(answer);
                        session.sub.wake.notify();
                        if let Some(s) = snapshot {
                            send_snapshot(&ctx, &session, s).await;
                        }
                        continue;
                    }
                    seq += 1;
                    ctx.stats().ws_ingest_frames.inc();
                    let frame = ctx.budget.lease();
                    let answer = ingest_frame(&ctx, text, frame, seq, &client).await;
                    session.control.borrow_mut().push_back(answer);
                    session.sub.wake.notify();
                }
                Ok(Message::Binary(_)) => {
                    seq += 1;
                    let notice = serde_json::json!({
                        "seq": seq,
                        "error": "binary frames are not accepted; send events as JSON in text frames",
                    });
                    session.control.borrow_mut().push_back(notice.to_string());
                    session.sub.wake.notify();
                }
                Ok(Message::Close(_)) => {
                    // tungstenite has queued the reply; the writer flushes it.
                    session.peer_done.set(true);
                    session.sub.wake.notify();
                    return;
                }
                // Pings are answered by tungstenite on the next flush.
                Ok(_) => session.sub.wake.notify(),
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Everything fed in was consumed: release a grown buffer.
                    let mut p = session.protocol.borrow_mut();
                    if p.pos == p.input.len() {
                        p.pos = 0;
                        if p.input.capacity() > IDLE_READ_BYTES {
                            p.input = Vec::new();
                        } else {
                            p.input.clear();
                        }
                    }
                    break;
                }
                Err(tungstenite::Error::Capacity(_)) => {
                    session.request_close(1009, "message larger than websocket.max_message_bytes");
                    return;
                }
                Err(tungstenite::Error::Utf8(_)) => {
                    session.request_close(1007, "text frame is not valid UTF-8");
                    return;
                }
                Err(tungstenite::Error::Protocol(_)) => {
                    session.request_close(1002, "WebSocket protocol error");
                    return;
                }
                Err(_) => {
                    session.peer_done.set(true);
                    session.sub.wake.notify();
                    return;
                }
            }
        }
    }
}

/// Applies one control frame (see `rooms`) and renders its answer. It
/// counts against the client's IP and token rates like an ingest frame.
/// The change takes effect before the answer is queued: every event
/// committed after the client reads the answer is chosen by the new rooms
/// (events already queued for it may still arrive). With `"snapshot":
/// true` the socket's queue is held from here until the snapshot that the
/// caller sends next is out.
fn control_frame(
    ctx: &ShardCtx,
    session: &Session,
    parsed: Result<Control, ControlError>,
    client: &Client,
) -> Result<(String, Option<Snapshot>), ControlError> {
    let c = parsed?;
    let (ip_rate, token_rate) = {
        let cfg = ctx.config();
        (cfg.limits.ip_rate(), cfg.limits.token_rate())
    };
    if client.ip.take(ip_rate.0, ip_rate.1).is_err() {
        return Err(c.refuse("too many requests from this address (limits.ip_requests_per_s); slow down"));
    }
    if let Some(grant) = &client.grant
        && client.ip.take_from(&grant.rate, token_rate.0, token_rate.1).is_err()
    {
        return Err(c.refuse(format!("too many requests with {} (limits.token_requests_per_s)", grant.label())));
    }
    let Some(id) = session.room else {
        return Err(c.refuse(
            "this socket was opened with subscribe=false and receives no events; open GET /ws without it to use rooms",
        ));
    };
    if c.snapshot && c.op != Op::Subscribe {
        return Err(c.refuse("snapshot goes with subscribe"));
    }
    if c.snapshot && ctx.readers.is_none() {
        return Err(c.refuse(rooms::SNAPSHOT_NEEDS_STATE));
    }
    let limits = ctx.ws_limits().rooms;
    let afford = |next: &Selection| {
        session.selection_lease.borrow_mut().try_resize(next.memory_bytes()).map_err(|e| {
            ctx.stats().shed(crate::labels::Shed::MemoryBudget);
            format!("server is over its memory budget ({}); nothing changed, retry later", e.key)
        })
    };
    let answer = ctx.ws.apply(id, &c, &limits, afford).map_err(|e| c.refuse(e))?;
    // No await since the new rooms went into the index: no event of them
    // can have been sent yet.
    let snapshot = c.snapshot.then(|| {
        session.sub.holding.set(true);
        let now = ctx.ws.selection(id);
        Snapshot { filter: now.and_then(|now| snapshot::filter(&now, Some(&c))), id: c.id.clone() }
    });
    Ok((answer, snapshot))
}

/// A snapshot to send: what to read (`None`: the rooms hold no device) and
/// the id of the frame that asked for it.
struct Snapshot {
    filter: Option<DeviceFilter>,
    id: Option<serde_json::Value>,
}

/// Waits until the session may queue one more answer (the writer keeps up);
/// false once the writer has stopped.
async fn room_for_answer(session: &Session) -> bool {
    while session.control.borrow().len() >= MAX_PENDING_ANSWERS
        || session.protocol.borrow().output.len() >= MAX_PENDING_OUTPUT_BYTES
    {
        session.sub.wake.notify();
        let stopped = monoio::select! {
            _ = session.answered.wait() => false,
            _ = session.stopped.wait() => true,
        };
        if stopped {
            return false;
        }
    }
    true
}

/// Sends a snapshot (see `snapshot`) while the subscriber's queue is held:
/// the state of its devices page by page, then the done marker, releasing
/// the queue in the same step. A failed read ends it with an error marker;
/// the live feed goes on either way.
async fn send_snapshot(ctx: &ShardCtx, session: &Session, s: Snapshot) {
    let (max_devices, max_page) = {
        let c = ctx.config();
        (c.websocket.snapshot_max_devices, c.state.max_page)
    };
    let id = s.id.as_ref();
    let mut seen = Seen::default();
    let mut lease = ctx.budget.lease();
    let mut sent = 0usize;
    let end = 'read: {
        let Some(mut filter) = s.filter else { break 'read snapshot::done(id, 0, true) };
        loop {
            if sent >= max_devices {
                break 'read snapshot::done(id, sent, false);
            }
            filter.limit = max_page.min(max_devices - sent).max(1);
            let answer = match devices::read(ctx, Query::Page(filter.clone())).await {
                Ok(Some(answer)) => answer,
                Ok(None) => break 'read snapshot::done(id, sent, true),
                Err(failed) => break 'read snapshot::failed(id, sent, &failed.message),
            };
            for item in &answer.items {
                seen.insert(&item.device_id, &item.event_id);
            }
            if let Err(e) = lease.try_resize(seen.memory_bytes()) {
                ctx.stats().shed(crate::labels::Shed::MemoryBudget);
                let why = format!("server is over its memory budget ({}); retry later", e.key);
                break 'read snapshot::failed(id, sent, &why);
            }
            for item in &answer.items {
                if !room_for_answer(session).await {
                    return;
                }
                session.control.borrow_mut().push_back(snapshot::frame(answer.object(item)));
                session.sub.wake.notify();
                sent += 1;
            }
            match answer.next {
                Some(next) => filter.after = Some(next),
                None => break 'read snapshot::done(id, sent, true),
            }
        }
    };
    if !room_for_answer(session).await {
        return;
    }
    session.sub.release(seen, lease);
    session.control.borrow_mut().push_back(end);
    session.sub.wake.notify();
}

/// Answers one ingest frame. Each frame counts against the client's IP and
/// token rates like an HTTP request, and needs the `ingest` scope.
async fn ingest_frame(ctx: &ShardCtx, body: Utf8Bytes, mut lease: Lease, seq: u64, client: &Client) -> String {
    let refused = |status: u16, message: &str| {
        serde_json::json!({"seq": seq, "status": status, "error": message, "accepted": 0, "rejected": []}).to_string()
    };
    let (ip_rate, token_rate) = {
        let c = ctx.config();
        (c.limits.ip_rate(), c.limits.token_rate())
    };
    if client.ip.take(ip_rate.0, ip_rate.1).is_err() {
        return refused(429, "too many requests from this address (limits.ip_requests_per_s); slow down");
    }
    if let Some(grant) = &client.grant {
        if !grant.allows(Scope::Ingest) {
            return refused(403, &format!("{} lacks the `ingest` scope this needs", grant.label()));
        }
        if client.ip.take_from(&grant.rate, token_rate.0, token_rate.1).is_err() {
            return refused(429, &format!("too many requests with {} (limits.token_requests_per_s)", grant.label()));
        }
    }
    let kind = match body.as_bytes().iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => BodyKind::JsonArray,
        _ => BodyKind::Single,
    };
    if let Err(e) = lease.try_resize(body.len()) {
        ctx.stats().shed(crate::labels::Shed::MemoryBudget);
        return refused(503, &format!("server is over its memory budget ({}); nothing was stored, retry later", e.key));
    }
    match accept::ingest_events(ctx, Bytes::from(body), lease, kind, client.grant.as_deref()).await {
        Ingested::Answer { status: _, accepted, rejected } => {
            let body = accept::ingest_json(accepted, &rejected);
            format!("{{\"seq\":{seq},{}", &body[1..])
        }
        Ingested::BodyRefused { status, message } | Ingested::Failed { status, message, .. } => {
            if status >= 500 {
                crate::warn!(
                    "websocket ingest frame failed",
                    request_id = client.request_id,
                    seq = seq,
                    status = status,
                    error = message
                );
            }
            serde_json::json!({"seq": seq, "status": status, "error": message, "accepted": 0, "rejected": []})
                .to_string()
        }
    }
}

async fn write_loop(mut writer: WriteHalf, session: &Session, ctx: &ShardCtx) {
    let limits = ctx.ws_limits();
    let stats = ctx.stats();
    let sub = &session.sub;
    let mut last_sent = Instant::now();
    let mut next_tick = sub.coalesce.map(|every| Instant::now() + every);
    let mut out = Vec::new();
    loop {
        let pending = !session.control.borrow().is_empty() || (!sub.holding.get() && !sub.queue.borrow().is_empty());
        if !pending && session.close.get().is_none() && !session.peer_done.get() && !sub.overflowed.get() {
            let ping_at = last_sent + limits.ping_interval;
            let wake_at = next_tick.map_or(ping_at, |t| t.min(ping_at));
            let shutdown = ctx.shutdown.clone();
            monoio::select! {
                _ = sub.wake.wait() => {},
                _ = monoio::time::sleep(wake_at.saturating_duration_since(Instant::now())) => {},
                _ = shutdown => session.request_close(1001, "server shutting down"),
            }
        }
        let now = Instant::now();
        if now.duration_since(session.last_heard.get()) >= limits.idle_timeout {
            session.request_close(1001, "idle timeout");
        }
        if sub.overflowed.get() {
            session.close.set(Some((1013, "subscriber too slow; queue full")));
        }
        if let Some(tick) = next_tick.filter(|t| now >= *t) {
            next_tick = sub.coalesce.map(|every| tick.max(now - every) + every);
            let latest: Vec<_> = sub.latest.borrow_mut().drain().map(|(_, q)| q).collect();
            for q in latest {
                sub.held.set(sub.held.get() - q.json.len() - QUEUED_EVENT_OVERHEAD);
                let _ = sub.push(q, &limits);
            }
        }
        let closing = session.close.take();
        if let Some((code, reason)) = closing
            && code != 1000
            && code != 1001
        {
            crate::info!(
                "websocket closed by the server",
                request_id = session.request_id,
                code = code,
                reason = reason
            );
        }
        let mut sent_events = 0u64;
        {
            let mut p = session.protocol.borrow_mut();
            p.with(|ws, mem| {
                if let Some((code, reason)) = closing {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    let _ = ws.close(mem, Some(frame));
                    return;
                }
                for text in session.control.borrow_mut().drain(..) {
                    let _ = ws.write(mem, Message::Text(text.into()));
                }
                let dropped = sub.dropped.replace(0);
                if dropped > 0 {
                    let _ = ws.write(mem, Message::Text(format!("{{\"dropped\":{dropped}}}").into()));
                }
                let mut budget = WRITE_CHUNK_BYTES;
                while budget > 0 && !sub.holding.get() {
                    let Some(q) = sub.pop() else { break };
                    budget = budget.saturating_sub(q.json.len());
                    stats.ws_fanout_us.record_since(q.committed_at);
                    if let Ok(text) = Utf8Bytes::try_from(q.json) {
                        let _ = ws.write(mem, Message::Text(text));
                        sent_events += 1;
                    }
                }
                sub.give_back();
                if mem.output.is_empty() && now.duration_since(last_sent) >= limits.ping_interval {
                    let _ = ws.write(mem, Message::Ping(Bytes::new()));
                }
                let _ = ws.flush(mem);
            });
            std::mem::swap(&mut out, &mut p.output);
        }
        session.answered.notify();
        if !out.is_empty() {
            let bytes = out.len() as u64;
            // A peer that reads nothing for idle_timeout is gone.
            let deadline = Instant::now() + limits.idle_timeout;
            let (written, back) = writer.write_all_by(std::mem::take(&mut out), deadline).await;
            out = back;
            out.clear();
            if out.capacity() > WRITE_CHUNK_BYTES * 2 {
                out = Vec::new();
            }
            if !written {
                return;
            }
            stats.ws_messages_sent.add(sent_events);
            stats.ws_bytes_sent.add(bytes);
            last_sent = Instant::now();
        }
        if closing.is_some() || session.peer_done.get() {
            return;
        }
        if !sub.holding.get() && !sub.queue.borrow().is_empty() {
            sub.wake.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcast::Published;
    use crate::row::{RowBuf, RowFields};

    fn batch(devices: &[&str]) -> CommittedBatch {
        let mut rows = RowBuf::default();
        for (i, d) in devices.iter().enumerate() {
            let id = format!("e{i}");
            rows.push(&RowFields {
                event_id: id.as_bytes(),
                device_id: d,
                event_type: "t",
                ts: 0,
                received_at: 0,
                payload: Some(b"{}"),
            });
        }
        CommittedBatch::build(&Published::new(vec![rows], None, Instant::now()))
    }

    fn limits(overflow: Overflow, messages: usize) -> WsLimits {
        WsLimits {
            max_per_shard: 10,
            queue_messages: messages,
            queue_bytes: 1 << 20,
            overflow,
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            max_message_bytes: 1 << 20,
            rooms: RoomLimits { max_devices: 8, max_prefixes: 8, max_types: 8, max_control_frame_bytes: 1024 },
        }
    }

    fn every() -> Selection {
        Selection::new("", &[], &[], &[])
    }

    fn sub(coalesce: Option<Duration>, lease: Lease) -> Rc<Subscriber> {
        Rc::new(Subscriber::new(coalesce, lease))
    }

    /// Delivers `batch` to `s` alone, with every device selected: the lost events.
    fn offer(s: &Rc<Subscriber>, batch: &CommittedBatch, limits: &WsLimits) -> u64 {
        let subs = Subscribers::default();
        subs.register(s.clone(), every());
        subs.deliver(Some(batch), 0, limits).lost
    }

    fn queued(s: &Subscriber) -> Vec<String> {
        s.queue.borrow().iter().map(|q| String::from_utf8(q.json.to_vec()).unwrap()).collect()
    }

    #[test]
    fn query_parsing() {
        let r = WsRequest::parse("device_id=d%201&type=boot&coalesce_ms=250").unwrap();
        assert_eq!(
            (r.devices, r.types, r.coalesce),
            (vec!["d 1".into()], vec!["boot".into()], Some(Duration::from_millis(250)))
        );
        let r = WsRequest::parse("device_id=a&device_id=b&device_prefix=f%2F&device_prefix=&type=x&type=y").unwrap();
        assert_eq!(r.devices, [Box::<str>::from("a"), Box::<str>::from("b")], "repeats accumulate");
        assert_eq!(r.prefixes, [Box::<str>::from("f/"), Box::<str>::from("")]);
        assert_eq!(r.types, [Box::<str>::from("x"), Box::<str>::from("y")]);
        assert_eq!(WsRequest::parse("").unwrap(), WsRequest::default());
        assert!(WsRequest::parse("device=x").unwrap_err().contains("unknown query parameter"));
        assert!(WsRequest::parse("device_id=").unwrap_err().contains("device_id must not be empty"));
        assert!(WsRequest::parse(&format!("device_prefix={}", "p".repeat(129))).unwrap_err().contains("128"));
        assert!(WsRequest::parse("coalesce_ms=0").is_err());
        assert!(WsRequest::parse("subscribe=false").unwrap().ingest_only);
        assert!(WsRequest::parse("subscribe=maybe").is_err());
        assert!(WsRequest::parse("snapshot=true").unwrap().snapshot);
        assert!(WsRequest::parse("snapshot=yes").unwrap_err().contains("snapshot must be true or false"));
    }

    #[test]
    fn each_event_reaches_exactly_its_rooms() {
        let subs = Subscribers::default();
        let l = limits(Overflow::Close, 100);
        let b = sub(None, Lease::detached());
        subs.register(b.clone(), Selection::new("", &["b".into()], &[], &[]));
        let fleet = sub(None, Lease::detached());
        subs.register(fleet.clone(), Selection::new("", &["a".into()], &["f/".into()], &[]));
        let all = sub(None, Lease::detached());
        let all_id = subs.register(all.clone(), every());
        let d = subs.deliver(Some(&batch(&["a", "b", "f/1", "c", "b"])), 0, &l);
        assert_eq!(d, Delivered::default());
        assert_eq!(queued(&b).len(), 2);
        assert_eq!(queued(&fleet).len(), 2);
        assert_eq!(queued(&all).len(), 5);
        assert!(queued(&fleet)[1].contains("\"f/1\""), "in batch order: {:?}", queued(&fleet));
        // A control frame moves `all` into room c.
        let c = rooms::classify(r#"{"op":"subscribe","devices":["c"]}"#, 1024).unwrap().unwrap();
        let answer = subs.apply(all_id, &c, &l.rooms, |_| Ok(())).unwrap();
        assert!(answer.contains("\"ok\":true") && answer.contains("\"devices\":1"), "{answer}");
        let refused = subs.apply(all_id, &c, &l.rooms, |_| Err("no bytes".into()));
        assert_eq!(refused, Err("no bytes".into()));
        subs.deliver(Some(&batch(&["a", "c"])), 0, &l);
        assert_eq!((queued(&all).len(), queued(&fleet).len()), (6, 3));
        // Missed events reach everyone, whatever their rooms.
        let d = subs.deliver(None, 3, &l);
        assert_eq!(d, Delivered { lost: 9 + 11, slow_closes: 3 }, "the close policy loses the queued ones too");
    }

    #[test]
    fn close_policy_trips_and_empties() {
        let s = sub(None, Lease::detached());
        let lost = offer(&s, &batch(&["a", "b", "c"]), &limits(Overflow::Close, 2));
        assert!(s.overflowed.get());
        assert_eq!(s.queue.borrow().len(), 0);
        assert_eq!(lost, 3);
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let s = sub(None, Lease::detached());
        let lost = offer(&s, &batch(&["a", "b", "c", "d", "e"]), &limits(Overflow::DropOldest, 2));
        assert_eq!((lost, s.dropped.get(), s.queue.borrow().len()), (3, 3, 2));
        let kept: Vec<_> = s.queue.borrow().iter().map(|q| String::from_utf8(q.json.to_vec()).unwrap()).collect();
        assert!(kept[0].contains("\"d\"") && kept[1].contains("\"e\""), "{kept:?}");
    }

    #[test]
    fn the_live_feeds_budget_bounds_every_queue_together() {
        let budget = crate::budget::Budget::new("websocket.fanout_budget_bytes", 200 * 1024);
        let a = sub(None, budget.lease());
        let b = sub(None, budget.lease());
        let roomy = limits(Overflow::DropOldest, 1_000_000);
        let events: Vec<String> = (0..2000).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = events.iter().map(String::as_str).collect();
        // `a` never reads: it fills the budget, then drops its oldest.
        let lost = offer(&a, &batch(&names), &roomy);
        assert!(lost > 0 && budget.used() <= budget.limit(), "lost {lost}, used {}", budget.used());
        // `b` gets what is left; `a` closes under the close policy and frees its share.
        let tight = limits(Overflow::Close, 1_000_000);
        assert!(offer(&a, &batch(&names), &tight) > 0 && a.overflowed.get());
        assert_eq!(a.lease.borrow().bytes(), 0);
        assert_eq!(offer(&b, &batch(&names[..100]), &tight), 0, "room again for the others");
        while b.pop().is_some() {}
        b.give_back();
        assert_eq!(budget.used(), 0, "a reader that caught up holds nothing");
    }

    #[test]
    fn coalescing_keeps_latest_per_device() {
        let s = sub(Some(Duration::from_millis(10)), Lease::detached());
        offer(&s, &batch(&["a", "b", "a", "a"]), &limits(Overflow::Close, 10));
        assert_eq!(s.latest.borrow().len(), 2);
        assert!(s.queue.borrow().is_empty());
    }
}
