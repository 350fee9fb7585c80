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

use serde::{Deserialize, Serialize};

mod pgurl;
mod sections;
pub use pgurl::{DbTarget, DbTls, Given, Roots, TlsMode, Verify, mask_password, split_tls_params};
pub use sections::*;

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
    pub breaker: BreakerConfig,
    /// The disk spool behind `ack = "spool"`.
    pub spool: SpoolConfig,
    /// The latest state per device.
    pub state: StateConfig,
    pub websocket: WebSocketConfig,
    /// Bearer tokens and their scopes.
    pub auth: AuthConfig,
    /// The optional TLS listener.
    pub tls: TlsConfig,
    /// Browser pages on other origins: CORS and the WebSocket `Origin` check.
    pub cors: CorsConfig,
    /// Abuse limits across shards: per IP and per token.
    pub limits: LimitsConfig,
    /// One live feed across instances, through Redis or NATS.
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

/// The running configuration, swapped whole on SIGHUP; reads are lock-free.
pub type LiveConfig = arc_swap::ArcSwap<Config>;
/// A read of the running configuration.
pub type ConfigGuard = arc_swap::Guard<std::sync::Arc<Config>>;

/// Keys a SIGHUP reload applies to the running process. Every other key
/// needs a restart: it sized threads, the ring, sockets or files at start-up.
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
    "state.max_page",
    "state.read_timeout_ms",
    "state.max_answer_bytes",
    "websocket.queue_messages",
    "websocket.queue_bytes",
    "websocket.overflow",
    "websocket.ping_interval_ms",
    "websocket.idle_timeout_ms",
    "websocket.max_message_bytes",
    "websocket.max_devices_per_socket",
    "websocket.max_prefixes_per_socket",
    "websocket.max_types_per_socket",
    "websocket.max_control_frame_bytes",
    "websocket.snapshot_max_devices",
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
    "log.slow_request_ms",
    "tls.cert_file",
    "tls.key_file",
    "cors.allowed_origins",
    "cors.max_age_s",
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
                // Some paths already end with the field.
                Some(field) if path == field || path.ends_with(&format!(".{field}")) => path,
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
            self.database.dead_letter_count_interval_ms == 0 || self.database.dead_letter_count_interval_ms >= 100,
            "database.dead_letter_count_interval_ms",
            "must be 0 (off) or at least 100",
        );
        check(
            !self.database.url.trim().is_empty(),
            "database.url",
            "is required (or --database-url / INGESTD_DATABASE_URL)",
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
            self.state.table.is_empty() || table_name_is_valid(&self.state.table),
            "state.table",
            "must be empty (<table>_state), `name` or `schema.name`",
        );
        let st = &self.state;
        check((1..=64).contains(&st.readers), "state.readers", "must be between 1 and 64");
        check((1..=100_000).contains(&st.max_page), "state.max_page", "must be between 1 and 100000");
        check((10..=600_000).contains(&st.read_timeout_ms), "state.read_timeout_ms", "must be between 10 and 600000");
        check(st.max_answer_bytes >= 65_536, "state.max_answer_bytes", "must be at least 65536");
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
        check(ws.max_devices_per_socket >= 1, "websocket.max_devices_per_socket", "must be at least 1");
        check(ws.max_prefixes_per_socket >= 1, "websocket.max_prefixes_per_socket", "must be at least 1");
        check(ws.max_types_per_socket >= 1, "websocket.max_types_per_socket", "must be at least 1");
        check(ws.max_control_frame_bytes >= 256, "websocket.max_control_frame_bytes", "must be at least 256");
        check(ws.snapshot_max_devices >= 1, "websocket.snapshot_max_devices", "must be at least 1");
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
        if let Some(why) = self.cors.problem() {
            problems.push(("cors.allowed_origins".to_string(), why));
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
        // The URL with the TLS keys (config::pgurl), once a URL is given.
        if !self.database.url.trim().is_empty()
            && let Err(p) = self.database.target()
        {
            problems.extend(p);
        }
        for (key, why) in self.breaker.problems() {
            problems.push((format!("breaker.{key}"), why.to_string()));
        }
        for (key, why) in self.cluster.problems() {
            problems.push((format!("cluster.{key}"), why));
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
        shown.cluster.url = shown.cluster.url_masked();
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

    /// The state table's name, when `[state]` is on.
    pub fn state_table(&self) -> Option<String> {
        self.state.enabled.then(|| {
            if self.state.table.is_empty() {
                format!("{}_state", self.database.table)
            } else {
                self.state.table.clone()
            }
        })
    }

    /// Connections in the PostgreSQL pool.
    pub fn pool_size(&self) -> u32 {
        if self.database.pool_size > 0 { self.database.pool_size } else { self.writer.writers as u32 + 1 }
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

/// `name` or `schema.name` (validated by [`table_name_is_valid`]), each
/// part quoted for SQL.
pub fn quote_table(table: &str) -> String {
    table.split('.').map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(".")
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
    fn cluster_feed_needs_a_url_of_its_kind_and_masks_its_password() {
        let e = with(&[("cluster.feed", "\"redis\"")]).unwrap_err().to_string();
        assert!(e.contains("cluster.url") && e.contains("required"), "{e}");
        let e = with(&[("cluster.feed", "\"nats\""), ("cluster.url", "\"redis://h\"")]).unwrap_err().to_string();
        assert!(e.contains("cluster.url") && e.contains("nats://"), "{e}");
        let e = with(&[("cluster.feed", "\"redis\""), ("cluster.url", "\"redis://\"")]).unwrap_err().to_string();
        assert!(e.contains("no host"), "{e}");
        let e =
            with(&[("cluster.feed", "\"redis\""), ("cluster.url", "\"redis://h\""), ("cluster.channel", "\"a b\"")])
                .unwrap_err()
                .to_string();
        assert!(e.contains("cluster.channel"), "{e}");
        let c = with(&[("cluster.feed", "\"redis\""), ("cluster.url", "\"redis://:s3cret@h:6379/0\"")]).unwrap();
        let shown = c.to_toml();
        assert!(shown.contains("redis://:***@h:6379/0") && !shown.contains("s3cret"), "{shown}");
        assert!(with(&[("cluster.url", "\"anything\"")]).is_ok(), "off: the url is not looked at");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = with(&[("server.nope", "1")]).unwrap_err().to_string();
        assert!(e.contains("config key server.nope:"), "named once: {e}");
        let e = Config::from_parts("[writer]\ncount = 2\n", std::iter::empty()).unwrap_err().to_string();
        assert!(e.contains("config key writer.count:"), "named once: {e}");
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
    fn cors_origins_are_exact_origins_or_a_lone_star() {
        for ok in ["https://app.example.com", "http://127.0.0.1:8080", "http://[::1]:3000", "https://a-b.c"] {
            with(&[("cors.allowed_origins", &format!("[\"{ok}\"]"))]).expect(ok);
        }
        with(&[("cors.allowed_origins", "[\"*\"]")]).expect("star");
        for bad in ["app.example.com", "https://a.com/", "https://a.com/x", "ftp://a.com", "https://a.com:x", "*.a.com"]
        {
            let e = with(&[("cors.allowed_origins", &format!("[\"{bad}\"]"))]).unwrap_err().to_string();
            assert!(e.contains("cors.allowed_origins") && e.contains("not an origin"), "{bad}: {e}");
        }
        let e = with(&[("cors.allowed_origins", "[\"*\", \"https://a.com\"]")]).unwrap_err().to_string();
        assert!(e.contains("must be alone"), "{e}");
        let c = with(&[("cors.allowed_origins", "[\"https://A.example\"]")]).unwrap();
        assert!(c.cors.allows("https://a.example") && !c.cors.allows("https://a.example:8443"));
        assert!(!with(&[]).unwrap().cors.allows("https://a.example"));
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
