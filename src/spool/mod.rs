//! The disk spool behind `ack = "spool"`: a local, checksummed, segmented,
//! append-only log of opaque records, each numbered by a [`Seq`].
//!
//! Why: with `ack = "spool"` a 200 must mean "on local disk, and it will reach
//! PostgreSQL even across outages and restarts". So a request's rows are
//! appended here and fsync'd before the answer; writers drain the log to
//! PostgreSQL in seq order and report how far they got with
//! [`Spool::commit_through`]; whole segments behind that point are deleted.
//! While PostgreSQL is down the spool grows, up to `max_bytes`; then appends
//! fail fast with [`SpoolError::Full`] (503), never block.
//!
//! # Group commit
//!
//! An fsync costs the same for one record as for a hundred, so one thread,
//! `spool-appender`, owns the log's end: it takes every append waiting in its
//! bounded queue, writes them all, calls `fdatasync` once and only then
//! answers each. Under load the queue fills while an fsync runs and the next
//! group is large; alone, a request is its own group. Shards never block:
//! [`SpoolSender::try_append`] reserves room and `try_send`s, and the shard
//! awaits a `futures_channel::oneshot` that the appender completes.
//!
//! # On disk
//!
//! `dir/` holds segments `{first_seq:020}.seg` ([`segment`]: a magic header,
//! then records framed as length, seq, CRC-32, payload, see [`record`]), a
//! `checkpoint` (the committed seq, replaced by write + fsync + rename + dir
//! fsync) and a `LOCK` file that one process holds.
//!
//! # Crashes
//!
//! Everything fsync'd before a crash is there after [`Spool::open`]. Only the
//! last segment can end in a torn write (earlier ones were fsync'd whole
//! before the next was created); `open` reads it, cuts it after its last
//! intact record and says so in [`Recovery`]. Damage anywhere else (a
//! non-last segment, the checkpoint) is never "repaired": the reader reports
//! it as [`SpoolError::Corrupt`].
//!
//! # Layout
//!
//! - [`record`]: framing and checksums (pure).
//! - [`segment`]: segment files, and the scan of the last one.
//! - [`checkpoint`]: the committed seq, stored atomically.
//! - [`appender`]: the log's end, group commit, the appender thread.
//! - [`reader`]: records from a seq onwards, across segments.

pub mod appender;
pub mod checkpoint;
pub mod reader;
pub mod record;
pub mod segment;

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub use appender::{AppendWait, Appender, AppenderReport, SpoolSender};
pub use reader::{Record, SpoolReader};
pub use record::Damage;

/// A record's number: 1 for the first record ever appended to a spool
/// directory, then consecutive. 0 means "none".
pub type Seq = u64;

pub use crate::config::SpoolConfig;

/// The largest payload one record of a spool so configured may carry.
pub fn max_payload_bytes(config: &SpoolConfig) -> u64 {
    config.segment_bytes.saturating_sub(segment::SEGMENT_HEADER_BYTES + record::RECORD_HEADER_BYTES as u64)
}

/// Everything that can go wrong with the spool.
///
/// For an ingest answer: `Full`, `Busy`, `Closed`, `Failed` and `Io` are
/// 503s (the client retries later; [`SpoolError::is_transient`]), `TooLarge`
/// is a 413. `Corrupt`, `Locked` and `Config` stop the start-up.
#[derive(Debug, Clone)]
pub enum SpoolError {
    /// The spool holds `max_bytes` (with appends in flight): wait for the
    /// writers to drain it.
    Full {
        used_bytes: u64,
        max_bytes: u64,
    },
    /// One payload larger than a segment can hold.
    TooLarge {
        bytes: usize,
        max_bytes: u64,
    },
    /// The appender's queue is full.
    Busy,
    /// The appender has stopped (shutting down).
    Closed,
    /// An earlier write or fsync failed. After a failed fsync the kernel may
    /// have dropped the data, so the spool refuses appends until reopened
    /// (the reopen scan finds what really is on disk).
    Failed(Arc<str>),
    /// Bytes that must be intact are not.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Another process holds the spool directory.
    Locked(PathBuf),
    /// `commit_through` was given a seq not yet appended.
    Ahead {
        seq: Seq,
        durable_seq: Seq,
    },
    /// Invalid configuration (see [`SpoolConfig::problems`]).
    Config(String),
    Io {
        context: String,
        source: Arc<io::Error>,
    },
}

impl SpoolError {
    /// Whether trying again later may succeed without anyone fixing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SpoolError::Full { .. }
                | SpoolError::Busy
                | SpoolError::Closed
                | SpoolError::Failed(_)
                | SpoolError::Io { .. }
        )
    }

    fn io(context: impl fmt::Display, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
        let context = format!("{context} {}", path.display());
        move |source| SpoolError::Io { context, source: Arc::new(source) }
    }
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Full { used_bytes, max_bytes } => {
                write!(f, "spool full: {used_bytes} of {max_bytes} bytes used; retry when PostgreSQL has caught up")
            }
            SpoolError::TooLarge { bytes, max_bytes } => {
                write!(f, "record of {bytes} bytes exceeds the spool's {max_bytes}-byte record limit")
            }
            SpoolError::Busy => f.write_str("spool append queue full"),
            SpoolError::Closed => f.write_str("spool appender stopped"),
            SpoolError::Failed(why) => write!(f, "spool failed earlier and refuses appends until reopened: {why}"),
            SpoolError::Corrupt { path, offset, reason } => {
                write!(f, "spool corrupt: {} at byte {offset}: {reason}", path.display())
            }
            SpoolError::Locked(dir) => write!(f, "spool directory {} is in use by another process", dir.display()),
            SpoolError::Ahead { seq, durable_seq } => {
                write!(f, "cannot commit through seq {seq}: only {durable_seq} appended")
            }
            SpoolError::Config(why) => write!(f, "spool config: {why}"),
            SpoolError::Io { context, source } => write!(f, "spool I/O error: {context}: {source}"),
        }
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Io { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// What [`Spool::open`] found and did; worth a log line each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Seq committed in PostgreSQL according to the checkpoint (0: none).
    pub committed_seq: Seq,
    /// Seq the next append gets. Records `committed_seq + 1 .. next_seq` are
    /// to be replayed.
    pub next_seq: Seq,
    /// Segments on disk after the recovery.
    pub segments: usize,
    pub used_bytes: u64,
    /// Wholly committed segments a crash had left behind, now deleted.
    pub deleted_segments: usize,
    /// The torn or corrupt end of the last segment, now cut.
    pub tail_cut: Option<TailCut>,
}

impl Recovery {
    /// Records appended but not committed: what replay will send.
    pub fn pending_records(&self) -> u64 {
        self.next_seq.saturating_sub(self.committed_seq + 1)
    }
}

/// Bytes cut from the end of the last segment at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailCut {
    pub path: PathBuf,
    /// Where the cut was made (the file's new length).
    pub offset: u64,
    pub bytes_cut: u64,
    pub damage: Damage,
    /// A good record followed the damaged one. A crash tears only records
    /// that were never fsync'd (so never acknowledged), except that after a
    /// power loss the kernel may have written their pages out of order; a
    /// flipped bit in acknowledged data looks the same. Log it loudly.
    pub intact_after: bool,
}

/// A segment in the shared list. `bytes` is exact once it is sealed.
#[derive(Debug, Clone, Copy)]
struct SegmentMeta {
    first_seq: Seq,
    bytes: u64,
}

/// State shared by the appender, the readers and the committers.
struct Shared {
    config: SpoolConfig,
    /// Segments in seq order; the last is the one being appended to.
    segments: Mutex<VecDeque<SegmentMeta>>,
    /// Last seq fsync'd: readers never read past it.
    durable: AtomicU64,
    committed: AtomicU64,
    /// Segment bytes on disk plus bytes reserved by queued appends.
    used_bytes: AtomicU64,
    /// Set once, by the appender, when a write or fsync fails.
    failed: OnceLock<Arc<str>>,
    /// Set when the appender thread has returned.
    stopped: AtomicBool,
    /// Wakes [`Spool::wait_for_records`] when `durable` moves or the appender stops.
    wake: Mutex<()>,
    wake_cv: Condvar,
    /// Serialises checkpoint writes.
    commit_lock: Mutex<()>,
    appended_records: AtomicU64,
    append_groups: AtomicU64,
    /// Held (flock) for the spool's lifetime.
    _lock: File,
}

impl Shared {
    fn dir(&self) -> &Path {
        &self.config.dir
    }

    fn segment_path(&self, first_seq: Seq) -> PathBuf {
        self.dir().join(segment::file_name(first_seq))
    }

    /// Reserves room for `bytes` more, or says the spool is full.
    fn reserve(&self, bytes: u64) -> Result<(), SpoolError> {
        let max = self.config.max_bytes;
        self.used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|&n| n <= max))
            .map(|_| ())
            .map_err(|used_bytes| SpoolError::Full { used_bytes, max_bytes: max })
    }

    fn release(&self, bytes: u64) {
        let _ =
            self.used_bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(bytes)));
    }

    fn notify(&self) {
        let _guard = self.wake.lock();
        self.wake_cv.notify_all();
    }
}

/// A handle on an open spool for readers, committers and metrics. Cheap to
/// clone; appending goes through the [`Appender`] or its [`SpoolSender`].
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

/// Gauges and counters for `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub segments: usize,
    pub durable_seq: Seq,
    pub committed_seq: Seq,
    /// Records appended since open.
    pub appended_records: u64,
    /// fdatasync groups since open (records per group = the group-commit gain).
    pub append_groups: u64,
    pub failed: bool,
}

/// What one [`Spool::commit_through`] freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    pub deleted_segments: usize,
    pub freed_bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`: locks it, reads the
    /// checkpoint, deletes segments a crash left behind after a commit, cuts
    /// a torn tail off the last segment. Returns the shared handle, the
    /// single appender, and what recovery did.
    pub fn open(config: SpoolConfig) -> Result<(Spool, Appender, Recovery), SpoolError> {
        let problems = config.problems();
        if !problems.is_empty() {
            let text: Vec<String> = problems.iter().map(|(k, why)| format!("{k} {why}")).collect();
            return Err(SpoolError::Config(text.join("; ")));
        }
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(SpoolError::io("create directory", &dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(SpoolError::io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir)),
            Err(TryLockError::Error(e)) => return Err(SpoolError::io("lock", &lock_path)(e)),
        }

        let committed = match checkpoint::load(&dir).map_err(SpoolError::io("read checkpoint in", &dir))? {
            checkpoint::Loaded::Missing => 0,
            checkpoint::Loaded::Valid(seq) => seq,
            checkpoint::Loaded::Corrupt => {
                return Err(SpoolError::Corrupt {
                    path: dir.join(checkpoint::FILE_NAME),
                    offset: 0,
                    reason: "checkpoint fails its checksum".into(),
                });
            }
        };
        let mut listed = segment::list(&dir).map_err(SpoolError::io("list", &dir))?;
        let mut recovery = Recovery { committed_seq: committed, ..Recovery::default() };
        let mut dir_changed = false;

        // A crash between a checkpoint and its deletions leaves sealed
        // segments whose records are all committed.
        while listed.len() >= 2 && listed[1].first_seq.saturating_sub(1) <= committed {
            let gone = listed.remove(0);
            fs::remove_file(&gone.path).map_err(SpoolError::io("delete", &gone.path))?;
            recovery.deleted_segments += 1;
            dir_changed = true;
        }

        // The last segment: keep its intact records, cut the rest.
        let mut next_seq = committed + 1;
        let mut reuse: Option<segment::Listed> = None;
        if let Some(last) = listed.pop() {
            let tail = segment::scan_tail(&last.path, last.first_seq, max_payload_bytes(&config))
                .map_err(SpoolError::io("scan", &last.path))?;
            if let Some(damage) = tail.damage {
                recovery.tail_cut = Some(TailCut {
                    path: last.path.clone(),
                    offset: tail.valid_bytes,
                    bytes_cut: last.bytes.saturating_sub(tail.valid_bytes),
                    damage,
                    intact_after: tail.intact_after,
                });
            }
            if tail.header_ok {
                let mut last = last;
                if tail.damage.is_some() {
                    let file =
                        OpenOptions::new().write(true).open(&last.path).map_err(SpoolError::io("open", &last.path))?;
                    file.set_len(tail.valid_bytes).map_err(SpoolError::io("truncate", &last.path))?;
                    file.sync_all().map_err(SpoolError::io("fsync", &last.path))?;
                    last.bytes = tail.valid_bytes;
                }
                let natural_next = tail.last_seq.map_or(last.first_seq, |s| s + 1);
                // The checkpoint is ahead only if the disk lost acknowledged
                // data: never reuse seqs that PostgreSQL has already seen.
                if natural_next >= next_seq {
                    next_seq = natural_next;
                    reuse = Some(last.clone());
                }
                listed.push(last);
            } else {
                // Torn while being created: it never held a record.
                fs::remove_file(&last.path).map_err(SpoolError::io("delete", &last.path))?;
                next_seq = next_seq.max(last.first_seq);
                dir_changed = true;
            }
        }
        if dir_changed {
            segment::sync_dir(&dir).map_err(SpoolError::io("fsync", &dir))?;
        }

        let (file, active) = match reuse {
            Some(last) => {
                let file =
                    OpenOptions::new().append(true).open(&last.path).map_err(SpoolError::io("open", &last.path))?;
                (file, last)
            }
            None => {
                let path = dir.join(segment::file_name(next_seq));
                let file = segment::create(&dir, next_seq).map_err(SpoolError::io("create", &path))?;
                let created = segment::Listed { first_seq: next_seq, path, bytes: segment::SEGMENT_HEADER_BYTES };
                listed.push(created.clone());
                (file, created)
            }
        };

        let used_bytes: u64 = listed.iter().map(|s| s.bytes).sum();
        recovery.next_seq = next_seq;
        recovery.segments = listed.len();
        recovery.used_bytes = used_bytes;
        let shared = Arc::new(Shared {
            config,
            segments: Mutex::new(
                listed.iter().map(|s| SegmentMeta { first_seq: s.first_seq, bytes: s.bytes }).collect(),
            ),
            durable: AtomicU64::new(next_seq - 1),
            committed: AtomicU64::new(committed),
            used_bytes: AtomicU64::new(used_bytes),
            failed: OnceLock::new(),
            stopped: AtomicBool::new(false),
            wake: Mutex::new(()),
            wake_cv: Condvar::new(),
            commit_lock: Mutex::new(()),
            appended_records: AtomicU64::new(0),
            append_groups: AtomicU64::new(0),
            _lock: lock,
        });
        let appender = Appender::new(shared.clone(), file, active.first_seq, active.bytes, next_seq);
        Ok((Spool { shared }, appender, recovery))
    }

    /// Reads records from `from` on (from the oldest kept record when `from`
    /// is older), up to the last fsync'd one.
    pub fn reader(&self, from: Seq) -> SpoolReader {
        SpoolReader::new(self.shared.clone(), from)
    }

    /// Reads every record not yet committed: the replay at start-up, and the
    /// drain afterwards.
    pub fn replay(&self) -> SpoolReader {
        self.reader(self.committed_seq() + 1)
    }

    /// Records that everything up to `seq` is committed in PostgreSQL:
    /// stores the checkpoint durably, then deletes the segments whose
    /// records are all at or below `seq` (never the one being appended to).
    /// Blocking file I/O: call it from a writer thread, never a shard.
    pub fn commit_through(&self, seq: Seq) -> Result<Committed, SpoolError> {
        let shared = &*self.shared;
        let _serial = shared.commit_lock.lock();
        let durable_seq = shared.durable.load(Ordering::Acquire);
        if seq > durable_seq {
            return Err(SpoolError::Ahead { seq, durable_seq });
        }
        if seq <= shared.committed.load(Ordering::Acquire) {
            return Ok(Committed::default());
        }
        // Checkpoint first: a crash before the deletions leaves segments
        // that the next open deletes, never a checkpoint that points at
        // deleted records.
        checkpoint::store(shared.dir(), seq).map_err(SpoolError::io("store checkpoint in", shared.dir()))?;
        shared.committed.store(seq, Ordering::Release);

        let doomed: Vec<SegmentMeta> = {
            let mut segments = shared.segments.lock();
            let mut doomed = Vec::new();
            while segments.len() >= 2 && segments[1].first_seq.saturating_sub(1) <= seq {
                doomed.extend(segments.pop_front());
            }
            doomed
        };
        let mut done = Committed::default();
        for meta in &doomed {
            let path = shared.segment_path(meta.first_seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io("delete", &path)(e)),
            }
            shared.release(meta.bytes);
            done.deleted_segments += 1;
            done.freed_bytes += meta.bytes;
        }
        if !doomed.is_empty() {
            segment::sync_dir(shared.dir()).map_err(SpoolError::io("fsync", shared.dir()))?;
        }
        Ok(done)
    }

    /// The last seq made durable (0: none).
    pub fn durable_seq(&self) -> Seq {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// The last seq committed in PostgreSQL, as told to `commit_through`.
    pub fn committed_seq(&self) -> Seq {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Blocks until a record after `after` is durable, the appender has
    /// stopped, or `timeout` passes; returns the durable seq. For a drain
    /// thread that has caught up: once the appender has stopped this returns
    /// at once, so a drain loop ends when it is caught up and
    /// [`Spool::appender_stopped`] says so.
    pub fn wait_for_records(&self, after: Seq, timeout: Duration) -> Seq {
        let deadline = Instant::now() + timeout;
        let shared = &*self.shared;
        let mut guard = shared.wake.lock();
        loop {
            let durable = shared.durable.load(Ordering::Acquire);
            if durable > after || shared.stopped.load(Ordering::Acquire) {
                return durable;
            }
            if shared.wake_cv.wait_until(&mut guard, deadline).timed_out() {
                return shared.durable.load(Ordering::Acquire);
            }
        }
    }

    /// Whether the appender thread (or the dropped [`Appender`]) is gone:
    /// nothing more will be appended.
    pub fn appender_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> SpoolStats {
        let s = &*self.shared;
        SpoolStats {
            used_bytes: s.used_bytes.load(Ordering::Relaxed),
            max_bytes: s.config.max_bytes,
            segments: s.segments.lock().len(),
            durable_seq: s.durable.load(Ordering::Relaxed),
            committed_seq: s.committed.load(Ordering::Relaxed),
            appended_records: s.appended_records.load(Ordering::Relaxed),
            append_groups: s.append_groups.load(Ordering::Relaxed),
            failed: s.failed.get().is_some(),
        }
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.shared.config
    }
}

#[cfg(test)]
mod tests;
