//! Readers: the latest state of devices (`[state]`), read from PostgreSQL
//! for the shards, on connections of their own.
//!
//! Shards must never block, and a read is a round trip to PostgreSQL; so a
//! few `reader-{n}` threads (`state.readers`) do the reading, each holding
//! at most one connection of a pool of their own (size = `state.readers`).
//! A writer's connection is never used: a slow page of devices cannot delay
//! a commit, and a stalled COPY cannot hold up a read.
//!
//! The path of one read, and the bound on each step:
//!
//! 1. The shard leases the answer's bytes from the memory budget
//!    (`limit` × a row's bound, at most `state.max_answer_bytes`), then
//!    [`Readers::try_submit`]s the query: a bounded `crossbeam-channel`
//!    queue ([`QUEUE_PER_READER`] per reader), `try_send`, a full queue is a
//!    503 at once (`ingestd_requests_shed_total{reason="readers_busy"}`).
//! 2. It awaits the answer on a `futures-channel` oneshot, the same
//!    mechanism as a writer's commit report (monoio is woken from the
//!    reader thread), racing the request's deadline (`state.read_timeout_ms`);
//!    past it the client gets 503 (`reason="read_timeout"`) and the dropped
//!    receiver tells the reader not to bother.
//! 3. The reader skips a query whose shard gave up or whose deadline has
//!    passed, takes a connection within what is left of the deadline, and
//!    runs the query in a transaction begun by [`Tx::begin`] with
//!    `SET LOCAL statement_timeout` = what is left: PostgreSQL cancels it
//!    when the shard would stop waiting anyway. The statement is prepared,
//!    streamed and dropped inside that transaction, so PgBouncer in
//!    transaction mode keeps working (see `writer::db`).
//! 4. Rows are rendered to JSON as they stream in; a page ends early when
//!    the next row would pass the leased bytes (its `next` cursor says where
//!    to go on), so an answer holds at most the lease, or one row when a
//!    single row is larger (the lease then grows for it, or the read is
//!    refused as over budget).
//!
//! Read failures are answered (503 when a retry may help) but are not fed
//! to the writers' breaker: the probe keeps the database's health current,
//! and a shard refuses reads while the breaker is open, as it does ingest.
//!
//! # One query type for pages and for snapshots
//!
//! [`Query::Page`] takes a [`DeviceFilter`]: devices named exactly, device
//! id prefixes, event types, `since` (on the state's `ts`), a keyset cursor
//! `after` (exclusive) and a `limit`. `GET /devices` uses a prefix, since,
//! after and limit; a WebSocket snapshot (a subscriber first receiving the
//! current state of what it subscribed to) is the same query with its
//! devices, prefixes and types, paged with `after` = the last device of the
//! previous page. Answers come as [`Answer`]: the rendered HTTP body plus
//! the byte range of each device's JSON object inside it, so a snapshot can
//! send the objects one by one without re-rendering.
//!
//! # Ordering and indexes
//!
//! Pages are in byte order of `device_id` (`COLLATE "C"`, the state table's
//! column collation, see `writer::state`), so that the primary key index
//! serves the keyset (`device_id > $after … ORDER BY device_id LIMIT n`)
//! and a prefix is an index range `[prefix, successor(prefix))` rather than
//! a `LIKE` whose metacharacters would need escaping and which needs a
//! `text_pattern_ops` index under other collations. Every value is a bound
//! parameter; the SQL text depends only on which filters are present.

use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use futures_channel::oneshot;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

use crate::budget::Lease;
use crate::writer::db::{self, Pool, Tx, WriteError};

/// Queries that may wait per reader thread; beyond them a read is 503.
pub const QUEUE_PER_READER: usize = 32;

/// JSON bytes one device's state takes besides its payload: the ids (128
/// bytes each, escaped up to 6×), type, three timestamps, the count, keys.
pub const ROW_OVERHEAD_BYTES: usize = 2 * 1024;

/// Which devices' state to read: every present filter must hold; devices
/// and prefixes together mean "any of these devices, or any device under
/// one of these prefixes". Empty lists and `None` filter nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Exact `device_id`s.
    pub devices: Vec<String>,
    /// `device_id` prefixes (an empty prefix is all devices).
    pub prefixes: Vec<String>,
    /// The newest event's `type`.
    pub types: Vec<String>,
    /// Only devices whose newest event's `ts` is at or after this.
    pub since: Option<SystemTime>,
    /// Keyset cursor: only devices after this `device_id` (exclusive).
    pub after: Option<String>,
    /// Most devices in the page (at least 1).
    pub limit: usize,
}

/// One read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// One device by id: its state object, or not found.
    Device(String),
    /// A page of devices in `device_id` order.
    Page(DeviceFilter),
}

/// What a read found.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP body: for [`Query::Device`] the device's object, for
    /// [`Query::Page`] `{"devices":[…],"next":…}`.
    pub body: String,
    /// Each device in `body`, in order.
    pub items: Vec<Item>,
    /// [`Query::Page`]: the cursor for the next page (`after`), `None` at
    /// the end.
    pub next: Option<String>,
    /// `body`'s bytes in the memory budget; drop it with the body.
    pub lease: Lease,
}

/// One device in an [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub device_id: String,
    /// The `event_id` of the device's newest event (what a snapshot
    /// recognises in the live feed).
    pub event_id: String,
    /// Its JSON object's bytes in [`Answer::body`].
    pub json: Range<usize>,
}

impl Answer {
    /// The JSON object of `item`.
    pub fn object(&self, item: &Item) -> &str {
        self.body.get(item.json.clone()).unwrap_or_default()
    }
}

/// Why a read has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The database could not answer now (down, timed out, no connection):
    /// 503, a retry may help.
    Unavailable(String),
    /// PostgreSQL refused the query (a missing table or privilege): 500.
    Failed(String),
    /// One device's state is larger than what the memory budget has left.
    OverBudget(&'static str),
    /// The deadline passed before a reader took the query.
    Expired,
}

/// `Ok(None)`: [`Query::Device`] found no such device.
pub type ReadOutcome = Result<Option<Answer>, ReadError>;

/// What a shard awaits.
pub type ReadWait = oneshot::Receiver<ReadOutcome>;

/// One query on its way to a reader.
struct ReadRequest {
    query: Query,
    deadline: Instant,
    lease: Lease,
    reply: oneshot::Sender<ReadOutcome>,
}

/// Why a query was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every reader is busy and the queue is full: 503.
    Busy,
    /// The readers are gone (shutting down): 503.
    Closed,
}

/// The shards' handle on the readers. Cloned once per shard; when every
/// clone is gone the readers finish what is queued and return.
#[derive(Clone)]
pub struct Readers {
    queue: Sender<ReadRequest>,
}

impl Readers {
    /// Queues `query` without blocking. `lease` holds the answer's expected
    /// bytes and travels with it; `deadline` is when the shard stops waiting.
    pub fn try_submit(&self, query: Query, deadline: Instant, lease: Lease) -> Result<ReadWait, Refused> {
        let (reply, wait) = oneshot::channel();
        match self.queue.try_send(ReadRequest { query, deadline, lease, reply }) {
            Ok(()) => Ok(wait),
            Err(TrySendError::Full(_)) => Err(Refused::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Closed),
        }
    }

    /// Queries waiting for a reader.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }
}

/// Starts `readers` threads named `reader-{n}` on `pool` (which should hold
/// `readers` connections), reading the state table `table` (unquoted).
pub fn start(readers: usize, pool: Pool, table: &str) -> std::io::Result<(Readers, Vec<JoinHandle<()>>)> {
    let (queue, taken) = crossbeam_channel::bounded(readers.max(1) * QUEUE_PER_READER);
    let table: Arc<str> = db::quote_table(table).into();
    let mut threads = Vec::with_capacity(readers);
    for id in 0..readers.max(1) {
        let (taken, pool, table) = (taken.clone(), pool.clone(), table.clone());
        threads.push(
            std::thread::Builder::new().name(format!("reader-{id}")).spawn(move || serve(&taken, &pool, &table))?,
        );
    }
    Ok((Readers { queue }, threads))
}

/// A reader's loop: until every shard has dropped its [`Readers`].
fn serve(taken: &Receiver<ReadRequest>, pool: &Pool, table: &str) {
    while let Ok(ReadRequest { query, deadline, lease, reply }) = taken.recv() {
        if reply.is_canceled() {
            continue;
        }
        let outcome = if Instant::now() >= deadline {
            Err(ReadError::Expired)
        } else {
            read(pool, table, &query, deadline, lease)
        };
        let _gone = reply.send(outcome);
    }
}

/// What is left until `deadline`, at least 1 ms.
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn read(pool: &Pool, table: &str, query: &Query, deadline: Instant, lease: Lease) -> ReadOutcome {
    let mut client =
        pool.get_timeout(left(deadline)).map_err(|e| ReadError::Unavailable(format!("no database connection: {e}")))?;
    let mut tx = Tx::begin(&mut client, left(deadline).as_millis() as u64).map_err(classify)?;
    let (sql, params) = match query {
        Query::Device(id) => (device_sql(table), vec![Param::Text(id.clone())]),
        Query::Page(filter) => page_sql(table, filter),
    };
    let mut out = Render::new(query, lease);
    {
        // The statement is prepared here and closed when `rows` drops,
        // before the COMMIT (PgBouncer, see `writer::db`).
        let mut rows = tx.query_raw(sql.as_str(), params.iter().map(Param::as_sql)).map_err(classify)?;
        while let Some(row) = rows.next().map_err(classify)? {
            if !out.push(&row)? {
                break;
            }
        }
    }
    tx.commit().map_err(classify)?;
    Ok(out.finish())
}

fn classify(e: postgres::Error) -> ReadError {
    match WriteError::from(e) {
        WriteError::Permanent(m) => ReadError::Failed(m),
        WriteError::Transient(m) | WriteError::Conflict(m) => ReadError::Unavailable(m),
    }
}

/// A bound parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    Text(String),
    TextArray(Vec<String>),
    Time(SystemTime),
    Int(i64),
}

impl Param {
    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::TextArray(v) => v,
            Param::Time(v) => v,
            Param::Int(v) => v,
        }
    }
}

const SELECT: &str = "SELECT device_id, event_id, event_type, ts, received_at, payload::text, first_seen, events";

/// One device by its primary key.
pub fn device_sql(table: &str) -> String {
    format!("{SELECT} FROM {table} WHERE device_id = $1")
}

/// A page: the filter's conditions, in `device_id` byte order, `limit + 1`
/// rows (the extra one only says whether there is a next page). `table` is
/// quoted.
pub fn page_sql(table: &str, f: &DeviceFilter) -> (String, Vec<Param>) {
    const ID: &str = "device_id COLLATE \"C\"";
    let mut params = Vec::new();
    let next = |p: Param, params: &mut Vec<Param>| {
        params.push(p);
        format!("${}", params.len())
    };
    let mut conditions = Vec::new();
    if let Some(after) = &f.after {
        conditions.push(format!("{ID} > {}", next(Param::Text(after.clone()), &mut params)));
    }
    let mut any = Vec::new();
    if !f.devices.is_empty() {
        any.push(format!("device_id = ANY({})", next(Param::TextArray(f.devices.clone()), &mut params)));
    }
    let all_devices = f.prefixes.iter().any(String::is_empty);
    for prefix in f.prefixes.iter().filter(|_| !all_devices) {
        let from = next(Param::Text(prefix.clone()), &mut params);
        match successor(prefix) {
            Some(upto) => any.push(format!("({ID} >= {from} AND {ID} < {})", next(Param::Text(upto), &mut params))),
            None => any.push(format!("{ID} >= {from}")),
        }
    }
    if !any.is_empty() && !all_devices {
        conditions.push(if any.len() == 1 { any.remove(0) } else { format!("({})", any.join(" OR ")) });
    }
    if !f.types.is_empty() {
        conditions.push(format!("event_type = ANY({})", next(Param::TextArray(f.types.clone()), &mut params)));
    }
    if let Some(since) = f.since {
        conditions.push(format!("ts >= {}", next(Param::Time(since), &mut params)));
    }
    let limit = next(Param::Int(f.limit.max(1) as i64 + 1), &mut params);
    let filter = if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) };
    (format!("{SELECT} FROM {table}{filter} ORDER BY {ID} LIMIT {limit}"), params)
}

/// The least string greater than every string that starts with `prefix`,
/// in byte (code point) order: the last character that can be incremented
/// is, and what follows it goes. `None` when there is none (every
/// character is U+10FFFF): no upper bound.
pub fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut code = u32::from(last) + 1;
        if (0xD800..0xE000).contains(&code) {
            code = 0xE000;
        }
        if let Some(c) = char::from_u32(code) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Renders rows into an answer's body within its lease.
struct Render {
    page: bool,
    limit: usize,
    body: String,
    items: Vec<Item>,
    /// A row past `limit`, or one that did not fit: there is a next page.
    more: bool,
    lease: Lease,
}

impl Render {
    fn new(query: &Query, lease: Lease) -> Render {
        let (page, limit) = match query {
            Query::Device(_) => (false, 1),
            Query::Page(f) => (true, f.limit.max(1)),
        };
        let mut body = String::with_capacity(lease.bytes().min(64 * 1024));
        if page {
            body.push_str("{\"devices\":[");
        }
        Render { page, limit, body, items: Vec::new(), more: false, lease }
    }

    /// Adds a row; `Ok(false)` when the page is complete.
    fn push(&mut self, row: &postgres::Row) -> Result<bool, ReadError> {
        if self.items.len() == self.limit {
            self.more = true;
            return Ok(false);
        }
        let (device_id, event_id, object) = object_json(row).map_err(classify)?;
        // Room for the object, its comma and the page's closing part.
        let needed = self.body.len() + object.len() + 1 + ROW_OVERHEAD_BYTES;
        if needed > self.lease.bytes() {
            if !self.items.is_empty() {
                self.more = true;
                return Ok(false);
            }
            self.lease.try_resize(needed).map_err(|e| ReadError::OverBudget(e.key))?;
        }
        if !self.items.is_empty() {
            self.body.push(',');
        }
        let start = self.body.len();
        self.body.push_str(&object);
        self.items.push(Item { device_id, event_id, json: start..self.body.len() });
        Ok(true)
    }

    fn finish(mut self) -> Option<Answer> {
        let next = if self.more { self.items.last().map(|i| i.device_id.clone()) } else { None };
        if self.page {
            self.body.push_str("],\"next\":");
            self.body.push_str(&next.as_deref().map_or_else(|| "null".to_string(), json_string));
            self.body.push('}');
        } else if self.items.is_empty() {
            return None;
        }
        self.lease.set(self.body.capacity());
        Some(Answer { body: self.body, items: self.items, next, lease: self.lease })
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// One state row as JSON: the event as the WebSocket feed sends it
/// (`event_id`, `device_id`, `type`, `ts`, `received_at`, `payload` when
/// not null) plus `first_seen` and `events`.
/// Returns the device's id, its newest event's id and the object.
fn object_json(row: &postgres::Row) -> Result<(String, String, String), postgres::Error> {
    let device_id: &str = row.try_get(0)?;
    let event_id: &str = row.try_get(1)?;
    let event_type: &str = row.try_get(2)?;
    let ts: SystemTime = row.try_get(3)?;
    let received_at: SystemTime = row.try_get(4)?;
    let payload: Option<&str> = row.try_get(5)?;
    let first_seen: SystemTime = row.try_get(6)?;
    let events: i64 = row.try_get(7)?;
    let mut s = String::with_capacity(256 + payload.map_or(0, str::len));
    s.push_str("{\"event_id\":");
    s.push_str(&json_string(event_id));
    s.push_str(",\"device_id\":");
    s.push_str(&json_string(device_id));
    s.push_str(",\"type\":");
    s.push_str(&json_string(event_type));
    s.push_str(",\"ts\":\"");
    s.push_str(&rfc3339(ts));
    s.push_str("\",\"received_at\":\"");
    s.push_str(&rfc3339(received_at));
    s.push('"');
    if let Some(p) = payload {
        s.push_str(",\"payload\":");
        s.push_str(p);
    }
    s.push_str(",\"first_seen\":\"");
    s.push_str(&rfc3339(first_seen));
    s.push_str("\",\"events\":");
    s.push_str(&events.to_string());
    s.push('}');
    Ok((device_id.to_string(), event_id.to_string(), s))
}

/// As the WebSocket feed formats timestamps: RFC 3339 in UTC (`Z`), with
/// as many fraction digits as the value needs.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter() -> DeviceFilter {
        DeviceFilter { limit: 10, ..DeviceFilter::default() }
    }

    #[test]
    fn the_successor_bounds_every_string_with_the_prefix() {
        assert_eq!(successor("fleet-7/").as_deref(), Some("fleet-70"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(successor("\u{10FFFF}"), None);
        for s in ["fleet-7/", "fleet-7/\u{10FFFF}", "fleet-7/zzz"] {
            assert!(s >= "fleet-7/" && s < successor("fleet-7/").unwrap().as_str(), "{s}");
        }
        assert!("fleet-70" >= successor("fleet-7/").unwrap().as_str());
    }

    #[test]
    fn a_plain_page_is_an_ordered_keyset_scan() {
        let (sql, params) = page_sql("\"t\"", &filter());
        assert_eq!(sql, format!("{SELECT} FROM \"t\" ORDER BY device_id COLLATE \"C\" LIMIT $1"));
        assert_eq!(params, [Param::Int(11)]);
    }

    #[test]
    fn every_filter_is_a_bound_parameter() {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let f = DeviceFilter {
            devices: vec!["x'; DROP TABLE t; --".into()],
            prefixes: vec!["a%_".into()],
            types: vec!["gps".into()],
            since: Some(since),
            after: Some("a%_1".into()),
            limit: 3,
        };
        let (sql, params) = page_sql("\"t\"", &f);
        assert_eq!(
            sql,
            format!(
                "{SELECT} FROM \"t\" WHERE device_id COLLATE \"C\" > $1 AND (device_id = ANY($2) OR \
                 (device_id COLLATE \"C\" >= $3 AND device_id COLLATE \"C\" < $4)) AND event_type = ANY($5) \
                 AND ts >= $6 ORDER BY device_id COLLATE \"C\" LIMIT $7"
            )
        );
        assert!(!sql.contains("DROP") && !sql.contains('%'));
        assert_eq!(params[3], Param::Text("a%`".into()));
        assert_eq!(params[6], Param::Int(4));
    }

    #[test]
    fn an_empty_prefix_is_every_device() {
        let f = DeviceFilter { prefixes: vec!["p".into(), String::new()], devices: vec!["d".into()], ..filter() };
        assert!(!page_sql("t", &f).0.contains("WHERE"));
    }

    #[test]
    fn a_full_queue_is_refused_at_once_and_a_closed_one_says_so() {
        let (queue, taken) = crossbeam_channel::bounded(1);
        let readers = Readers { queue };
        let far = Instant::now() + Duration::from_secs(60);
        let _first = readers.try_submit(Query::Device("a".into()), far, Lease::detached()).unwrap();
        assert_eq!(readers.depth(), 1);
        let busy = readers.try_submit(Query::Device("b".into()), far, Lease::detached());
        assert_eq!(busy.err(), Some(Refused::Busy));
        drop(taken);
        let closed = readers.try_submit(Query::Device("c".into()), far, Lease::detached());
        assert_eq!(closed.err(), Some(Refused::Closed));
    }

    #[test]
    fn timestamps_match_the_feed() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_767_225_600_123_000);
        assert_eq!(rfc3339(t), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)), "2026-01-01T00:00:00Z");
    }
}
