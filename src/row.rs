//! The row format every stage passes along: an accepted event as a
//! PostgreSQL binary COPY tuple. Pure, no I/O.
//!
//! Shards encode each accepted event straight into COPY tuple bytes, so a
//! writer thread only concatenates buffers into the COPY stream: the per-row
//! encoding cost (≈ 1 µs) is spread over all shard cores instead of sitting
//! on the writer. Each request's rows live in one contiguous [`RowBuf`],
//! which is what the ring, the spool, the writers and the broadcaster carry;
//! so this module sits below all of them (it imports nothing of ingestd).
//!
//! Tuple layout (the SPEC table, without its defaulted column `received_at`
//! which is filled explicitly so that it means "received by ingestd"):
//! `event_id text, device_id text, event_type text, ts timestamptz,
//! received_at timestamptz, payload jsonb`.

use std::ops::Range;

/// The columns every encoded row fills, in order.
pub const COLUMNS: &str = "event_id, device_id, event_type, ts, received_at, payload";

/// Binary COPY signature, flags and header-extension length.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// File trailer: a tuple field count of -1.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
pub const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Microseconds since the PostgreSQL epoch: timestamptz's binary value.
pub type PgMicros = i64;

/// Converts Unix microseconds to PostgreSQL microseconds.
pub const fn pg_micros_from_unix_micros(unix_us: i64) -> PgMicros {
    unix_us - PG_EPOCH_UNIX_SECS * 1_000_000
}

/// The values of one row, borrowed from the request that carried it.
#[derive(Debug, Clone, Copy)]
pub struct RowFields<'a> {
    pub event_id: &'a [u8],
    pub device_id: &'a str,
    pub event_type: &'a str,
    pub ts: PgMicros,
    pub received_at: PgMicros,
    /// JSON text of the payload; `None` stores SQL NULL.
    pub payload: Option<&'a [u8]>,
}

/// Encoded COPY tuples of one request, back to back, and where each starts.
///
/// The event id of a row is its first field, so it can be read back from the
/// bytes (for de-duplication) without storing it twice.
#[derive(Debug, Default)]
pub struct RowBuf {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl RowBuf {
    pub fn with_capacity(bytes: usize, rows: usize) -> Self {
        Self { bytes: Vec::with_capacity(bytes), ends: Vec::with_capacity(rows) }
    }

    /// Appends one tuple.
    pub fn push(&mut self, row: &RowFields<'_>) {
        let out = &mut self.bytes;
        out.reserve(
            2 + 6 * 4
                + row.event_id.len()
                + row.device_id.len()
                + row.event_type.len()
                + 16
                + 1
                + row.payload.map_or(0, <[u8]>::len),
        );
        out.extend_from_slice(&6i16.to_be_bytes());
        put_field(out, row.event_id);
        put_field(out, row.device_id.as_bytes());
        put_field(out, row.event_type.as_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&row.ts.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&row.received_at.to_be_bytes());
        match row.payload {
            Some(json) => {
                // jsonb binary format: version byte 1, then the JSON text.
                out.extend_from_slice(&field_len(json.len() + 1).to_be_bytes());
                out.push(1);
                out.extend_from_slice(json);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Heap bytes this buffer holds (what it costs against the memory budget).
    pub fn memory_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<u32>()
    }

    /// Gives back spare capacity when it is worth a copy (more than 64 KiB and
    /// an eighth of what is used): a waiting request holds only its rows.
    pub fn shrink(&mut self) {
        let spare = self.bytes.capacity() - self.bytes.len();
        if spare > 64 * 1024 && spare > self.bytes.len() / 8 {
            self.bytes.shrink_to_fit();
        }
        if self.ends.capacity() - self.ends.len() > 16 * 1024 {
            self.ends.shrink_to_fit();
        }
    }

    /// All tuples, ready to be written between [`HEADER`] and [`TRAILER`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Byte range of row `i`.
    pub fn row_range(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        start..self.ends[i] as usize
    }

    /// Tuple bytes of row `i`.
    pub fn row(&self, i: usize) -> &[u8] {
        &self.bytes[self.row_range(i)]
    }

    /// The event id of row `i`, read back from its first field.
    pub fn event_id(&self, i: usize) -> &[u8] {
        let row = self.row(i);
        let len = i32::from_be_bytes([row[2], row[3], row[4], row[5]]) as usize;
        &row[6..6 + len]
    }
}

/// The fields of one encoded row, read back (for broadcasting committed rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowView<'a> {
    pub event_id: &'a [u8],
    pub device_id: &'a [u8],
    pub event_type: &'a [u8],
    pub ts: PgMicros,
    pub received_at: PgMicros,
    /// JSON text (without jsonb's version byte), or `None` for SQL NULL.
    pub payload: Option<&'a [u8]>,
}

impl RowBuf {
    /// Decodes row `i`. Rows are only ever written by [`RowBuf::push`], so
    /// the layout is known; a malformed row yields `None` rather than a panic.
    pub fn view(&self, i: usize) -> Option<RowView<'_>> {
        let row = self.row(i);
        let mut at = 2;
        let mut field = || -> Option<Option<&[u8]>> {
            let len = i32::from_be_bytes(row.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            if len < 0 {
                return Some(None);
            }
            let value = row.get(at..at + len as usize)?;
            at += len as usize;
            Some(Some(value))
        };
        let event_id = field()??;
        let device_id = field()??;
        let event_type = field()??;
        let ts = i64::from_be_bytes(field()??.try_into().ok()?);
        let received_at = i64::from_be_bytes(field()??.try_into().ok()?);
        let payload = field()?.map(|p| p.get(1..).unwrap_or_default());
        Some(RowView { event_id, device_id, event_type, ts, received_at, payload })
    }
}

impl RowBuf {
    /// The rows as one spool record: row count, row ends (u32, little
    /// endian), then the tuples.
    pub fn to_spool_record(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.ends.len() * 4 + self.bytes.len());
        out.extend_from_slice(&(self.ends.len() as u32).to_le_bytes());
        for end in &self.ends {
            out.extend_from_slice(&end.to_le_bytes());
        }
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Reads a record written by [`RowBuf::to_spool_record`]; `None` if it
    /// is not one (the spool checksums records, so this means a bug).
    pub fn from_spool_record(record: &[u8]) -> Option<RowBuf> {
        let count = u32::from_le_bytes(record.get(..4)?.try_into().ok()?) as usize;
        let table = record.get(4..4 + count.checked_mul(4)?)?;
        let ends: Vec<u32> = table.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let bytes = record.get(4 + count * 4..)?.to_vec();
        let ordered = ends.windows(2).all(|w| w[0] <= w[1]);
        (ordered && ends.last().map_or(bytes.is_empty(), |&e| e as usize == bytes.len()))
            .then_some(RowBuf { bytes, ends })
    }
}

fn field_len(len: usize) -> i32 {
    // Every field is bounded by validation far below 2 GiB.
    i32::try_from(len).unwrap_or(i32::MAX)
}

fn put_field(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&field_len(value.len()).to_be_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_row_bytes() {
        let mut rows = RowBuf::default();
        rows.push(&RowFields {
            event_id: b"e1",
            device_id: "d",
            event_type: "t",
            ts: 1,
            received_at: 2,
            payload: Some(b"{}"),
        });
        let expected: Vec<u8> = [
            &[0, 6][..],
            &[0, 0, 0, 2],
            b"e1",
            &[0, 0, 0, 1],
            b"d",
            &[0, 0, 0, 1],
            b"t",
            &[0, 0, 0, 8],
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 8],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 3],
            &[1],
            b"{}",
        ]
        .concat();
        assert_eq!(rows.bytes(), &expected[..]);
        assert_eq!(rows.event_id(0), b"e1");
    }

    #[test]
    fn spool_records_round_trip() {
        let mut rows = RowBuf::default();
        for id in [&b"a"[..], b"bb"] {
            rows.push(&RowFields {
                event_id: id,
                device_id: "d",
                event_type: "t",
                ts: 1,
                received_at: 2,
                payload: Some(b"{}"),
            });
        }
        let back = RowBuf::from_spool_record(&rows.to_spool_record()).unwrap();
        assert_eq!((back.len(), back.bytes()), (2, rows.bytes()));
        assert_eq!(back.event_id(1), b"bb");
        assert!(RowBuf::from_spool_record(b"\x05\0\0\0").is_none());
        assert!(RowBuf::from_spool_record(&RowBuf::default().to_spool_record()).is_some_and(|r| r.is_empty()));
    }

    #[test]
    fn rows_read_back() {
        let mut rows = RowBuf::default();
        let fields = RowFields {
            event_id: b"e",
            device_id: "dev",
            event_type: "t",
            ts: -5,
            received_at: 7,
            payload: Some(b"[1]"),
        };
        rows.push(&fields);
        rows.push(&RowFields { payload: None, ..fields });
        let v = rows.view(0).unwrap();
        assert_eq!(
            (v.event_id, v.device_id, v.event_type, v.ts, v.received_at, v.payload),
            (&b"e"[..], &b"dev"[..], &b"t"[..], -5, 7, Some(&b"[1]"[..]))
        );
        assert_eq!(rows.view(1).unwrap().payload, None);
    }

    #[test]
    fn null_payload_and_row_ranges() {
        let mut rows = RowBuf::default();
        for id in [&b"a"[..], b"bbb"] {
            rows.push(&RowFields {
                event_id: id,
                device_id: "d",
                event_type: "t",
                ts: 0,
                received_at: 0,
                payload: None,
            });
        }
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.event_id(1), b"bbb");
        assert_eq!(&rows.row(0)[rows.row(0).len() - 4..], &[0xff; 4]);
        assert_eq!(rows.row_range(0).end, rows.row_range(1).start);
    }

    #[test]
    fn header_is_the_binary_copy_signature() {
        assert_eq!(HEADER.len(), 19);
        assert_eq!(&HEADER[..11], b"PGCOPY\n\xff\r\n\0");
    }

    #[test]
    fn epoch_conversion() {
        assert_eq!(pg_micros_from_unix_micros(PG_EPOCH_UNIX_SECS * 1_000_000), 0);
    }
}
