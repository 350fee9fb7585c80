//! The `spool-drain` thread (`ack = "spool"`): spool records → the writers' ring → PostgreSQL, and
//! the spool's checkpoint moved only past what PostgreSQL has committed.
//!
//! Records are dispatched in sequence order (from the last checkpoint at
//! start-up, then live as the appender makes them durable). Each job carries
//! its record's seq; the writer reports back whether it committed. The
//! checkpoint (`commit_through`) advances to just below the oldest record
//! still in flight, and never past one that failed: after a failure (the
//! database is down, the breaker is open) the drainer lets in-flight work
//! settle, waits with backoff, and dispatches again from the checkpoint.
//! Dispatching a record twice is harmless: inserts are idempotent on
//! `event_id`. Segments are deleted by the spool only behind the checkpoint.
//!
//! Shutdown: the drainer keeps going until the appender has stopped (every
//! shard is gone) and everything durable is committed, or until the shutdown
//! deadline, after which whatever is left stays in the spool for the next
//! start. Either way it then drops its ring senders so the writers can stop.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::budget::Lease;
use crate::pipeline::{HandOffError, Job, Reply, RingSender};
use crate::row::RowBuf;
use crate::spool::{Seq, Spool};

/// How often the checkpoint is written while it moves (two fsyncs each).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// Longest pause between retries while PostgreSQL is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the drainer reports when it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainReport {
    /// Highest seq committed in PostgreSQL and checkpointed.
    pub committed_seq: Seq,
    /// Highest seq durable in the spool.
    pub durable_seq: Seq,
    /// Records dispatched to writers (re-sends included).
    pub dispatched: u64,
}

impl DrainReport {
    /// Records left in the spool for the next start.
    pub fn left(&self) -> u64 {
        self.durable_seq.saturating_sub(self.committed_seq)
    }
}

pub struct Drainer {
    pub spool: Spool,
    pub ring: RingSender,
    /// Records in flight hold their rows in the memory budget, like requests.
    pub budget: crate::budget::Budget,
    /// Most records dispatched and not yet reported back.
    pub max_in_flight: usize,
    /// Dispatching stops at its drain deadline (so what was sent can commit).
    pub shutdown: crate::shutdown::Shutdown,
}

impl Drainer {
    pub fn run(self) -> DrainReport {
        // One report per record in flight, and at most max_in_flight of
        // those: a writer's send never waits.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<(Seq, bool)>(self.max_in_flight.max(1));
        let mut state = State {
            in_flight: BTreeSet::new(),
            failed: None,
            checkpoint: self.spool.committed_seq(),
            dispatched_to: self.spool.committed_seq(),
            dispatched: 0,
            last_checkpoint: Instant::now(),
        };
        let mut reader = self.spool.reader(state.checkpoint + 1);
        let mut backoff = Duration::from_millis(50);
        loop {
            state.collect(&done_rx, Duration::ZERO);
            state.checkpoint(&self.spool, false);
            let shutting_down = self.shutdown.drain_deadline();
            if shutting_down.is_some_and(|d| Instant::now() >= d) {
                // Out of time: what is in flight may still commit; the rest
                // stays in the spool.
                state.collect(&done_rx, Duration::from_millis(200));
                break;
            }
            if let Some(failed) = state.failed {
                // Let in-flight work settle, wait, then go again from the
                // checkpoint (re-sending is idempotent).
                if !state.in_flight.is_empty() {
                    state.collect(&done_rx, Duration::from_millis(20));
                    continue;
                }
                crate::warn!(
                    "spool drain: database unavailable, retrying",
                    from_seq = failed,
                    backoff_ms = backoff.as_millis()
                );
                self.shutdown.pause(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                state.failed = None;
                state.dispatched_to = state.checkpoint;
                reader = self.spool.reader(state.checkpoint + 1);
                continue;
            }
            if state.in_flight.len() >= self.max_in_flight {
                state.collect(&done_rx, Duration::from_millis(20));
                continue;
            }
            match reader.next() {
                Ok(Some(record)) => {
                    let Some(rows) = RowBuf::from_spool_record(&record.payload) else {
                        crate::error!("spool drain: record is not a row batch; skipped", seq = record.seq);
                        state.dispatched_to = record.seq;
                        continue;
                    };
                    let job = Job {
                        rows,
                        reply: Reply::Spool { seq: record.seq, done: done_tx.clone() },
                        enqueued: Instant::now(),
                        lease: Lease::detached(),
                    };
                    if !self.dispatch(job, &done_rx, &mut state) {
                        break;
                    }
                    state.in_flight.insert(record.seq);
                    state.dispatched_to = record.seq;
                    state.dispatched += 1;
                    backoff = Duration::from_millis(50);
                }
                Ok(None) => {
                    let caught_up = state.in_flight.is_empty() && state.dispatched_to >= self.spool.durable_seq();
                    if caught_up && self.spool.appender_stopped() {
                        break;
                    }
                    if state.in_flight.is_empty() {
                        self.spool.wait_for_records(state.dispatched_to, Duration::from_millis(20));
                    } else {
                        state.collect(&done_rx, Duration::from_millis(5));
                    }
                }
                Err(e) => {
                    crate::error!("spool drain: cannot read the spool", error = e);
                    self.shutdown.pause(Duration::from_millis(200));
                    reader = self.spool.reader(state.dispatched_to + 1);
                }
            }
        }
        state.checkpoint(&self.spool, true);
        DrainReport {
            committed_seq: state.checkpoint,
            durable_seq: self.spool.durable_seq(),
            dispatched: state.dispatched,
        }
    }

    /// Hands a job to a writer ring, waiting (this is not a shard) while the
    /// memory budget has no room for its rows or the ring is full: writers'
    /// reports free both. False when the writers are gone or the shutdown
    /// deadline passed.
    fn dispatch(&self, mut job: Job, done: &Receiver<(Seq, bool)>, state: &mut State) -> bool {
        let bytes = job.rows.memory_bytes();
        loop {
            match self.budget.try_lease(bytes) {
                Ok(lease) => {
                    job.lease = lease;
                    break;
                }
                // A record larger than the whole budget (lowered by SIGHUP
                // since it was written) goes alone rather than never.
                Err(_) if bytes > self.budget.limit() && self.budget.used() == 0 => {
                    job.lease = self.budget.lease();
                    job.lease.set(bytes);
                    break;
                }
                Err(_) => {
                    state.collect(done, Duration::from_millis(5));
                    if self.shutdown.drain_deadline().is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                }
            }
        }
        loop {
            match self.ring.try_send(job) {
                Ok(()) => return true,
                Err(HandOffError::Closed(_)) => return false,
                Err(HandOffError::Full(back)) => {
                    job = back;
                    state.collect(done, Duration::from_millis(1));
                    if self.shutdown.drain_deadline().is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                }
            }
        }
    }
}

struct State {
    in_flight: BTreeSet<Seq>,
    /// Lowest seq that failed since the last rewind.
    failed: Option<Seq>,
    /// Highest seq known committed and written to the spool's checkpoint.
    checkpoint: Seq,
    /// Highest seq handed to a writer.
    dispatched_to: Seq,
    dispatched: u64,
    last_checkpoint: Instant,
}

impl State {
    /// Takes writers' reports, waiting up to `wait` for the first one.
    fn collect(&mut self, done: &Receiver<(Seq, bool)>, wait: Duration) {
        let first = if wait.is_zero() { done.try_recv().ok() } else { done.recv_timeout(wait).ok() };
        for (seq, ok) in first.into_iter().chain(std::iter::from_fn(|| done.try_recv().ok())) {
            self.in_flight.remove(&seq);
            if !ok {
                self.failed = Some(self.failed.map_or(seq, |f| f.min(seq)));
            }
        }
    }

    /// Everything below the oldest record in flight (or failed) is committed.
    fn committed_through(&self) -> Seq {
        let mut through = self.dispatched_to;
        if let Some(&oldest) = self.in_flight.first() {
            through = through.min(oldest - 1);
        }
        if let Some(failed) = self.failed {
            through = through.min(failed - 1);
        }
        through
    }

    fn checkpoint(&mut self, spool: &Spool, now: bool) {
        let through = self.committed_through();
        if through <= self.checkpoint || (!now && self.last_checkpoint.elapsed() < CHECKPOINT_EVERY) {
            return;
        }
        match spool.commit_through(through) {
            Ok(_) => self.checkpoint = through,
            Err(e) => crate::error!("spool drain: cannot write the checkpoint", error = e),
        }
        self.last_checkpoint = Instant::now();
    }
}
