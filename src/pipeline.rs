//! The bounded rings between shards and writers, and what travels on them.
//!
//! Each writer owns one `crossbeam-channel` ring; every shard holds a
//! [`RingSet`] with a sender to each. A shard never blocks on a ring:
//! [`RingSet::try_send`] tries each ring once, round robin, and a full set
//! hands the job back so the shard can answer 503 at once.
//!
//! A [`Job`] carries one request's encoded rows and, with `ack = "commit"`, a
//! [`CommitReply`]: a oneshot whose receiver the shard awaits (monoio wakes the
//! shard from the writer thread). Dropping a reply unanswered reads as
//! "failed" on the shard, so a writer that dies can never leave a client
//! waiting for ever.
//!
//! Shutdown cascades through the rings: when every shard has finished its
//! in-flight requests it drops its `RingSet`, the rings disconnect, and each
//! writer drains what is left, commits it and returns.

use std::cell::Cell;
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

/// Builds one ring per writer: the senders for the shards and the receivers
/// for the writers.
pub fn rings(writers: usize, capacity: usize) -> (RingSet, Vec<Receiver<Job>>) {
    let (senders, receivers) = (0..writers).map(|_| crossbeam_channel::bounded(capacity)).unzip();
    (RingSet { senders, next: Cell::new(0) }, receivers)
}

/// A shard's senders to every writer ring. Cloned once per shard; `!Sync` on
/// purpose (its round-robin cursor is a `Cell`): it stays on its shard.
pub struct RingSet {
    senders: Vec<Sender<Job>>,
    next: Cell<usize>,
}

impl Clone for RingSet {
    fn clone(&self) -> Self {
        Self { senders: self.senders.clone(), next: Cell::new(0) }
    }
}

/// Why a job could not be handed over; the job comes back.
pub enum HandOffError {
    /// Every ring is full: answer 503.
    Full(Job),
    /// The writers are gone (shutting down): answer 503.
    Closed(Job),
}

impl RingSet {
    /// Hands `job` to the first ring with room, starting after the last one
    /// used. Never blocks.
    pub fn try_send(&self, mut job: Job) -> Result<(), HandOffError> {
        let n = self.senders.len();
        let start = self.next.get();
        for i in 0..n {
            let ring = (start + i) % n;
            match self.senders[ring].try_send(job) {
                Ok(()) => {
                    self.next.set((ring + 1) % n);
                    return Ok(());
                }
                Err(TrySendError::Full(back)) => job = back,
                Err(TrySendError::Disconnected(back)) => return Err(HandOffError::Closed(back)),
            }
        }
        Err(HandOffError::Full(job))
    }

    /// Jobs waiting in all rings.
    pub fn depth(&self) -> usize {
        self.senders.iter().map(Sender::len).sum()
    }
}

/// Read-only view of the rings for metrics: lengths without the power to send.
#[derive(Clone)]
pub struct RingGauge {
    receivers: Vec<Receiver<Job>>,
    capacity: usize,
}

impl RingGauge {
    pub fn new(receivers: &[Receiver<Job>], capacity: usize) -> Self {
        Self { receivers: receivers.to_vec(), capacity }
    }

    /// Jobs waiting, per ring.
    pub fn depths(&self) -> Vec<usize> {
        self.receivers.iter().map(Receiver::len).collect()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job { rows: RowBuf::default(), reply: Reply::None, enqueued: Instant::now() }
    }

    #[test]
    fn full_rings_hand_the_job_back() {
        let (set, receivers) = rings(2, 1);
        assert!(set.try_send(job()).is_ok());
        assert!(set.try_send(job()).is_ok());
        assert!(matches!(set.try_send(job()), Err(HandOffError::Full(_))));
        assert_eq!(set.depth(), 2);
        assert_eq!(receivers.iter().map(Receiver::len).collect::<Vec<_>>(), [1, 1], "round robin");
        receivers[0].recv().unwrap();
        assert!(set.try_send(job()).is_ok(), "room again after a receive");
    }

    #[test]
    fn closed_rings_are_reported() {
        let (set, receivers) = rings(1, 4);
        drop(receivers);
        assert!(matches!(set.try_send(job()), Err(HandOffError::Closed(_))));
    }
}
