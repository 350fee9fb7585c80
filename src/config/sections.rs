//! The sections of the configuration: plain data with defaults and doc
//! lines, one struct per `[section]`. No file is read here and nothing of
//! a later stage is imported: stages import their section from here.
//! `tuning/default.toml` repeats every key for operators.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Listeners, shards and per-connection limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address for HTTP and WebSocket. Port 0 picks a free port (printed at start).
    pub listen: String,
    /// Shard threads, one io_uring runtime each; 0 means one per available core.
    pub shards: usize,
    /// Pin shard `n` to core `n` (modulo the core count).
    pub pin_cores: bool,
    /// Open connections for the whole process, split evenly across shards.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; more answers 431.
    pub max_header_bytes: usize,
    /// Most headers in one request; more answers 431.
    pub max_headers: usize,
    /// Largest request body as sent on the wire (compressed size for gzip); more answers 413.
    pub max_body_bytes: usize,
    /// Largest body after gzip decompression; more answers 413.
    pub max_decompressed_bytes: usize,
    /// Time from a request's first byte to its last; slower answers 408 and closes.
    pub request_timeout_ms: u64,
    /// Time allowed to write one response; a client that does not read it
    /// in time is disconnected.
    pub write_timeout_ms: u64,
    /// How long an idle keep-alive connection is kept open.
    pub idle_timeout_ms: u64,
    /// Deadline for a graceful shutdown, from the signal to the last thread joined.
    pub shutdown_timeout_ms: u64,
    /// Seconds sent in `Retry-After` with every 503.
    pub retry_after_s: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            shards: 0,
            pin_cores: true,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 8 * 1024 * 1024,
            max_decompressed_bytes: 32 * 1024 * 1024,
            request_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            shutdown_timeout_ms: 30_000,
            retry_after_s: 1,
        }
    }
}

/// When an answer is sent, and what an event may contain.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// `commit`: 200 once every accepted event is committed in PostgreSQL.
    /// `spool`: 200 once the events are fsync'd in the local disk spool, from
    /// which they reach PostgreSQL even across outages and restarts.
    /// `queue`: 202 once the events are in a ring (no durability promise).
    pub ack: AckMode,
    /// Most events in one request (JSON array elements or NDJSON lines); more answers 413.
    pub max_events_per_request: usize,
    /// Largest `payload` value of one event, in bytes of JSON text.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a `payload` (PostgreSQL's
    /// JSON parser refuses depths in the low ten thousands).
    pub max_payload_depth: usize,
    /// How far ahead of the server clock `ts` may be, in milliseconds.
    pub max_future_skew_ms: u64,
    /// Ignore unknown top-level event fields instead of rejecting the event.
    pub allow_unknown_fields: bool,
    /// Longest a request waits for a writer before its COPY starts. A request
    /// that would wait longer (judged at admission from the queue and the
    /// writers' recent cost per event) is answered 503 at once; one whose
    /// wait passes anyway is answered 503 then, never written.
    pub max_wait_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            ack: AckMode::Commit,
            max_events_per_request: 10_000,
            max_payload_bytes: 64 * 1024,
            max_payload_depth: 256,
            max_future_skew_ms: 5 * 60 * 1000,
            allow_unknown_fields: false,
            max_wait_ms: 1_000,
        }
    }
}

/// The acknowledgement contract of a success answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// 200 means committed in PostgreSQL.
    Commit,
    /// 202 means handed to a writer ring.
    Queue,
    /// 200 means fsync'd in the disk spool.
    Spool,
}

/// The bounded ring between shards and writers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Requests waiting for a writer, per writer: the writers share one ring
    /// of writers × ring_capacity; a full ring answers 503 at once. What
    /// waits there is bounded in bytes by `limits.memory_budget_bytes` and
    /// in time by `ingest.max_wait_ms`.
    pub ring_capacity: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self { ring_capacity: 1024 }
    }
}

/// Writer threads and how they batch.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterConfig {
    /// Writer threads, each with its own PostgreSQL connection; they share one ring.
    pub writers: usize,
    /// Most events in one COPY transaction.
    pub max_batch_events: usize,
    /// Most encoded bytes in one COPY transaction.
    pub max_batch_bytes: usize,
    /// How long a writer waits for more requests once it holds some, when its
    /// batch is still small. A writer always takes everything already waiting,
    /// so batches grow with load without any wait; 0 never waits.
    pub max_linger_ms: u64,
    /// How long committed `event_id`s are remembered (as 64-bit fingerprints)
    /// so that re-sent events are inserted idempotently without forcing their
    /// whole batch through the staging fallback. 0 turns the hint off.
    pub dedup_window_ms: u64,
    /// Most fingerprints remembered (≈ 16 bytes each); past it the window
    /// shrinks.
    pub dedup_max_ids: usize,
    /// A batch is sized to commit in about this long, from the writers'
    /// recent cost per event: a database that slows down gets smaller
    /// batches, not longer commits.
    pub target_commit_ms: u64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            writers: 2,
            max_batch_events: 10_000,
            max_batch_bytes: 16 * 1024 * 1024,
            max_linger_ms: 2,
            dedup_window_ms: 60_000,
            dedup_max_ids: 4_000_000,
            target_commit_ms: 250,
        }
    }
}

/// PostgreSQL connection and table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL (or libpq `key=value` string), e.g.
    /// `postgres://user@127.0.0.1:5432/db?sslmode=verify-full`. Required.
    /// libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are read
    /// as the keys below; a parameter and a key that differ are an error.
    pub url: String,
    /// TLS to PostgreSQL (libpq's `sslmode`): `disable`, `prefer` (TLS when
    /// offered, else plain), `require` (TLS, certificate not checked unless
    /// `ca_file` is set), `verify-ca` (chain checked) or `verify-full`
    /// (chain and host name). Empty: the URL's `sslmode`, else `prefer`.
    pub tls_mode: String,
    /// PEM file of the CA certificates that sign the server's certificate
    /// (libpq's `sslrootcert`); empty: the system's trusted roots for the
    /// verify modes, none otherwise; `system`: the system's roots, and
    /// `verify-full`. Re-read on SIGHUP.
    pub ca_file: String,
    /// PEM client certificate chain for certificate authentication
    /// (`sslcert`); needs `key_file`. Re-read on SIGHUP.
    pub cert_file: String,
    /// PEM private key of `cert_file` (`sslkey`). Re-read on SIGHUP.
    pub key_file: String,
    /// File holding the password (one line); re-read on SIGHUP, so new
    /// connections use a rotated password. Empty: the URL's password, else
    /// the `PGPASSWORD` environment variable. Never logged.
    pub password_file: String,
    /// Table to write, `name` or `schema.name`; created at start-up when missing.
    pub table: String,
    /// Connections in the pool; 0 means writers + 1.
    pub pool_size: u32,
    /// Time allowed to open a connection.
    pub connect_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` for every statement ingestd runs.
    pub statement_timeout_ms: u64,
    /// Create the table (and nothing else) at start-up when it is missing.
    pub create_table: bool,
    /// Where events PostgreSQL refuses (e.g. an operator's CHECK constraint)
    /// are kept with its error; empty means `<table>_dead_letter`.
    pub dead_letter_table: String,
    /// How often the database is probed (`SELECT 1` on a connection of the
    /// probe's own) while no writer has reached it lately; the probe moves
    /// `/health` and the breaker without any client traffic.
    pub probe_interval_ms: u64,
    /// Time a probe may take (connect and query) before it counts as failed.
    pub probe_timeout_ms: u64,
    /// How often the probe thread counts the dead-letter table
    /// (`SELECT count(*)`, within `probe_timeout_ms`) for the
    /// `ingestd_dead_letters_waiting` gauge; 0 turns the count off.
    pub dead_letter_count_interval_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            tls_mode: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            password_file: String::new(),
            table: "events".into(),
            pool_size: 0,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 5_000,
            create_table: true,
            dead_letter_table: String::new(),
            probe_interval_ms: 1_000,
            probe_timeout_ms: 2_000,
            dead_letter_count_interval_ms: 10_000,
        }
    }
}

/// WebSocket subscribers and ingest over `GET /ws`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Subscribers in the whole process; more upgrades answer 503.
    pub max_subscribers: usize,
    /// Subscribers per shard; more upgrades on that shard answer 503.
    pub max_subscribers_per_shard: usize,
    /// WebSocket connections from one IP address; more answer 429.
    pub max_per_ip: usize,
    /// Events waiting to be sent to one subscriber.
    pub queue_messages: usize,
    /// Bytes of events waiting to be sent to one subscriber.
    pub queue_bytes: usize,
    /// When a subscriber's queue is full: `close` it with code 1013, or
    /// `drop_oldest` events and send it `{"dropped": N}`.
    pub overflow: Overflow,
    /// A ping is sent after this long without traffic to the client.
    pub ping_interval_ms: u64,
    /// A connection that sends nothing (not even a pong) this long is closed.
    pub idle_timeout_ms: u64,
    /// Largest message (and frame) a client may send.
    pub max_message_bytes: usize,
    /// Devices one socket may subscribe to (URL and control frames together).
    pub max_devices_per_socket: usize,
    /// Device prefixes one socket may subscribe to. Each distinct prefix
    /// length on a shard costs every event one lookup, so keep it small.
    pub max_prefixes_per_socket: usize,
    /// Event types one socket may filter on.
    pub max_types_per_socket: usize,
    /// Largest control frame (`{"op": "subscribe", …}`); a larger one is
    /// answered with an error, the socket stays open.
    pub max_control_frame_bytes: usize,
    /// Most devices one snapshot (`snapshot=true`, `"snapshot": true`)
    /// sends; past it the done marker says `"complete": false`.
    pub snapshot_max_devices: usize,
    /// Committed batches waiting for one shard's fan-out; past it the
    /// shard's subscribers are told they missed events (overflow policy).
    pub inbox_batches: usize,
    /// Committed batches waiting for the broadcaster thread.
    pub broadcast_ring: usize,
    /// Bytes the live feed may hold in all: committed batches waiting for
    /// the broadcaster and the shards, and every subscriber's queue. Past it
    /// subscribers are told they missed events (per `overflow`).
    pub fanout_budget_bytes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_subscribers: 100_000,
            max_subscribers_per_shard: 100_000,
            max_per_ip: 10_000,
            queue_messages: 10_000,
            queue_bytes: 1024 * 1024,
            overflow: Overflow::Close,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            max_message_bytes: 1024 * 1024,
            max_devices_per_socket: 1_000,
            max_prefixes_per_socket: 16,
            max_types_per_socket: 32,
            max_control_frame_bytes: 64 * 1024,
            snapshot_max_devices: 10_000,
            inbox_batches: 256,
            broadcast_ring: 1024,
            fanout_budget_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What happens to a subscriber that cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Close with 1013 (try again later).
    Close,
    /// Drop the oldest queued events and report how many.
    DropOldest,
}

/// `[tls]`: a second listener speaking TLS (rustls) on the same shards.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Address of the TLS listener, e.g. `0.0.0.0:8443`; empty = no TLS.
    /// `server.listen` keeps serving plain HTTP beside it.
    pub listen: String,
    /// PEM certificate chain, leaf first. Read at start-up and again on
    /// SIGHUP: new handshakes use the renewed pair, open connections keep
    /// theirs, and a pair that does not load keeps the running one.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); re-read with `cert_file`.
    pub key_file: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// The TLS listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
}

/// `[cors]`: which web pages (by origin) may call the ingest and read
/// routes from a browser, and open `GET /ws`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed, each exactly `scheme://host[:port]` as a browser
    /// sends it in `Origin` (`https://app.example.com`), or `["*"]` for any
    /// origin. Empty (the default) = CORS off: no CORS headers, `OPTIONS`
    /// is 405, and `GET /ws` does not look at `Origin`.
    pub allowed_origins: Vec<String>,
    /// `Access-Control-Max-Age` of a preflight answer: how long a browser
    /// may reuse it.
    pub max_age_s: u32,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self { allowed_origins: Vec::new(), max_age_s: 600 }
    }
}

impl CorsConfig {
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    /// Whether any origin is allowed (`["*"]`).
    pub fn any(&self) -> bool {
        self.allowed_origins.iter().any(|o| o == "*")
    }

    /// Whether a request's `Origin` is allowed; always false when CORS is off.
    pub fn allows(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// What is wrong with `cors.allowed_origins`, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.any() && self.allowed_origins.len() > 1 {
            return Some("\"*\" allows every origin and must be alone".into());
        }
        self.allowed_origins.iter().filter(|o| *o != "*").find(|o| !origin_is_valid(o)).map(|o| {
            format!(
                "{o:?} is not an origin: write scheme://host[:port] with scheme http or https, no path and no \
                 trailing slash (e.g. https://app.example.com), or \"*\""
            )
        })
    }
}

/// `scheme://host[:port]`, as browsers serialise an origin: http or https,
/// a DNS name, IPv4 or bracketed IPv6 host, an optional port, nothing after.
fn origin_is_valid(origin: &str) -> bool {
    let Some(authority) = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")) else {
        return false;
    };
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, after)) => {
                (!addr.is_empty() && addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'), after)
            }
            None => (false, ""),
        },
        None => {
            let (host, port) = authority.find(':').map_or((authority, ""), |i| authority.split_at(i));
            (!host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'), port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// Which bus carries the live feed between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Feed {
    /// Each instance's subscribers see only its own events.
    #[default]
    Off,
    /// Redis pub/sub (`redis://` or `rediss://`).
    Redis,
    /// NATS core subjects (`nats://`).
    Nats,
}

impl Feed {
    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Off => "off",
            Feed::Redis => "redis",
            Feed::Nats => "nats",
        }
    }
}

/// One live feed across instances: the `[cluster]` section (see `cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `off`, `redis` or `nats`.
    pub feed: Feed,
    /// The bus: `redis://host:6379` (`rediss://` for TLS, `redis://:password@…`)
    /// or `nats://host:4222` (`nats://user:password@…`).
    pub url: String,
    /// The Redis channel or NATS subject; instances that share the bus and
    /// this name share one feed.
    pub channel: String,
    /// This instance's name on the bus; empty: `<hostname>-<pid>-<random>`,
    /// new at every start.
    pub instance_id: String,
    /// Batches waiting for the bus; past it batches are dropped (counted,
    /// and told to the other instances as missed events).
    pub queue_batches: usize,
    /// Bytes of the batches waiting for the bus.
    pub queue_bytes: usize,
    /// A batch not on the bus this long after its commit is dropped.
    pub publish_timeout_ms: u64,
    /// Largest message on the bus; a bigger batch goes as several messages
    /// (NATS refuses messages over its `max_payload`, 1 MiB by default).
    pub max_message_bytes: usize,
    /// Longest pause between reconnection attempts (from 50 ms, doubling).
    pub reconnect_max_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            feed: Feed::Off,
            url: String::new(),
            channel: "ingestd.feed".into(),
            instance_id: String::new(),
            queue_batches: 256,
            queue_bytes: 32 * 1024 * 1024,
            publish_timeout_ms: 1_000,
            max_message_bytes: 512 * 1024,
            reconnect_max_ms: 2_000,
        }
    }
}

impl ClusterConfig {
    /// `url` with any password in it shown as `***`.
    pub fn url_masked(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else { return self.url.clone() };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let shown = if userinfo.contains(':') { format!("{user}:***") } else { userinfo.to_string() };
                format!("{scheme}://{shown}{}", &rest[at..])
            }
            None => self.url.clone(),
        }
    }

    /// What is wrong with the section, key by key.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.feed == Feed::Off {
            return out;
        }
        let schemes: &[&str] = match self.feed {
            Feed::Redis => &["redis://", "rediss://"],
            _ => &["nats://", "tls://"],
        };
        if self.url.trim().is_empty() {
            out.push((
                "url",
                format!("is required with feed = \"{}\" (e.g. {}127.0.0.1)", self.feed.as_str(), schemes[0]),
            ));
        } else if !schemes.iter().any(|s| self.url.starts_with(s)) {
            out.push((
                "url",
                format!("must start with {} for feed = \"{}\"", schemes.join(" or "), self.feed.as_str()),
            ));
        } else if self.url.split_once("://").is_none_or(|(_, rest)| rest.trim().is_empty()) {
            out.push(("url", "names no host".into()));
        } else {
            // The client's own parser, without connecting.
            let parsed = match self.feed {
                Feed::Redis => redis::Client::open(self.url.as_str()).map(|_| ()).map_err(|e| e.to_string()),
                _ => self.url.parse::<async_nats::ServerAddr>().map(|_| ()).map_err(|e| e.to_string()),
            };
            if let Err(why) = parsed {
                out.push(("url", format!("is not a valid {} URL ({why}): {}", self.feed.as_str(), self.url_masked())));
            }
        }
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        };
        if !name_ok(&self.channel) {
            out.push(("channel", "must be 1-200 visible ASCII characters without * or >".into()));
        }
        let id_ok = self.instance_id.len() <= 200 && self.instance_id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            out.push(("instance_id", "must be empty (generated) or 1-200 visible ASCII characters".into()));
        }
        if self.queue_batches < 2 {
            out.push(("queue_batches", "must be at least 2".into()));
        }
        if self.queue_bytes < 1024 * 1024 {
            out.push(("queue_bytes", "must be at least 1048576".into()));
        }
        if !(10..=60_000).contains(&self.publish_timeout_ms) {
            out.push(("publish_timeout_ms", "must be between 10 and 60000".into()));
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            out.push(("max_message_bytes", "must be between 65536 and 67108864".into()));
        }
        if !(100..=600_000).contains(&self.reconnect_max_ms) {
            out.push(("reconnect_max_ms", "must be between 100 and 600000".into()));
        }
        out
    }
}

/// Logging to stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Least severe level written: `error`, `warn`, `info` or `debug`.
    pub level: crate::log::Level,
    /// `logfmt` or `json`, one line per log event.
    pub format: crate::log::Format,
    /// A request answered later than this after its first byte is logged
    /// (`warn`, "slow request", with its `request_id`); 0 = never.
    pub slow_request_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: crate::log::Level::Info, format: crate::log::Format::Logfmt, slow_request_ms: 1000 }
    }
}

impl ServerConfig {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// `[breaker]`: when the circuit breaker around the database opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive transient failures (or timeouts) that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open the first time before a probe.
    pub open_ms: u64,
    /// Cap on the open time, which doubles after each failed probe.
    pub max_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: 5, open_ms: 1_000, max_open_ms: 30_000 }
    }
}

impl BreakerConfig {
    /// Range problems as `(key, why)`, keys relative to the breaker's section.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.failure_threshold < 1 {
            out.push(("failure_threshold", "must be at least 1"));
        }
        if self.open_ms < 1 {
            out.push(("open_ms", "must be at least 1"));
        }
        if self.max_open_ms < self.open_ms {
            out.push(("max_open_ms", "must be at least open_ms"));
        }
        out
    }
}

/// The latest state of every device: the `[state]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Keep one row per `device_id` with its newest event, written by the
    /// writers in the same transaction as the events.
    pub enabled: bool,
    /// The state table, `name` or `schema.name`; empty means `<table>_state`.
    /// Created with the events table (`database.create_table`).
    pub table: String,
    /// Reader threads serving `GET /devices…` (see [`crate::read`]), each
    /// with one connection of its own pool: the writers' pool is never used.
    pub readers: usize,
    /// Most devices one `GET /devices` page may ask for (`limit`).
    pub max_page: usize,
    /// Longest a read waits, from the shard's hand-off to its answer: queue,
    /// connection and query (its `statement_timeout` is what is left of
    /// this). Past it the client gets 503 + `Retry-After`.
    pub read_timeout_ms: u64,
    /// Most bytes of one answer's JSON; a page that would pass it ends early
    /// (its `next` says where to go on). Leased from
    /// `limits.memory_budget_bytes` while the answer exists.
    pub max_answer_bytes: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            table: String::new(),
            readers: 1,
            max_page: 1000,
            read_timeout_ms: 2_000,
            max_answer_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Where the spool lives and how big it may grow: the `[spool]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of segments and the checkpoint; created if missing. One
    /// process at a time (it is locked).
    pub dir: PathBuf,
    /// A new segment is started when the next record would take the current
    /// one past this size. Segments are the unit of deletion, and the largest
    /// record is a segment less its framing.
    pub segment_bytes: u64,
    /// Bound on all segments plus appends in flight; beyond it appends fail
    /// with [`SpoolError::Full`]. The current segment is deleted only after
    /// the next one starts, so at least twice `segment_bytes`.
    pub max_bytes: u64,
    /// Appends waiting for the appender thread; beyond it `try_append` fails
    /// with [`SpoolError::Busy`].
    pub queue_capacity: usize,
    /// Most payload bytes written between two fsyncs (one group commit), so
    /// that the first append of a huge group does not wait for all of it.
    pub max_group_bytes: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("spool"),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            queue_capacity: 1024,
            max_group_bytes: 16 * 1024 * 1024,
        }
    }
}

impl SpoolConfig {
    /// Range problems as `(key, why)`, keys relative to the spool's section.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.dir.as_os_str().is_empty() {
            out.push(("dir", "must not be empty"));
        }
        if !(1024..=u64::from(u32::MAX)).contains(&self.segment_bytes) {
            out.push(("segment_bytes", "must be between 1024 and 4294967295"));
        }
        if self.max_bytes < self.segment_bytes.saturating_mul(2) {
            out.push(("max_bytes", "must be at least twice segment_bytes"));
        }
        if self.queue_capacity < 1 {
            out.push(("queue_capacity", "must be at least 1"));
        }
        if self.max_group_bytes < 1 {
            out.push(("max_group_bytes", "must be at least 1"));
        }
        out
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `off`: no credentials asked. `tokens`: every route but `GET /health`
    /// needs a bearer token with the route's scope.
    pub mode: AuthMode,
    /// A TOML file of `[[tokens]]` entries (same shape as `auth.tokens`),
    /// re-read on SIGHUP; its tokens add to the inline ones. Empty = none.
    pub token_file: String,
    /// Inline tokens.
    pub tokens: Vec<TokenConfig>,
    /// Whether `mode` was written in a source (file, env or flag), not
    /// defaulted: a listener beyond loopback needs it said explicitly.
    #[serde(skip)]
    pub mode_given: bool,
}

/// Whether requests must carry a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Off,
    Tokens,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Off => "off",
            AuthMode::Tokens => "tokens",
        }
    }
}

/// One token and what it may do.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// The secret: 16 to 512 bytes of visible ASCII (no spaces).
    pub token: String,
    /// Any of `ingest` (POST /events, /events/batch, WebSocket ingest
    /// frames), `subscribe` (GET /ws subscriptions; also the device reads),
    /// `read` (GET /devices, /devices/{device_id}), `admin` (/stats, /metrics).
    pub scopes: Vec<Scope>,
    /// When set, the token may only write events whose `device_id` starts
    /// with it, and only receive such events on a subscription.
    pub device_prefix: String,
    /// A label for logs and errors; never the token itself.
    pub name: String,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token", &"***")
            .field("scopes", &self.scopes)
            .field("device_prefix", &self.device_prefix)
            .field("name", &self.name)
            .finish()
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ingest,
    Subscribe,
    Admin,
    /// The latest state of devices (`GET /devices…`); `subscribe` grants it too.
    Read,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Subscribe => "subscribe",
            Scope::Admin => "admin",
            Scope::Read => "read",
        }
    }

    /// The scope's bit in a grant's set.
    pub fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// `[limits]`: every key may change on SIGHUP.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections from one client IP (all shards together). Over it a
    /// new connection gets a 429 and is closed. 0 = only `server.max_connections`.
    pub max_connections_per_ip: usize,
    /// Requests (and WebSocket ingest frames) per second from one client IP;
    /// over it, 429 with `Retry-After`. 0 = no limit.
    pub ip_requests_per_s: u32,
    /// Requests one IP may make at once before its rate applies; 0 = `ip_requests_per_s`.
    pub ip_burst: u32,
    /// Requests per second per token (auth.mode = "tokens"). 0 = no limit.
    pub token_requests_per_s: u32,
    /// Burst per token; 0 = `token_requests_per_s`.
    pub token_burst: u32,
    /// Bytes that requests may hold in memory at once, all shards and
    /// writers together: bodies being read, gzip output, parse scratch,
    /// encoded rows waiting in the ring and in writer batches, spool appends,
    /// WebSocket ingest frames (see [`crate::budget`]). A request that does
    /// not fit is answered 503 + `Retry-After` at once.
    pub memory_budget_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_ip: 0,
            ip_requests_per_s: 0,
            ip_burst: 0,
            token_requests_per_s: 0,
            token_burst: 0,
            memory_budget_bytes: 256 * 1024 * 1024,
        }
    }
}

impl LimitsConfig {
    /// (requests per second, burst) per IP.
    pub fn ip_rate(&self) -> (u32, u32) {
        (self.ip_requests_per_s, if self.ip_burst == 0 { self.ip_requests_per_s } else { self.ip_burst })
    }

    /// (requests per second, burst) per token.
    pub fn token_rate(&self) -> (u32, u32) {
        (self.token_requests_per_s, if self.token_burst == 0 { self.token_requests_per_s } else { self.token_burst })
    }
}
