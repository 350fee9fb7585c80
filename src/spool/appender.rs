//! The end of the log: appends, group commit, and the `spool-appender` thread.
//!
//! There is exactly one [`Appender`] per open spool, so the end of the log
//! has one owner and needs no lock. It can be used directly (blocking, one
//! fsync per call: for tools, tests and start-up) or moved onto its own
//! thread with [`Appender::spawn`], which returns a [`SpoolSender`] for the
//! shards. The thread runs until every sender is dropped.
//!
//! A group is every request waiting in the queue when the thread looks, up
//! to `max_group_bytes`: written with one `write` per segment touched, then
//! one `fdatasync`, then each request is answered with its seq. Room is
//! reserved against `max_bytes` when a request is queued, so a full spool
//! answers at once, on the shard, without a round trip through the thread.

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, JoinHandle, Thread};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use futures_channel::oneshot;

use super::record::{self, RECORD_HEADER_BYTES};
use super::segment::{self, SEGMENT_HEADER_BYTES};
use super::{SegmentMeta, Seq, Shared, SpoolError};

/// The single writer of a spool's log.
pub struct Appender {
    shared: Arc<Shared>,
    /// The segment being appended to, opened with `O_APPEND`.
    file: File,
    active_first_seq: Seq,
    active_bytes: u64,
    next_seq: Seq,
    /// One group's framed records, reused.
    buf: Vec<u8>,
}

/// What the appender thread did, returned when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppenderReport {
    /// Records made durable and acknowledged.
    pub records: u64,
    /// fdatasync groups.
    pub groups: u64,
    /// Records answered with an error because a write or fsync failed.
    pub failed_records: u64,
}

/// One queued append and where its answer goes.
pub(super) struct AppendRequest {
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<Seq, SpoolError>>,
    /// The payload's bytes in the memory budget, released once it is written.
    _lease: crate::budget::Lease,
}

impl Appender {
    pub(super) fn new(
        shared: Arc<Shared>,
        file: File,
        active_first_seq: Seq,
        active_bytes: u64,
        next_seq: Seq,
    ) -> Self {
        Self { shared, file, active_first_seq, active_bytes, next_seq, buf: Vec::new() }
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Appends one record and fsyncs it. Blocking.
    pub fn append(&mut self, payload: &[u8]) -> Result<Seq, SpoolError> {
        self.append_batch(&[payload]).map(|seqs| seqs.start)
    }

    /// Appends records with one fsync and returns their seqs. Blocking. All
    /// or nothing as to room: `Full` if they do not all fit.
    pub fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<Range<Seq>, SpoolError> {
        if let Some(why) = self.shared.failed.get() {
            return Err(SpoolError::Failed(why.clone()));
        }
        let mut bytes = 0;
        for p in payloads {
            bytes += framed_bytes(&self.shared, p.len())?;
        }
        self.shared.reserve(bytes)?;
        let written = self.write_group(payloads);
        if written.is_err() {
            self.shared.release(bytes);
        }
        written
    }

    /// Moves the appender onto its thread, `spool-appender`, and returns the
    /// sender for the shards. The thread ends when every sender is dropped,
    /// after answering everything queued.
    pub fn spawn(self) -> io::Result<(SpoolSender, JoinHandle<AppenderReport>)> {
        let (tx, rx) = crossbeam_channel::bounded(self.shared.config.queue_capacity);
        let sender = SpoolSender { tx, shared: self.shared.clone() };
        let handle = thread::Builder::new().name("spool-appender".into()).spawn(move || self.run(rx))?;
        Ok((sender, handle))
    }

    /// A sender and its queue without a thread, for tests that drive [`Appender::run`].
    #[cfg(test)]
    pub(super) fn queue(&self) -> (SpoolSender, Receiver<AppendRequest>) {
        let (tx, rx) = crossbeam_channel::bounded(self.shared.config.queue_capacity);
        (SpoolSender { tx, shared: self.shared.clone() }, rx)
    }

    /// The thread's loop: a group per wake-up, until the queue disconnects.
    pub(super) fn run(mut self, rx: Receiver<AppendRequest>) -> AppenderReport {
        let mut report = AppenderReport::default();
        let mut group: Vec<AppendRequest> = Vec::new();
        let max_group_bytes = self.shared.config.max_group_bytes;
        while let Ok(first) = rx.recv() {
            let mut bytes = first.payload.len();
            group.push(first);
            while bytes < max_group_bytes {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += next.payload.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            let payloads: Vec<&[u8]> = group.iter().map(|r| r.payload.as_slice()).collect();
            let written = self.write_group(&payloads);
            let n = group.len() as u64;
            match &written {
                Ok(_) => {
                    report.records += n;
                    report.groups += 1;
                }
                Err(_) => {
                    let reserved: u64 = payloads.iter().map(|p| (RECORD_HEADER_BYTES + p.len()) as u64).sum();
                    self.shared.release(reserved);
                    report.failed_records += n;
                }
            }
            for (i, request) in group.drain(..).enumerate() {
                // A dropped receiver is a client gone; its record stays durable.
                let _ = request.reply.send(written.clone().map(|seqs| seqs.start + i as u64));
            }
        }
        report
    }

    /// Writes and fsyncs one group (room already reserved), then publishes
    /// it to readers. Any I/O error fails the spool for good (see
    /// [`SpoolError::Failed`]).
    fn write_group(&mut self, payloads: &[&[u8]]) -> Result<Range<Seq>, SpoolError> {
        if let Some(why) = self.shared.failed.get() {
            return Err(SpoolError::Failed(why.clone()));
        }
        let first = self.next_seq;
        if let Err(e) = self.write_and_sync(payloads) {
            let _ = self.shared.failed.set(Arc::from(e.to_string()));
            return Err(e);
        }
        let shared = &*self.shared;
        shared.durable.store(self.next_seq - 1, Ordering::Release);
        shared.appended_records.fetch_add(payloads.len() as u64, Ordering::Relaxed);
        shared.append_groups.fetch_add(1, Ordering::Relaxed);
        shared.notify();
        Ok(first..self.next_seq)
    }

    fn write_and_sync(&mut self, payloads: &[&[u8]]) -> Result<(), SpoolError> {
        let segment_bytes = self.shared.config.segment_bytes;
        self.buf.clear();
        let mut seq = self.next_seq;
        for payload in payloads {
            let in_segment = self.active_bytes + self.buf.len() as u64;
            let framed = (RECORD_HEADER_BYTES + payload.len()) as u64;
            if in_segment > SEGMENT_HEADER_BYTES && in_segment + framed > segment_bytes {
                self.flush()?;
                self.sync()?;
                self.roll(seq)?;
            }
            record::encode(&mut self.buf, seq, payload);
            seq += 1;
        }
        self.flush()?;
        self.sync()?;
        self.next_seq = seq;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SpoolError> {
        self.file.write_all(&self.buf).map_err(|e| self.io_error("write", e))?;
        self.active_bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        self.file.sync_data().map_err(|e| self.io_error("fdatasync", e))
    }

    /// Seals the current segment (already fsync'd) and starts one at `first_seq`.
    fn roll(&mut self, first_seq: Seq) -> Result<(), SpoolError> {
        let dir = self.shared.dir();
        let file =
            segment::create(dir, first_seq).map_err(SpoolError::io("create", &self.shared.segment_path(first_seq)))?;
        {
            let mut segments = self.shared.segments.lock();
            if let Some(sealed) = segments.back_mut() {
                sealed.bytes = self.active_bytes;
            }
            segments.push_back(SegmentMeta { first_seq, bytes: SEGMENT_HEADER_BYTES });
        }
        self.shared.used_bytes.fetch_add(SEGMENT_HEADER_BYTES, Ordering::AcqRel);
        self.file = file;
        self.active_first_seq = first_seq;
        self.active_bytes = SEGMENT_HEADER_BYTES;
        Ok(())
    }

    fn io_error(&self, op: &str, e: io::Error) -> SpoolError {
        SpoolError::io(op, &self.shared.segment_path(self.active_first_seq))(e)
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.notify();
    }
}

/// Bytes a payload takes on disk, or why it cannot be appended.
fn framed_bytes(shared: &Shared, len: usize) -> Result<u64, SpoolError> {
    let max_bytes = super::max_payload_bytes(&shared.config);
    if len as u64 > max_bytes {
        return Err(SpoolError::TooLarge { bytes: len, max_bytes });
    }
    Ok((RECORD_HEADER_BYTES + len) as u64)
}

/// The shards' side of the appender thread. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct SpoolSender {
    tx: Sender<AppendRequest>,
    shared: Arc<Shared>,
}

impl SpoolSender {
    /// Queues `payload` for the next group and returns what to await: its
    /// seq once it is fsync'd. Fails at once, without blocking, when the
    /// spool is full, the queue is full, the payload is too large, the spool
    /// has failed, or the appender has stopped.
    pub fn try_append(&self, payload: Vec<u8>) -> Result<AppendWait, SpoolError> {
        self.try_append_leased(payload, crate::budget::Lease::detached())
    }

    /// [`SpoolSender::try_append`], with the payload's bytes held in the
    /// memory budget until the appender has written it (a client that stops
    /// waiting does not free them early).
    pub fn try_append_leased(&self, payload: Vec<u8>, lease: crate::budget::Lease) -> Result<AppendWait, SpoolError> {
        if let Some(why) = self.shared.failed.get() {
            return Err(SpoolError::Failed(why.clone()));
        }
        let bytes = framed_bytes(&self.shared, payload.len())?;
        self.shared.reserve(bytes)?;
        let (reply, wait) = oneshot::channel();
        match self.tx.try_send(AppendRequest { payload, reply, _lease: lease }) {
            Ok(()) => Ok(AppendWait(wait)),
            Err(e) => {
                self.shared.release(bytes);
                Err(match e {
                    TrySendError::Full(_) => SpoolError::Busy,
                    TrySendError::Disconnected(_) => SpoolError::Closed,
                })
            }
        }
    }

    /// Appends waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

/// The answer to one [`SpoolSender::try_append`]: a future of the record's
/// seq once it is durable. If the appender thread dies without answering,
/// it resolves to [`SpoolError::Closed`].
#[must_use = "the append is acknowledged only when this resolves"]
pub struct AppendWait(oneshot::Receiver<Result<Seq, SpoolError>>);

impl Future for AppendWait {
    type Output = Result<Seq, SpoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| answer.unwrap_or(Err(SpoolError::Closed)))
    }
}

impl AppendWait {
    /// Blocks the calling thread until the answer comes. For plain threads
    /// (tools, tests, benches), never on a shard.
    pub fn wait_blocking(mut self) -> Result<Seq, SpoolError> {
        struct Unpark(Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(answer) = Pin::new(&mut self).poll(&mut cx) {
                return answer;
            }
            thread::park();
        }
    }
}
