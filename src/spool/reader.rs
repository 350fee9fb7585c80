//! Reading records back, in seq order, across segments: the replay at
//! start-up and the drain to PostgreSQL afterwards.
//!
//! A reader never reads past the last fsync'd seq, so it never sees a
//! half-written record of a group in progress, and it can follow the
//! appender live: `Ok(None)` means "caught up", not "finished"
//! ([`super::Spool::wait_for_records`] waits for more). Every record is
//! checked (checksum, and the seq that must come next), so damage anywhere in
//! what must be intact is reported as [`SpoolError::Corrupt`] with the file
//! and offset, never skipped.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::record::{self, Damage, Next};
use super::segment::{self, SEGMENT_HEADER_BYTES};
use super::{Seq, Shared, SpoolError};

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub payload: Vec<u8>,
}

/// Records from a seq onwards. Owned by one thread; open as many as needed.
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// The next seq to hand out.
    want: Seq,
    cursor: Option<Cursor>,
}

/// An open segment and the reader's place in it.
struct Cursor {
    first_seq: Seq,
    path: PathBuf,
    file: BufReader<File>,
    offset: u64,
    /// The seq of the record at `offset`.
    next: Seq,
}

impl SpoolReader {
    pub(super) fn new(shared: Arc<Shared>, from: Seq) -> Self {
        Self { shared, want: from.max(1), cursor: None }
    }

    /// The seq the next record returned will have (if the spool still has it).
    pub fn position(&self) -> Seq {
        self.want
    }

    /// The next durable record, `Ok(None)` when caught up with the appender.
    #[allow(clippy::should_implement_trait)] // fallible and resumable after None: not an Iterator
    pub fn next(&mut self) -> Result<Option<Record>, SpoolError> {
        let max_payload_bytes = super::max_payload_bytes(&self.shared.config);
        loop {
            if self.want > self.shared.durable.load(Ordering::Acquire) {
                return Ok(None);
            }
            let mut cursor = match self.cursor.take() {
                Some(cursor) => cursor,
                None => self.open_at(self.want)?,
            };
            let mut payload = Vec::new();
            let next = record::read(&mut cursor.file, max_payload_bytes, &mut payload)
                .map_err(SpoolError::io("read", &cursor.path))?;
            match next {
                Next::Record { seq, bytes } if seq == cursor.next => {
                    cursor.next += 1;
                    cursor.offset += bytes;
                    self.cursor = Some(cursor);
                    if seq >= self.want {
                        self.want = seq + 1;
                        return Ok(Some(Record { seq, payload }));
                    }
                }
                Next::Record { .. } => return Err(corrupt(&cursor, Damage::WrongSeq.as_str().into())),
                Next::Damaged { damage, .. } => return Err(corrupt(&cursor, damage.as_str().into())),
                Next::End => {
                    // The segment is done; the next one must carry on where it ended.
                    let following = {
                        let segments = self.shared.segments.lock();
                        segments.iter().map(|s| s.first_seq).find(|&first| first > cursor.first_seq)
                    };
                    let Some(first) = following else {
                        let why = format!("segment ends at seq {} but seq {} is durable", cursor.next - 1, self.want);
                        return Err(corrupt(&cursor, why));
                    };
                    self.check_gap(cursor.next, first)?;
                    self.cursor = Some(self.open_segment(first)?.map_err(|why| SpoolError::Corrupt {
                        path: self.shared.segment_path(first),
                        offset: 0,
                        reason: why,
                    })?);
                }
            }
        }
    }

    /// Opens the segment holding `seq`, or the oldest one if `seq` is older.
    fn open_at(&self, seq: Seq) -> Result<Cursor, SpoolError> {
        // A commit may delete the chosen segment between the lookup and the
        // open; then look again (its records were all committed).
        for _ in 0..3 {
            let first = {
                let segments = self.shared.segments.lock();
                segments
                    .iter()
                    .rev()
                    .map(|s| s.first_seq)
                    .find(|&first| first <= seq)
                    .or_else(|| segments.front().map(|s| s.first_seq))
            };
            let Some(first) = first else { break };
            if first > seq {
                self.check_gap(seq, first)?;
            }
            match self.open_segment(first) {
                Ok(Ok(cursor)) => return Ok(cursor),
                Ok(Err(why)) => {
                    return Err(SpoolError::Corrupt { path: self.shared.segment_path(first), offset: 0, reason: why });
                }
                Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SpoolError::Corrupt {
            path: self.shared.config.dir.clone(),
            offset: 0,
            reason: format!("no segment holds seq {seq}"),
        })
    }

    /// `Ok(Err(why))` when the segment's header is damaged.
    fn open_segment(&self, first_seq: Seq) -> Result<Result<Cursor, String>, SpoolError> {
        let path = self.shared.segment_path(first_seq);
        let opened = segment::open_for_read(&path).map_err(SpoolError::io("open", &path))?;
        Ok(match opened {
            Ok(file) => Ok(Cursor { first_seq, path, file, offset: SEGMENT_HEADER_BYTES, next: first_seq }),
            Err(damage) => Err(format!("bad segment header ({})", damage.as_str())),
        })
    }

    /// The segment after the one that ended before `expected` starts at
    /// `first`. A gap is fine only if committed (its segment was deleted);
    /// otherwise records are lost, or segments overlap.
    fn check_gap(&self, expected: Seq, first: Seq) -> Result<(), SpoolError> {
        let committed = self.shared.committed.load(Ordering::Acquire);
        if first == expected || (first > expected && first - 1 <= committed) {
            return Ok(());
        }
        let reason = if first > expected {
            format!("records {expected}..{} are missing before this segment", first - 1)
        } else {
            format!("segment starts at seq {first} but the one before ends at {}", expected - 1)
        };
        Err(SpoolError::Corrupt { path: self.shared.segment_path(first), offset: 0, reason })
    }
}

fn corrupt(cursor: &Cursor, reason: String) -> SpoolError {
    SpoolError::Corrupt { path: cursor.path.clone(), offset: cursor.offset, reason }
}
