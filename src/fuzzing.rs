//! Entry points of the cargo-fuzz targets in `fuzz/` (see `docs/FUZZING.md`),
//! and a test that replays their seeds and saved findings on stable Rust.
//!
//! Each function takes arbitrary bytes, runs the production code a shard or
//! the spool would run on them, and checks with `assert!` what must hold
//! whatever the input. A panic is a finding; an error result is not. All are
//! pure except [`spool_reader`], which writes files into a scratch directory
//! of its own (one per process and thread, emptied on every call).
//!
//! - [`http_request`]: request heads, `Content-Length` and chunked framing,
//!   pipelining, gzip, as `shard::conn` reads them.
//! - [`event_validator`]: `ingest::Parser` on one event and on JSON arrays.
//! - [`ndjson_splitter`]: the NDJSON line splitter of the same parser.
//! - [`ws_ingest`]: client bytes through tungstenite's server role, text
//!   messages through the parser, as `shard::ws` does.
//! - [`spool_reader`]: spool recovery and replay over damaged segment files.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;

use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

use crate::config::IngestConfig;
use crate::ingest::event::{MAX_ID_BYTES, MAX_TYPE_BYTES, TsWindow};
use crate::ingest::{BodyError, BodyKind, Clock, Parsed, Parser, Rules};
use crate::labels::RejectKind;
use crate::row::{RowBuf, pg_micros_from_unix_micros};
use crate::shard::http::{self, BodyFraming, ChunkError, Chunked, GunzipError, HeadError};
use crate::spool::{Seq, Spool, SpoolConfig, SpoolError, checkpoint, record, segment};

/// The server clock of every run, 2026-11-23T12:00:00Z: fixed, so that a
/// finding replays the same way.
pub const NOW_UNIX_US: i64 = 1_795_435_200_000_000;

const CLOCK: Clock = Clock { now_unix_us: NOW_UNIX_US };

/// The defaults of `[ingest]`, except the payload depth: the checker below
/// is serde_json, which refuses nesting deeper than 128.
pub fn default_rules() -> Rules {
    Rules { max_payload_depth: 100, ..Rules::from_config(&IngestConfig::default()) }
}

/// Limits small enough for short inputs to reach every one of them.
pub fn tight_rules() -> Rules {
    Rules {
        max_events: 3,
        max_payload_bytes: 48,
        max_payload_depth: 3,
        max_future_skew_us: 0,
        allow_unknown_fields: true,
    }
}

thread_local! {
    /// One parser reused across calls, rules replaced per call, like a shard's.
    static PARSER: RefCell<Parser> = RefCell::new(Parser::new(default_rules()));
}

fn with_parser<T>(f: impl FnOnce(&mut Parser) -> T) -> T {
    PARSER.with(|p| f(&mut p.borrow_mut()))
}

// ---------------------------------------------------------------------------
// HTTP

/// `server.max_headers` and `server.max_header_bytes` defaults.
const MAX_HEADERS: usize = 64;
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Smaller than the defaults, so that fuzz inputs reach the limits.
const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_DECOMPRESSED_BYTES: usize = 256 * 1024;

/// Reads pipelined requests from `data` the way `shard::conn` does: head,
/// then body by its framing (chunked bodies both at once and as if they
/// arrived in pieces, which must agree), then gunzip when the head says gzip.
pub fn http_request(data: &[u8]) {
    let mut buf = data;
    // A connection serves requests until one fails or asks to close.
    for _ in 0..64 {
        if buf.is_empty() {
            return;
        }
        let head = match http::parse_head(buf, MAX_HEADERS, MAX_HEAD_BYTES) {
            Ok(head) => head,
            Err(HeadError::Partial) => {
                assert!(buf.len() <= MAX_HEAD_BYTES, "Partial for {} bytes, past the head limit", buf.len());
                return;
            }
            Err(_) => return,
        };
        assert!(head.len > 0 && head.len <= buf.len() && head.len <= MAX_HEAD_BYTES, "head.len {}", head.len);
        // A head does not depend on what follows it, and none of its strict
        // prefixes is a head (conn parses the buffer again on every read).
        assert_eq!(http::parse_head(&buf[..head.len], MAX_HEADERS, MAX_HEAD_BYTES).as_ref(), Ok(&head));
        for cut in [head.len - 1, head.len / 2, head.len * 3 / 4] {
            let prefix = http::parse_head(&buf[..cut], MAX_HEADERS, MAX_HEAD_BYTES);
            assert!(
                matches!(prefix, Err(HeadError::Partial | HeadError::TooLarge(_))),
                "prefix of {cut} of a {}-byte head: {prefix:?}",
                head.len
            );
        }
        let rest = &buf[head.len..];
        let body = match head.body {
            BodyFraming::None => {
                buf = rest;
                Vec::new()
            }
            BodyFraming::Length(n) => {
                let Some(n) = usize::try_from(n).ok().filter(|&n| n <= MAX_BODY_BYTES) else { return };
                if rest.len() < n {
                    return;
                }
                buf = &rest[n..];
                rest[..n].to_vec()
            }
            BodyFraming::Chunked => {
                let mut body = Vec::new();
                let whole = http::decode_chunks(rest, &mut body, MAX_BODY_BYTES);
                assert!(body.len() <= MAX_BODY_BYTES);
                let trickled = decode_chunks_in_pieces(rest, 1 + rest.len() / 256);
                match (&whole, &trickled) {
                    (Ok(Chunked::Done { consumed }), Ok((Chunked::Done { consumed: c2 }, b2))) => {
                        assert_eq!((consumed, &body), (c2, b2), "chunked body decoded differently in pieces");
                    }
                    (_, Ok((Chunked::Done { .. }, _))) => {
                        panic!("chunked body complete in pieces but not at once: {whole:?}")
                    }
                    (Err(ChunkError::TooLarge), other) => {
                        assert!(matches!(other, Err(ChunkError::TooLarge)), "too large at once, {other:?} in pieces")
                    }
                    _ => {}
                }
                match whole {
                    Ok(Chunked::Done { consumed }) => {
                        assert!(consumed <= rest.len());
                        buf = &rest[consumed..];
                        body
                    }
                    Ok(Chunked::Partial { consumed }) => {
                        assert!(consumed <= rest.len());
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        if head.gzip {
            check_gunzip(&body);
        }
        if !head.keep_alive {
            return;
        }
    }
}

/// Decodes a chunked body the way `conn` does while bytes trickle in:
/// `piece` more bytes per read, consumed bytes dropped from the buffer.
fn decode_chunks_in_pieces(input: &[u8], piece: usize) -> Result<(Chunked, Vec<u8>), ChunkError> {
    let mut buf = Vec::new();
    let mut body = Vec::new();
    let mut total = 0;
    let mut fed = 0;
    loop {
        let more = piece.min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + more]);
        fed += more;
        match http::decode_chunks(&buf, &mut body, MAX_BODY_BYTES)? {
            Chunked::Done { consumed } => return Ok((Chunked::Done { consumed: total + consumed }, body)),
            Chunked::Partial { consumed } => {
                assert!(consumed <= buf.len());
                buf.drain(..consumed);
                total += consumed;
                if more == 0 {
                    return Ok((Chunked::Partial { consumed: total }, body));
                }
            }
        }
    }
}

/// gunzip never exceeds its bound, and the bound is exact.
fn check_gunzip(body: &[u8]) {
    match http::gunzip(body, MAX_DECOMPRESSED_BYTES, &mut crate::budget::Lease::detached()) {
        Ok(out) => {
            assert!(out.len() <= MAX_DECOMPRESSED_BYTES);
            assert_eq!(
                http::gunzip(body, out.len(), &mut crate::budget::Lease::detached()).as_ref(),
                Ok(&out),
                "a bound of exactly its size refuses it"
            );
            if !out.is_empty() {
                assert_eq!(
                    http::gunzip(body, out.len() - 1, &mut crate::budget::Lease::detached()),
                    Err(GunzipError::TooLarge)
                );
            }
        }
        Err(GunzipError::TooLarge) => {}
        Err(GunzipError::Invalid) => {}
        Err(GunzipError::OverBudget(e)) => panic!("a detached lease has no budget to exceed: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Events

/// One event, and JSON arrays of events, under the default and tight rules.
pub fn event_validator(data: &[u8]) {
    let body_json = serde_value(data);
    for rules in [default_rules(), tight_rules()] {
        for kind in [BodyKind::Single, BodyKind::JsonArray] {
            let result = with_parser(|p| {
                p.set_rules(rules);
                p.parse(data, kind, CLOCK)
            });
            check_json_body(data, kind, &rules, &result, body_json.as_ref());
        }
    }
}

/// NDJSON bodies: every record line is judged exactly as if it had come
/// alone to `POST /events`, and numbered by records (blank lines skipped).
pub fn ndjson_splitter(data: &[u8]) {
    for rules in [default_rules(), tight_rules()] {
        let result = with_parser(|p| {
            p.set_rules(rules);
            p.parse(data, BodyKind::Ndjson, CLOCK)
        });
        let lines: Vec<&[u8]> =
            data.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).collect();
        let parsed = match result {
            Err(BodyError::Empty) => {
                assert!(lines.is_empty(), "Empty with {} record lines", lines.len());
                continue;
            }
            Err(BodyError::TooManyEvents { limit }) => {
                assert!(lines.len() > limit && limit == rules.max_events, "{} lines, limit {limit}", lines.len());
                continue;
            }
            Err(e) => panic!("NDJSON body refused as a whole: {e}"),
            Ok(parsed) => parsed,
        };
        assert!(!lines.is_empty() && lines.len() <= rules.max_events);
        check_parsed(&parsed, &rules, lines.len());
        let mut row = 0;
        let mut rejected = parsed.rejected.iter().peekable();
        for (index, line) in lines.iter().enumerate() {
            let alone = with_parser(|p| p.parse(line, BodyKind::Single, CLOCK));
            let here = rejected.next_if(|r| r.index == index);
            match (alone, here) {
                (Err(BodyError::Malformed(_)), Some(r)) => assert_eq!(r.error.kind, RejectKind::Malformed),
                (Ok(one), Some(r)) if one.rows.is_empty() => assert_eq!(one.rejected[0].error, r.error),
                (Ok(one), None) if one.rows.len() == 1 => {
                    let (a, b) =
                        (one.rows.view(0).expect("a row reads back"), parsed.rows.view(row).expect("a row reads back"));
                    assert_eq!(
                        (a.device_id, a.event_type, a.ts, a.payload),
                        (b.device_id, b.event_type, b.ts, b.payload)
                    );
                    row += 1;
                }
                (alone, here) => panic!("record {index} alone: {alone:?}; in NDJSON: {here:?}"),
            }
        }
        assert_eq!(row, parsed.rows.len());
    }
}

/// serde_json's reading of a body, if it has one (it refuses some bodies
/// simd-json takes: deeper than 128, numbers beyond f64).
fn serde_value(data: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice(data).ok()
}

/// What must hold for a JSON (single or array) body's result.
fn check_json_body(
    data: &[u8],
    kind: BodyKind,
    rules: &Rules,
    result: &Result<Parsed, BodyError>,
    json: Option<&serde_json::Value>,
) {
    let events: Option<Vec<&serde_json::Value>> = json.map(|v| match (kind, v) {
        (BodyKind::JsonArray, serde_json::Value::Array(items)) => items.iter().collect(),
        (BodyKind::JsonArray, _) => Vec::new(),
        _ => vec![v],
    });
    let parsed = match result {
        Err(BodyError::Malformed(why)) => {
            // serde_json reads the body: refusing it would refuse valid JSON,
            // unless it holds a number PostgreSQL refuses too (simd-json
            // refuses some exponents of many digits that serde_json reads as 0).
            assert!(
                json.is_none() || numeric_refuses(data),
                "valid JSON refused as malformed ({why}): {}",
                String::from_utf8_lossy(data)
            );
            return;
        }
        Err(BodyError::NotAnArray) => {
            assert_eq!(kind, BodyKind::JsonArray);
            assert!(json.is_none_or(|v| !v.is_array()));
            return;
        }
        Err(BodyError::Empty) => {
            assert!(kind == BodyKind::JsonArray && json.is_none_or(|v| v.as_array().is_some_and(Vec::is_empty)));
            return;
        }
        Err(BodyError::TooManyEvents { limit }) => {
            assert!(kind == BodyKind::JsonArray && *limit == rules.max_events);
            assert!(events.as_ref().is_none_or(|e| e.len() > *limit));
            return;
        }
        Ok(parsed) => parsed,
    };
    let count = parsed.rows.len() + parsed.rejected.len();
    match kind {
        BodyKind::Single => assert_eq!(count, 1),
        _ => assert!(count >= 1 && count <= rules.max_events),
    }
    if let Some(events) = &events {
        assert_eq!(events.len(), count, "serde_json counts {} events, the parser {count}", events.len());
    }
    check_parsed(parsed, rules, count);
    // Each accepted row holds the fields of its event, as serde_json reads them.
    let Some(events) = events else { return };
    let rejected: BTreeSet<usize> = parsed.rejected.iter().map(|r| r.index).collect();
    let accepted = (0..count).filter(|i| !rejected.contains(i));
    for (row, index) in accepted.enumerate() {
        let view = parsed.rows.view(row).expect("row reads back");
        let event = events[index].as_object().expect("an accepted event is an object");
        let text = |field: &str| event.get(field).and_then(|v| v.as_str()).map(str::as_bytes);
        assert_eq!(Some(view.device_id), text("device_id"), "event {index}");
        assert_eq!(Some(view.event_type), text("type"), "event {index}");
        if let Some(id) = event.get("event_id") {
            assert_eq!(Some(view.event_id), id.as_str().map(str::as_bytes), "event {index}");
        }
        let window = TsWindow { now_unix_us: NOW_UNIX_US, max_future_skew_us: rules.max_future_skew_us };
        let ts = match &event["ts"] {
            serde_json::Value::String(s) => window.from_rfc3339(s).ok(),
            serde_json::Value::Number(n) => {
                n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)).and_then(|ms| window.from_epoch_ms(ms).ok())
            }
            _ => None,
        };
        assert_eq!(Some(view.ts), ts, "event {index}");
        let payload = view.payload.map(|p| serde_json::from_slice::<serde_json::Value>(p).ok());
        match (event.get("payload"), payload) {
            (None, None) => {}
            (Some(want), Some(Some(got))) => assert_eq!(want, &got, "event {index}: payload cut wrongly"),
            (want, got) => panic!("event {index}: payload {want:?} stored as {got:?}"),
        }
    }
}

/// What every parse result must satisfy: `count` events in all, rejection
/// indexes in range and increasing, and every row something PostgreSQL takes.
fn check_parsed(parsed: &Parsed, rules: &Rules, count: usize) {
    assert_eq!(parsed.rows.len() + parsed.rejected.len(), count, "rows + rejections != events");
    assert!(parsed.rejected.windows(2).all(|w| w[0].index < w[1].index), "rejection indexes not increasing");
    assert!(parsed.rejected.last().is_none_or(|r| r.index < count), "rejection index out of range");
    // The answer a client gets is JSON.
    let answer = crate::shard::accept::ingest_json(parsed.rows.len(), &parsed.rejected);
    serde_json::from_str::<serde_json::Value>(&answer).expect("the ingest answer is JSON");
    for i in 0..parsed.rows.len() {
        check_row(&parsed.rows, i, rules);
    }
    let back = RowBuf::from_spool_record(&parsed.rows.to_spool_record()).expect("rows survive the spool");
    assert_eq!((back.len(), back.bytes()), (parsed.rows.len(), parsed.rows.bytes()));
}

/// One encoded row: fields within the contract, payload valid for jsonb.
fn check_row(rows: &RowBuf, i: usize, rules: &Rules) {
    let v = rows.view(i).expect("a row reads back");
    assert_eq!(rows.event_id(i), v.event_id);
    let id = v.event_id;
    assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES, "event_id of {} bytes", id.len());
    assert!(id.iter().all(|&b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)), "event_id {id:?}");
    for (text, max) in [(v.device_id, MAX_ID_BYTES), (v.event_type, MAX_TYPE_BYTES)] {
        assert!(!text.is_empty() && text.len() <= max && !text.contains(&0), "text field {text:?}");
        assert!(std::str::from_utf8(text).is_ok(), "text field is not UTF-8: {text:?}");
    }
    assert!(v.ts >= 0, "ts before 2000");
    assert!(v.ts <= pg_micros_from_unix_micros(NOW_UNIX_US + rules.max_future_skew_us), "ts too far ahead");
    assert_eq!(v.received_at, pg_micros_from_unix_micros(NOW_UNIX_US));
    if let Some(p) = v.payload {
        check_payload_for_jsonb(p, rules);
    }
}

/// A stored payload is JSON that PostgreSQL's jsonb input accepts: valid
/// JSON (valid UTF-8, no raw control characters, no lone surrogate escapes),
/// no NUL anywhere, within the size and depth limits.
fn check_payload_for_jsonb(p: &[u8], rules: &Rules) {
    let text = String::from_utf8_lossy(p);
    assert!(p.len() <= rules.max_payload_bytes, "payload of {} bytes", p.len());
    assert!(!p.contains(&0), "raw NUL in a stored payload: {text}");
    let value: serde_json::Value = match serde_json::from_slice(p) {
        Ok(v) => v,
        // serde_json stops at f64; jsonb's numeric does not.
        Err(e) if e.to_string().starts_with("number out of range") => return,
        Err(e) => panic!("stored payload is not valid JSON ({e}): {text}"),
    };
    fn walk(v: &serde_json::Value, depth: usize) -> usize {
        match v {
            serde_json::Value::String(s) => {
                assert!(!s.contains('\0'), "\\u0000 in a stored payload string");
                depth
            }
            serde_json::Value::Array(items) => items.iter().map(|x| walk(x, depth + 1)).max().unwrap_or(depth + 1),
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, x)| {
                    assert!(!k.contains('\0'), "\\u0000 in a stored payload key");
                    walk(x, depth + 1)
                })
                .max()
                .unwrap_or(depth + 1),
            _ => depth,
        }
    }
    let depth = walk(&value, 0);
    assert!(depth <= rules.max_payload_depth, "payload {depth} deep, limit {}", rules.max_payload_depth);
    assert!(!numeric_refuses(p), "a payload number PostgreSQL's numeric refuses: {text}");
}

/// Whether some number in JSON text is one jsonb's `numeric` refuses with
/// "value overflows numeric format": a display scale (digits after the
/// point, less the exponent) above `NUMERIC_DSCALE_MAX` (16383), or an
/// exponent of `INT_MAX / 2` or more either way (checked against
/// PostgreSQL 15).
fn numeric_refuses(text: &[u8]) -> bool {
    const NUMERIC_DSCALE_MAX: i64 = 0x3fff;
    const EXPONENT_LIMIT: i64 = (i32::MAX / 2) as i64;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < text.len() && matches!(text[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                    i += 1;
                }
                let token = String::from_utf8_lossy(&text[start..i]).into_owned();
                let (mantissa, exponent) = token.split_once(['e', 'E']).unwrap_or((&token, "0"));
                let fraction = mantissa.split_once('.').map_or(0, |(_, f)| f.len() as i64);
                let exponent: i64 = exponent
                    .parse()
                    .unwrap_or_else(|_| if exponent.starts_with('-') { i64::MIN / 2 } else { i64::MAX / 2 });
                if fraction.saturating_sub(exponent) > NUMERIC_DSCALE_MAX || exponent.abs() >= EXPONENT_LIMIT {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

// ---------------------------------------------------------------------------
// WebSocket

/// `websocket.max_message_bytes`, smaller than the default so that inputs
/// reach it (the config allows down to 1024).
const WS_MAX_MESSAGE_BYTES: usize = 4096;

/// Client-to-server bytes after the upgrade, through tungstenite's server
/// role configured as `shard::ws::serve` does, each text message ingested
/// as `ingest_frame` does. All at once and in small pieces must read alike.
pub fn ws_ingest(data: &[u8]) {
    let whole = ws_session(data, data.len().max(1));
    let pieces = ws_session(data, 1 + data.len() / 64);
    assert_eq!(whole, pieces, "WebSocket messages differ when the bytes arrive in pieces");
}

/// What the session read, in order.
#[derive(Debug, PartialEq, Eq)]
enum WsSeen {
    Text(usize),
    Binary(usize),
    Ping,
    Pong,
    Close(Option<u16>),
    Error(String),
}

fn ws_session(data: &[u8], piece: usize) -> Vec<WsSeen> {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(WS_MAX_MESSAGE_BYTES))
        .max_frame_size(Some(WS_MAX_MESSAGE_BYTES));
    let mut ws = WebSocketContext::new(Role::Server, Some(config));
    let mut mem = Mem { input: Vec::new(), pos: 0, output: Vec::new() };
    let mut seen = Vec::new();
    let rules = default_rules();
    for chunk in data.chunks(piece) {
        if mem.pos == mem.input.len() {
            mem.input.clear();
            mem.pos = 0;
        }
        mem.input.extend_from_slice(chunk);
        loop {
            let item = match ws.read(&mut mem) {
                Ok(Message::Text(text)) => {
                    let body = text.as_bytes();
                    // `ingest_frame`'s choice of body kind.
                    let kind = match body.iter().find(|b| !b.is_ascii_whitespace()) {
                        Some(b'[') => BodyKind::JsonArray,
                        _ => BodyKind::Single,
                    };
                    let result = with_parser(|p| {
                        p.set_rules(rules);
                        p.parse(body, kind, CLOCK)
                    });
                    check_json_body(body, kind, &rules, &result, serde_value(body).as_ref());
                    WsSeen::Text(body.len())
                }
                Ok(Message::Binary(b)) => WsSeen::Binary(b.len()),
                Ok(Message::Ping(_)) => WsSeen::Ping,
                Ok(Message::Pong(_)) => WsSeen::Pong,
                Ok(Message::Close(frame)) => {
                    // The session flushes tungstenite's reply and ends.
                    let _ = ws.flush(&mut mem);
                    seen.push(WsSeen::Close(frame.map(|f| f.code.into())));
                    return seen;
                }
                Ok(Message::Frame(_)) => unreachable!("read never returns raw frames"),
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    seen.push(WsSeen::Error(e.to_string()));
                    return seen;
                }
            };
            seen.push(item);
            // Pongs go out on the next flush.
            let _ = ws.flush(&mut mem);
            mem.output.clear();
        }
    }
    seen
}

/// tungstenite's view of the socket, as in `shard::ws`: the bytes read so
/// far, and where frames go.
struct Mem {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl std::io::Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.input[self.pos..];
        if rest.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::Write for Mem {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Spool

/// Flags of [`spool_reader`]'s first input byte.
pub mod spool_flags {
    /// The rest is a list of operations building checksummed records (see
    /// [`super::spool_reader`]); without it, the rest is the segment's bytes.
    pub const FRAMED: u8 = 1;
    /// Leave out the segment's magic header (raw mode).
    pub const NO_MAGIC: u8 = 2;
    /// Store a valid checkpoint holding the second input byte.
    pub const CHECKPOINT: u8 = 4;
    /// Write 20 input bytes as the checkpoint file instead.
    pub const RAW_CHECKPOINT: u8 = 8;
    /// Leave a `checkpoint.tmp` behind, as a crash would.
    pub const TEMP_CHECKPOINT: u8 = 16;
    /// After replay, append a record, commit through it, reopen.
    pub const APPEND: u8 = 32;
}

/// Framed-mode operation bytes.
const OP_NEW_SEGMENT: u8 = 0xff;
const OP_JUNK: u8 = 0xfe;
const OP_BIG: u8 = 0x7e;

/// `spool.segment_bytes` at its minimum: records over 992 bytes are refused.
const SPOOL_SEGMENT_BYTES: u64 = 1024;

thread_local! {
    static SPOOL_DIR: PathBuf = {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // tmpfs when there is one: the spool fsyncs.
        let base = std::env::var_os("INGESTD_FUZZ_DIR").map(PathBuf::from).unwrap_or_else(|| {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() { shm } else { std::env::temp_dir() }
        });
        base.join(format!("ingestd-fuzz-spool-{}-{n}", std::process::id()))
    };
}

/// A spool directory built from the input, opened (recovery) and replayed.
///
/// Input: `flags` ([`spool_flags`]), checkpoint seq, first seq of the first
/// segment, then either the segment's bytes (raw mode) or operations
/// (framed mode): `0xff d` starts a new segment at the expected seq plus
/// `d as i8`; `0xfe n` and `n` bytes append junk; any other byte `b` is a
/// record with length `b & 0x7f` (`0x7e`: a u16 length follows) and, when
/// `b & 0x80`, a seq off by the next byte as `i8`; its payload is the next
/// bytes, zero-padded.
///
/// Checks: `open` fails only with `Corrupt`; a replay that ends cleanly
/// hands out exactly the seqs after the checkpoint up to the durable end,
/// in order; a second open finds nothing left to repair and replays the
/// same; an append after recovery gets the next seq and survives a reopen.
pub fn spool_reader(data: &[u8]) {
    let dir = SPOOL_DIR.with(PathBuf::clone);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    spool_files(&dir, data);
    let flags = data.first().copied().unwrap_or(0);
    let config = SpoolConfig {
        dir: dir.clone(),
        segment_bytes: SPOOL_SEGMENT_BYTES,
        max_bytes: 1024 * 1024,
        ..SpoolConfig::default()
    };
    let (spool, mut appender, recovery) = match Spool::open(config.clone()) {
        Ok(opened) => opened,
        Err(SpoolError::Corrupt { .. }) => return,
        Err(e) => panic!("spool open failed other than Corrupt: {e}"),
    };
    let first = replay(&spool, &recovery);
    let mut appended = None;
    if flags & spool_flags::APPEND != 0 && first.is_ok() {
        let seq = appender.append(b"appended after recovery").expect("append after recovery");
        assert_eq!(seq, recovery.next_seq);
        spool.commit_through(seq).expect("commit through the appended record");
        appended = Some(seq);
    }
    drop((spool, appender));

    let (spool, _appender, again) = Spool::open(config).expect("a recovered spool opens again");
    // The first open may leave one wholly committed segment behind when it
    // starts a new one after a checkpoint that is ahead of the log; the
    // second deletes it. Nothing else is left to do.
    assert!(again.tail_cut.is_none() && again.deleted_segments <= 1, "second open repaired: {again:?}");
    match appended {
        Some(seq) => {
            assert_eq!((again.committed_seq, again.next_seq), (seq, seq + 1));
            assert!(matches!(replay(&spool, &again), Ok(ref r) if r.is_empty()));
        }
        None => {
            assert_eq!((again.committed_seq, again.next_seq), (recovery.committed_seq, recovery.next_seq));
            let second = replay(&spool, &again);
            match (&first, &second) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "replays differ"),
                (Err(_), Err(_)) => {}
                _ => panic!("replay {first:?} then {second:?}"),
            }
        }
    }
}

/// Every record after the checkpoint, checked; payloads read as rows where
/// they are rows.
fn replay(spool: &Spool, recovery: &crate::spool::Recovery) -> Result<Vec<(Seq, Vec<u8>)>, String> {
    let mut reader = spool.replay();
    let mut out: Vec<(Seq, Vec<u8>)> = Vec::new();
    loop {
        match reader.next() {
            Ok(Some(r)) => {
                let want = out.last().map_or(recovery.committed_seq + 1, |(s, _)| s + 1);
                assert_eq!(r.seq, want, "replay out of order");
                if let Some(rows) = RowBuf::from_spool_record(&r.payload) {
                    for i in 0..rows.len() {
                        let _ = rows.view(i);
                    }
                }
                out.push((r.seq, r.payload));
            }
            Ok(None) => break,
            Err(SpoolError::Corrupt { reason, .. }) => return Err(reason),
            Err(e) => panic!("replay failed other than Corrupt: {e}"),
        }
    }
    assert_eq!(out.len() as u64, recovery.pending_records(), "replay ended early: {recovery:?}");
    // Reading from the oldest record on works too, or reports damage.
    let mut all = spool.reader(0);
    for _ in 0..10_000 {
        match all.next() {
            Ok(Some(_)) => {}
            Ok(None) | Err(SpoolError::Corrupt { .. }) => break,
            Err(e) => panic!("read failed other than Corrupt: {e}"),
        }
    }
    Ok(out)
}

/// Writes the segment(s) and checkpoint the input describes into `dir`.
fn spool_files(dir: &std::path::Path, data: &[u8]) {
    use spool_flags::*;
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let (flags, checkpoint_seq, first_seq) = (byte(0), Seq::from(byte(1)), Seq::from(byte(2)));
    let mut rest = data.get(3..).unwrap_or_default();
    if flags & CHECKPOINT != 0 {
        checkpoint::store(dir, checkpoint_seq).expect("store checkpoint");
    } else if flags & RAW_CHECKPOINT != 0 {
        let n = rest.len().min(20);
        std::fs::write(dir.join(checkpoint::FILE_NAME), &rest[..n]).expect("write checkpoint");
        rest = &rest[n..];
    }
    if flags & TEMP_CHECKPOINT != 0 {
        std::fs::write(dir.join(checkpoint::TEMP_NAME), b"torn").expect("write checkpoint.tmp");
    }
    let mut segments: Vec<(Seq, Vec<u8>)> = Vec::new();
    if flags & FRAMED == 0 {
        let mut bytes = if flags & NO_MAGIC == 0 { segment::MAGIC.to_vec() } else { Vec::new() };
        bytes.extend_from_slice(rest);
        segments.push((first_seq, bytes));
    } else {
        segments.push((first_seq, segment::MAGIC.to_vec()));
        let mut expected = first_seq;
        let mut input = Cursor(rest);
        while let Some(op) = input.byte() {
            match op {
                OP_NEW_SEGMENT => {
                    let first = expected.saturating_add_signed(i64::from(input.byte().unwrap_or(0) as i8));
                    if segments.iter().all(|(s, _)| *s != first) {
                        segments.push((first, segment::MAGIC.to_vec()));
                        expected = first;
                    }
                }
                OP_JUNK => {
                    let n = usize::from(input.byte().unwrap_or(0));
                    segments.last_mut().expect("a segment").1.extend_from_slice(input.take(n));
                }
                _ => {
                    let len = match op & 0x7f {
                        OP_BIG => {
                            usize::from(u16::from_le_bytes([input.byte().unwrap_or(0), input.byte().unwrap_or(0)]))
                        }
                        len => usize::from(len),
                    };
                    let seq = if op & 0x80 != 0 {
                        expected.saturating_add_signed(i64::from(input.byte().unwrap_or(0) as i8))
                    } else {
                        expected
                    };
                    let mut payload = input.take(len).to_vec();
                    payload.resize(len, 0);
                    record::encode(&mut segments.last_mut().expect("a segment").1, seq, &payload);
                    expected = seq.saturating_add(1);
                }
            }
        }
    }
    for (first, bytes) in segments {
        std::fs::write(dir.join(segment::file_name(first)), bytes).expect("write segment");
    }
}

/// Input bytes taken from the front.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// Up to `n` bytes (fewer at the end).
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

// ---------------------------------------------------------------------------
// Dispatch and replay

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets by name.
pub const TARGETS: [(&str, Target); 5] = [
    ("http_request", http_request),
    ("event_validator", event_validator),
    ("ndjson_splitter", ndjson_splitter),
    ("ws_ingest", ws_ingest),
    ("spool_reader", spool_reader),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every checked-in seed and every saved finding, through its target:
    /// `fuzz/seeds/<target>/*` and `fuzz/regressions/<target>/*`.
    #[test]
    fn seeds_and_regressions_replay() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let (mut ran, mut failed) = (0, Vec::new());
        for (name, target) in TARGETS {
            for kind in ["seeds", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else { continue };
                let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("dir entry").path()).collect();
                paths.sort();
                for path in paths {
                    let data = std::fs::read(&path).expect("read input");
                    if std::panic::catch_unwind(|| target(&data)).is_err() {
                        failed.push(path.display().to_string());
                    }
                    ran += 1;
                }
            }
        }
        assert!(ran >= TARGETS.len(), "no seeds found under {}", root.display());
        assert!(failed.is_empty(), "{} of {ran} inputs fail: {failed:#?}", failed.len());
    }

    /// Writes the seed corpora under `fuzz/seeds/` (checked in; run again
    /// after a format change): `cargo test --lib fuzzing::tests::write_seeds
    /// -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/seeds"]
    fn write_seeds() {
        use std::io::Write as _;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let put = |target: &str, name: &str, bytes: &[u8]| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        };
        let gzip = |data: &[u8]| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        };
        const EVENT: &str = r#"{"device_id":"d1","type":"boot","ts":"2026-11-23T11:59:00Z","payload":{"v":1}}"#;
        let batch = format!("[{EVENT},{EVENT}]");
        let ndjson = format!("{EVENT}\n{EVENT}\n");

        // http_request
        let post = |path: &str, extra: &str, body: &[u8]| {
            let mut r = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n", body.len())
                .into_bytes();
            r.extend_from_slice(body);
            r
        };
        let h = "http_request";
        put(h, "get_health", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        put(h, "post_event", &post("/events", "Content-Type: application/json\r\n", EVENT.as_bytes()));
        put(h, "post_ndjson", &post("/events/batch", "Content-Type: application/x-ndjson\r\n", ndjson.as_bytes()));
        put(h, "post_gzip", &post("/events/batch", "Content-Encoding: gzip\r\n", &gzip(batch.as_bytes())));
        put(h, "gzip_bomb", &post("/events/batch", "Content-Encoding: gzip\r\n", &gzip(&vec![b' '; 300_000])));
        put(h, "gzip_twice", &post("/events", "Content-Encoding: gzip, gzip\r\n", &gzip(&gzip(EVENT.as_bytes()))));
        put(h, "gzip_bad", &post("/events", "Content-Encoding: x-gzip\r\n", b"\x1f\x8b\x08\0garbage"));
        let chunked = format!(
            "POST /events/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n[{{\"d\r\n{:x}\r\n{}\r\n0\r\nX-Trailer: y\r\n\r\n",
            batch.len() - 4,
            &batch[4..]
        );
        put(h, "post_chunked_trailer", chunked.as_bytes());
        let mut gz_chunked =
            b"POST /events/batch HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
        let gz = gzip(batch.as_bytes());
        for part in gz.chunks(7) {
            gz_chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            gz_chunked.extend_from_slice(part);
            gz_chunked.extend_from_slice(b"\r\n");
        }
        gz_chunked.extend_from_slice(b"0\r\n\r\n");
        put(h, "post_gzip_chunked", &gz_chunked);
        let mut pipelined = b"GET /health HTTP/1.1\r\n\r\n".to_vec();
        pipelined.extend(post("/events", "", EVENT.as_bytes()));
        pipelined.extend_from_slice(b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
        pipelined
            .extend_from_slice(b"GET /stats HTTP/1.1\r\nConnection: close\r\n\r\nGET /after-close HTTP/1.1\r\n\r\n");
        put(h, "pipelined", &pipelined);
        put(h, "smuggle_cl_te", b"POST /events HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n");
        put(
            h,
            "smuggle_te_cl",
            b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        );
        put(
            h,
            "smuggle_double_cl",
            b"POST /events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 10\r\n\r\n0123456789",
        );
        put(h, "smuggle_te_list", b"POST /events HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n");
        put(
            h,
            "smuggle_te_twice",
            b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        put(h, "smuggle_te_identity", b"POST /events HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n");
        put(h, "smuggle_cl_plus", b"POST /events HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello");
        put(
            h,
            "smuggle_space_colon",
            b"POST /events HTTP/1.1\r\nTransfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\n{}",
        );
        put(
            h,
            "chunk_size_overflow",
            b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        );
        put(h, "chunk_bad_crlf", b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n");
        put(h, "chunk_lf_only", b"POST /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\n0\n\n");
        put(h, "bare_lf_head", b"GET /health HTTP/1.1\nHost: x\n\n");
        put(h, "http10", b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /health HTTP/1.0\r\n\r\n");
        put(h, "http2", b"GET / HTTP/2.0\r\n\r\n");
        put(h, "expect_continue", &post("/events", "Expect: 100-continue\r\n", EVENT.as_bytes()));
        let mut upgrade = b"GET /ws?device_id=d1&subscribe=false HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
        upgrade.extend(client_frame(
            tungstenite::protocol::frame::coding::OpCode::Data(tungstenite::protocol::frame::coding::Data::Text),
            EVENT.as_bytes(),
            true,
            true,
        ));
        put(h, "ws_upgrade_with_frame", &upgrade);
        put(h, "many_headers", format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(65)).as_bytes());
        put(h, "long_header", format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(17_000)).as_bytes());
        put(h, "non_utf8_header", b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n");

        // event_validator
        let e = "event_validator";
        put(e, "minimal", br#"{"device_id":"d","type":"t","ts":1795435100000}"#);
        put(e, "every_field", br#"{"event_id":"a.B_c:9-z","device_id":"dev-\u00e9","type":"boot","ts":"2026-11-23T13:59:59.123456+02:00","payload":{"s":"x\"\\\/\b\f\n\r\t\u0041","i":-42,"u":18446744073709551615,"f":-1.5e-3,"big":123456789012345678901234567890,"t":true,"n":null,"a":[1,[2,[]],{}],"o":{"k":{}}}}"#);
        put(e, "payload_scalar", br#"{"device_id":"d","type":"t","ts":1795435100000,"payload":"only a string"}"#);
        put(e, "payload_null", br#"{"payload":null,"device_id":"d","type":"t","ts":1795435100000}"#);
        put(e, "payload_number_edge", br#"[{"device_id":"d","type":"t","ts":1795435100000,"payload":1e400},{"device_id":"d","type":"t","ts":1795435100000,"payload":-0},{"device_id":"d","type":"t","ts":1795435100000,"payload":1E-400}]"#);
        put(e, "ts_kinds", br#"[{"device_id":"d","type":"t","ts":"2000-01-01T00:00:00Z"},{"device_id":"d","type":"t","ts":"1999-12-31T23:59:59Z"},{"device_id":"d","type":"t","ts":"2030-01-01T00:00:00Z"},{"device_id":"d","type":"t","ts":1.5},{"device_id":"d","type":"t","ts":-1},{"device_id":"d","type":"t","ts":99999999999999999999},{"device_id":"d","type":"t","ts":"2026-11-23t12:00:00z"}]"#);
        put(e, "nul_escapes", br#"[{"device_id":"d\u0000","type":"t","ts":1795435100000},{"device_id":"d","type":"t","ts":1795435100000,"payload":{"k\u0000":1}},{"device_id":"d","type":"t","ts":1795435100000,"payload":["\u0000"]},{"event_id":"x\u0000","device_id":"d","type":"t","ts":1795435100000}]"#);
        put(e, "nul_raw", b"{\"device_id\":\"d\0\",\"type\":\"t\",\"ts\":1795435100000}");
        put(e, "surrogates", br#"[{"device_id":"\ud83d\ude00","type":"t","ts":1795435100000,"payload":"\ud83d\ude00"},{"device_id":"d","type":"t","ts":1795435100000,"payload":"\ud800"},{"device_id":"d","type":"t","ts":1795435100000,"payload":"\udc00\ud800"},{"device_id":"\udfff","type":"t","ts":1795435100000}]"#);
        put(e, "control_chars", b"[{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1795435100000,\"payload\":\"a\\tb\\u001f\"},{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1795435100000,\"payload\":\"a\tb\"}]");
        put(e, "invalid_utf8", b"{\"device_id\":\"\xc3\x28\",\"type\":\"t\",\"ts\":1795435100000}");
        let deep = |n: usize| {
            format!(
                r#"{{"device_id":"d","type":"t","ts":1795435100000,"payload":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        put(e, "deep_100", deep(100).as_bytes());
        put(e, "deep_101", deep(101).as_bytes());
        put(e, "deep_300", deep(300).as_bytes());
        put(
            e,
            "deep_objects",
            format!(
                r#"{{"device_id":"d","type":"t","ts":1795435100000,"payload":{}0{}}}"#,
                r#"{"a":"#.repeat(50),
                "}".repeat(50)
            )
            .as_bytes(),
        );
        put(e, "batch_mixed", br#" [ {"device_id":"d","type":"t","ts":1795435100000} , 7, "s", [], {"type":"t","ts":1795435100000}, {"device_id":"d","device_id":"e","type":"t","ts":1795435100000}, {"device_id":"d","type":"t","ts":1795435100000,"extra":{"x":[1,2]}}, {"device_id":1,"type":"t","ts":1795435100000}, {"device_id":"","type":"t","ts":1795435100000} ] "#);
        put(e, "batch_empty", b"[]");
        put(e, "not_json", b"{\"device_id\":");
        put(e, "long_fields", format!(r#"[{{"device_id":"{}","type":"t","ts":1795435100000}},{{"device_id":"d","type":"{}","ts":1795435100000}},{{"event_id":"{}","device_id":"d","type":"t","ts":1795435100000}}]"#, "d".repeat(129), "t".repeat(65), "e".repeat(129)).as_bytes());
        put(e, "event_id_chars", br#"[{"event_id":"a b","device_id":"d","type":"t","ts":1795435100000},{"event_id":"","device_id":"d","type":"t","ts":1795435100000},{"event_id":7,"device_id":"d","type":"t","ts":1795435100000}]"#);
        put(e, "payload_whitespace", b"{ \"payload\" :\n\t[ 1 , { \"a\" : \"b\" } ]\r\n , \"device_id\":\"d\",\"type\":\"t\",\"ts\":1795435100000 }");
        put(e, "batch", batch.as_bytes());

        // ndjson_splitter
        let n = "ndjson_splitter";
        put(n, "two_events", ndjson.as_bytes());
        put(n, "blank_lines_crlf", format!("\r\n{EVENT}\r\n\r\n  \t\n{EVENT}\r\n\n").as_bytes());
        put(n, "bad_lines", format!("{EVENT}\n{{bad\n[1]\n\"s\"\n{EVENT} trailing\n{{}}\n").as_bytes());
        put(n, "four_lines", format!("{EVENT}\n{EVENT}\n{EVENT}\n{EVENT}").as_bytes());
        put(n, "only_blank", b"\n \r\n\t\n");
        put(n, "nul_and_surrogate", b"{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1795435100000,\"payload\":\"\\u0000\"}\n{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1795435100000,\"payload\":\"\\ud800\"}\n");
        put(n, "array_line", format!("{batch}\n{EVENT}\n").as_bytes());

        // ws_ingest
        use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
        let text = OpCode::Data(Data::Text);
        let w = "ws_ingest";
        put(w, "text_event", &client_frame(text, EVENT.as_bytes(), true, true));
        put(w, "text_array", &client_frame(text, batch.as_bytes(), true, true));
        put(w, "text_array_leading_ws", &client_frame(text, format!(" \n{batch}").as_bytes(), true, true));
        let mut ping_text = client_frame(OpCode::Control(Control::Ping), b"hi", true, true);
        ping_text.extend(client_frame(text, EVENT.as_bytes(), true, true));
        ping_text.extend(client_frame(OpCode::Control(Control::Pong), b"", true, true));
        put(w, "ping_text_pong", &ping_text);
        let mut close = client_frame(text, b"[]", true, true);
        close.extend(client_frame(OpCode::Control(Control::Close), b"\x03\xe8bye", true, true));
        close.extend(client_frame(text, EVENT.as_bytes(), true, true));
        put(w, "text_close_text", &close);
        let (a, b) = EVENT.as_bytes().split_at(20);
        let mut fragmented = client_frame(text, a, false, true);
        fragmented.extend(client_frame(OpCode::Control(Control::Ping), b"", true, true));
        fragmented.extend(client_frame(OpCode::Data(Data::Continue), b, true, true));
        put(w, "fragmented_text", &fragmented);
        let euro = "{\"device_id\":\"\u{20ac}\",\"type\":\"t\",\"ts\":1795435100000}".as_bytes();
        let cut = euro.iter().position(|&b| b == 0xe2).unwrap() + 1;
        let mut split_utf8 = client_frame(text, &euro[..cut], false, true);
        split_utf8.extend(client_frame(OpCode::Data(Data::Continue), &euro[cut..], true, true));
        put(w, "fragment_splits_utf8", &split_utf8);
        put(w, "binary", &client_frame(OpCode::Data(Data::Binary), EVENT.as_bytes(), true, true));
        put(w, "unmasked", &client_frame(text, EVENT.as_bytes(), true, false));
        put(w, "too_large", &client_frame(text, &vec![b' '; 5000], true, true));
        put(w, "invalid_utf8", &client_frame(text, b"{\"device_id\":\"\xff\"}", true, true));
        put(w, "close_bad_code", &client_frame(OpCode::Control(Control::Close), b"\x03\xed", true, true));
        let mut many = Vec::new();
        for _ in 0..5 {
            many.extend(client_frame(text, EVENT.as_bytes(), true, true));
        }
        put(w, "five_events", &many);

        // spool_reader: records written by the real appender.
        let dir = SPOOL_DIR.with(PathBuf::clone).with_extension("seeds");
        let _ = std::fs::remove_dir_all(&dir);
        let config = SpoolConfig {
            dir: dir.clone(),
            segment_bytes: SPOOL_SEGMENT_BYTES,
            max_bytes: 1 << 20,
            ..SpoolConfig::default()
        };
        let (_spool, mut appender, _) = Spool::open(config).unwrap();
        let mut parser = Parser::new(default_rules());
        for body in [EVENT, &batch, r#"{"device_id":"d","type":"t","ts":1795435100000}"#] {
            let kind = if body.starts_with('[') { BodyKind::JsonArray } else { BodyKind::Single };
            let parsed = parser.parse(body.as_bytes(), kind, CLOCK).unwrap();
            appender.append(&parsed.rows.to_spool_record()).unwrap();
        }
        let segment = std::fs::read(dir.join(segment::file_name(1))).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let body = &segment[segment::MAGIC.len()..];
        let s = "spool_reader";
        let with = |flags: u8, ckpt: u8, first: u8, rest: &[u8]| [&[flags, ckpt, first][..], rest].concat();
        put(s, "appender_segment", &with(0, 0, 1, body));
        put(s, "appender_segment_checkpoint", &with(spool_flags::CHECKPOINT, 1, 1, body));
        put(s, "appender_segment_torn", &with(0, 0, 1, &body[..body.len() - 5]));
        put(s, "appender_segment_append", &with(spool_flags::APPEND | spool_flags::TEMP_CHECKPOINT, 0, 1, body));
        put(s, "no_magic", &with(spool_flags::NO_MAGIC, 0, 1, &segment));
        put(s, "checkpoint_ahead", &with(spool_flags::CHECKPOINT | spool_flags::APPEND, 9, 1, body));
        put(s, "raw_checkpoint", &with(spool_flags::RAW_CHECKPOINT, 0, 1, b"ingckpt1\x01\0\0\0\0\0\0\0\0\0\0\0"));
        // Framed: three records, a second segment, a record with a wrong seq, junk.
        let framed = [
            &[spool_flags::FRAMED | spool_flags::CHECKPOINT, 1, 1][..],
            &[3, b'a', b'b', b'c', 0, 5, b'h', b'e', b'l', b'l', b'o'],
            &[OP_NEW_SEGMENT, 0, 2, b'x', b'y', 0x80 | 1, 0xfe, b'z'],
            &[OP_JUNK, 3, 1, 2, 3],
        ]
        .concat();
        put(s, "framed_two_segments", &framed);
        put(s, "framed_gap", &[&[spool_flags::FRAMED, 0, 5][..], &[1, b'a', OP_NEW_SEGMENT, 3, 1, b'b']].concat());
        put(s, "framed_big_record", &[&[spool_flags::FRAMED, 0, 1][..], &[OP_BIG, 0xe8, 0x03, 1, 2, 3]].concat());
        put(
            s,
            "framed_seq_zero",
            &[&[spool_flags::FRAMED | spool_flags::APPEND, 0, 0][..], &[1, b'a', 1, b'b']].concat(),
        );
    }

    /// A client frame (masked with a fixed key unless `masked` is false).
    fn client_frame(
        opcode: tungstenite::protocol::frame::coding::OpCode,
        payload: &[u8],
        fin: bool,
        masked: bool,
    ) -> Vec<u8> {
        use tungstenite::protocol::frame::{Frame, FrameHeader};
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: masked.then_some([0x12, 0x34, 0x56, 0x78]),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, payload.to_vec().into()).format(&mut out).unwrap();
        out
    }
}
