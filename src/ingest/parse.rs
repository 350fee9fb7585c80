//! Request body → validated events → COPY rows, with simd-json: pure, no I/O.
//!
//! simd-json parses a scratch copy of the body in place into a flat tape.
//! Walking the tape gives the typed top-level fields; the payload is kept as
//! the exact JSON text the client sent (numbers and all), cut out of the
//! original body with simd-json's structural indexes, so it is never rebuilt.
//! The tape walk maps a node to its structural characters: a scalar or
//! string is one, an object adds `{`, one `:` per key and one `,`/`}` per
//! entry (at least one), an array `[` and one `,`/`]` per element.
//!
//! One [`Parser`] lives on each shard and reuses its buffers across requests.

use simd_json::{Buffers, Node, StaticNode, Tape};
use uuid::timestamp::context::ContextV7;

use super::event::{self, Field, Reason, TsWindow};
use crate::labels::RejectKind;
use crate::row::{PgMicros, RowBuf, RowFields};

/// The shape of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /events`: one JSON object.
    Single,
    /// `POST /events/batch`: a JSON array of objects.
    JsonArray,
    /// `POST /events/batch` with `application/x-ndjson`: one object per line.
    Ndjson,
}

/// The per-event rules that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub max_events: usize,
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects inside a payload.
    pub max_payload_depth: usize,
    pub max_future_skew_us: i64,
    pub allow_unknown_fields: bool,
}

impl Rules {
    pub fn from_config(c: &crate::config::IngestConfig) -> Rules {
        Rules {
            max_events: c.max_events_per_request,
            max_payload_bytes: c.max_payload_bytes,
            max_payload_depth: c.max_payload_depth,
            max_future_skew_us: (c.max_future_skew_ms as i64).saturating_mul(1000),
            allow_unknown_fields: c.allow_unknown_fields,
        }
    }
}

/// One rejected event: its position in the request and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub error: Reason,
}

/// What a body turned into.
#[derive(Debug, Default)]
pub struct Parsed {
    /// COPY tuples of the accepted events.
    pub rows: RowBuf,
    /// The rejected events, in index order.
    pub rejected: Vec<Rejection>,
}

/// Why a whole body was refused (400 or 413), as opposed to single events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON at all (for NDJSON, a bad line is a per-event rejection instead).
    Malformed(String),
    /// `POST /events/batch` whose JSON body is not an array.
    NotAnArray,
    /// No events at all.
    Empty,
    /// More events than `ingest.max_events_per_request`.
    TooManyEvents { limit: usize },
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Malformed(detail) => write!(f, "malformed JSON: {detail}"),
            BodyError::NotAnArray => {
                f.write_str("a batch must be a JSON array of events, or NDJSON with Content-Type: application/x-ndjson")
            }
            BodyError::Empty => f.write_str("the request holds no events"),
            BodyError::TooManyEvents { limit } => {
                write!(f, "more than {limit} events in one request (ingest.max_events_per_request)")
            }
        }
    }
}

/// Bytes of tape and structural index one structural character can cost:
/// a `u32` index and a tape node.
const BYTES_PER_STRUCTURAL: usize = 4 + std::mem::size_of::<Node<'static>>();

/// Scratch kept between requests; buffers that grew past it for one large
/// body are released after it (see [`Parser::shed`]).
pub const KEPT_SCRATCH_BYTES: usize = 1024 * 1024;

/// An upper bound on the memory that parsing `body` takes, rows included:
/// what the memory budget is asked for before the parse starts.
///
/// simd-json copies the document twice (its aligned input and string
/// buffers) besides our scratch copy, and keeps a `u32` index and a tape
/// node per structural character; a structural character is at most one of
/// `{ [ , : "` (a string's two quotes over-count it), so counting those bytes
/// bounds it. NDJSON is parsed one line at a time, so only its longest line
/// needs scratch. An encoded row is at most [`ROW_GROWTH_BYTES`] longer than
/// its event's JSON, and there are no more events than `{`. The count is one
/// vectorised pass over the body.
pub fn working_bytes(body: &[u8], kind: BodyKind) -> usize {
    let (scratch, objects) = match kind {
        BodyKind::Single | BodyKind::JsonArray => {
            let (structurals, objects) = count_structurals(body);
            (3 * body.len() + BYTES_PER_STRUCTURAL * structurals, objects)
        }
        BodyKind::Ndjson => body.split(|&b| b == b'\n').fold((0, 0), |(scratch, objects), line| {
            let (structurals, o) = count_structurals(line);
            (scratch.max(3 * line.len() + BYTES_PER_STRUCTURAL * structurals), objects + o)
        }),
    };
    scratch + body.len() + ROW_GROWTH_BYTES * objects + 64 * 1024
}

/// A bound on [`working_bytes`] that needs no pass over the body: every
/// byte taken to be a structural character and every other byte an event.
/// Far above the real need (≈ 55 × the body), so it is asked for only for
/// small bodies, whose parse it covers momentarily (one parse per shard at a
/// time); the scan it saves cost 16 % of ingestd's CPU at 100-event bodies.
pub fn working_bytes_unscanned(body_len: usize) -> usize {
    (3 + BYTES_PER_STRUCTURAL + 1) * body_len + ROW_GROWTH_BYTES * body_len.div_ceil(2) + 64 * 1024
}

/// Bodies up to this size first ask for [`working_bytes_unscanned`].
pub const SCAN_ABOVE_BYTES: usize = 64 * 1024;

/// Bytes that may be structural characters (`{ [ , : "`), and `{`s (an
/// upper bound on events), in one pass the compiler vectorises.
fn count_structurals(doc: &[u8]) -> (usize, usize) {
    let (mut structurals, mut objects) = (1usize, 0usize);
    for chunk in doc.chunks(4096) {
        let (s, o) = chunk.iter().fold((0u32, 0u32), |(s, o), &b| {
            let open = u32::from(b == b'{');
            let any = open | u32::from(b == b'[') | u32::from(b == b',') | u32::from(b == b':') | u32::from(b == b'"');
            (s + any, o + open)
        });
        structurals += s as usize;
        objects += o as usize;
    }
    (structurals, objects)
}

/// How much longer an encoded row can be than its event's JSON: the tuple's
/// field count and six lengths (26), binary `ts` and `received_at` (16), the
/// jsonb version byte, and a 36-byte UUID when ingestd assigns the id, less
/// the keys and punctuation the JSON must have had (`"device_id":""`,
/// `"type":""`, `"ts":0`, braces, commas: 33).
pub const ROW_GROWTH_BYTES: usize = 26 + 16 + 1 + 36 - 33;

/// A shard's parser: rules plus buffers reused from one request to the next.
pub struct Parser {
    rules: Rules,
    buffers: Buffers,
    scratch: Vec<u8>,
    tape: Tape<'static>,
    uuid_context: ContextV7,
}

/// Time facts of one request.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Server clock when the request was received, Unix microseconds.
    pub now_unix_us: i64,
}

impl Parser {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            buffers: Buffers::new(64 * 1024),
            scratch: Vec::new(),
            tape: Tape::null(),
            uuid_context: ContextV7::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Replaces the rules (a configuration reload).
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    /// Releases buffers that grew past [`KEPT_SCRATCH_BYTES`] for one large
    /// body, so that a burst of large requests does not leave every shard
    /// holding the largest one's scratch for ever. Ordinary bodies keep
    /// reusing theirs.
    pub fn shed(&mut self) {
        if self.scratch.capacity() > KEPT_SCRATCH_BYTES {
            self.scratch = Vec::new();
            self.buffers = Buffers::new(64 * 1024);
            self.tape = Tape::null();
        }
    }

    /// Parses and validates a whole body.
    pub fn parse(&mut self, body: &[u8], kind: BodyKind, clock: Clock) -> Result<Parsed, BodyError> {
        let mut out = Parsed { rows: RowBuf::with_capacity(body.len() + body.len() / 4, 0), rejected: Vec::new() };
        match kind {
            BodyKind::Single => self.parse_json(body, false, clock, &mut out)?,
            BodyKind::JsonArray => self.parse_json(body, true, clock, &mut out)?,
            BodyKind::Ndjson => self.parse_ndjson(body, clock, &mut out)?,
        }
        Ok(out)
    }

    fn parse_json(&mut self, body: &[u8], array: bool, clock: Clock, out: &mut Parsed) -> Result<(), BodyError> {
        // JSON never holds a raw NUL byte (it is not whitespace, and inside a
        // string it must be escaped), but simd-json 0.17 ends a number or
        // literal at one and skips what follows up to the next structural
        // character (simd-lite/simd-json#357): `1\0junk` would be stored.
        if body.contains(&0) {
            return Err(BodyError::Malformed("raw NUL byte (0x00) in the body".into()));
        }
        let mut tape = std::mem::replace(&mut self.tape, Tape::null()).reset();
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        let result = match simd_json::fill_tape(&mut self.scratch, &mut self.buffers, &mut tape) {
            Err(e) => Err(BodyError::Malformed(e.to_string())),
            Ok(()) => {
                let doc = Doc { nodes: &tape.0, structurals: self.buffers.structural_indexes(), raw: body };
                let mut ctx = EventCtx { rules: &self.rules, clock, uuid: &self.uuid_context };
                if array {
                    match doc.nodes.first() {
                        Some(&Node::Array { len, .. }) => {
                            if len > self.rules.max_events {
                                Err(BodyError::TooManyEvents { limit: self.rules.max_events })
                            } else if len == 0 {
                                Err(BodyError::Empty)
                            } else {
                                let (mut node, mut sp) = (1, 1);
                                for index in 0..len {
                                    let (nodes, structurals) = doc.extent(node);
                                    ctx.accept(&doc, node, sp, index, out);
                                    node += nodes;
                                    sp += structurals + 1;
                                }
                                Ok(())
                            }
                        }
                        _ => Err(BodyError::NotAnArray),
                    }
                } else {
                    ctx.accept(&doc, 0, 0, 0, out);
                    Ok(())
                }
            }
        };
        self.tape = tape.reset();
        result
    }

    fn parse_ndjson(&mut self, body: &[u8], clock: Clock, out: &mut Parsed) -> Result<(), BodyError> {
        let mut index = 0;
        for line in body.split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if index == self.rules.max_events {
                return Err(BodyError::TooManyEvents { limit: self.rules.max_events });
            }
            let before = out.rejected.len();
            // A single-event parse records a rejection at index 0: renumber it.
            if let Err(e) = self.parse_json(line, false, clock, out) {
                out.rejected.push(Rejection { index, error: Reason::new(RejectKind::Malformed, e.to_string()) });
            }
            if out.rejected.len() > before {
                out.rejected[before].index = index;
            }
            index += 1;
        }
        if index == 0 { Err(BodyError::Empty) } else { Ok(()) }
    }
}

/// A parsed document: its tape, structural offsets and the original bytes.
struct Doc<'t, 'i> {
    nodes: &'t [Node<'i>],
    structurals: &'t [u32],
    raw: &'t [u8],
}

impl Doc<'_, '_> {
    /// Tape nodes and structural characters taken by the value at `node`.
    fn extent(&self, node: usize) -> (usize, usize) {
        let size = match self.nodes[node] {
            Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
            _ => 1,
        };
        let structurals = self.nodes[node..node + size]
            .iter()
            .map(|n| match *n {
                Node::Object { len, .. } => 1 + len + len.max(1),
                Node::Array { len, .. } => 1 + len.max(1),
                _ => 1,
            })
            .sum();
        (size, structurals)
    }

    /// The original text of a value that starts at structural `sp` and takes
    /// `count` structurals; the next structural closes it (`,` `}` `]`).
    fn raw_text(&self, sp: usize, count: usize) -> &[u8] {
        let start = self.structurals[sp] as usize;
        let end = self.structurals.get(sp + count).map_or(self.raw.len(), |&e| e as usize);
        self.raw[start..end].trim_ascii_end()
    }
}

/// What validating one event needs besides the document.
struct EventCtx<'a> {
    rules: &'a Rules,
    clock: Clock,
    uuid: &'a ContextV7,
}

impl EventCtx<'_> {
    /// Validates the event at `node` and either encodes it or records why not.
    fn accept(&mut self, doc: &Doc<'_, '_>, node: usize, sp: usize, index: usize, out: &mut Parsed) {
        if let Err(error) = self.encode(doc, node, sp, &mut out.rows) {
            out.rejected.push(Rejection { index, error });
        }
    }

    fn encode(&mut self, doc: &Doc<'_, '_>, node: usize, sp: usize, rows: &mut RowBuf) -> Result<(), Reason> {
        let Node::Object { len, .. } = doc.nodes[node] else {
            return Err(Reason::new(RejectKind::NotAnObject, "an event must be a JSON object"));
        };
        let window =
            TsWindow { now_unix_us: self.clock.now_unix_us, max_future_skew_us: self.rules.max_future_skew_us };
        let (mut event_id, mut device_id, mut event_type) = (None, None, None);
        let mut ts: Option<PgMicros> = None;
        let mut payload: Option<&[u8]> = None;
        let mut seen = 0u8;
        let (mut n, mut s) = (node + 1, sp + 1);
        for _ in 0..len {
            let Node::String(key) = doc.nodes[n] else {
                return Err(Reason::new(RejectKind::Malformed, "object keys must be strings"));
            };
            let (value_node, value_sp) = (n + 1, s + 2);
            let (nodes, structurals) = doc.extent(value_node);
            n = value_node + nodes;
            s = value_sp + structurals + 1;
            let Some(field) = Field::from_key(key) else {
                if self.rules.allow_unknown_fields {
                    continue;
                }
                return Err(Reason::new(
                    RejectKind::UnknownField,
                    format!("unknown field `{}`; allowed: event_id, device_id, type, ts, payload", key.escape_debug()),
                ));
            };
            if seen & field.bit() != 0 {
                return Err(Reason::new(RejectKind::DuplicateField, format!("duplicate field `{}`", field.name())));
            }
            seen |= field.bit();
            let value = &doc.nodes[value_node];
            match field {
                Field::EventId => {
                    let id = as_str(value, field)?;
                    event::check_event_id(id)?;
                    event_id = Some(id);
                }
                Field::DeviceId => {
                    let v = as_str(value, field)?;
                    event::check_text(field, v, event::MAX_ID_BYTES)?;
                    device_id = Some(v);
                }
                Field::Type => {
                    let v = as_str(value, field)?;
                    event::check_text(field, v, event::MAX_TYPE_BYTES)?;
                    event_type = Some(v);
                }
                Field::Ts => {
                    ts = Some(match *value {
                        Node::String(text) => window.from_rfc3339(text)?,
                        Node::Static(StaticNode::I64(ms)) => window.from_epoch_ms(i128::from(ms))?,
                        Node::Static(StaticNode::U64(ms)) => window.from_epoch_ms(i128::from(ms))?,
                        _ => {
                            return Err(Reason::new(
                                RejectKind::WrongType,
                                "ts must be an RFC 3339 string or integer epoch milliseconds",
                            ));
                        }
                    });
                }
                Field::Payload => {
                    let text = doc.raw_text(value_sp, structurals);
                    if text.len() > self.rules.max_payload_bytes {
                        return Err(Reason::new(
                            RejectKind::PayloadTooLarge,
                            format!(
                                "payload is {} bytes, more than ingest.max_payload_bytes ({})",
                                text.len(),
                                self.rules.max_payload_bytes
                            ),
                        ));
                    }
                    check_payload(
                        doc,
                        value_node..value_node + nodes,
                        value_sp..value_sp + structurals,
                        text,
                        self.rules.max_payload_depth,
                    )?;
                    payload = Some(text);
                }
            }
        }
        let device_id = device_id.ok_or_else(|| missing(Field::DeviceId))?;
        let event_type = event_type.ok_or_else(|| missing(Field::Type))?;
        let ts = ts.ok_or_else(|| missing(Field::Ts))?;
        let mut generated = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let event_id = match event_id {
            Some(id) => id.as_bytes(),
            None => self.new_event_id(&mut generated),
        };
        rows.push(&RowFields {
            event_id,
            device_id,
            event_type,
            ts,
            received_at: crate::row::pg_micros_from_unix_micros(self.clock.now_unix_us),
            payload,
        });
        Ok(())
    }

    /// A UUIDv7 from this shard's own context: no lock shared with other shards.
    fn new_event_id<'b>(&self, buf: &'b mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'b [u8] {
        let us = self.clock.now_unix_us.max(0) as u64;
        let ts = uuid::Timestamp::from_unix(self.uuid, us / 1_000_000, (us % 1_000_000) as u32 * 1000);
        uuid::Uuid::new_v7(ts).hyphenated().encode_lower(buf).as_bytes()
    }
}

fn as_str<'i>(node: &Node<'i>, field: Field) -> Result<&'i str, Reason> {
    match *node {
        Node::String(s) => Ok(s),
        _ => Err(Reason::new(RejectKind::WrongType, format!("{} must be a string", field.name()))),
    }
}

fn missing(field: Field) -> Reason {
    Reason::new(RejectKind::MissingField, format!("missing required field `{}`", field.name()))
}

/// Checks every string, number and nesting level of a payload against what
/// jsonb accepts (PostgreSQL's JSON parser recurses per level and refuses
/// depths in the low ten thousands with its default stack).
fn check_payload(
    doc: &Doc<'_, '_>,
    nodes: std::ops::Range<usize>,
    structurals: std::ops::Range<usize>,
    raw: &[u8],
    max_depth: usize,
) -> Result<(), Reason> {
    let nodes = &doc.nodes[nodes];
    let mut control = false;
    let (mut numbers, mut astral) = (false, false);
    // Nesting depth is at most the number of nodes: most payloads are far
    // too small to need the depth tracked at all.
    let track_depth = nodes.len() > max_depth;
    // Tape index where each open container ends; its length is the depth.
    let mut open: Vec<usize> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        match *node {
            Node::Object { count, .. } | Node::Array { count, .. } if track_depth => {
                while open.last().is_some_and(|&end| end <= i) {
                    open.pop();
                }
                open.push(i + count + 1);
                if open.len() > max_depth {
                    return Err(Reason::new(
                        RejectKind::PayloadTooDeep,
                        format!("payload nests deeper than ingest.max_payload_depth ({max_depth})"),
                    ));
                }
            }
            // One pass in the common case: no control character, nothing
            // past U+FFFF. (A fold without early exit: branch-free, and
            // vectorised for long strings.)
            #[allow(clippy::manual_range_contains)] // two compares LLVM keeps branch-free
            Node::String(s) if s.bytes().fold(false, |odd, b| odd | (b < 0x20) | (b >= 0xf0)) => {
                control |= event::check_payload_string(s)?;
                astral |= s.bytes().any(|b| b >= 0xf0);
            }
            Node::Static(StaticNode::F64(x)) if !x.is_finite() => {
                return Err(Reason::new(RejectKind::InvalidValue, "payload holds a number PostgreSQL cannot store"));
            }
            // What simd-json's slow path for long numbers or f64 may have let
            // through (see check_raw_numbers); the common small integers skip the scan.
            Node::Static(StaticNode::F64(_)) => numbers = true,
            Node::Static(StaticNode::U64(n)) => numbers |= n >= 10u64.pow(18),
            Node::Static(StaticNode::I64(n)) => numbers |= n.unsigned_abs() >= 10u64.pow(18),
            _ => {}
        }
    }
    if control {
        event::check_raw_strings(raw)?;
    }
    if astral {
        event::check_raw_surrogates(raw)?;
    }
    if numbers {
        // A number starts at a structural index and ends before the next one.
        for sp in structurals {
            let start = doc.structurals[sp] as usize;
            if matches!(doc.raw[start], b'-' | b'0'..=b'9') {
                let end = doc.structurals.get(sp + 1).map_or(doc.raw.len(), |&e| e as usize);
                event::check_number(&doc.raw[start..end])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000_000_000;

    fn parser() -> Parser {
        Parser::new(Rules {
            max_events: 100,
            max_payload_bytes: 1024,
            max_payload_depth: 8,
            max_future_skew_us: 300_000_000,
            allow_unknown_fields: false,
        })
    }

    fn run(body: &str, kind: BodyKind) -> Result<Parsed, BodyError> {
        parser().parse(body.as_bytes(), kind, Clock { now_unix_us: NOW })
    }

    /// The stored payload text of accepted row `i`.
    fn payload(p: &Parsed, i: usize) -> Option<String> {
        let row = p.rows.row(i);
        // Skip the 5 fields before payload: 3 texts and 2 timestamps.
        let mut at = 2;
        for _ in 0..5 {
            let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap()) as usize;
            at += 4 + len;
        }
        let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap());
        (len >= 0).then(|| String::from_utf8(row[at + 5..at + 4 + len as usize].to_vec()).unwrap())
    }

    const GOOD: &str = r#"{"device_id":"d1","type":"t","ts":"2026-01-01T00:00:00Z"}"#;

    #[test]
    fn payload_text_is_kept_verbatim() {
        for p in [
            r#"{"a": 1.50, "b": [1, 2, {"c": "x\"y\\"}], "e": {}, "f": []}"#,
            r#"[]"#,
            r#"12345678901234567890123456789"#,
            r#""str\u00e9""#,
            r#"{"nested": {"deep": [[[], {}], [{"k": null}]]}}"#,
            r#"true"#,
            r#"null"#,
        ] {
            let body = format!(r#"{{"device_id":"d","payload": {p} ,"type":"t","ts":1767225600000}}"#);
            let parsed = run(&body, BodyKind::Single).unwrap();
            assert!(parsed.rejected.is_empty(), "{p}: {:?}", parsed.rejected);
            assert_eq!(payload(&parsed, 0).as_deref(), Some(p), "{body}");
        }
    }

    #[test]
    fn payload_last_and_with_whitespace() {
        let body =
            "{ \"device_id\" : \"d\", \"type\":\"t\", \"ts\":1767225600000, \"payload\" :\n {\"x\": [1 , 2]}\n }";
        let parsed = run(body, BodyKind::Single).unwrap();
        assert_eq!(payload(&parsed, 0).as_deref(), Some("{\"x\": [1 , 2]}"));
    }

    #[test]
    fn batch_spans_survive_earlier_escapes_and_nesting() {
        let body = format!(
            r#"[{{"device_id":"a\"b","type":"t","ts":1767225600000,"payload":{{"k":[{{}},[]]}}}}, 7, {GOOD}, {{"device_id":"d","type":"t","ts":1767225600000,"payload":"last"}}]"#
        );
        let parsed = run(&body, BodyKind::JsonArray).unwrap();
        assert_eq!(parsed.rows.len(), 3);
        assert_eq!(parsed.rejected.len(), 1);
        assert_eq!((parsed.rejected[0].index, parsed.rejected[0].error.kind), (1, RejectKind::NotAnObject));
        assert_eq!(payload(&parsed, 0).as_deref(), Some(r#"{"k":[{},[]]}"#));
        assert_eq!(payload(&parsed, 1), None);
        assert_eq!(payload(&parsed, 2).as_deref(), Some(r#""last""#));
    }

    #[test]
    fn rejections_carry_reasons() {
        let cases = [
            (r#"{"type":"t","ts":1767225600000}"#, "device_id"),
            (r#"{"device_id":"d","ts":1767225600000}"#, "type"),
            (r#"{"device_id":"d","type":"t"}"#, "ts"),
            (r#"{"device_id":"d","type":"t","ts":1.5}"#, "ts must be"),
            (r#"{"device_id":"d","type":"t","ts":"1999-01-01T00:00:00Z"}"#, "2000"),
            (r#"{"device_id":1,"type":"t","ts":1767225600000}"#, "device_id must be a string"),
            (r#"{"device_id":"d\u0000","type":"t","ts":1767225600000}"#, "NUL"),
            (r#"{"device_id":"d","type":"t","ts":1767225600000,"payload":{"k\u0000":1}}"#, "NUL"),
            (r#"{"device_id":"d","type":"t","ts":1767225600000,"payload":"a\u0000"}"#, "NUL"),
            (r#"{"device_id":"d","type":"t","ts":1767225600000,"extra":1}"#, "unknown field `extra`"),
            (r#"{"device_id":"d","device_id":"e","type":"t","ts":1767225600000}"#, "duplicate"),
            (r#"{"event_id":"a b","device_id":"d","type":"t","ts":1767225600000}"#, "event_id"),
            (
                &format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":"{}"}}"#, "x".repeat(1100)),
                "max_payload_bytes",
            ),
        ];
        for (body, want) in cases {
            let parsed = run(body, BodyKind::Single).unwrap();
            assert_eq!(parsed.rows.len(), 0, "{body}");
            assert!(parsed.rejected[0].error.message.contains(want), "{body}: {:?}", parsed.rejected);
        }
    }

    #[test]
    fn payload_depth_is_bounded() {
        let ok = format!(
            r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{}1{}}}"#,
            "[".repeat(8),
            "]".repeat(8)
        );
        assert_eq!(run(&ok, BodyKind::Single).unwrap().rows.len(), 1);
        let deep = format!(
            r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{}1{}}}"#,
            r#"{"a":"#.repeat(9),
            "}".repeat(9)
        );
        let parsed = run(&deep, BodyKind::Single).unwrap();
        assert_eq!(parsed.rejected[0].error.kind, RejectKind::PayloadTooDeep);
        let siblings =
            r#"{"device_id":"d","type":"t","ts":1767225600000,"payload":[[[[]]],[[[]]],[[[[[[[1]]]]]]],{"a":[[{}]]}]}"#;
        assert_eq!(run(siblings, BodyKind::Single).unwrap().rows.len(), 1, "depth counts nesting, not siblings");
        // At the bound exactly, with as few nodes as the depth (the depth is not tracked then).
        let empty = |d: usize| {
            format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{}{}}}"#, "[".repeat(d), "]".repeat(d))
        };
        assert_eq!(run(&empty(8), BodyKind::Single).unwrap().rows.len(), 1);
        assert_eq!(run(&empty(9), BodyKind::Single).unwrap().rejected[0].error.kind, RejectKind::PayloadTooDeep);
    }

    #[test]
    fn raw_control_character_in_payload_string_is_rejected() {
        // simd-json itself refuses it; check_raw_strings stays as a second line.
        let body = "{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1767225600000,\"payload\":\"a\tb\"}";
        assert!(matches!(run(body, BodyKind::Single), Err(BodyError::Malformed(_))), "raw tab inside a string");
        let escaped = r#"{"device_id":"d","type":"t","ts":1767225600000,"payload":"a\tb"}"#;
        assert_eq!(run(escaped, BodyKind::Single).unwrap().rows.len(), 1);
    }

    #[test]
    fn raw_nul_byte_is_malformed() {
        // Found by fuzzing (event_validator): simd-json took `1\0junk` as 1,
        // and the payload text kept the NUL, which PostgreSQL refuses.
        for body in [
            &b"{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1767225600000,\"payload\":[1\0junk]}"[..],
            b"{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1767225600000\0garbage}",
            b"{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1767225600000,\"payload\":true\0}",
        ] {
            let parsed = parser().parse(body, BodyKind::Single, Clock { now_unix_us: NOW });
            assert!(matches!(parsed, Err(BodyError::Malformed(_))), "{}: {parsed:?}", body.escape_ascii());
        }
        let ndjson = format!("{GOOD}\n{{\"device_id\":\"d\",\"type\":\"t\",\"ts\":1767225600000\0}}\n{GOOD}");
        let parsed = run(&ndjson, BodyKind::Ndjson).unwrap();
        assert_eq!(parsed.rows.len(), 2);
        assert_eq!((parsed.rejected[0].index, parsed.rejected[0].error.kind), (1, RejectKind::Malformed));
    }

    #[test]
    fn payload_numbers_beyond_numeric_scale_are_rejected() {
        // Found by fuzzing (event_validator): PostgreSQL's numeric (jsonb's
        // numbers) keeps at most 16383 digits after the decimal point and
        // refuses `1e-16384` ("value overflows numeric format"), which
        // simd-json reads as 0.
        let mut p = Parser::new(Rules { max_payload_bytes: 64 * 1024, ..*parser().rules() });
        let event = |payload: &str| format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{payload}}}"#);
        let long_fraction = format!("1.{}", "1".repeat(16_384));
        for bad in ["1e-16384", "[0.5e-16383]", "{\"a\":-1E-40000}", &long_fraction] {
            let parsed = p.parse(event(bad).as_bytes(), BodyKind::Single, Clock { now_unix_us: NOW }).unwrap();
            assert_eq!(parsed.rows.len(), 0, "{}", &bad[..bad.len().min(20)]);
            assert_eq!(parsed.rejected[0].error.kind, RejectKind::InvalidValue);
        }
        let fine_fraction = format!("1.{}", "1".repeat(16_383));
        for good in ["1e-16383", "123e-16381", "0.0", "[1.5, \"1e-99999\"]", &fine_fraction] {
            let parsed = p.parse(event(good).as_bytes(), BodyKind::Single, Clock { now_unix_us: NOW }).unwrap();
            assert_eq!(parsed.rows.len(), 1, "{}: {:?}", &good[..good.len().min(20)], parsed.rejected);
        }
    }

    #[test]
    fn long_numbers_followed_by_junk_are_rejected() {
        // Found by fuzzing (event_validator): simd-json's slow path for
        // numbers of 19 digits or more does not check what ends them, so
        // `1801234567890123456g890` was stored and PostgreSQL refused it.
        for bad in ["1801234567890123456g890", "[1.00000000000000000000x]", "{\"a\":1234567890123456789012345<7890}"] {
            let parsed =
                run(&format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{bad}}}"#), BodyKind::Single);
            let parsed = parsed.unwrap();
            assert_eq!(parsed.rows.len(), 0, "{bad}");
            assert_eq!(parsed.rejected[0].error.kind, RejectKind::Malformed, "{bad}");
        }
        for good in ["1801234567890123456890", "[1.00000000000000000000]", "-1000000000000000000", "[0.25, 1e3]"] {
            let parsed = run(
                &format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{good}}}"#),
                BodyKind::Single,
            );
            assert_eq!(payload(&parsed.unwrap(), 0).as_deref(), Some(good));
        }
    }

    #[test]
    fn broken_surrogate_pairs_and_huge_exponents_are_rejected() {
        // Found by fuzzing (event_validator, campaign of 2026-11-23):
        // simd-json decodes "\ud83d\uee00" as U+1F600 without checking the
        // low half and reads 0e2000000000 as 0; PostgreSQL refuses both.
        for bad in [r#""\ud83d\uee00""#, r#"{"\ud800\uffff":1}"#, "0e2000000000", "[0.0e1073741823]"] {
            let body = format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{bad}}}"#);
            let parsed = run(&body, BodyKind::Single).unwrap();
            assert_eq!(parsed.rows.len(), 0, "{bad}");
            assert_eq!(parsed.rejected[0].error.kind, RejectKind::InvalidValue, "{bad}");
        }
        for good in ["\"\\ud83d\\ude00 \u{1f600}\"", "0e1073741822"] {
            let body = format!(r#"{{"device_id":"d","type":"t","ts":1767225600000,"payload":{good}}}"#);
            assert_eq!(payload(&run(&body, BodyKind::Single).unwrap(), 0).as_deref(), Some(good));
        }
    }

    #[test]
    fn generated_ids_are_uuid_v7() {
        let parsed = run(GOOD, BodyKind::Single).unwrap();
        let id = std::str::from_utf8(parsed.rows.event_id(0)).unwrap();
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
    }

    #[test]
    fn body_errors() {
        assert!(matches!(run("{", BodyKind::Single), Err(BodyError::Malformed(_))));
        assert_eq!(run(GOOD, BodyKind::JsonArray).unwrap_err(), BodyError::NotAnArray);
        assert_eq!(run("[]", BodyKind::JsonArray).unwrap_err(), BodyError::Empty);
        let many = format!("[{}]", vec![GOOD; 101].join(","));
        assert_eq!(run(&many, BodyKind::JsonArray).unwrap_err(), BodyError::TooManyEvents { limit: 100 });
        assert_eq!(run("\n \n", BodyKind::Ndjson).unwrap_err(), BodyError::Empty);
    }

    #[test]
    fn ndjson_indexes_count_records_not_blank_lines() {
        let body = format!("{GOOD}\n\n{{bad\n{GOOD}\n[1]\n");
        let parsed = run(&body, BodyKind::Ndjson).unwrap();
        assert_eq!(parsed.rows.len(), 2);
        let idx: Vec<_> = parsed.rejected.iter().map(|r| r.index).collect();
        assert_eq!(idx, [1, 3]);
        assert_eq!(parsed.rejected[0].error.kind, RejectKind::Malformed);
    }

    #[test]
    fn unknown_fields_can_be_allowed() {
        let mut p = Parser::new(Rules {
            max_events: 10,
            max_payload_bytes: 10,
            max_payload_depth: 8,
            max_future_skew_us: 0,
            allow_unknown_fields: true,
        });
        let body = r#"{"device_id":"d","x":{"y":[1,2]},"type":"t","ts":1767225600000}"#;
        let parsed = p.parse(body.as_bytes(), BodyKind::Single, Clock { now_unix_us: NOW }).unwrap();
        assert_eq!(parsed.rows.len(), 1, "{:?}", parsed.rejected);
    }

    #[test]
    fn the_working_bound_covers_the_rows_of_the_smallest_events() {
        // The smallest valid events, ids assigned by ingestd: rows outgrow the
        // JSON most.
        let ts = NOW / 1000;
        for count in [500, 7000] {
            for (kind, sep, open, close) in [(BodyKind::JsonArray, ",", "[", "]"), (BodyKind::Ndjson, "\n", "", "")] {
                let events: Vec<String> =
                    (0..count).map(|_| format!(r#"{{"device_id":"d","type":"t","ts":{ts}}}"#)).collect();
                let body = format!("{open}{}{close}", events.join(sep));
                let mut p = parser();
                p.set_rules(Rules { max_events: 10_000, ..*p.rules() });
                let parsed = p.parse(body.as_bytes(), kind, Clock { now_unix_us: NOW }).unwrap();
                assert_eq!(parsed.rows.len(), count);
                let rows = parsed.rows.bytes().len();
                let bound = working_bytes(body.as_bytes(), kind);
                assert!(working_bytes_unscanned(body.len()) >= bound);
                assert!(rows > body.len(), "rows outgrow this JSON: {rows} vs {}", body.len());
                // The body itself is already leased when this is asked for.
                assert!(bound >= rows + 64 * 1024, "{kind:?} x {count}: bound {bound} < rows {rows} + scratch");
            }
        }
    }
}
