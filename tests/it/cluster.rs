//! One live feed across instances (issue 16, `[cluster] feed`): three
//! ingestd instances on one table share a Redis or NATS bus, and a
//! WebSocket subscriber on any of them receives the committed events of
//! every instance that its filter selects, exactly once.
//!
//! The buses are real servers (`redis-server`, `nats-server`; installed by
//! scripts/lib/bus.sh, found through `INGESTD_TEST_REDIS_SERVER` and
//! `INGESTD_TEST_NATS_SERVER`), started by the tests themselves on a free
//! port ([`BusServer`]) so that a test can kill one and start it again on
//! the same port. Each test uses a channel of its own.
//!
//! - exactly once, Redis and NATS: three instances, ingest over HTTP and
//!   WebSocket from several clients spread over all three, subscribers on
//!   each (everything, two devices of the other instances, a prefix and a
//!   type, a token's device prefix): every subscriber receives every
//!   committed event of its filter once, nothing else, and per device in the
//!   order its one instance committed them; the bus counters add up.
//! - the bus killed (SIGKILL) and started again under load: ingest keeps its
//!   speed, `/health` stays 200 and shows the bus down then up again by
//!   itself, drops are counted, nothing stored is lost, the feed resumes,
//!   and a subscriber of everything has its events plus its `{"dropped": N}`
//!   notices add up to what was committed (a filtered one is told the whole
//!   gap: a receiver cannot know the devices of events it never got); with
//!   `overflow = "close"` the subscriber is closed with 1013 instead.
//! - configuration: `feed` without `url` and an unknown `feed` exit 64 naming
//!   the key; a bus that is not there at start-up does not stop ingestd, which
//!   connects once it appears.
//!
//! Redis pub/sub keeps nothing for a subscriber that is not connected yet, so
//! the tests wait until every instance reports the bus up and a warm-up event
//! of each instance has reached every subscriber before they count.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::{Message, WebSocket};

use crate::support::*;

// ---------------------------------------------------------------------------
// The bus servers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bus {
    Redis,
    Nats,
}

impl Bus {
    /// The `cluster.feed` value (and the URL scheme).
    fn feed(self) -> &'static str {
        match self {
            Bus::Redis => "redis",
            Bus::Nats => "nats",
        }
    }

    /// The server binary: `INGESTD_TEST_REDIS_SERVER` / `INGESTD_TEST_NATS_SERVER`
    /// (exported by scripts/test.sh), else the Debian package's path.
    fn binary(self) -> String {
        let (var, default, package) = match self {
            Bus::Redis => ("INGESTD_TEST_REDIS_SERVER", "/usr/bin/redis-server", "redis-server"),
            Bus::Nats => ("INGESTD_TEST_NATS_SERVER", "/usr/sbin/nats-server", "nats-server"),
        };
        let bin = std::env::var(var).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_string());
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: run the tests with scripts/test.sh, which installs the Debian package {package} \
             (scripts/lib/bus.sh), or set {var}"
        );
        bin
    }

    fn command(self, port: u16, dir: &std::path::Path) -> Command {
        let mut cmd = Command::new(self.binary());
        let port = port.to_string();
        match self {
            Bus::Redis => {
                cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
                cmd.args(["--daemonize", "no", "--dir"]).arg(dir);
            }
            Bus::Nats => {
                cmd.args(["-a", "127.0.0.1", "-p", &port]);
            }
        }
        cmd
    }

    /// Whether a server of this kind answers on `port` right now (Redis:
    /// `PING` → `+PONG`; NATS greets every client with `INFO {…}`).
    fn answers(self, port: u16) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if self == Bus::Redis && s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        let n = retry_interrupted(|| s.read(&mut buf)).unwrap_or(0);
        let reply = &buf[..n];
        match self {
            Bus::Redis => reply.starts_with(b"+PONG"),
            Bus::Nats => reply.starts_with(b"INFO"),
        }
    }
}

/// A private `redis-server` or `nats-server` on 127.0.0.1, killed on drop.
/// [`BusServer::kill`] and [`BusServer::restart`] stop and start it on the
/// same port.
struct BusServer {
    bus: Bus,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: usize,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

impl BusServer {
    fn start(bus: Bus) -> BusServer {
        BusServer::start_on(bus, free_port())
    }

    fn start_on(bus: Bus, port: u16) -> BusServer {
        let dir = std::env::temp_dir().join(unique(&format!("ingestd-{}", bus.feed())));
        std::fs::create_dir_all(&dir).expect("bus server directory");
        let mut server = BusServer { bus, port, dir, child: None, starts: 0 };
        server.spawn();
        server
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.bus.feed(), self.port)
    }

    /// Starts the server and waits until it answers. A restart right after a
    /// SIGKILL may find the port still held for a moment: it tries again.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{:?} already runs", self.bus);
        for attempt in 1..=5 {
            self.starts += 1;
            let log_path = self.dir.join(format!("{}-{}.log", self.bus.feed(), self.starts));
            let log = std::fs::File::create(&log_path).expect("bus log");
            let mut child = self
                .bus
                .command(self.port, &self.dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bus.binary()));
            let (bus, port) = (self.bus, self.port);
            let up = eventually(
                Duration::from_secs(10),
                format_args!("{bus:?} answering on port {port} (log {})", log_path.display()),
                || {
                    if bus.answers(port) {
                        return Some(true);
                    }
                    matches!(child.try_wait(), Ok(Some(_))).then_some(false)
                },
            );
            if up {
                self.child = Some(child);
                return;
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(attempt < 5, "{bus:?} exited at start on port {port}:\n{log}");
            thread::sleep(Duration::from_millis(200)); // pacing: the port may still be held
        }
    }

    /// SIGKILL, as a crash: no goodbye to the clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(!self.bus.answers(self.port), "{:?} still answers after SIGKILL", self.bus);
    }

    fn restart(&mut self) {
        self.spawn();
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for BusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("--- {:?} server logs kept in {}", self.bus, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Instances, /health, /metrics
// ---------------------------------------------------------------------------

/// One instance of a cluster: two shards, two writers, the feed on
/// `channel`, and `drop_oldest` so that missed events arrive as
/// `{"dropped": N}` notices rather than closes.
fn instance(bus: &BusServer, channel: &str) -> Ingestd {
    Ingestd::new()
        .set("server.shards", 2)
        .set("writer.writers", 2)
        .set("websocket.overflow", "drop_oldest")
        .set("cluster.feed", bus.bus.feed())
        .set("cluster.url", bus.url())
        .set("cluster.channel", channel)
}

/// Three instances of `node` on one table (the first one creates it).
fn start_three(node: Ingestd) -> Vec<Server> {
    let first = node.clone().start();
    let table = first.table.clone();
    let mut nodes = vec![first];
    for _ in 1..3 {
        nodes.push(node.clone().table(&table).start());
    }
    nodes
}

/// `GET /health`: its status and JSON body.
fn health(s: &Server) -> (u16, Value) {
    let resp = s.get("/health");
    (resp.status, resp.json())
}

/// The `cluster` object of `/health`; panics when there is none.
fn cluster(s: &Server) -> Value {
    let (_, h) = health(s);
    let c = h.get("cluster").cloned().unwrap_or_else(|| panic!("/health of {} has no \"cluster\": {h}", s.addr));
    assert!(c.is_object(), "/health cluster is not an object: {h}");
    c
}

fn bus_state(s: &Server) -> String {
    cluster(s)["bus"].as_str().unwrap_or_else(|| panic!("/health cluster.bus is not a string")).to_string()
}

fn wait_bus(nodes: &[Server], want: &[&str], timeout: Duration) {
    for (i, s) in nodes.iter().enumerate() {
        eventually(timeout, format_args!("instance {i}: /health cluster.bus in {want:?}"), || {
            want.contains(&bus_state(s).as_str()).then_some(())
        });
    }
}

/// A `/metrics` scrape, with a bearer token when auth is on.
fn scrape(s: &Server, token: Option<&str>) -> Scrape {
    match token {
        None => s.scrape(),
        Some(t) => {
            let resp = s.send(&Req::get("/metrics").bearer(t));
            assert_eq!(resp.status, 200, "{resp:?}");
            parse_scrape(&resp.text())
        }
    }
}

// ---------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------

/// What one subscriber has read so far.
#[derive(Default, Debug)]
struct Inbox {
    events: Vec<Value>,
    /// The sum of `{"dropped": N}` notices.
    dropped: u64,
    /// Text frames that are neither events nor drop notices.
    other: Vec<Value>,
    /// Why reading stopped early (a close frame or an error), if it did.
    closed: Option<String>,
    /// The code of the server's close frame, if one came.
    close_code: Option<u16>,
}

/// Which events a subscriber's filter selects, by (device_id, type).
type Selects = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A subscriber on a thread of its own that reads everything until stopped.
struct Sub {
    name: String,
    /// Which events its filter selects, by (device_id, type).
    selects: Selects,
    inbox: Arc<Mutex<Inbox>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sub {
    fn open(
        server: &Server,
        name: String,
        query: &str,
        selects: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) -> Sub {
        let stream = TcpStream::connect(server.addr).expect("tcp connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let request = format!("ws://{}/ws{query}", server.addr).into_client_request().expect("request");
        let (mut ws, _) = tungstenite::client(request, stream)
            .unwrap_or_else(|e| panic!("subscriber {name}: upgrade /ws{query}: {e}\n{}", server.stderr()));
        ws.get_mut().set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            thread::spawn(move || read_all(&mut ws, &inbox, &stop))
        };
        Sub { name, selects: Box::new(selects), inbox, stop, thread: Some(thread) }
    }

    fn has(&self, id: &str) -> bool {
        self.inbox.lock().unwrap().events.iter().any(|e| e["event_id"] == id)
    }

    /// Event ids received, each as often as it came.
    fn ids(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &self.inbox.lock().unwrap().events {
            *out.entry(e["event_id"].as_str().unwrap_or("<no event_id>").to_string()).or_default() += 1;
        }
        out
    }

    fn dropped(&self) -> u64 {
        self.inbox.lock().unwrap().dropped
    }

    fn closed(&self) -> Option<String> {
        self.inbox.lock().unwrap().closed.clone()
    }

    /// The ids of `events` this subscriber selects.
    fn wanted(&self, events: &[Value]) -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| (self.selects)(e["device_id"].as_str().unwrap(), e["type"].as_str().unwrap()))
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_all(ws: &mut WebSocket<TcpStream>, inbox: &Mutex<Inbox>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON text frame");
                let mut inbox = inbox.lock().unwrap();
                if v.get("event_id").is_some() {
                    inbox.events.push(v);
                } else if let Some(n) = v.get("dropped").and_then(Value::as_u64) {
                    inbox.dropped += n;
                } else {
                    inbox.other.push(v);
                }
            }
            Ok(Message::Close(c)) => {
                let mut inbox = inbox.lock().unwrap();
                inbox.close_code = c.as_ref().map(|f| u16::from(f.code));
                inbox.closed = Some(format!("closed by the server: {c:?}"));
                return;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                inbox.lock().unwrap().closed = Some(format!("read error: {e}"));
                return;
            }
        }
    }
}

/// Waits until every subscriber has every id of `events` that it selects.
fn wait_delivered(subs: &[Sub], events: &[Value], timeout: Duration) {
    for sub in subs {
        let wanted = sub.wanted(events);
        eventually(timeout, format_args!("subscriber {}: {} events of its filter", sub.name, wanted.len()), || {
            if let Some(why) = sub.closed() {
                panic!("subscriber {} stopped: {why}", sub.name);
            }
            let got = sub.ids();
            wanted.iter().all(|id| got.contains_key(id)).then_some(())
        });
    }
}

// ---------------------------------------------------------------------------
// Ingest clients
// ---------------------------------------------------------------------------

/// One event of `device` with its per-device sequence number in the payload.
fn cev(device: &str, seq: u64, origin: usize) -> Value {
    let kind = if seq.is_multiple_of(2) { "gps" } else { "temp" };
    json!({
        "event_id": unique("ce"),
        "device_id": device,
        "type": kind,
        "ts": now_ms(),
        "payload": {"seq": seq, "origin": origin},
    })
}

/// How a sender reaches its instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Http,
    WebSocket,
}

/// Sends `rounds` batches of `batch` events over `devices` (round-robin,
/// each device's `seq` counting up), each after the previous one was
/// answered: a 503 is retried with the same batch (a client backing off),
/// anything else fails the test. Returns the events, all acknowledged.
fn send_rounds(
    addr: SocketAddr,
    token: Option<String>,
    via: Via,
    origin: usize,
    devices: Vec<String>,
    rounds: usize,
    batch: usize,
) -> Vec<Value> {
    let mut seqs = vec![0u64; devices.len()];
    let mut acked = Vec::new();
    let mut client = Client::open(addr, token.as_deref(), via);
    for r in 0..rounds {
        let evs: Vec<Value> = (0..batch)
            .map(|i| {
                let d = (r * batch + i) % devices.len();
                seqs[d] += 1;
                cev(&devices[d], seqs[d], origin)
            })
            .collect();
        client.send_ok(&evs);
        acked.extend(evs);
    }
    acked
}

/// An ingest client on one kept-alive connection: HTTP, or a WebSocket
/// opened with `subscribe=false`.
enum Client {
    Http { addr: SocketAddr, token: Option<String>, conn: Conn },
    Ws { ws: Box<WebSocket<TcpStream>>, seq: u64 },
}

impl Client {
    fn open(addr: SocketAddr, token: Option<&str>, via: Via) -> Client {
        match via {
            Via::Http => Client::Http { addr, token: token.map(str::to_string), conn: Conn::open(addr) },
            Via::WebSocket => {
                let stream = TcpStream::connect(addr).expect("tcp connect");
                stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let token = token.map(|t| format!("&access_token={t}")).unwrap_or_default();
                let request = format!("ws://{addr}/ws?subscribe=false{token}").into_client_request().expect("request");
                let (ws, _) = tungstenite::client(request, stream).unwrap_or_else(|e| panic!("ingest socket: {e}"));
                Client::Ws { ws: Box::new(ws), seq: 0 }
            }
        }
    }

    fn send_ok(&mut self, evs: &[Value]) {
        for attempt in 0.. {
            assert!(attempt < 200, "{} events refused 200 times", evs.len());
            match self {
                Client::Http { addr, token, conn } => {
                    let mut req = Req::post("/events/batch").json(&Value::Array(evs.to_vec()));
                    if let Some(t) = token {
                        req = req.bearer(t);
                    }
                    let resp = conn.roundtrip(&req);
                    if resp.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        *conn = Conn::open(*addr);
                    }
                    if resp.status == 200 {
                        assert_ingest(&resp, 200, evs.len() as u64, &[]);
                        return;
                    }
                    assert_eq!(resp.status, 503, "ingest refused:\n{resp:?}");
                }
                Client::Ws { ws, seq } => {
                    ws.send(Message::Text(Value::Array(evs.to_vec()).to_string().into())).expect("send frame");
                    *seq += 1;
                    let answer = next_json(ws);
                    assert_eq!(answer["seq"], *seq, "answers come in order: {answer}");
                    if answer["accepted"] == evs.len() && answer.get("error").is_none() {
                        return;
                    }
                    assert_eq!(answer["status"], 503, "ingest frame refused: {answer}");
                }
            }
            thread::sleep(Duration::from_millis(20)); // pacing: back off after a 503
        }
    }
}

/// Posts one batch through `s` and insists on a 200.
fn post_ok(s: &Server, token: Option<&str>, evs: &[Value]) {
    Client::open(s.addr, token, Via::Http).send_ok(evs);
}

/// Stored event ids of the (shared) table.
fn stored_ids(s: &Server) -> BTreeSet<String> {
    let sql = format!("SELECT event_id FROM {}", s.table);
    s.db().query(sql.as_str(), &[]).expect("select ids").iter().map(|r| r.get::<_, String>(0)).collect()
}

// ---------------------------------------------------------------------------
// Exactly once across three instances
// ---------------------------------------------------------------------------

/// Events per batch, batches per sender: three senders per instance (two over
/// HTTP, one over a WebSocket), each owning two devices.
const BATCH: usize = 20;

fn exactly_once_across_three(bus_kind: Bus, rounds: usize) {
    let started = Instant::now();
    let bus = BusServer::start(bus_kind);
    let run = unique("cl");
    let channel = format!("ingestd.test.{run}");
    // Tokens: one for ingest, /metrics and the unfiltered subscribers, one
    // that may only subscribe, to devices under `{run}-a/`.
    let admin = secret_token("admin");
    let reader = secret_token("reader");
    let config = format!(
        "[auth]\nmode = \"tokens\"\n\n[[auth.tokens]]\ntoken = \"{admin}\"\nscopes = [\"ingest\", \"subscribe\", \
         \"admin\"]\nname = \"admin\"\n\n[[auth.tokens]]\ntoken = \"{reader}\"\nscopes = [\"subscribe\"]\n\
         device_prefix = \"{run}-a/\"\nname = \"reader-a\"\n"
    );
    let config = temp_file("cluster-auth.toml", &config);
    let nodes = start_three(instance(&bus, &channel).config_file(&config.display().to_string()));
    wait_bus(&nodes, &["up"], Duration::from_secs(20));

    // Devices: instance i owns {run}-a/i{i}-{k} and {run}-b/i{i}-{k}, k < 3;
    // each device goes through its one instance, in order.
    let owned = |i: usize, group: &str, k: usize| format!("{run}-{group}/i{i}-{k}");
    let mut subs = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        subs.push(Sub::open(s, format!("{i}/all"), &format!("?access_token={admin}"), |_, _| true));
        let (d1, d2) = (owned((i + 1) % 3, "a", 0), owned((i + 2) % 3, "b", 1));
        let q = format!("?device_id={d1}&device_id={d2}&access_token={admin}");
        subs.push(Sub::open(s, format!("{i}/two-devices"), &q, move |d, _| d == d1 || d == d2));
        let prefix = format!("{run}-b/");
        let q = format!("?device_prefix={prefix}&type=gps&access_token={admin}");
        subs.push(Sub::open(s, format!("{i}/b-gps"), &q, move |d, t| d.starts_with(&prefix) && t == "gps"));
        let prefix = format!("{run}-a/");
        let q = format!("?access_token={reader}");
        subs.push(Sub::open(s, format!("{i}/token-a"), &q, move |d, _| d.starts_with(&prefix)));
    }

    // Warm-up: one event per device from its instance (every filter selects
    // some), until every subscriber has its share: the subscriptions on the
    // bus are in place and every instance has heard from the other two.
    let mut committed: Vec<Value> = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let warm: Vec<Value> = ["a", "b"]
            .iter()
            .flat_map(|g| (0..3).map(move |k| (g, k)))
            .map(|(g, k)| cev(&owned(i, g, k), 0, i))
            .collect();
        post_ok(s, Some(&admin), &warm);
        committed.extend(warm);
    }
    wait_delivered(&subs, &committed, Duration::from_secs(20));
    for (i, s) in nodes.iter().enumerate() {
        eventually(Duration::from_secs(10), format_args!("instance {i}: /health cluster.peers == 2"), || {
            (cluster(s)["peers"] == 2).then_some(())
        });
    }

    // The load: nine senders at once, three per instance.
    let load_started = Instant::now();
    let senders: Vec<JoinHandle<Vec<Value>>> = (0..3)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| {
            let addr = nodes[i].addr;
            let token = Some(admin.clone());
            let via = if j == 2 { Via::WebSocket } else { Via::Http };
            let devices = vec![owned(i, "a", j), owned(i, "b", j)];
            thread::spawn(move || send_rounds(addr, token, via, i, devices, rounds, BATCH))
        })
        .collect();
    for t in senders {
        committed.extend(t.join().expect("sender thread"));
    }
    let load_time = load_started.elapsed();
    wait_delivered(&subs, &committed, Duration::from_secs(60));
    let delivered_time = load_started.elapsed();
    // A last event per device from each instance, after everything above
    // has arrived: anything sent twice would come before these.
    let mut last = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let evs: Vec<Value> = ["a", "b"]
            .iter()
            .flat_map(|g| (0..3).map(move |k| (g, k)))
            .map(|(g, k)| cev(&owned(i, g, k), 1_000_000, i))
            .collect();
        post_ok(s, Some(&admin), &evs);
        last.extend(evs);
    }
    wait_delivered(&subs, &last, Duration::from_secs(20));
    committed.extend(last);

    // Nothing lost in the table, nothing extra.
    let acked: BTreeSet<String> = committed.iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(acked.len(), committed.len(), "the test made duplicate ids");
    let stored = stored_ids(&nodes[0]);
    assert_eq!(stored.len(), acked.len(), "rows stored vs events acknowledged");
    assert!(stored == acked, "the table differs from what was acknowledged");

    // Every subscriber: each selected event exactly once, nothing else, in
    // per-device order (seq counts up per device; one instance per device).
    let by_id: BTreeMap<&str, &Value> = committed.iter().map(|e| (e["event_id"].as_str().unwrap(), e)).collect();
    let mut report = Vec::new();
    for sub in &subs {
        let wanted = sub.wanted(&committed);
        let got = sub.ids();
        let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).map(|(id, n)| format!("{id} x{n}")).collect();
        let extra: Vec<_> = got.keys().filter(|id| !wanted.contains(*id)).collect();
        let missing = wanted.iter().filter(|id| !got.contains_key(*id)).count();
        let inbox = sub.inbox.lock().unwrap();
        assert!(
            twice.is_empty() && extra.is_empty() && missing == 0,
            "subscriber {}: {} received, {} wanted; twice: {:?}; not selected: {:?}; missing: {missing}",
            sub.name,
            inbox.events.len(),
            wanted.len(),
            &twice[..twice.len().min(10)],
            &extra[..extra.len().min(10)],
        );
        assert_eq!(inbox.dropped, 0, "subscriber {}: events reported dropped on a healthy bus", sub.name);
        assert!(inbox.other.is_empty(), "subscriber {}: unexpected frames {:?}", sub.name, inbox.other);
        let mut last_seq: BTreeMap<&str, u64> = BTreeMap::new();
        for e in &inbox.events {
            let sent = by_id[e["event_id"].as_str().unwrap()];
            assert_eq!(e["device_id"], sent["device_id"], "subscriber {}: {e}", sub.name);
            assert_eq!(e["type"], sent["type"], "subscriber {}: {e}", sub.name);
            assert_eq!(e["payload"], sent["payload"], "subscriber {}: {e}", sub.name);
            let device = sent["device_id"].as_str().unwrap();
            let seq = sent["payload"]["seq"].as_u64().unwrap();
            if let Some(prev) = last_seq.insert(device, seq) {
                assert!(
                    seq > prev,
                    "subscriber {}: device {device} out of order: seq {seq} after {prev} (instance {})",
                    sub.name,
                    sent["payload"]["origin"]
                );
            }
        }
        report.push(format!("{}={}", sub.name, inbox.events.len()));
    }

    // The counters add up: every committed event published once by its
    // instance, and each instance received what the other two published.
    let total = committed.len() as f64;
    let metrics: Vec<Scrape> = nodes.iter().map(|s| scrape(s, Some(&admin))).collect();
    let published: Vec<f64> = metrics.iter().map(|m| m.sum("ingestd_cluster_published_events_total", None)).collect();
    let received: Vec<f64> = metrics.iter().map(|m| m.sum("ingestd_cluster_received_events_total", None)).collect();
    assert_eq!(published.iter().sum::<f64>(), total, "published events per instance {published:?}");
    for i in 0..3 {
        let others = total - published[i];
        assert_eq!(received[i], others, "instance {i} received {received:?} of published {published:?}");
        let m = &metrics[i];
        assert_eq!(m.sum("ingestd_cluster_bus_up", None), 1.0, "instance {i}");
        assert_eq!(m.sum("ingestd_cluster_peers", None), 2.0, "instance {i}");
        assert_eq!(m.sum("ingestd_cluster_missed_events_total", None), 0.0, "instance {i}");
        assert_eq!(m.sum("ingestd_cluster_publish_dropped_events_total", None), 0.0, "instance {i}");
        let c = cluster(&nodes[i]);
        assert_eq!(c["feed"], bus_kind.feed(), "{c}");
        assert_eq!((c["bus"].as_str(), c["peers"].as_u64()), (Some("up"), Some(2)), "{c}");
        assert!(c["instance"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        assert_eq!(c["missed_events"], 0, "{c}");
        assert_eq!(c["publish_dropped_events"], 0, "{c}");
        assert!(c["published_batches"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert!(c["received_batches"].as_u64().is_some_and(|n| n > 0), "{c}");
    }
    let instances: BTreeSet<String> =
        nodes.iter().map(|s| cluster(s)["instance"].as_str().unwrap().to_string()).collect();
    assert_eq!(instances.len(), 3, "instance ids must differ: {instances:?}");
    println!(
        "{bus_kind:?}: {} events committed over 3 instances ({} in the load, {load_time:?}; all delivered after \
         {delivered_time:?}); received per subscriber: {}; whole test {:?}",
        committed.len(),
        9 * rounds * BATCH,
        report.join(" "),
        started.elapsed()
    );
}

#[test]
fn redis_three_instances_every_subscriber_gets_every_event_once() {
    exactly_once_across_three(Bus::Redis, 100);
}

#[test]
fn nats_three_instances_every_subscriber_gets_every_event_once() {
    exactly_once_across_three(Bus::Nats, 40);
}

// ---------------------------------------------------------------------------
// The bus killed and restarted under load
// ---------------------------------------------------------------------------

/// Events/s acknowledged while the loads get `answers` more 200s.
fn measure(loads: &[Load], answers: usize, batch: usize, what: &str) -> f64 {
    let seen = |loads: &[Load]| loads.iter().map(|l| l.seen(200)).sum::<usize>();
    let start = seen(loads);
    let t = Instant::now();
    eventually(Duration::from_secs(60), format_args!("{answers} more 200s to the load ({what})"), || {
        (seen(loads) >= start + answers).then_some(())
    });
    let secs = t.elapsed().as_secs_f64();
    let rate = ((seen(loads) - start) * batch) as f64 / secs;
    println!("{what}: {rate:.0} events/s acknowledged over {secs:.2} s");
    rate
}

fn bus_killed_and_restarted_under_load(bus_kind: Bus) {
    let mut bus = BusServer::start(bus_kind);
    let channel = format!("ingestd.test.{}", unique("outage"));
    let node = instance(&bus, &channel).set("cluster.reconnect_max_ms", 500);
    let nodes = {
        let first = node.clone().start();
        let table = first.table.clone();
        let second = node.clone().table(&table).start();
        // The third closes subscribers that missed events (the default policy).
        let third = node.set("websocket.overflow", "close").table(&table).start();
        vec![first, second, third]
    };
    wait_bus(&nodes, &["up"], Duration::from_secs(20));
    let mut subs: Vec<Sub> =
        nodes[..2].iter().enumerate().map(|(i, s)| Sub::open(s, format!("{i}/all"), "", |_, _| true)).collect();
    let dev = unique("dev");
    let dev_filter = dev.clone();
    subs.push(Sub::open(&nodes[1], "1/one-device".into(), &format!("?device_id={dev}"), move |d, _| d == dev_filter));
    let closer = Sub::open(&nodes[2], "2/all (overflow = close)".into(), "", |_, _| true);
    let mut committed: Vec<Value> = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let warm = vec![cev(&dev, i as u64, i)];
        post_ok(s, None, &warm);
        committed.extend(warm);
    }
    wait_delivered(&subs, &committed, Duration::from_secs(20));
    wait_delivered(std::slice::from_ref(&closer), &committed, Duration::from_secs(20));

    // Continuous ingest over all three, two clients each.
    let batch = 20;
    let loads: Vec<Load> = nodes.iter().map(|s| Load::start(s.addr, 2, batch, 200)).collect();
    // Windows of ~1,000 answers (20,000 events; about a second here).
    let window = 1000;
    let before = measure(&loads, window, batch, "bus up");

    let bus_pid = bus.pid();
    bus.kill();
    println!("{bus_kind:?} (pid {bus_pid:?}) killed");
    wait_bus(&nodes, &["down", "connecting"], Duration::from_secs(10));
    let during = measure(&loads, window, batch, "bus down");
    for (i, s) in nodes.iter().enumerate() {
        let (status, h) = health(s);
        assert_eq!(status, 200, "instance {i}: /health must not turn 503 for the bus: {h}");
        assert_ne!(h["cluster"]["bus"], "up", "instance {i}: {h}");
        assert_eq!(scrape(s, None).sum("ingestd_cluster_bus_up", None), 0.0, "instance {i}");
    }
    let dropped = |nodes: &[Server]| -> f64 {
        nodes.iter().map(|s| scrape(s, None).sum("ingestd_cluster_publish_dropped_events_total", None)).sum()
    };
    eventually(Duration::from_secs(20), "publish drops counted while the bus is down", || {
        (dropped(&nodes) > 0.0).then_some(())
    });
    // Events committed while the bus is down still reach local subscribers.
    let local = cev(&dev, 100, 1);
    post_ok(&nodes[1], None, std::slice::from_ref(&local));
    committed.push(local.clone());
    eventually(Duration::from_secs(10), "a local event during the outage", || {
        (subs[1].has(local["event_id"].as_str().unwrap()) && subs[2].has(local["event_id"].as_str().unwrap()))
            .then_some(())
    });

    bus.restart();
    println!("{bus_kind:?} restarted on port {}", bus.port);
    wait_bus(&nodes, &["up"], Duration::from_secs(30));
    // A subscriber that comes after the outage gets the feed of all three.
    let late = Sub::open(&nodes[2], "2/after the outage".into(), "", |_, _| true);
    let after = measure(&loads, window, batch, "bus up again");
    let results: Vec<LoadResult> = loads.into_iter().map(Load::stop).collect();

    // A final round through every instance, after the load: each instance
    // publishes once more, so every receiver sees any gap it has.
    let mut last = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let evs = vec![cev(&dev, 1000 + i as u64, i), cev(&unique("final"), 0, i)];
        post_ok(s, None, &evs);
        last.extend(evs);
    }
    wait_delivered(&subs, &last, Duration::from_secs(30));
    wait_delivered(std::slice::from_ref(&late), &last, Duration::from_secs(30));
    // With overflow = "close", missing events is a close with 1013.
    eventually(Duration::from_secs(10), "the close policy's subscriber closed with 1013", || {
        closer.inbox.lock().unwrap().close_code
    });
    assert_eq!(closer.inbox.lock().unwrap().close_code, Some(1013), "{:?}", closer.closed());
    assert_eq!(closer.dropped(), 0, "overflow = close sends no dropped notices");
    committed.extend(last);

    // Nothing stored is lost.
    let mut acked: BTreeSet<String> = committed.iter().map(|e| e["event_id"].as_str().unwrap().to_string()).collect();
    let load_acked: Vec<String> = results.iter().flat_map(|r| r.acked.iter().cloned()).collect();
    let load_ids: Vec<Value> =
        load_acked.iter().map(|id| json!({"event_id": id, "device_id": "dev-1", "type": "temperature"})).collect();
    acked.extend(load_acked.iter().cloned());
    let stored = stored_ids(&nodes[0]);
    assert_eq!(stored.len(), acked.len(), "rows stored vs events acknowledged");
    assert!(stored == acked, "the table differs from what was acknowledged");
    let statuses: Vec<_> = results.iter().map(|r| (&r.statuses, r.transport_errors)).collect();
    println!("load answers per instance (status counts, transport errors): {statuses:?}");

    // Every subscriber: events received once each. One that selects
    // everything: received + dropped notices == committed. A receiver cannot
    // know the devices of events it never got, so a filtered subscriber is
    // told the whole gap (an upper bound); the one here selects a device
    // none of whose events crossed the bus during the outage, so it has
    // every event of its filter.
    let all: Vec<Value> = committed.iter().cloned().chain(load_ids).collect();
    let mut report = Vec::new();
    for sub in subs.iter().chain([&closer]) {
        let wanted = sub.wanted(&all);
        let got = sub.ids();
        let twice = got.values().filter(|n| **n > 1).count();
        let extra = got.keys().filter(|id| !wanted.contains(*id)).count();
        assert_eq!((twice, extra), (0, 0), "subscriber {}: ids received twice / not selected", sub.name);
        let dropped = sub.dropped();
        if std::ptr::eq(sub, &closer) {
            report.push(format!("{}: {} received, then closed", sub.name, got.len()));
            continue;
        }
        assert!(sub.closed().is_none(), "subscriber {}: {:?}", sub.name, sub.closed());
        if wanted.len() == all.len() {
            assert_eq!(
                got.len() as u64 + dropped,
                wanted.len() as u64,
                "subscriber {}: received {} + dropped notices {dropped} != committed events {}",
                sub.name,
                got.len(),
                wanted.len()
            );
        } else {
            assert_eq!(got.len(), wanted.len(), "subscriber {}: events of its device", sub.name);
        }
        report.push(format!("{}: {} received + {dropped} dropped", sub.name, got.len()));
    }
    let mut missed = 0.0;
    for (i, s) in nodes.iter().enumerate() {
        let m = scrape(s, None);
        missed += m.sum("ingestd_cluster_missed_events_total", None);
        assert_eq!(m.sum("ingestd_cluster_bus_up", None), 1.0, "instance {i}");
        assert!(m.sum("ingestd_cluster_reconnects_total", None) >= 1.0, "instance {i}: reconnects counted");
    }
    let drops = dropped(&nodes);
    assert!(subs[..2].iter().all(|s| s.dropped() > 0), "the outage dropped publishes, subscribers must be told");
    println!(
        "{bus_kind:?} outage: ingest {before:.0} events/s before, {during:.0} during, {after:.0} after; publish \
         drops {drops}, missed on receive {missed}; {}",
        report.join("; ")
    );
    // "Does not stall", against the slower of the windows on either side
    // (tests running beside this one slow all three alike).
    assert!(
        during >= 0.5 * before.min(after),
        "ingest slowed down while the bus was down: {during:.0} events/s vs {before:.0} before, {after:.0} after"
    );
}

#[test]
fn redis_killed_and_restarted_under_load_ingest_goes_on_and_the_feed_resumes() {
    bus_killed_and_restarted_under_load(Bus::Redis);
}

#[test]
fn nats_killed_and_restarted_under_load_ingest_goes_on_and_the_feed_resumes() {
    bus_killed_and_restarted_under_load(Bus::Nats);
}

// ---------------------------------------------------------------------------
// Configuration and start-up
// ---------------------------------------------------------------------------

/// `ingestd --check-config` against a database that is not there.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut all = vec!["--check-config", "--database-url", "postgres://nobody@127.0.0.1:1/none"];
    all.extend_from_slice(args);
    run_cli(&all, env, Duration::from_secs(20))
}

#[test]
fn cluster_config_is_checked_and_shown() {
    let out = check_config(&["--set", "cluster.feed=redis"], &[]);
    assert_eq!(out.code(), Some(64), "feed without url: {out:?}");
    assert!(out.stderr.contains("cluster.url"), "the error names cluster.url: {}", out.stderr);
    let out = check_config(&["--set", "cluster.feed=kafka", "--set", "cluster.url=redis://127.0.0.1:6379"], &[]);
    assert_eq!(out.code(), Some(64), "unknown feed: {out:?}");
    assert!(out.stderr.contains("cluster.feed"), "the error names cluster.feed: {}", out.stderr);
    let out = check_config(&["--set", "cluster.feed=nats", "--set", "cluster.url=redis://127.0.0.1:6379"], &[]);
    assert_eq!(out.code(), Some(64), "a redis:// URL for the nats feed: {out:?}");
    assert!(out.stderr.contains("cluster.url"), "the error names cluster.url: {}", out.stderr);
    // The default is off, shown with the other keys.
    let out = check_config(&[], &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let t: toml::Table = out.stdout.parse().expect("TOML");
    let c = t.get("cluster").and_then(toml::Value::as_table).unwrap_or_else(|| panic!("no [cluster]:\n{}", out.stdout));
    assert_eq!(c.get("feed").and_then(toml::Value::as_str), Some("off"), "{c:?}");
    assert_eq!(c.get("channel").and_then(toml::Value::as_str), Some("ingestd.feed"), "{c:?}");
    assert_eq!(c.get("queue_batches").and_then(toml::Value::as_integer), Some(256), "{c:?}");
    // From the environment, like every key.
    let env = [("INGESTD_CLUSTER__FEED", "nats"), ("INGESTD_CLUSTER__URL", "nats://127.0.0.1:4222")];
    let out = check_config(&[], &env);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let t: toml::Table = out.stdout.parse().expect("TOML");
    assert_eq!(t["cluster"]["feed"].as_str(), Some("nats"), "{}", out.stdout);
    assert_eq!(t["cluster"]["url"].as_str(), Some("nats://127.0.0.1:4222"), "{}", out.stdout);
    // With the feed off, /health has no cluster object.
    let server = Server::start();
    let (status, h) = health(&server);
    assert_eq!(status, 200, "{h}");
    assert!(h.get("cluster").is_none_or(Value::is_null), "feed off: {h}");
}

/// A bus that is not there yet: ingestd starts, serves, says so in /health,
/// and connects once the server appears; the feed then crosses instances.
fn starts_without_its_bus(bus_kind: Bus) {
    let port = free_port();
    let channel = format!("ingestd.test.{}", unique("late"));
    let node = Ingestd::new()
        .set("cluster.feed", bus_kind.feed())
        .set("cluster.url", format!("{}://127.0.0.1:{port}", bus_kind.feed()))
        .set("cluster.channel", &channel)
        .set("cluster.reconnect_max_ms", 300);
    let a = node.clone().start();
    let b = node.table(&a.table).start();
    for s in [&a, &b] {
        let (status, h) = health(s);
        assert_eq!(status, 200, "no bus is no reason to be unready: {h}");
        let state = h["cluster"]["bus"].as_str().unwrap_or_default().to_string();
        assert!(state == "connecting" || state == "down", "bus state {state:?} with nothing listening: {h}");
        assert_eq!(s.post_event(&event(&unique("nobus"))).status, 200, "ingest without a bus");
    }
    let sub = Sub::open(&b, "b/all".into(), "", |_, _| true);
    let _bus = BusServer::start_on(bus_kind, port);
    let nodes = [a, b];
    wait_bus(&nodes, &["up"], Duration::from_secs(20));
    // Once both are up, an event committed by A reaches B's subscriber.
    let crossing = cev(&unique("late"), 1, 0);
    post_ok(&nodes[0], None, std::slice::from_ref(&crossing));
    wait_delivered(std::slice::from_ref(&sub), std::slice::from_ref(&crossing), Duration::from_secs(10));
    assert_eq!(cluster(&nodes[1])["peers"], 1, "B has heard from A");
}

#[test]
fn redis_unreachable_at_start_up_then_connected() {
    starts_without_its_bus(Bus::Redis);
}

#[test]
fn nats_unreachable_at_start_up_then_connected() {
    starts_without_its_bus(Bus::Nats);
}
