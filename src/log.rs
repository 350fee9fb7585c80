//! Structured logs on stderr: one line per log event, logfmt or JSON.
//!
//! Deliberately small: the hot path never logs per event, so this only has to
//! be correct and cheap enough for start-up, shutdown, errors and the odd
//! warning. The level and format are set once at start-up.

use std::fmt::{self, Display, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// Severity, least to most verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Logfmt,
    Json,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicU8 = AtomicU8::new(0);

/// Sets the level and format for the whole process.
pub fn init(level: Level, format: Format) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    JSON.store(u8::from(format == Format::Json), Ordering::Relaxed);
}

/// Whether a line at `level` would be written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// Writes one line. Use the `error!`/`warn!`/`info!`/`debug!` macros instead.
pub fn emit(level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
    if !enabled(level) {
        return;
    }
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("main");
    let mut line = String::with_capacity(128);
    if JSON.load(Ordering::Relaxed) == 1 {
        let mut map = serde_json::Map::new();
        map.insert("ts".into(), ts.into());
        map.insert("level".into(), level.name().into());
        map.insert("thread".into(), thread.into());
        map.insert("msg".into(), msg.into());
        for (k, v) in fields {
            map.insert((*k).into(), v.to_string().into());
        }
        line = serde_json::Value::Object(map).to_string();
    } else {
        let _ = write!(line, "ts={ts} level={} thread={thread} msg={}", level.name(), Quoted(msg));
        for (k, v) in fields {
            let _ = write!(line, " {k}={}", Quoted(&v.to_string()));
        }
    }
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// logfmt value: bare when safe, quoted and escaped otherwise.
struct Quoted<'a>(&'a str);

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\') {
            return f.write_str(s);
        }
        f.write_char('"')?;
        for c in s.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $msg:expr $(, $k:ident = $v:expr)* $(,)?) => {
        if $crate::log::enabled($level) {
            $crate::log::emit($level, $msg, &[$((stringify!($k), &$v as &dyn ::std::fmt::Display)),*]);
        }
    };
}
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($t)*) }; }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($t)*) }; }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($t)*) }; }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($t)*) }; }
