//! Configuration: a TOML file, then `INGESTD_*` environment variables, then
//! command-line flags, each layer winning over the one before.
//!
//! The file is read into a `toml::Table`, the overrides are written into that
//! table, and only then is the whole deserialised into [`Config`] with
//! `deny_unknown_fields` everywhere, so an unknown key or a bad value is an
//! error that names the key (`writer.writers: invalid type ...`) wherever it
//! came from. [`Config::validate`] then checks ranges and cross-field rules and
//! reports every problem at once. Every key has a default and a doc line here;
//! `tuning/default.toml` repeats them for operators.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole effective configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub ingest: IngestConfig,
    pub pipeline: PipelineConfig,
    pub writer: WriterConfig,
    pub database: DatabaseConfig,
    /// The circuit breaker around every database call.
    pub breaker: crate::writer::breaker::BreakerConfig,
    /// The disk spool behind `ack = "spool"`.
    pub spool: crate::spool::SpoolConfig,
    pub websocket: WebSocketConfig,
    /// Bearer tokens and their scopes.
    pub auth: crate::auth::AuthConfig,
    /// The optional TLS listener.
    pub tls: TlsConfig,
    /// Abuse limits across shards: per IP and per token.
    pub limits: crate::limits::LimitsConfig,
    pub log: LogConfig,
}

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

/// The bounded rings between shards and writers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Requests waiting for a writer, per writer: the writers share one ring
    /// of writers × ring_capacity; a full ring answers 503 at once.
    /// Memory bound: writers × ring_capacity × the encoded size of one request.
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
    /// PostgreSQL URL, e.g. `postgres://user@127.0.0.1:5432/db`. Required.
    pub url: String,
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
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            table: "events".into(),
            pool_size: 0,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 5_000,
            create_table: true,
            dead_letter_table: String::new(),
            probe_interval_ms: 1_000,
            probe_timeout_ms: 2_000,
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
    /// PEM certificate chain, leaf first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
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

/// Logging to stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Least severe level written: `error`, `warn`, `info` or `debug`.
    pub level: crate::log::Level,
    /// `logfmt` or `json`, one line per log event.
    pub format: crate::log::Format,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: crate::log::Level::Info, format: crate::log::Format::Logfmt }
    }
}

/// The running configuration, swapped whole on SIGHUP; reads are lock-free.
pub type LiveConfig = arc_swap::ArcSwap<Config>;
/// A read of the running configuration.
pub type ConfigGuard = arc_swap::Guard<std::sync::Arc<Config>>;

/// Keys a SIGHUP reload applies to the running process. Every other key
/// needs a restart: it sized threads, rings, sockets or files at start-up.
pub const LIVE_KEYS: &[&str] = &[
    "server.max_connections",
    "server.max_header_bytes",
    "server.max_headers",
    "server.max_body_bytes",
    "server.max_decompressed_bytes",
    "server.request_timeout_ms",
    "server.write_timeout_ms",
    "server.idle_timeout_ms",
    "server.shutdown_timeout_ms",
    "server.retry_after_s",
    "ingest.max_events_per_request",
    "ingest.max_payload_bytes",
    "ingest.max_payload_depth",
    "ingest.max_future_skew_ms",
    "ingest.allow_unknown_fields",
    "ingest.max_wait_ms",
    "writer.max_batch_events",
    "writer.max_batch_bytes",
    "writer.max_linger_ms",
    "writer.target_commit_ms",
    "websocket.queue_messages",
    "websocket.queue_bytes",
    "websocket.overflow",
    "websocket.ping_interval_ms",
    "websocket.idle_timeout_ms",
    "websocket.max_message_bytes",
    "websocket.max_subscribers_per_shard",
    "websocket.fanout_budget_bytes",
    "auth.mode",
    "auth.token_file",
    "auth.tokens",
    "limits.max_connections_per_ip",
    "limits.ip_requests_per_s",
    "limits.ip_burst",
    "limits.token_requests_per_s",
    "limits.token_burst",
    "limits.memory_budget_bytes",
    "log.level",
    "log.format",
];

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reload {
    /// Live keys whose new values are now in force.
    pub applied: Vec<String>,
    /// Keys that changed in the sources but keep their running values
    /// until a restart.
    pub need_restart: Vec<String>,
}

impl Config {
    /// Merges a newly loaded configuration into the running one: live keys
    /// take their new values, the others keep the running ones.
    pub fn reloaded(&self, new: &Config) -> Result<(Config, Reload), ConfigError> {
        let flat = |c: &Config| -> Result<Vec<(String, toml::Value)>, ConfigError> {
            let value = toml::Value::try_from(c)
                .map_err(|e| ConfigError::Parse { key: String::new(), message: e.to_string() })?;
            let mut out = Vec::new();
            if let toml::Value::Table(sections) = value {
                for (section, v) in sections {
                    if let toml::Value::Table(keys) = v {
                        out.extend(keys.into_iter().map(|(k, v)| (format!("{section}.{k}"), v)));
                    }
                }
            }
            Ok(out)
        };
        let old = flat(self)?;
        let new_flat = flat(new)?;
        let mut merged = toml::Table::new();
        let mut report = Reload::default();
        for (key, new_value) in new_flat {
            let old_value = old.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            let changed = old_value.as_ref() != Some(&new_value);
            let value = if LIVE_KEYS.contains(&key.as_str()) || !changed {
                if changed {
                    report.applied.push(key.clone());
                }
                new_value
            } else {
                report.need_restart.push(key.clone());
                old_value.unwrap_or(new_value)
            };
            let (section, field) = key.split_once('.').unwrap_or((&key, ""));
            if let toml::Value::Table(t) =
                merged.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                t.insert(field.to_string(), value);
            }
        }
        let mut config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { key: String::new(), message: e.to_string() })?;
        config.auth.mode_given = new.auth.mode_given;
        config.validate()?;
        Ok((config, report))
    }
}

/// Everything that can be wrong with a configuration; each names its key.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: String, source: std::io::Error },
    /// The file, an override or a value did not parse.
    Parse { key: String, message: String },
    /// Values that parsed but break a rule.
    Invalid(Vec<(String, String)>),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => write!(f, "cannot read config file {path}: {source}"),
            ConfigError::Parse { key, message } if key.is_empty() => write!(f, "config: {message}"),
            ConfigError::Parse { key, message } => write!(f, "config key {key}: {message}"),
            ConfigError::Invalid(problems) => {
                for (i, (key, why)) in problems.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "config key {key}: {why}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where the configuration comes from, before it is merged.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Path of the TOML file, if any.
    pub file: Option<String>,
    /// `section.key = value` overrides from the environment, in order.
    pub env: Vec<(String, String)>,
    /// `section.key = value` overrides from flags, in order (applied after `env`).
    pub flags: Vec<(String, String)>,
}

impl Sources {
    /// Collects the `INGESTD_*` variables of an environment: `INGESTD_LISTEN`,
    /// `INGESTD_DATABASE_URL` and `INGESTD_<SECTION>__<KEY>`. Other `INGESTD_`
    /// names (without `__`) are not configuration and are left alone.
    pub fn env_overrides(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("INGESTD_") else { continue };
            let key = match rest {
                "LISTEN" => "server.listen".to_string(),
                "DATABASE_URL" => "database.url".to_string(),
                _ => match rest.split_once("__") {
                    Some((section, key)) => format!("{}.{}", section.to_lowercase(), key.to_lowercase()),
                    None => continue,
                },
            };
            out.push((key, value));
        }
        out.sort();
        out
    }
}

impl Config {
    /// Reads, merges and validates the configuration.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let text = match &sources.file {
            Some(path) => {
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?
            }
            None => String::new(),
        };
        Self::from_parts(&text, sources.env.iter().chain(sources.flags.iter()))
    }

    /// Merges a TOML document with `section.key = value` overrides and validates.
    pub fn from_parts<'a>(
        text: &str,
        overrides: impl IntoIterator<Item = &'a (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse { key: String::new(), message: e.to_string() })?;
        for (key, raw) in overrides {
            apply_override(&mut table, key, raw)?;
        }
        let auth_mode_given = table.get("auth").and_then(|a| a.get("mode")).is_some();
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde reports an unknown field at its parent; name the field itself.
            let key = match unknown_field_name(&message) {
                Some(field) if path == "." => field.to_string(),
                Some(field) => format!("{path}.{field}"),
                None => path,
            };
            ConfigError::Parse { key, message }
        })?;
        config.auth.mode_given = auth_mode_given;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and cross-field rules; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut check = |ok: bool, key: &str, why: &str| {
            if !ok {
                problems.push((key.to_string(), why.to_string()));
            }
        };
        check(self.server.listen_addr().is_ok(), "server.listen", "must be an IP:port address, e.g. 127.0.0.1:8080");
        check(self.server.shards <= 1024, "server.shards", "must be between 0 (one per core) and 1024");
        check(self.server.max_connections >= 1, "server.max_connections", "must be at least 1");
        check(self.server.max_header_bytes >= 256, "server.max_header_bytes", "must be at least 256");
        check((1..=1024).contains(&self.server.max_headers), "server.max_headers", "must be between 1 and 1024");
        check(self.server.max_body_bytes >= 1, "server.max_body_bytes", "must be at least 1");
        check(self.server.max_decompressed_bytes >= 1, "server.max_decompressed_bytes", "must be at least 1");
        check(self.server.request_timeout_ms >= 1, "server.request_timeout_ms", "must be at least 1");
        check(self.server.write_timeout_ms >= 1, "server.write_timeout_ms", "must be at least 1");
        check(self.server.idle_timeout_ms >= 1, "server.idle_timeout_ms", "must be at least 1");
        check(self.server.shutdown_timeout_ms >= 1, "server.shutdown_timeout_ms", "must be at least 1");
        check(self.ingest.max_events_per_request >= 1, "ingest.max_events_per_request", "must be at least 1");
        check(self.ingest.max_payload_bytes >= 1, "ingest.max_payload_bytes", "must be at least 1");
        check(
            (1..=5000).contains(&self.ingest.max_payload_depth),
            "ingest.max_payload_depth",
            "must be between 1 and 5000 (deeper payloads fail in PostgreSQL)",
        );
        check(self.pipeline.ring_capacity >= 1, "pipeline.ring_capacity", "must be at least 1");
        check((1..=256).contains(&self.writer.writers), "writer.writers", "must be between 1 and 256");
        check(self.writer.max_batch_events >= 1, "writer.max_batch_events", "must be at least 1");
        check(self.writer.max_batch_bytes >= 1024, "writer.max_batch_bytes", "must be at least 1024");
        check(self.writer.max_linger_ms <= 10_000, "writer.max_linger_ms", "must be at most 10000");
        check(
            (10..=60_000).contains(&self.writer.target_commit_ms),
            "writer.target_commit_ms",
            "must be between 10 and 60000",
        );
        check((1..=600_000).contains(&self.ingest.max_wait_ms), "ingest.max_wait_ms", "must be between 1 and 600000");
        check(self.database.probe_interval_ms >= 100, "database.probe_interval_ms", "must be at least 100");
        check(self.database.probe_timeout_ms >= 10, "database.probe_timeout_ms", "must be at least 10");
        check(
            !self.database.url.trim().is_empty(),
            "database.url",
            "is required (or --database-url / INGESTD_DATABASE_URL)",
        );
        check(
            self.database.url.is_empty() || self.database.url.parse::<postgres::Config>().is_ok(),
            "database.url",
            "is not a valid PostgreSQL URL or key=value string",
        );
        check(
            table_name_is_valid(&self.database.table),
            "database.table",
            "must be `name` or `schema.name`, each [A-Za-z_][A-Za-z0-9_]{0,62}",
        );
        check(
            self.database.dead_letter_table.is_empty() || table_name_is_valid(&self.database.dead_letter_table),
            "database.dead_letter_table",
            "must be empty (<table>_dead_letter), `name` or `schema.name`",
        );
        check(
            self.database.pool_size == 0 || self.database.pool_size as usize >= self.writer.writers,
            "database.pool_size",
            "must be 0 (writers + 1) or at least writer.writers",
        );
        check(self.database.connect_timeout_ms >= 1, "database.connect_timeout_ms", "must be at least 1");
        let ws = &self.websocket;
        check(ws.queue_messages >= 1, "websocket.queue_messages", "must be at least 1");
        check(ws.queue_bytes >= 1024, "websocket.queue_bytes", "must be at least 1024");
        check(ws.ping_interval_ms >= 10, "websocket.ping_interval_ms", "must be at least 10");
        check(
            ws.idle_timeout_ms > ws.ping_interval_ms,
            "websocket.idle_timeout_ms",
            "must be longer than websocket.ping_interval_ms",
        );
        check(ws.max_message_bytes >= 1024, "websocket.max_message_bytes", "must be at least 1024");
        check(ws.inbox_batches >= 1, "websocket.inbox_batches", "must be at least 1");
        check(ws.broadcast_ring >= 1, "websocket.broadcast_ring", "must be at least 1");
        check(
            ws.fanout_budget_bytes >= ws.queue_bytes.max(1024 * 1024),
            "websocket.fanout_budget_bytes",
            "must be at least websocket.queue_bytes and at least 1 MiB",
        );
        if self.tls.enabled() {
            check(
                self.tls.listen_addr().is_ok(),
                "tls.listen",
                "must be empty or an IP:port address, e.g. 0.0.0.0:8443",
            );
            check(
                self.tls.listen_addr().ok().is_none_or(|a| a.port() == 0 || Ok(a) != self.server.listen_addr()),
                "tls.listen",
                "must differ from server.listen",
            );
        }
        let smallest_budget = self.server.max_body_bytes.saturating_mul(4);
        if self.limits.memory_budget_bytes < smallest_budget {
            problems.push((
                "limits.memory_budget_bytes".to_string(),
                format!(
                    "must be at least 4 x server.max_body_bytes ({smallest_budget} bytes), so that a body at the \
                     limit can be read and encoded within it"
                ),
            ));
        }
        for (key, why) in self.breaker.problems() {
            problems.push((format!("breaker.{key}"), why.to_string()));
        }
        let exposed = [self.server.listen_addr().ok(), self.tls.listen_addr().ok()]
            .into_iter()
            .flatten()
            .find(|a| !a.ip().is_loopback());
        if let Some(addr) = exposed
            && !self.auth.mode_given
        {
            problems.push((
                "auth.mode".to_string(),
                format!(
                    "must be set when listening beyond loopback ({addr}): \"tokens\" (see [auth]), or \"off\" to \
                     serve anyone who can reach it"
                ),
            ));
        }
        if let Err(auth) = crate::auth::Tokens::load(&self.auth) {
            problems.extend(auth);
        }
        if self.tls.enabled()
            && let Err(problem) = crate::shard::transport::server_config(&self.tls.cert_file, &self.tls.key_file)
        {
            problems.push(problem);
        }
        if self.ingest.ack == AckMode::Spool {
            for (key, why) in self.spool.problems() {
                problems.push((format!("spool.{key}"), why.to_string()));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
    }

    /// The configuration as TOML, with any password in the database URL masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = mask_password(&shown.database.url);
        for t in &mut shown.auth.tokens {
            t.token = "***".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Shard threads to run: the configured number, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.server.shards > 0 {
            self.server.shards
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    /// The dead-letter table's name.
    pub fn dead_letter_table(&self) -> String {
        if self.database.dead_letter_table.is_empty() {
            format!("{}_dead_letter", self.database.table)
        } else {
            self.database.dead_letter_table.clone()
        }
    }

    /// Connections in the PostgreSQL pool.
    pub fn pool_size(&self) -> u32 {
        if self.database.pool_size > 0 { self.database.pool_size } else { self.writer.writers as u32 + 1 }
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

/// Writes one `section.key = raw` override into the document. The value is
/// read as a TOML value when it is one (`2`, `true`, `"x"`), else as a string.
fn apply_override(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), ConfigError> {
    let Some((section, field)) = key.split_once('.') else {
        return Err(ConfigError::Parse {
            key: key.to_string(),
            message: "overrides are written section.key=value, e.g. writer.writers=4".into(),
        });
    };
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(field.to_string(), value);
            Ok(())
        }
        _ => Err(ConfigError::Parse { key: section.to_string(), message: "must be a table".into() }),
    }
}

/// Pulls the field out of serde's "unknown field `x`, expected ..." message.
fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn table_name_is_valid(name: &str) -> bool {
    let ident = |s: &str| {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && s.len() <= 63
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((schema, table)) => ident(schema) && ident(table),
        None => ident(name),
    }
}

/// Replaces the password of a `scheme://user:password@host` URL with `***`.
pub fn mask_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![("database.url".to_string(), "postgres://u@127.0.0.1/db".to_string())];
        all.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Config::from_parts("", all.iter())
    }

    #[test]
    fn defaults_are_valid_once_a_url_is_given() {
        let c = with(&[]).expect("defaults");
        assert_eq!(c.ingest.ack, AckMode::Commit);
        assert_eq!(c.pool_size(), 3);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = with(&[("server.nope", "1")]).unwrap_err().to_string();
        assert!(e.contains("server.nope"), "{e}");
    }

    #[test]
    fn unknown_section_is_named() {
        let e = Config::from_parts("[nope]\nx = 1\n", std::iter::empty()).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = with(&[("writer.writers", "abc")]).unwrap_err().to_string();
        assert!(e.contains("writer.writers"), "{e}");
        let e = with(&[("ingest.ack", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("ingest.ack"), "{e}");
    }

    #[test]
    fn range_errors_are_all_reported() {
        let e = with(&[("writer.writers", "0"), ("pipeline.ring_capacity", "0")]).unwrap_err().to_string();
        assert!(e.contains("writer.writers") && e.contains("pipeline.ring_capacity"), "{e}");
    }

    #[test]
    fn missing_url_is_an_error() {
        let e = Config::from_parts("", std::iter::empty()).unwrap_err().to_string();
        assert!(e.contains("database.url"), "{e}");
    }

    #[test]
    fn flags_win_over_file() {
        let text = "[writer]\nwriters = 3\n[database]\nurl = \"postgres://a@b/c\"\n";
        let o = [("writer.writers".to_string(), "5".to_string())];
        assert_eq!(Config::from_parts(text, o.iter()).unwrap().writer.writers, 5);
    }

    #[test]
    fn env_names_map_to_keys() {
        let vars = [
            ("INGESTD_LISTEN".to_string(), "0.0.0.0:1".to_string()),
            ("INGESTD_WRITER__MAX_LINGER_MS".to_string(), "0".to_string()),
            ("INGESTD_TEST_DATABASE_URL".to_string(), "x".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let keys: Vec<_> = Sources::env_overrides(vars).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["server.listen", "writer.max_linger_ms"]);
    }

    #[test]
    fn reload_applies_live_keys_and_holds_the_rest() {
        let running = with(&[("writer.writers", "2")]).unwrap();
        let new = with(&[("writer.writers", "4"), ("ingest.max_payload_bytes", "10"), ("log.level", "debug")]).unwrap();
        let (merged, report) = running.reloaded(&new).unwrap();
        assert_eq!(merged.writer.writers, 2, "threads are sized at start-up");
        assert_eq!(merged.ingest.max_payload_bytes, 10);
        assert_eq!(merged.log.level, crate::log::Level::Debug);
        assert_eq!(report.need_restart, ["writer.writers"]);
        let mut applied = report.applied.clone();
        applied.sort();
        assert_eq!(applied, ["ingest.max_payload_bytes", "log.level"]);
        assert_eq!(running.reloaded(&running).unwrap().1, Reload::default());
    }

    #[test]
    fn live_keys_exist() {
        let text = toml::to_string(&Config::default()).unwrap();
        let table: toml::Table = text.parse().unwrap();
        for key in LIVE_KEYS {
            let (s, k) = key.split_once('.').unwrap();
            assert!(table[s].as_table().unwrap().contains_key(k), "{key}");
        }
    }

    #[test]
    fn auth_mode_must_be_explicit_beyond_loopback() {
        let e = with(&[("server.listen", "0.0.0.0:8080")]).unwrap_err().to_string();
        assert!(e.contains("auth.mode"), "{e}");
        let e = with(&[("tls.listen", "0.0.0.0:8443")]).unwrap_err().to_string();
        assert!(e.contains("auth.mode"), "{e}");
        with(&[("server.listen", "0.0.0.0:8080"), ("auth.mode", "off")]).expect("explicitly off");
        with(&[("server.listen", "[::1]:8080")]).expect("loopback needs nothing");
        let running = with(&[("server.listen", "0.0.0.0:8080"), ("auth.mode", "off")]).unwrap();
        running.reloaded(&running).expect("a reload keeps knowing the mode was given");
    }

    #[test]
    fn table_names() {
        assert!(table_name_is_valid("events"));
        assert!(table_name_is_valid("ingest.events_2"));
        assert!(!table_name_is_valid("events; drop table x"));
        assert!(!table_name_is_valid("1events"));
        assert!(!table_name_is_valid(""));
    }

    #[test]
    fn password_is_masked() {
        assert_eq!(mask_password("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn every_tuning_profile_is_valid() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("tuning/ exists") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("readable");
                let url = [("database.url".to_string(), "postgres://u@h/db".to_string())];
                Config::from_parts(&text, url.iter()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no profiles in tuning/");
    }
}
