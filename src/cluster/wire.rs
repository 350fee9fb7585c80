//! One message on the bus: a header that lets every receiver account for
//! what it missed, then the batch's events in the form the broadcaster
//! already made for local subscribers (their JSON back to back, and the
//! `device_id`/`type` keys the shards filter on), so a receiver forwards the
//! text without parsing or re-serialising it.
//!
//! ```text
//! "IGF1" | u8 id_len | instance id | u64 seq | u64 events_before | i64 committed_unix_us | u32 n
//!        | n × (u32 json_len, u16 device_len, u16 type_len) | keys | text          (little-endian)
//! ```
//!
//! `seq` numbers an instance's messages (1, 2, …; heartbeats too);
//! `events_before` counts every event the instance committed before this
//! message's first, sent or not. A receiver that expected `events_before`
//! to be smaller missed exactly the difference, wherever it was lost (a full
//! queue here, a send that timed out, the bus down, or its own connection
//! down). A message with `n = 0` is a heartbeat: it carries the count when
//! no batch does, so gaps are found within a heartbeat interval.

use std::fmt;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::broadcast::CommittedBatch;
use crate::budget::Lease;

const MAGIC: &[u8; 4] = b"IGF1";
const FIXED: usize = 4 + 1 + 8 + 8 + 8 + 4;
const PER_EVENT: usize = 4 + 2 + 2;

/// What a message says about where it stands in its sender's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub instance: String,
    pub seq: u64,
    pub events_before: u64,
    pub committed_unix_us: i64,
    pub events: u32,
}

/// Why a message was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Not an ingestd feed message (another writer on the channel).
    NotOurs,
    /// Cut short or its lengths do not add up.
    Damaged(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::NotOurs => f.write_str("not an ingestd feed message"),
            WireError::Damaged(why) => write!(f, "damaged feed message: {why}"),
        }
    }
}

/// This instance's side of the stream: its id, and where its count stands.
pub struct Encoder {
    instance: String,
    seq: u64,
    events_before: u64,
}

impl Encoder {
    /// `instance` is at most 255 bytes (config checks 200).
    pub fn new(instance: &str) -> Encoder {
        let mut end = instance.len().min(255);
        while !instance.is_char_boundary(end) {
            end -= 1;
        }
        Encoder { instance: instance[..end].to_string(), seq: 0, events_before: 0 }
    }

    /// `events` committed here that will not be sent: the next message's
    /// count steps over them, so every receiver learns it missed them.
    pub fn skip(&mut self, events: u64) {
        self.events_before += events;
    }

    /// A message with no events, carrying the count.
    pub fn heartbeat(&mut self, now_unix_us: i64) -> Bytes {
        let mut out = BytesMut::with_capacity(FIXED + self.instance.len());
        self.header(&mut out, 0, now_unix_us);
        out.freeze()
    }

    /// The next message of `batch` from event `from` on: as many events as
    /// fit in `max` bytes (at least one), and the index after the last.
    pub fn chunk(&mut self, batch: &CommittedBatch, from: usize, committed_unix_us: i64, max: usize) -> (Bytes, usize) {
        let room = max.saturating_sub(FIXED + self.instance.len());
        let (mut size, mut end) = (0, from);
        for e in batch.events().skip(from) {
            let this = PER_EVENT + e.json.len() + e.device_id.len() + e.event_type.len();
            if end > from && size + this > room {
                break;
            }
            size += this;
            end += 1;
        }
        let mut out = BytesMut::with_capacity(FIXED + self.instance.len() + size);
        let n = end - from;
        self.header(&mut out, n as u32, committed_unix_us);
        let events = || batch.events().skip(from).take(n);
        for e in events() {
            out.put_u32_le(e.json.len() as u32);
            // Validated ids and types are far shorter than 64 KiB.
            out.put_u16_le(e.device_id.len().min(u16::MAX as usize) as u16);
            out.put_u16_le(e.event_type.len().min(u16::MAX as usize) as u16);
        }
        for e in events() {
            out.put_slice(&e.device_id.as_bytes()[..e.device_id.len().min(u16::MAX as usize)]);
            out.put_slice(&e.event_type.as_bytes()[..e.event_type.len().min(u16::MAX as usize)]);
        }
        for e in events() {
            out.put_slice(e.json);
        }
        self.events_before += n as u64;
        (out.freeze(), end)
    }

    fn header(&mut self, out: &mut BytesMut, events: u32, unix_us: i64) {
        self.seq += 1;
        out.put_slice(MAGIC);
        out.put_u8(self.instance.len() as u8);
        out.put_slice(self.instance.as_bytes());
        out.put_u64_le(self.seq);
        out.put_u64_le(self.events_before);
        out.put_i64_le(unix_us);
        out.put_u32_le(events);
    }
}

/// Whether `msg` is one of `instance`'s own (read before anything is copied).
pub fn is_from(msg: &[u8], instance: &str) -> bool {
    let id = instance.as_bytes();
    msg.len() > 5 + id.len() && msg.starts_with(MAGIC) && msg[4] as usize == id.len() && &msg[5..5 + id.len()] == id
}

/// Reads a message's header; the offset where its index starts.
pub fn header(msg: &[u8]) -> Result<(Header, usize), WireError> {
    let rest = msg.strip_prefix(MAGIC).ok_or(WireError::NotOurs)?;
    let (&id_len, rest) = rest.split_first().ok_or(WireError::Damaged("no instance id"))?;
    let id_len = id_len as usize;
    if rest.len() < id_len + FIXED - 5 {
        return Err(WireError::Damaged("header cut short"));
    }
    let instance =
        std::str::from_utf8(&rest[..id_len]).map_err(|_| WireError::Damaged("instance id is not UTF-8"))?.to_string();
    let rest = &rest[id_len..];
    let u64_at = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().unwrap_or_default());
    let header = Header {
        instance,
        seq: u64_at(0),
        events_before: u64_at(8),
        committed_unix_us: u64_at(16) as i64,
        events: u32::from_le_bytes(rest[24..28].try_into().unwrap_or_default()),
    };
    Ok((header, FIXED + id_len))
}

/// The events of a message whose header said `events`, as a batch for
/// local subscribers (its text shares the message's bytes).
pub fn batch(
    msg: &Bytes,
    header: &Header,
    at: usize,
    committed_at: Instant,
    lease: Lease,
) -> Result<CommittedBatch, WireError> {
    let n = header.events as usize;
    let index_end = n.checked_mul(PER_EVENT).and_then(|i| i.checked_add(at)).filter(|e| *e <= msg.len());
    let index_end = index_end.ok_or(WireError::Damaged("index cut short"))?;
    let lens: Vec<(u32, u16, u16)> = msg[at..index_end]
        .chunks_exact(PER_EVENT)
        .map(|c| {
            (
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                u16::from_le_bytes([c[4], c[5]]),
                u16::from_le_bytes([c[6], c[7]]),
            )
        })
        .collect();
    let keys_len: usize = lens.iter().map(|(_, d, t)| *d as usize + *t as usize).sum();
    let keys_end =
        index_end.checked_add(keys_len).filter(|e| *e <= msg.len()).ok_or(WireError::Damaged("keys cut short"))?;
    let keys = std::str::from_utf8(&msg[index_end..keys_end]).map_err(|_| WireError::Damaged("keys are not UTF-8"))?;
    CommittedBatch::from_wire(msg.slice(keys_end..), keys.to_string(), lens.into_iter(), committed_at, lease)
        .ok_or(WireError::Damaged("lengths do not match the text"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcast::Published;
    use crate::row::{RowBuf, RowFields};

    fn committed(n: usize) -> CommittedBatch {
        let mut rows = RowBuf::default();
        for i in 0..n {
            let id = format!("e{i}");
            rows.push(&RowFields {
                event_id: id.as_bytes(),
                device_id: &format!("dév-{}", i % 3),
                event_type: "t",
                ts: i as i64,
                received_at: 0,
                payload: Some(b"{\"x\":\"\xc3\xa9\"}"),
            });
        }
        CommittedBatch::build(&Published::new(vec![rows], None, Instant::now()))
    }

    fn roundtrip(msg: &Bytes) -> (Header, CommittedBatch) {
        let (h, at) = header(msg).unwrap();
        assert!(is_from(msg, &h.instance) && !is_from(msg, "node-b") && !is_from(msg, ""));
        let b = batch(msg, &h, at, Instant::now(), Lease::detached()).unwrap();
        (h, b)
    }

    #[test]
    fn a_batch_crosses_the_wire_byte_for_byte() {
        let sent = committed(5);
        let mut enc = Encoder::new("node-a");
        let (msg, next) = enc.chunk(&sent, 0, 42, 1 << 20);
        assert_eq!(next, 5);
        let (h, got) = roundtrip(&msg);
        assert_eq!(h, Header { instance: "node-a".into(), seq: 1, events_before: 0, committed_unix_us: 42, events: 5 });
        let pairs: Vec<_> = sent.events().zip(got.events()).collect();
        assert_eq!(pairs.len(), 5);
        for (a, b) in pairs {
            assert_eq!((a.device_id, a.event_type, a.json), (b.device_id, b.event_type, b.json));
        }
    }

    #[test]
    fn big_batches_split_and_the_count_runs_on_across_skips_and_heartbeats() {
        let sent = committed(10);
        let one = sent.events().next().map(|e| e.json.len() + 20).unwrap();
        let mut enc = Encoder::new("a");
        let max = FIXED + 1 + 3 * one;
        let (m1, i) = enc.chunk(&sent, 0, 0, max);
        let (m2, j) = enc.chunk(&sent, i, 0, max);
        assert!(i >= 2 && j > i, "split into several messages: {i} {j}");
        assert!(m1.len() <= max && m2.len() <= max);
        enc.skip((10 - j) as u64);
        let hb = enc.heartbeat(7);
        let (h1, b1) = roundtrip(&m1);
        let (h2, _) = roundtrip(&m2);
        let (h3, b3) = roundtrip(&hb);
        assert_eq!((h1.seq, h1.events_before, b1.len()), (1, 0, i));
        assert_eq!((h2.seq, h2.events_before), (2, i as u64));
        assert_eq!((h3.seq, h3.events_before, h3.events, b3.len()), (3, 10, 0, 0));
        let (_, at) = enc.chunk(&sent, 0, 0, 10);
        assert_eq!(at, 1, "an event larger than the bound goes alone");
    }

    #[test]
    fn foreign_and_damaged_messages_are_refused_without_panics() {
        assert_eq!(header(b"hello").unwrap_err(), WireError::NotOurs);
        let mut enc = Encoder::new("a");
        let (msg, _) = enc.chunk(&committed(3), 0, 0, 1 << 20);
        for cut in 0..msg.len() {
            let short = msg.slice(..cut);
            if let Ok((h, at)) = header(&short) {
                assert!(batch(&short, &h, at, Instant::now(), Lease::detached()).is_err(), "cut at {cut}");
            }
        }
        let mut bad = msg.to_vec();
        let last = bad.len() - 3;
        bad[last] = 0xff; // not UTF-8 inside the text
        let bad = Bytes::from(bad);
        let (h, at) = header(&bad).unwrap();
        assert!(batch(&bad, &h, at, Instant::now(), Lease::detached()).is_err());
    }
}
