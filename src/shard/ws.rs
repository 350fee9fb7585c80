//! WebSocket sessions on a shard: live subscriptions and ingest over a socket.
//!
//! `tungstenite` does the protocol (frames, masking, fragmentation, ping/pong,
//! close handshake) through its sans-I/O `WebSocketContext`: bytes read from
//! the socket are fed into an in-memory stream, frames it writes land in an
//! in-memory buffer that the session writes to the socket. Each session runs
//! two tasks on its shard — a reader (client frames: ingest, ping, close) and
//! a writer (queued events, ingest answers, pings) — sharing one `Rc<Session>`
//! whose `RefCell`s are never held across an `.await`.
//!
//! A subscriber's queue is bounded by `websocket.queue_messages` and
//! `queue_bytes`. Events matching its filter are copied into it from the
//! shared batch (so a slow subscriber pins its own events, never whole
//! batches). When it is full the overflow policy applies: close with 1013,
//! or drop the oldest and report `{"dropped": N}` before the next event.
//! Missed batches (a full inbox upstream) are reported the same way.
//!
//! Ingest frames (one event or an array, as text) are answered in order with
//! `{"seq": n, "accepted": N, "rejected": [...]}` after commit; `seq` counts
//! the client's data frames from 1. The reader handles one frame at a time,
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
use super::io::{IDLE_READ_BYTES, LocalNotify, READ_CHUNK_BYTES, ReadOutcome};
use super::transport::{ReadHalf, Transport, WriteHalf};
use crate::auth::{Grant, Scope};
use crate::broadcast::{Admission, CommittedBatch, EventRef};
use crate::budget::Lease;
use crate::config::{Overflow, WebSocketConfig as WsConfig};
use crate::ingest::BodyKind;
use crate::limits::IpPass;

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
    pub device_id: Option<Box<str>>,
    pub event_type: Option<Box<str>>,
    /// `coalesce_ms`: at most the latest event per device, this often.
    pub coalesce: Option<Duration>,
    /// `subscribe=false`: an ingest-only socket that gets no pushed events.
    pub ingest_only: bool,
    /// Set from the token (not the query): only events whose device_id
    /// starts with it are pushed.
    pub device_prefix: Option<Box<str>>,
}

impl WsRequest {
    /// Parses `device_id=…&type=…&coalesce_ms=…` (all optional).
    pub fn parse(query: &str) -> Result<WsRequest, String> {
        let mut request = WsRequest::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "device_id" if !value.is_empty() => request.device_id = Some(value.into()),
                "type" if !value.is_empty() => request.event_type = Some(value.into()),
                "coalesce_ms" => {
                    let ms: u64 = value
                        .parse()
                        .ok()
                        .filter(|ms| (1..=60_000).contains(ms))
                        .ok_or_else(|| "coalesce_ms must be an integer from 1 to 60000".to_string())?;
                    request.coalesce = Some(Duration::from_millis(ms));
                }
                "subscribe" => match &*value {
                    "true" | "1" => request.ingest_only = false,
                    "false" | "0" => request.ingest_only = true,
                    _ => return Err("subscribe must be true or false".to_string()),
                },
                "device_id" | "type" => return Err(format!("{key} must not be empty")),
                // Read by `routes::admit`; never kept.
                "access_token" => {}
                other => {
                    return Err(format!(
                        "unknown query parameter `{other}`; use device_id, type, coalesce_ms, subscribe, access_token"
                    ));
                }
            }
        }
        Ok(request)
    }

    fn matches(&self, e: &EventRef<'_>) -> bool {
        self.device_id.as_deref().is_none_or(|d| d == e.device_id)
            && self.event_type.as_deref().is_none_or(|t| t == e.event_type)
            && self.device_prefix.as_deref().is_none_or(|p| e.device_id.starts_with(p))
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
        }
    }
}

struct Queued {
    json: Bytes,
    committed_at: Instant,
}

/// One subscriber's filter and bounded queue.
pub struct Subscriber {
    request: WsRequest,
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
}

impl Subscriber {
    fn new(request: WsRequest, lease: Lease) -> Self {
        Self {
            request,
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            held: Cell::new(0),
            lease: RefCell::new(lease),
            latest: RefCell::new(HashMap::new()),
            dropped: Cell::new(0),
            overflowed: Cell::new(false),
            wake: LocalNotify::default(),
        }
    }

    /// Takes the events of `batch` this subscriber wants. Returns how many
    /// were dropped or lost to an overflow.
    pub fn offer(&self, batch: &CommittedBatch, limits: &WsLimits) -> u64 {
        if self.overflowed.get() {
            return 0;
        }
        let mut taken = false;
        let mut lost = 0;
        for e in batch.events().filter(|e| self.request.matches(e)) {
            let item = Queued { json: Bytes::copy_from_slice(e.json), committed_at: batch.committed_at };
            if self.request.coalesce.is_some() {
                let mut latest = self.latest.borrow_mut();
                let replaced = latest.get(e.device_id).map_or(0, |q| q.json.len() + QUEUED_EVENT_OVERHEAD);
                if (latest.len() >= limits.queue_messages && replaced == 0)
                    || !self.charge(self.held.get() - replaced + item.json.len() + QUEUED_EVENT_OVERHEAD)
                {
                    drop(latest);
                    lost += self.missed(1, limits);
                    continue;
                }
                self.held.set(self.held.get() - replaced + item.json.len() + QUEUED_EVENT_OVERHEAD);
                latest.insert(e.device_id.into(), item);
            } else {
                lost += self.push(item, limits);
                taken = true;
            }
            if self.overflowed.get() {
                break;
            }
        }
        if taken {
            self.wake.notify();
        }
        lost
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

/// The subscribers a shard owns, for its fan-out task.
#[derive(Default)]
pub struct Subscribers {
    all: RefCell<HashMap<u64, Rc<Subscriber>>>,
    next_id: Cell<u64>,
}

impl Subscribers {
    fn register(&self, s: Rc<Subscriber>) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.all.borrow_mut().insert(id, s);
        id
    }

    fn unregister(&self, id: u64) {
        self.all.borrow_mut().remove(&id);
    }

    /// Offers a committed batch to every subscriber; `missed` events are
    /// reported to all of them first.
    pub fn fan_out(&self, batch: Option<&CommittedBatch>, missed: u64, ctx: &ShardCtx) {
        let limits = &ctx.ws_limits();
        let stats = ctx.stats();
        for s in self.all.borrow().values() {
            let was_overflowed = s.overflowed.get();
            let mut lost = 0;
            if missed > 0 {
                lost += s.missed(missed, limits);
            }
            if let Some(batch) = batch {
                lost += s.offer(batch, limits);
            }
            stats.ws_dropped.add(lost);
            if s.overflowed.get() && !was_overflowed {
                stats.ws_slow_closes.inc();
            }
        }
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
    let ingest_only = request.ingest_only;
    let sub = Rc::new(Subscriber::new(request, ctx.hub.budget.lease()));
    // An ingest-only socket is not offered committed events.
    let id = (!ingest_only).then(|| ctx.ws.register(sub.clone()));
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
    let read_task = monoio::spawn(read_loop(reader, session.clone(), ctx.clone(), client));
    write_loop(writer, &session, &ctx).await;
    session.stopped.notify();
    read_task.await;
    if let Some(id) = id {
        ctx.ws.unregister(id);
    }
    drop(admission);
}

async fn read_loop(mut reader: ReadHalf, session: Rc<Session>, ctx: Rc<ShardCtx>, client: Client) {
    let limits = ctx.ws_limits();
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
            while session.control.borrow().len() >= MAX_PENDING_ANSWERS
                || session.protocol.borrow().output.len() >= MAX_PENDING_OUTPUT_BYTES
            {
                session.sub.wake.notify();
                let stopped = monoio::select! {
                    _ = session.answered.wait() => false,
                    _ = session.stopped.wait() => true,
                };
                if stopped {
                    return;
                }
            }
            let message = session.protocol.borrow_mut().with(|ws, mem| ws.read(mem));
            if message.is_ok() {
                // A message is complete; tungstenite holds at most the rest of the last read.
                let held = partial.bytes().min(last_read);
                partial.set(held);
            }
            match message {
                Ok(Message::Text(text)) => {
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

/// Ingests one text frame and renders its in-order answer.
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
    let mut next_tick = sub.request.coalesce.map(|every| Instant::now() + every);
    let mut out = Vec::new();
    loop {
        let pending = !session.control.borrow().is_empty() || !sub.queue.borrow().is_empty();
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
            next_tick = sub.request.coalesce.map(|every| tick.max(now - every) + every);
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
                while budget > 0 {
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
        if !sub.queue.borrow().is_empty() {
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
        }
    }

    #[test]
    fn query_parsing() {
        let r = WsRequest::parse("device_id=d%201&type=boot&coalesce_ms=250").unwrap();
        assert_eq!(
            (r.device_id.as_deref(), r.event_type.as_deref(), r.coalesce),
            (Some("d 1"), Some("boot"), Some(Duration::from_millis(250)))
        );
        assert_eq!(WsRequest::parse("").unwrap(), WsRequest::default());
        assert!(WsRequest::parse("device=x").unwrap_err().contains("unknown query parameter"));
        assert!(WsRequest::parse("coalesce_ms=0").is_err());
        assert!(WsRequest::parse("subscribe=false").unwrap().ingest_only);
        assert!(WsRequest::parse("subscribe=maybe").is_err());
    }

    #[test]
    fn filters_select_events() {
        let s = Subscriber::new(WsRequest { device_id: Some("b".into()), ..Default::default() }, Lease::detached());
        s.offer(&batch(&["a", "b", "c", "b"]), &limits(Overflow::Close, 10));
        assert_eq!(s.queue.borrow().len(), 2);
    }

    #[test]
    fn close_policy_trips_and_empties() {
        let s = Subscriber::new(WsRequest::default(), Lease::detached());
        let lost = s.offer(&batch(&["a", "b", "c"]), &limits(Overflow::Close, 2));
        assert!(s.overflowed.get());
        assert_eq!(s.queue.borrow().len(), 0);
        assert_eq!(lost, 3);
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let s = Subscriber::new(WsRequest::default(), Lease::detached());
        let lost = s.offer(&batch(&["a", "b", "c", "d", "e"]), &limits(Overflow::DropOldest, 2));
        assert_eq!((lost, s.dropped.get(), s.queue.borrow().len()), (3, 3, 2));
        let kept: Vec<_> = s.queue.borrow().iter().map(|q| String::from_utf8(q.json.to_vec()).unwrap()).collect();
        assert!(kept[0].contains("\"d\"") && kept[1].contains("\"e\""), "{kept:?}");
    }

    #[test]
    fn the_live_feeds_budget_bounds_every_queue_together() {
        let budget = crate::budget::Budget::new("websocket.fanout_budget_bytes", 200 * 1024);
        let a = Subscriber::new(WsRequest::default(), budget.lease());
        let b = Subscriber::new(WsRequest::default(), budget.lease());
        let roomy = limits(Overflow::DropOldest, 1_000_000);
        let events: Vec<String> = (0..2000).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = events.iter().map(String::as_str).collect();
        // `a` never reads: it fills the budget, then drops its oldest.
        let lost = a.offer(&batch(&names), &roomy);
        assert!(lost > 0 && budget.used() <= budget.limit(), "lost {lost}, used {}", budget.used());
        // `b` gets what is left; `a` closes under the close policy and frees its share.
        let tight = limits(Overflow::Close, 1_000_000);
        assert!(a.offer(&batch(&names), &tight) > 0 && a.overflowed.get());
        assert_eq!(a.lease.borrow().bytes(), 0);
        assert_eq!(b.offer(&batch(&names[..100]), &tight), 0, "room again for the others");
        while b.pop().is_some() {}
        b.give_back();
        assert_eq!(budget.used(), 0, "a reader that caught up holds nothing");
    }

    #[test]
    fn coalescing_keeps_latest_per_device() {
        let s = Subscriber::new(
            WsRequest { coalesce: Some(Duration::from_millis(10)), ..Default::default() },
            Lease::detached(),
        );
        s.offer(&batch(&["a", "b", "a", "a"]), &limits(Overflow::Close, 10));
        assert_eq!(s.latest.borrow().len(), 2);
        assert!(s.queue.borrow().is_empty());
    }
}
