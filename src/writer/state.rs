//! The latest state of every device (`[state] enabled`), written by the
//! writers in the same transaction as the batch's events.
//!
//! Why in the same transaction: state and events then never disagree. A
//! batch that rolls back (a unique violation sends it through staging, a
//! refused row sends it through isolation) rolls its state back too, and
//! whatever commits the events commits their state.
//!
//! How, per batch:
//! 1. Collapse in ingestd: the rows the batch really inserted (a re-sent
//!    duplicate is not new, so it neither counts nor moves the state) become
//!    one row per device: its newest event (greatest `ts`; on equal `ts` the
//!    later one in the batch), the earliest `received_at` as `first_seen`,
//!    and how many events it had. A fleet that reports every few seconds
//!    gives several events per device per batch; only one reaches SQL.
//! 2. COPY those rows (binary, the event's own encoded tuple plus two
//!    fields) into a temporary staging table.
//! 3. One set-based upsert, `INSERT … SELECT … ORDER BY device_id ON
//!    CONFLICT (device_id) DO UPDATE`, in which an event older than the stored
//!    state (a late arrival) adds to `events` and may lower `first_seen` but
//!    never replaces the newest event's fields.
//!
//! Deadlocks: two writers whose batches share devices lock the same state
//! rows. Both lock them in `device_id` order (the `ORDER BY` drives the
//! insert), so one waits for the other instead of each holding what the
//! other needs. The events table's own COPYs share no rows (distinct ids),
//! and re-sent ids are already taken in `event_id` order (see the writer).

use std::collections::HashMap;

use crate::row::{HEADER, TRAILER};

/// The staging stream for the rows `is_new` says a commit inserts, or
/// `None` when none of them is new. `rows` yields each row's encoded tuple,
/// its `event_id` and whether it was COPYed as clean, in batch order;
/// `is_new(event_id, clean)` is [`super::db::Committed::was_new`] (this
/// module sits below `db`, which holds its statements).
pub fn of_new_rows<'a>(
    rows: impl Iterator<Item = (&'a [u8], &'a [u8], bool)>,
    is_new: impl Fn(&[u8], bool) -> bool,
) -> Option<Vec<u8>> {
    let mut latest = Latest::default();
    for (tuple, event_id, clean) in rows {
        if is_new(event_id, clean) {
            latest.add(tuple);
        }
    }
    (!latest.is_empty()).then(|| latest.encode())
}

/// The statements for one state table.
#[derive(Debug, Clone)]
pub struct StateSql {
    /// The quoted table name.
    pub table: String,
    pub create_table: String,
    pub create_staging: String,
    pub copy_into_staging: String,
    pub upsert: String,
}

/// Columns of the staging table, in the order of the tuples [`Latest`]
/// encodes: an event's six fields, then `first_seen` and `events`.
const STAGING_COLUMNS: &str = "event_id, device_id, event_type, ts, received_at, payload, first_seen, events";

impl StateSql {
    /// `table` is validated by the config; it is quoted all the same.
    pub fn new(table: &str) -> Self {
        let quoted = crate::config::quote_table(table);
        let staging = format!("\"ingestd_state_staging_{}\"", table.replace('.', "_"));
        let newer = "excluded.ts >= s.ts";
        Self {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {quoted} (\n  \
                 device_id   text        PRIMARY KEY,\n  \
                 event_id    text        NOT NULL,\n  \
                 event_type  text        NOT NULL,\n  \
                 ts          timestamptz NOT NULL,\n  \
                 received_at timestamptz NOT NULL,\n  \
                 payload     jsonb,\n  \
                 first_seen  timestamptz NOT NULL,\n  \
                 events      bigint      NOT NULL\n)"
            ),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} (\
                 event_id text, device_id text, event_type text, ts timestamptz, received_at timestamptz, \
                 payload jsonb, first_seen timestamptz, events bigint) ON COMMIT DELETE ROWS"
            ),
            copy_into_staging: format!("COPY {staging} ({STAGING_COLUMNS}) FROM STDIN (FORMAT binary)"),
            upsert: format!(
                "INSERT INTO {quoted} AS s (device_id, event_id, event_type, ts, received_at, payload, first_seen, events) \
                 SELECT device_id, event_id, event_type, ts, received_at, payload, first_seen, events \
                 FROM {staging} ORDER BY device_id \
                 ON CONFLICT (device_id) DO UPDATE SET \
                 event_id = CASE WHEN {newer} THEN excluded.event_id ELSE s.event_id END, \
                 event_type = CASE WHEN {newer} THEN excluded.event_type ELSE s.event_type END, \
                 received_at = CASE WHEN {newer} THEN excluded.received_at ELSE s.received_at END, \
                 payload = CASE WHEN {newer} THEN excluded.payload ELSE s.payload END, \
                 ts = GREATEST(s.ts, excluded.ts), \
                 first_seen = LEAST(s.first_seen, excluded.first_seen), \
                 events = s.events + excluded.events"
            ),
            table: quoted,
        }
    }
}

/// One device's part of a batch.
struct Device<'a> {
    /// The newest event's encoded tuple.
    newest: &'a [u8],
    ts: i64,
    first_seen: i64,
    events: i64,
}

/// The batch collapsed to one row per device.
#[derive(Default)]
pub struct Latest<'a> {
    devices: HashMap<&'a [u8], Device<'a>, foldhash::fast::RandomState>,
}

impl<'a> Latest<'a> {
    /// Adds one inserted row (an encoded tuple, see [`crate::row`]), in batch
    /// order. A tuple that does not decode is skipped (rows are only ever
    /// written by `RowBuf::push`).
    pub fn add(&mut self, tuple: &'a [u8]) {
        let Some(f) = Fields::read(tuple) else { return };
        match self.devices.get_mut(f.device_id) {
            Some(d) => {
                if f.ts >= d.ts {
                    d.newest = tuple;
                    d.ts = f.ts;
                }
                d.first_seen = d.first_seen.min(f.received_at);
                d.events += 1;
            }
            None => {
                let device = Device { newest: tuple, ts: f.ts, first_seen: f.received_at, events: 1 };
                self.devices.insert(f.device_id, device);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Devices in the batch.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// The binary COPY stream for the staging table: each device's newest
    /// tuple with its field count raised to 8, then `first_seen` and
    /// `events`.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.devices.values().map(|d| d.newest.len() + 24).sum();
        let mut out = Vec::with_capacity(HEADER.len() + size + TRAILER.len());
        out.extend_from_slice(HEADER);
        for d in self.devices.values() {
            out.extend_from_slice(&8i16.to_be_bytes());
            out.extend_from_slice(d.newest.get(2..).unwrap_or_default());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&d.first_seen.to_be_bytes());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&d.events.to_be_bytes());
        }
        out.extend_from_slice(TRAILER);
        out
    }
}

/// What the collapse reads of a tuple.
struct Fields<'a> {
    device_id: &'a [u8],
    ts: i64,
    received_at: i64,
}

impl<'a> Fields<'a> {
    fn read(tuple: &'a [u8]) -> Option<Self> {
        let mut at = 2;
        let mut field = || -> Option<&'a [u8]> {
            let len = usize::try_from(i32::from_be_bytes(tuple.get(at..at + 4)?.try_into().ok()?)).ok()?;
            at += 4;
            let value = tuple.get(at..at + len)?;
            at += len;
            Some(value)
        };
        let _event_id = field()?;
        let device_id = field()?;
        let _event_type = field()?;
        let ts = i64::from_be_bytes(field()?.try_into().ok()?);
        let received_at = i64::from_be_bytes(field()?.try_into().ok()?);
        Some(Fields { device_id, ts, received_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{RowBuf, RowFields};

    fn rows(events: &[(&str, &str, i64, i64)]) -> RowBuf {
        let mut buf = RowBuf::default();
        for (id, device, ts, received) in events {
            buf.push(&RowFields {
                event_id: id.as_bytes(),
                device_id: device,
                event_type: "t",
                ts: *ts,
                received_at: *received,
                payload: Some(b"{}"),
            });
        }
        buf
    }

    /// Reads back the staging stream: (event_id, device, ts, first_seen, events).
    fn decode(stream: &[u8]) -> Vec<(String, String, i64, i64, i64)> {
        let mut out = Vec::new();
        let mut at = HEADER.len();
        while stream[at..at + 2] != *TRAILER {
            assert_eq!(i16::from_be_bytes([stream[at], stream[at + 1]]), 8);
            at += 2;
            let mut fields = Vec::new();
            for _ in 0..8 {
                let len = i32::from_be_bytes(stream[at..at + 4].try_into().unwrap());
                at += 4;
                let len = len.max(0) as usize;
                fields.push(stream[at..at + len].to_vec());
                at += len;
            }
            let int = |b: &[u8]| i64::from_be_bytes(b.try_into().unwrap());
            out.push((
                String::from_utf8(fields[0].clone()).unwrap(),
                String::from_utf8(fields[1].clone()).unwrap(),
                int(&fields[3]),
                int(&fields[6]),
                int(&fields[7]),
            ));
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    #[test]
    fn newest_per_device_with_counts() {
        let buf = rows(&[("e1", "a", 10, 100), ("e2", "b", 5, 101), ("e3", "a", 30, 102), ("e4", "a", 20, 99)]);
        let mut latest = Latest::default();
        (0..buf.len()).for_each(|i| latest.add(buf.row(i)));
        assert_eq!(latest.len(), 2);
        assert_eq!(
            decode(&latest.encode()),
            vec![("e3".into(), "a".into(), 30, 99, 3), ("e2".into(), "b".into(), 5, 101, 1)]
        );
    }

    #[test]
    fn equal_ts_later_in_batch_wins() {
        let buf = rows(&[("e1", "a", 10, 1), ("e2", "a", 10, 2)]);
        let mut latest = Latest::default();
        (0..buf.len()).for_each(|i| latest.add(buf.row(i)));
        assert_eq!(decode(&latest.encode())[0].0, "e2");
    }

    #[test]
    fn upsert_keeps_the_newest_and_locks_in_device_order() {
        let sql = StateSql::new("ingest.events_state");
        assert!(sql.upsert.contains("ORDER BY device_id"));
        assert!(sql.upsert.contains("\"ingest\".\"events_state\" AS s"));
        assert!(sql.create_staging.contains("\"ingestd_state_staging_ingest_events_state\""));
    }
}
