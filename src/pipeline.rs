//! The bounded ring between shards and writers, what travels on it, and how
//! long a request may wait there.
//!
//! All writers receive from one `crossbeam-channel` ring (multi-consumer);
//! every shard holds a [`RingSender`]. A shard never blocks on the ring:
//! [`RingSender::try_send`] hands a full ring's job back so the shard can
//! answer 503 at once.
//!
//! One shared ring rather than one per writer: whichever writer finishes its
//! commit first takes everything that is waiting. With a ring per writer, a
//! request queued behind a slow commit (a checkpoint, an fsync stall, a lock)
//! waited for it even while the other writer sat idle; measured at half load,
//! those queued requests were the ack p99.
//!
//! A [`Job`] carries one request's encoded rows, their [`Lease`] in the
//! memory budget and, with `ack = "commit"`, a [`CommitReply`]: a oneshot
//! whose receiver the shard awaits (monoio wakes the shard from the writer
//! thread). Dropping a reply unanswered reads as "failed" on the shard, so a
//! writer that dies can never leave a client waiting for ever.
//!
//! # A time bound on waiting
//!
//! A ring bounded in requests says nothing about time: when PostgreSQL
//! slows down 100×, 2,048 queued requests are minutes of work, and every
//! client waited through it (12 s in the slow-trigger test) instead of
//! getting a 503 it could retry elsewhere. `ingest.max_wait_ms` bounds the
//! time from hand-off to the start of the request's COPY, three ways:
//!
//! 1. **Admission** ([`Backlog::wait_estimate`]): before reading a body the
//!    shard estimates the wait from the events queued and each writer's
//!    fitted cost per batch and per event ([`CostModel`]), including a
//!    writer stuck past its prediction; over the bound is a 503 at once.
//!    This is the fast path that turns excess load away in microseconds.
//! 2. **Sojourn** (as CoDel measures it): a writer that takes a job which
//!    has already waited past the bound answers it 503 instead of writing it.
//! 3. **Deadline**: the shard cancels the job itself when the bound passes
//!    (a [`Ticket`] decides the race with a writer claiming it), which
//!    covers writers that are all stuck in a stalled COPY.
//!
//! Why not CoDel or an adaptive concurrency limit alone: both learn capacity
//! from latency and drop *after* a standing queue has formed; CoDel keeps
//! the queue's minimum sojourn near a target and would still let a request
//! wait seconds while it converges. Here the service time is observable
//! (writers commit whole batches and time them), so admission can predict
//! the wait directly, and the sojourn check and the deadline make the bound
//! hard where the prediction is wrong. Writers also size batches by time
//! (`writer.target_commit_ms` through [`CostModel::batch_limit`]), so a slow
//! database gives smaller batches rather than multi-second COPYs.
//!
//! Shutdown cascades through the ring: when every shard has finished its
//! in-flight requests it drops its sender, the ring disconnects, and the
//! writers drain what is left, commit it and return.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::budget::Lease;
use crate::row::RowBuf;

/// One request's worth of rows on its way to a writer.
pub struct Job {
    pub rows: RowBuf,
    /// Who learns how the rows ended.
    pub reply: Reply,
    /// When the shard handed it over, for ack latency and `ingest.max_wait_ms`.
    pub enqueued: Instant,
    /// The rows' bytes in the memory budget, released when the job is dropped.
    pub lease: Lease,
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
    /// Not written: it waited past `ingest.max_wait_ms` for a writer: 503.
    Expired(String),
    /// Not committed; PostgreSQL refused these rows and a retry will not help: 500.
    Refused(String),
}

pub type CommitReply = futures_channel::oneshot::Sender<CommitOutcome>;

/// Who waits for a job's outcome.
pub enum Reply {
    /// `ack = "queue"`: nobody; a writer retries until shutdown's deadline.
    None,
    /// `ack = "commit"`: a shard, to answer its client. The ticket settles
    /// who decides first: a writer taking the job, or the shard giving up on
    /// it after `ingest.max_wait_ms`.
    Shard { tx: CommitReply, ticket: Ticket },
    /// `ack = "spool"`: the spool drainer, to advance the spool's checkpoint
    /// (true: committed) or to send the record again (false).
    Spool { seq: u64, done: crossbeam_channel::Sender<(u64, bool)> },
}

impl Reply {
    /// Sends the outcome to whoever waits, once.
    pub fn send(&mut self, outcome: &CommitOutcome) {
        match std::mem::replace(self, Reply::None) {
            Reply::None => {}
            // The shard may have gone (client disconnected): nothing to do.
            Reply::Shard { tx, .. } => {
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

/// Settles, once, whether a queued request is written or given up: a writer
/// [`claim`](Ticket::claim)s it before its COPY starts; the shard (or a
/// writer that finds it waited too long) [`cancel`](Ticket::cancel)s it.
/// Whoever loses the race knows at once: a cancelled request is never
/// written, so its 503 can say "nothing was stored"; a claimed one is
/// answered after its commit.
#[derive(Debug, Clone, Default)]
pub struct Ticket(Arc<AtomicU8>);

const QUEUED: u8 = 0;
const CLAIMED: u8 = 1;
const CANCELLED: u8 = 2;

impl Ticket {
    pub fn new() -> Ticket {
        Ticket::default()
    }

    /// A writer takes the request; false if it was cancelled first.
    pub fn claim(&self) -> bool {
        self.0.compare_exchange(QUEUED, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Gives the request up; false if a writer claimed it first.
    pub fn cancel(&self) -> bool {
        self.0.compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// Builds the ring: a sender for the shards and one receiver per writer.
/// It holds `writers × ring_capacity` jobs (`pipeline.ring_capacity`).
pub fn ring(writers: usize, ring_capacity: usize) -> (RingSender, Vec<RingReceiver>, Arc<Backlog>) {
    let (sender, receiver) = crossbeam_channel::bounded(writers.max(1) * ring_capacity.max(1));
    let backlog = Arc::new(Backlog::new(writers.max(1)));
    let receivers =
        (0..writers).map(|_| RingReceiver { receiver: receiver.clone(), backlog: backlog.clone() }).collect();
    (RingSender { sender, backlog: backlog.clone() }, receivers, backlog)
}

/// A sender to the writers' ring. Cloned once per shard (and for the spool drainer).
#[derive(Clone)]
pub struct RingSender {
    sender: Sender<Job>,
    backlog: Arc<Backlog>,
}

/// Why a job could not be handed over; the job comes back.
pub enum HandOffError {
    /// The ring is full: answer 503.
    Full(Job),
    /// The writers are gone (shutting down): answer 503.
    Closed(Job),
}

impl RingSender {
    /// Hands `job` to the writers. Never blocks.
    pub fn try_send(&self, job: Job) -> Result<(), HandOffError> {
        let events = job.rows.len() as u64;
        // Counted before the send so that a writer's decrement never comes first.
        self.backlog.queued_events.fetch_add(events, Ordering::Relaxed);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.backlog.queued_events.fetch_sub(events, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(back) => HandOffError::Full(back),
                    TrySendError::Disconnected(back) => HandOffError::Closed(back),
                })
            }
        }
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.sender.len()
    }

    /// What waits and how fast it drains.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }
}

/// A writer's end of the ring: jobs out, the backlog's count kept.
pub struct RingReceiver {
    receiver: Receiver<Job>,
    backlog: Arc<Backlog>,
}

impl RingReceiver {
    fn took(&self, job: Job) -> Job {
        self.backlog.queued_events.fetch_sub(job.rows.len() as u64, Ordering::Relaxed);
        job
    }

    /// Waits for a job; `None` once every sender is gone and the ring is empty.
    pub fn recv(&self) -> Option<Job> {
        self.receiver.recv().ok().map(|j| self.took(j))
    }

    /// A job if one waits.
    pub fn try_recv(&self) -> Option<Job> {
        self.receiver.try_recv().ok().map(|j| self.took(j))
    }

    /// A job if one comes before `deadline`.
    pub fn recv_deadline(&self, deadline: Instant) -> Option<Job> {
        self.receiver.recv_deadline(deadline).ok().map(|j| self.took(j))
    }

    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }
}

/// What a writer's commits cost: `overhead + per_event × events`, fitted by
/// exponentially weighted least squares over its recent batches (a few
/// batches of memory, so that a database that slows down is seen within a
/// second). Pure; the clock is the caller's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Fixed cost of a batch (round trips, the commit's WAL flush), µs.
    pub overhead_us: f64,
    /// Cost of one more event in a batch, µs.
    pub per_event_us: f64,
    // Decayed sums of weight, events, duration, events², events × duration.
    sw: f64,
    /// The largest batch seen lately (decaying): the model is trusted up to
    /// twice that, like TCP's slow start, so that a cold start or a change
    /// nobody has measured yet costs one modest batch, not a 5-second COPY.
    seen_events: f64,
    sn: f64,
    sd: f64,
    snn: f64,
    snd: f64,
}

/// How much an older batch still counts, per newer batch.
const COST_DECAY: f64 = 0.75;
/// How fast the largest batch seen is forgotten, per newer batch.
const SEEN_DECAY: f64 = 0.95;
/// A batch may always hold this many events, whatever has been seen.
const MIN_BATCH_LIMIT: f64 = 128.0;
/// Floor on the per-event cost, so that the batch limit stays finite.
const MIN_PER_EVENT_US: f64 = 0.05;

impl Default for CostModel {
    /// Before any commit: 1 ms per batch and 10 µs per event, about what a
    /// healthy local PostgreSQL costs, so that start-up neither refuses work
    /// nor makes huge batches.
    fn default() -> Self {
        CostModel {
            overhead_us: 1_000.0,
            per_event_us: 10.0,
            sw: 0.0,
            seen_events: 0.0,
            sn: 0.0,
            sd: 0.0,
            snn: 0.0,
            snd: 0.0,
        }
    }
}

impl CostModel {
    /// Learns from one committed batch of `events` that took `took`.
    ///
    /// A batch far off the prediction (3× either way) means the database
    /// changed (it slowed down, or recovered): the history is dropped, since
    /// fitting a line through two regimes gives neither. Until batches of
    /// different sizes come, the fixed cost is kept and the rest is charged
    /// per event, which errs towards smaller batches.
    pub fn observe(&mut self, events: usize, took: Duration) {
        let (n, d) = (events.max(1) as f64, took.as_secs_f64() * 1e6);
        let expected = self.overhead_us + self.per_event_us * n;
        if self.sw > 0.0 && (d > 3.0 * expected || 3.0 * d < expected) {
            (self.sw, self.sn, self.sd, self.snn, self.snd) = (0.0, 0.0, 0.0, 0.0, 0.0);
        }
        self.seen_events = (self.seen_events * SEEN_DECAY).max(n);
        self.sw = self.sw * COST_DECAY + 1.0;
        self.sn = self.sn * COST_DECAY + n;
        self.sd = self.sd * COST_DECAY + d;
        self.snn = self.snn * COST_DECAY + n * n;
        self.snd = self.snd * COST_DECAY + n * d;
        let (mean_n, mean_d) = (self.sn / self.sw, self.sd / self.sw);
        let var_n = self.snn / self.sw - mean_n * mean_n;
        if var_n > (0.1 * mean_n) * (0.1 * mean_n) {
            // Batch sizes differ enough to tell the fixed cost from the per-event one.
            let slope = (self.snd / self.sw - mean_n * mean_d) / var_n;
            self.per_event_us = slope.max(MIN_PER_EVENT_US);
            self.overhead_us = (mean_d - self.per_event_us * mean_n).clamp(0.0, mean_d);
        } else {
            // All about the same size: keep the fixed cost, put the rest per event.
            self.overhead_us = self.overhead_us.min(mean_d);
            self.per_event_us = ((mean_d - self.overhead_us) / mean_n).max(MIN_PER_EVENT_US);
        }
    }

    /// Expected duration of a batch of `events`.
    pub fn predict(&self, events: usize) -> Duration {
        Duration::from_secs_f64((self.overhead_us + self.per_event_us * events as f64) / 1e6)
    }

    /// Most events a batch may hold to commit within `target`.
    /// Most events a batch may hold to commit within `target`, and at most
    /// twice the largest batch measured lately (at least [`MIN_BATCH_LIMIT`]).
    pub fn batch_limit(&self, target: Duration) -> usize {
        let room = (target.as_secs_f64() * 1e6 - self.overhead_us).max(self.per_event_us);
        let by_time = room / self.per_event_us + 1e-6;
        let trusted = (2.0 * self.seen_events).max(MIN_BATCH_LIMIT);
        by_time.min(trusted).min(usize::MAX as f64 / 2.0) as usize
    }
}

/// One writer as the backlog sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriterLoad {
    pub model: CostModel,
    /// The batch in flight: how long it has run and how many events it holds.
    pub busy: Option<(Duration, usize)>,
}

/// How long a request handed over now would wait for a writer to start its
/// COPY: until the first writer is free, then its share of what is queued
/// ahead of it, spread over the writers.
///
/// A writer whose batch runs past its prediction (a lock, a stall) is
/// expected to run as long again as it already has, and its cost per event
/// is taken to be what the batch has shown so far: so a database that stops
/// answering turns admission away within about `max_wait`, before any
/// commit finishes to say so.
pub fn wait_estimate(queued_events: u64, writers: impl IntoIterator<Item = WriterLoad>) -> Duration {
    let mut first_free = f64::MAX;
    let mut per_event_sum = 0.0;
    let mut count = 0usize;
    for w in writers {
        count += 1;
        let mut per_event = w.model.per_event_us;
        let free_in = match w.busy {
            None => 0.0,
            Some((ran, events)) => {
                let (ran, expected) = (ran.as_secs_f64() * 1e6, w.model.predict(events).as_secs_f64() * 1e6);
                if ran <= expected {
                    expected - ran
                } else {
                    per_event = per_event.max((ran - w.model.overhead_us).max(0.0) / events.max(1) as f64);
                    ran
                }
            }
        };
        first_free = first_free.min(free_in);
        per_event_sum += per_event;
    }
    if count == 0 {
        return Duration::ZERO;
    }
    let per_event = per_event_sum / count as f64;
    let ahead = queued_events as f64 * per_event / count as f64;
    Duration::from_secs_f64((first_free + ahead).max(0.0) / 1e6)
}

/// What waits in the ring and how fast the writers drain it: the shards'
/// view for admission, written by the writers (each its own slot).
pub struct Backlog {
    epoch: Instant,
    /// Events in the ring, not yet taken by a writer.
    queued_events: AtomicU64,
    writers: Box<[WriterSlot]>,
}

/// One writer's published state; only that writer stores into it.
#[derive(Default)]
#[repr(align(128))]
struct WriterSlot {
    /// µs since the epoch + 1 when its batch started; 0 while idle.
    busy_since: AtomicU64,
    busy_events: AtomicU64,
    overhead_us: AtomicU64,
    per_event_ns: AtomicU64,
}

impl Backlog {
    fn new(writers: usize) -> Backlog {
        let model = CostModel::default();
        let slots: Box<[WriterSlot]> = (0..writers).map(|_| WriterSlot::default()).collect();
        let backlog = Backlog { epoch: Instant::now(), queued_events: AtomicU64::new(0), writers: slots };
        for w in 0..writers {
            backlog.publish_model(w, &model);
        }
        backlog
    }

    /// Events waiting in the ring.
    pub fn queued_events(&self) -> u64 {
        self.queued_events.load(Ordering::Relaxed)
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Writer `w` starts committing a batch of `events` at `now`.
    pub fn started(&self, w: usize, events: usize, now: Instant) {
        let slot = &self.writers[w];
        slot.busy_events.store(events as u64, Ordering::Relaxed);
        slot.busy_since.store(self.micros(now) + 1, Ordering::Release);
    }

    /// Writer `w` is done with its batch; its cost model is now `model`.
    pub fn finished(&self, w: usize, model: &CostModel) {
        self.writers[w].busy_since.store(0, Ordering::Release);
        self.publish_model(w, model);
    }

    fn publish_model(&self, w: usize, model: &CostModel) {
        let slot = &self.writers[w];
        slot.overhead_us.store(model.overhead_us as u64, Ordering::Relaxed);
        slot.per_event_ns.store((model.per_event_us * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Every writer's load at `now`.
    pub fn loads(&self, now: Instant) -> impl Iterator<Item = WriterLoad> + '_ {
        let now_us = self.micros(now);
        self.writers.iter().map(move |slot| {
            let since = slot.busy_since.load(Ordering::Acquire);
            let model = CostModel {
                overhead_us: slot.overhead_us.load(Ordering::Relaxed) as f64,
                per_event_us: slot.per_event_ns.load(Ordering::Relaxed) as f64 / 1000.0,
                ..CostModel::default()
            };
            let busy = (since > 0).then(|| {
                let ran = Duration::from_micros(now_us.saturating_sub(since - 1));
                (ran, slot.busy_events.load(Ordering::Relaxed) as usize)
            });
            WriterLoad { model, busy }
        })
    }

    /// How long a request handed over at `now` would wait for its COPY to
    /// start. No allocation, no lock: a few atomic loads per writer.
    pub fn wait_estimate(&self, now: Instant) -> Duration {
        wait_estimate(self.queued_events(), self.loads(now))
    }
}

/// Read-only view of the ring for metrics: its length without the power to send.
#[derive(Clone)]
pub struct RingGauge {
    receiver: Option<Receiver<Job>>,
}

impl RingGauge {
    pub fn new(receivers: &[RingReceiver]) -> Self {
        Self { receiver: receivers.first().map(|r| r.receiver.clone()) }
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

    fn job(events: usize) -> Job {
        let mut rows = RowBuf::default();
        for i in 0..events {
            let id = format!("e{i}");
            rows.push(&crate::row::RowFields {
                event_id: id.as_bytes(),
                device_id: "d",
                event_type: "t",
                ts: 0,
                received_at: 0,
                payload: None,
            });
        }
        Job { rows, reply: Reply::None, enqueued: Instant::now(), lease: Lease::detached() }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_full_ring_hands_the_job_back() {
        let (set, receivers, backlog) = ring(2, 1);
        assert!(set.try_send(job(3)).is_ok());
        assert!(set.try_send(job(4)).is_ok());
        assert!(matches!(set.try_send(job(5)), Err(HandOffError::Full(_))));
        assert_eq!(set.depth(), 2);
        assert_eq!(backlog.queued_events(), 7, "a refused job is not counted");
        assert_eq!(RingGauge::new(&receivers).capacity(), 2);
        // Either writer takes whatever waits: one can drain it all.
        receivers[1].recv().unwrap();
        receivers[1].try_recv().unwrap();
        assert_eq!(backlog.queued_events(), 0);
        assert!(receivers[0].try_recv().is_none());
        assert!(set.try_send(job(1)).is_ok(), "room again after a receive");
    }

    #[test]
    fn closed_rings_are_reported() {
        let (set, receivers, backlog) = ring(1, 4);
        drop(receivers);
        assert!(matches!(set.try_send(job(2)), Err(HandOffError::Closed(_))));
        assert_eq!(backlog.queued_events(), 0);
    }

    #[test]
    fn a_ticket_is_settled_once() {
        let t = Ticket::new();
        let shard = t.clone();
        assert!(t.claim());
        assert!(!shard.cancel(), "claimed first: the shard must wait for the commit");
        let t = Ticket::new();
        assert!(t.clone().cancel());
        assert!(!t.claim(), "cancelled first: never written");
    }

    #[test]
    fn the_cost_model_separates_fixed_and_per_event_cost() {
        let mut m = CostModel::default();
        // 2 ms per batch + 20 µs per event, batches of varying size.
        for n in [10, 500, 2000, 100, 4000, 50, 3000, 800] {
            m.observe(n, Duration::from_micros(2_000 + 20 * n as u64));
        }
        assert!((m.per_event_us - 20.0).abs() < 0.5, "{m:?}");
        assert!((m.overhead_us - 2_000.0).abs() < 100.0, "{m:?}");
        assert_eq!(m.predict(1000), Duration::from_micros(22_000));
        let limit = m.batch_limit(ms(250));
        assert!((6_000..=8_000).contains(&limit), "twice the largest batch seen lately: {limit}");
        for _ in 0..3 {
            m.observe(9000, Duration::from_micros(2_000 + 20 * 9000));
        }
        assert_eq!(m.batch_limit(ms(250)), 12_400, "then the time target");
    }

    #[test]
    fn a_database_a_hundred_times_slower_gives_small_batches_within_a_few_commits() {
        let mut m = CostModel::default();
        for _ in 0..20 {
            m.observe(5000, ms(50));
        }
        assert!(m.batch_limit(ms(250)) >= 10_000, "healthy: no limit below the usual bounds ({m:?})");
        // Every event now costs 1 ms.
        let mut limit = 5000;
        for _ in 0..4 {
            let took = Duration::from_micros(1_000 + 1_000 * limit as u64);
            m.observe(limit, took);
            limit = m.batch_limit(ms(250)).min(10_000);
        }
        assert!((200..=400).contains(&limit), "limit {limit} ({m:?})");
    }

    #[test]
    fn a_cold_start_grows_batches_from_what_it_has_measured() {
        let mut m = CostModel::default();
        assert_eq!(m.batch_limit(ms(250)), 128, "nothing measured yet");
        let mut limit = m.batch_limit(ms(250));
        let mut sizes = Vec::new();
        for _ in 0..8 {
            m.observe(limit, Duration::from_micros(1_000 + 5 * limit as u64));
            limit = m.batch_limit(ms(250));
            sizes.push(limit);
        }
        assert!(sizes.windows(2).all(|w| w[1] >= w[0]) && limit >= 10_000, "{sizes:?}");
    }

    #[test]
    fn identical_batches_keep_the_fixed_cost_and_charge_the_rest_per_event() {
        let mut m = CostModel::default();
        for _ in 0..10 {
            m.observe(100, ms(11));
        }
        assert!((m.overhead_us - 1_000.0).abs() < 1.0 && (m.per_event_us - 100.0).abs() < 1.0, "{m:?}");
        let mut tiny = CostModel::default();
        tiny.observe(1, Duration::from_micros(300));
        assert!(tiny.overhead_us <= 300.0 && tiny.per_event_us >= MIN_PER_EVENT_US, "{tiny:?}");
    }

    fn load(per_event_us: f64, busy: Option<(u64, usize)>) -> WriterLoad {
        WriterLoad {
            model: CostModel { overhead_us: 1_000.0, per_event_us, ..CostModel::default() },
            busy: busy.map(|(ran_ms, n)| (ms(ran_ms), n)),
        }
    }

    #[test]
    fn the_wait_is_the_first_free_writer_plus_the_queue_ahead() {
        // An idle writer: only the queue, shared by both writers.
        assert_eq!(wait_estimate(1000, [load(10.0, None), load(10.0, Some((1, 100)))]), ms(5));
        // Both busy, on schedule: the sooner one frees in 1 ms (2 ms expected, 1 ms run).
        assert_eq!(wait_estimate(0, [load(10.0, Some((1, 100))), load(10.0, Some((1, 1000)))]), ms(1));
        assert_eq!(wait_estimate(0, []), Duration::ZERO);
    }

    #[test]
    fn a_stalled_writer_counts_as_long_again_and_at_the_cost_it_has_shown() {
        // Both writers stuck for 2 s on 100-event batches expected to take 2 ms.
        let stuck = [load(10.0, Some((2_000, 100))), load(10.0, Some((2_000, 100)))];
        let empty_queue = wait_estimate(0, stuck);
        assert_eq!(empty_queue, ms(2_000), "as long again as it has run");
        // The queue ahead now costs ~20 ms an event.
        assert!(wait_estimate(100, stuck) > ms(2_900), "{:?}", wait_estimate(100, stuck));
    }

    #[test]
    fn the_backlog_publishes_what_writers_do() {
        let (_tx, _rx, backlog) = ring(2, 4);
        let t0 = Instant::now();
        assert_eq!(backlog.wait_estimate(t0), Duration::ZERO, "idle and empty");
        backlog.started(0, 100, t0);
        backlog.started(1, 100, t0);
        let loads: Vec<_> = backlog.loads(t0 + ms(5)).collect();
        assert_eq!(loads[0].busy, Some((ms(5), 100)));
        assert!(backlog.wait_estimate(t0 + ms(5000)) >= ms(5000), "stalled writers");
        let mut model = CostModel::default();
        model.observe(100, ms(3));
        backlog.finished(1, &model);
        assert_eq!(backlog.loads(t0).nth(1).map(|l| l.busy), Some(None));
        assert_eq!(backlog.wait_estimate(t0 + ms(5000)), Duration::ZERO, "a writer is free again");
    }
}
