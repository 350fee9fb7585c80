//! The bounded ring between shards and writers, and what travels on it.
//!
//! All writers receive from one `crossbeam-channel` ring (multi-consumer);
//! every shard holds a [`RingSet`], a sender to it. A shard never blocks on
//! the ring: [`RingSet::try_send`] hands a full ring's job back so the shard
//! can answer 503 at once.
//!
//! One shared ring rather than one per writer: whichever writer finishes its
//! commit first takes everything that is waiting. With a ring per writer, a
//! request queued behind a slow commit (a checkpoint, an fsync stall, a lock)
//! waited for it even while the other writer sat idle; measured at half load,
//! those queued requests were the ack p99.
//!
//! A [`Job`] carries one request's encoded rows and, with `ack = "commit"`, a
//! [`CommitReply`]: a oneshot whose receiver the shard awaits (monoio wakes the
//! shard from the writer thread). Dropping a reply unanswered reads as
//! "failed" on the shard, so a writer that dies can never leave a client
//! waiting for ever.
//!
//! Shutdown cascades through the ring: when every shard has finished its
//! in-flight requests it drops its `RingSet`, the ring disconnects, and the
//! writers drain what is left, commit it and return.

use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::writer::copy::RowBuf;

/// One request's worth of rows on its way to a writer.
pub struct Job {
    pub rows: RowBuf,
    /// Who learns how the rows ended.
    pub reply: Reply,
    /// When the shard handed it over, for ack latency.
    pub enqueued: Instant,
}

/// How a job's rows ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Every row is in PostgreSQL (newly inserted or already there), except
    /// `dead_letters`: rows (by position in the job) that PostgreSQL refused,
    /// kept in the dead-letter table with its error.
    Committed { dead_letters: Vec<(usize, String)> },
    /// Not committed; a retry may succeed (database down, timeout): 503.
    Unavailable(String),
    /// Not committed; PostgreSQL refused these rows and a retry will not help: 500.
    Refused(String),
}

pub type CommitReply = futures_channel::oneshot::Sender<CommitOutcome>;

/// Who waits for a job's outcome.
pub enum Reply {
    /// `ack = "queue"`: nobody; a writer retries until shutdown's deadline.
    None,
    /// `ack = "commit"`: a shard, to answer its client.
    Shard(CommitReply),
    /// `ack = "spool"`: the spool drainer, to advance the spool's checkpoint
    /// (true: committed) or to send the record again (false).
    Spool { seq: crate::spool::Seq, done: crossbeam_channel::Sender<(crate::spool::Seq, bool)> },
}

impl Reply {
    /// Sends the outcome to whoever waits, once.
    pub fn send(&mut self, outcome: &CommitOutcome) {
        match std::mem::replace(self, Reply::None) {
            Reply::None => {}
            // The shard may have gone (client disconnected): nothing to do.
            Reply::Shard(tx) => {
                let _ = tx.send(outcome.clone());
            }
            Reply::Spool { seq, done } => {
                let _ = done.send((seq, matches!(outcome, CommitOutcome::Committed { .. })));
            }
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Reply::None)
    }
}
pub type CommitWait = futures_channel::oneshot::Receiver<CommitOutcome>;

/// A reply channel pair for one job.
pub fn commit_channel() -> (CommitReply, CommitWait) {
    futures_channel::oneshot::channel()
}

/// Builds the ring: a sender for the shards and one receiver per writer.
/// It holds `writers × per_writer` jobs, the bound `pipeline.ring_capacity`
/// documents.
pub fn rings(writers: usize, per_writer: usize) -> (RingSet, Vec<Receiver<Job>>) {
    let (sender, receiver) = crossbeam_channel::bounded(writers.max(1) * per_writer.max(1));
    let receivers = (0..writers).map(|_| receiver.clone()).collect();
    (RingSet { sender }, receivers)
}

/// A shard's sender to the writers' ring. Cloned once per shard.
#[derive(Clone)]
pub struct RingSet {
    sender: Sender<Job>,
}

/// Why a job could not be handed over; the job comes back.
pub enum HandOffError {
    /// The ring is full: answer 503.
    Full(Job),
    /// The writers are gone (shutting down): answer 503.
    Closed(Job),
}

impl RingSet {
    /// Hands `job` to the writers. Never blocks.
    pub fn try_send(&self, job: Job) -> Result<(), HandOffError> {
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(back)) => Err(HandOffError::Full(back)),
            Err(TrySendError::Disconnected(back)) => Err(HandOffError::Closed(back)),
        }
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.sender.len()
    }
}

/// Read-only view of the ring for metrics: its length without the power to send.
#[derive(Clone)]
pub struct RingGauge {
    receiver: Option<Receiver<Job>>,
}

impl RingGauge {
    pub fn new(receivers: &[Receiver<Job>]) -> Self {
        Self { receiver: receivers.first().cloned() }
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.receiver.as_ref().map_or(0, Receiver::len)
    }

    /// Jobs the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.receiver.as_ref().and_then(Receiver::capacity).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job { rows: RowBuf::default(), reply: Reply::None, enqueued: Instant::now() }
    }

    #[test]
    fn a_full_ring_hands_the_job_back() {
        let (set, receivers) = rings(2, 1);
        assert!(set.try_send(job()).is_ok());
        assert!(set.try_send(job()).is_ok());
        assert!(matches!(set.try_send(job()), Err(HandOffError::Full(_))));
        assert_eq!(set.depth(), 2);
        assert_eq!(RingGauge::new(&receivers).capacity(), 2);
        // Either writer takes whatever waits: one can drain it all.
        receivers[1].recv().unwrap();
        receivers[1].recv().unwrap();
        assert_eq!(receivers[0].len(), 0);
        assert!(set.try_send(job()).is_ok(), "room again after a receive");
    }

    #[test]
    fn closed_rings_are_reported() {
        let (set, receivers) = rings(1, 4);
        drop(receivers);
        assert!(matches!(set.try_send(job()), Err(HandOffError::Closed(_))));
    }
}
