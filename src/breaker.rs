//! The database circuit breaker: a small, pure state machine with the clock
//! passed in.
//!
//! Why: when PostgreSQL is down, every batch would otherwise wait for a
//! connect or statement timeout before failing, and every client would wait
//! with it. After `failure_threshold` consecutive transient failures the
//! breaker opens: writers stop calling the database and shards answer 503 with
//! `Retry-After` at once. After `open_ms` it lets one probe through
//! (half-open); a success closes it, a failure re-opens it for twice as long
//! (up to `max_open_ms`), so a long outage is probed ever less often.
//!
//! ```text
//!            failure_threshold consecutive failures
//!   Closed ─────────────────────────────────────────▶ Open ◀──────┐
//!     ▲                                                │ open time │ probe fails:
//!     │ probe succeeds                                 ▼ elapsed   │ open time × 2
//!     └──────────────────────────────────────────── HalfOpen ──────┘
//!                                            (one probe at a time)
//! ```
//!
//! The breaker follows the database by itself, without client traffic: the
//! probe thread (`writer::probe`) reports a cheap query every
//! `database.probe_interval_ms` while no writer is reaching the database
//! ([`Breaker::on_probe`]). A failed probe counts like a failed batch; once
//! the open time has passed, a successful probe half-opens the breaker, so
//! the next client batch is the trial and `/health` turns ready. Probe
//! failures never double the open time: only a failed trial *batch* does
//! (the database answers a `SELECT 1` but not our COPYs), which is the
//! flapping the doubling is for. Before the probe, an open breaker stayed
//! open until a client's batch happened to come and be the probe, and a
//! load balancer that gates on `/health` never sent one.
//!
//! Ownership: one [`Breaker`] is owned by one thread (a writer, or several
//! writers and the probe behind one lock taken once per round trip). It never reads the clock:
//! every method takes `now`, so tests drive it through every transition
//! without sleeping. Other threads read a [`BreakerView`]: two atomics behind
//! an `Arc`, so a shard can refuse a request without locking anything.
//!
//! Only failures that say the database is unavailable count (the writer
//! decides which, in one place: `WriteError::counts_against_database`: lost
//! connections, timeouts, PostgreSQL shutting down). A permanent error (bad
//! data refused by PostgreSQL) proves the database is answering, so it counts
//! as a success for the breaker: bad events can never open it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use crate::config::BreakerConfig;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Calls flow; consecutive transient failures are counted.
    Closed = 0,
    /// Calls are refused until the open time has passed.
    Open = 1,
    /// The open time has passed; one probe call at a time is let through.
    HalfOpen = 2,
}

impl BreakerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Lower-case name for `/health` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Numeric value for a Prometheus gauge: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> u8 {
        self as u8
    }
}

/// The answer to "may I call the database now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead, then report the outcome with `on_success` / `on_failure`.
    Permit,
    /// Do not call; try again after `retry_after` (what `Retry-After` says).
    Rejected { retry_after: Duration },
}

/// The state machine. Owned by one thread; see the module docs.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// Transient failures in a row while closed.
    failures: u32,
    /// Open time used the last time the breaker opened (doubles on a failed probe).
    open_for: Duration,
    /// While open: when a probe becomes allowed.
    open_until: Instant,
    /// While half-open: a probe is out and has not reported yet.
    probing: bool,
    view: BreakerView,
}

impl Breaker {
    /// A closed breaker. `now` anchors the view's clock (any instant will do).
    pub fn new(config: BreakerConfig, now: Instant) -> Self {
        let open_for = Duration::from_millis(config.open_ms);
        let view = BreakerView {
            shared: Arc::new(Shared {
                epoch: now,
                state: AtomicU8::new(BreakerState::Closed as u8),
                open_until_ms: AtomicU64::new(0),
                opens: AtomicU64::new(0),
            }),
        };
        Self { config, state: BreakerState::Closed, failures: 0, open_for, open_until: now, probing: false, view }
    }

    /// Asks to call the database. While open and the open time has passed,
    /// this is the moment the breaker turns half-open and hands out the probe.
    pub fn allow(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Permit,
            BreakerState::Open if now >= self.open_until => {
                self.set_state(BreakerState::HalfOpen);
                self.probing = true;
                Admission::Permit
            }
            BreakerState::Open => Admission::Rejected { retry_after: self.open_until - now },
            BreakerState::HalfOpen if !self.probing => {
                self.probing = true;
                Admission::Permit
            }
            // A probe is out: whoever asks waits for its verdict, about one
            // base open time at most.
            BreakerState::HalfOpen => Admission::Rejected { retry_after: Duration::from_millis(self.config.open_ms) },
        }
    }

    /// The permitted call succeeded (or failed permanently: the database answered).
    pub fn on_success(&mut self, _now: Instant) {
        match self.state {
            BreakerState::Closed => self.failures = 0,
            BreakerState::HalfOpen => {
                self.failures = 0;
                self.probing = false;
                self.open_for = Duration::from_millis(self.config.open_ms);
                self.set_state(BreakerState::Closed);
            }
            // A call permitted before the breaker opened finished late: its
            // verdict is stale, the probe decides.
            BreakerState::Open => {}
        }
    }

    /// The permitted call failed transiently or timed out.
    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                self.failures += 1;
                if self.failures >= self.config.failure_threshold {
                    self.open_for = Duration::from_millis(self.config.open_ms);
                    self.open(now);
                }
            }
            BreakerState::HalfOpen => {
                let doubled = self.open_for.saturating_mul(2);
                self.open_for = doubled.min(Duration::from_millis(self.config.max_open_ms));
                self.open(now);
            }
            BreakerState::Open => {}
        }
    }

    /// The probe's verdict: whether a cheap query reached the database.
    pub fn on_probe(&mut self, now: Instant, reached: bool) {
        match (self.state, reached) {
            // While closed, writers' batches decide; a failed probe is one
            // more failure in a row (nothing else is trying).
            (BreakerState::Closed, true) | (BreakerState::HalfOpen, true) => {}
            (BreakerState::Closed, false) => self.on_failure(now),
            (BreakerState::Open, true) if now >= self.open_until => {
                self.probing = false;
                self.set_state(BreakerState::HalfOpen);
            }
            (BreakerState::Open, _) => {}
            // Unreachable again before a trial batch came: open, not doubled.
            (BreakerState::HalfOpen, false) => self.open(now),
        }
    }

    /// Reports a database call's outcome: `unavailable` when it failed in a
    /// way that says the database is unavailable; successes, data errors and
    /// conflicts between transactions (deadlocks) are the database answering.
    pub fn on_outcome(&mut self, now: Instant, unavailable: bool) {
        if unavailable { self.on_failure(now) } else { self.on_success(now) }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Transient failures in a row so far (closed state).
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// A read-only view for other threads.
    pub fn view(&self) -> BreakerView {
        self.view.clone()
    }

    fn open(&mut self, now: Instant) {
        self.probing = false;
        self.open_until = now + self.open_for;
        let until_ms = self.open_until.saturating_duration_since(self.view.shared.epoch).as_millis();
        self.view.shared.open_until_ms.store(u64::try_from(until_ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.view.shared.opens.fetch_add(1, Ordering::Relaxed);
        self.set_state(BreakerState::Open);
    }

    fn set_state(&mut self, state: BreakerState) {
        self.state = state;
        // Release: a reader that sees Open also sees the open_until_ms stored before.
        self.view.shared.state.store(state as u8, Ordering::Release);
    }
}

/// What the breaker publishes. `open_until_ms` counts from `epoch`.
#[derive(Debug)]
struct Shared {
    epoch: Instant,
    state: AtomicU8,
    open_until_ms: AtomicU64,
    opens: AtomicU64,
}

/// A cheap, lock-free, read-only view of a [`Breaker`] for shards, `/health`
/// and `/metrics`. Clone it freely.
#[derive(Debug, Clone)]
pub struct BreakerView {
    shared: Arc<Shared>,
}

impl BreakerView {
    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.shared.state.load(Ordering::Acquire))
    }

    /// Whether a shard should take a request that needs the database now.
    ///
    /// Closed and half-open admit (the writer's own breaker lets one trial
    /// batch through). Open rejects: the probe half-opens it by itself once
    /// the open time has passed and the database answers, so no client
    /// request has to be let through to find out.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.state() != BreakerState::Open {
            return Admission::Permit;
        }
        let until = self.shared.epoch + Duration::from_millis(self.shared.open_until_ms.load(Ordering::Relaxed));
        Admission::Rejected { retry_after: until.saturating_duration_since(now) }
    }

    /// Times the breaker has opened (a counter for `/metrics`).
    pub fn opens(&self) -> u64 {
        self.shared.opens.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig { failure_threshold: 3, open_ms: 100, max_open_ms: 350 };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A breaker that has just opened at `t0 + at`.
    fn opened(t0: Instant, at: u64) -> Breaker {
        let mut b = Breaker::new(CONFIG, t0);
        for _ in 0..CONFIG.failure_threshold {
            assert_eq!(b.allow(t0 + ms(at)), Admission::Permit);
            b.on_failure(t0 + ms(at));
        }
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let c = BreakerConfig::default();
        assert_eq!((c.failure_threshold, c.open_ms, c.max_open_ms), (5, 1_000, 30_000));
        assert!(c.problems().is_empty());
        let bad = BreakerConfig { failure_threshold: 0, open_ms: 0, max_open_ms: 0 };
        assert_eq!(bad.problems().iter().map(|p| p.0).collect::<Vec<_>>(), ["failure_threshold", "open_ms"]);
        let bad = BreakerConfig { max_open_ms: 10, ..CONFIG };
        assert_eq!(bad.problems()[0].0, "max_open_ms");
    }

    #[test]
    fn closed_permits_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CONFIG, t0);
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.consecutive_failures(), 2);
        b.on_success(t0);
        assert_eq!(b.consecutive_failures(), 0);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Closed, "failures must be consecutive");
        assert_eq!(b.allow(t0), Admission::Permit);
    }

    #[test]
    fn threshold_failures_open_and_reject_with_the_remaining_time() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        assert_eq!(b.allow(t0 + ms(30)), Admission::Rejected { retry_after: ms(70) });
        assert_eq!(b.view().state(), BreakerState::Open);
        assert_eq!(b.view().opens(), 1);
    }

    #[test]
    fn open_turns_half_open_after_open_ms_with_a_single_probe() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        assert_eq!(b.allow(t0 + ms(100)), Admission::Permit, "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.allow(t0 + ms(101)), Admission::Rejected { retry_after: ms(100) }, "one probe at a time");
    }

    #[test]
    fn probe_success_closes_and_resets_the_open_time() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        assert_eq!(b.allow(t0 + ms(100)), Admission::Permit);
        b.on_failure(t0 + ms(100)); // open for 200 now
        assert_eq!(b.allow(t0 + ms(300)), Admission::Permit);
        b.on_success(t0 + ms(300));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.view().state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        // Opening again starts from open_ms, not the doubled time.
        for _ in 0..3 {
            b.on_failure(t0 + ms(400));
        }
        assert_eq!(b.allow(t0 + ms(400)), Admission::Rejected { retry_after: ms(100) });
    }

    #[test]
    fn probe_failure_reopens_with_doubling_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        let mut at = 100;
        for expected in [200, 350, 350] {
            assert_eq!(b.allow(t0 + ms(at)), Admission::Permit, "probe at {at}");
            b.on_failure(t0 + ms(at));
            assert_eq!(b.state(), BreakerState::Open);
            assert_eq!(b.allow(t0 + ms(at)), Admission::Rejected { retry_after: ms(expected) });
            assert_eq!(b.allow(t0 + ms(at + expected - 1)), Admission::Rejected { retry_after: ms(1) });
            at += expected;
        }
        assert_eq!(b.view().opens(), 4);
    }

    #[test]
    fn late_verdicts_while_open_are_ignored() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        b.on_success(t0 + ms(10));
        assert_eq!(b.state(), BreakerState::Open, "a stale success does not close");
        b.on_failure(t0 + ms(90));
        assert_eq!(b.allow(t0 + ms(100)), Admission::Permit, "a stale failure does not extend");
    }

    #[test]
    fn only_transient_errors_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CONFIG, t0);
        for _ in 0..10 {
            b.on_outcome(t0, false); // e.g. invalid input syntax: the database answered
        }
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..3 {
            b.on_outcome(t0, true); // e.g. connection refused
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.allow(t0 + ms(100)), Admission::Permit);
        b.on_outcome(t0 + ms(100), false);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn view_rejects_while_open_until_the_owner_half_opens() {
        let t0 = Instant::now();
        let b = opened(t0, 50);
        let view = b.view();
        assert_eq!(view.admit(t0 + ms(60)), Admission::Rejected { retry_after: ms(90) });
        // Past the open time the view still refuses: the probe (or a
        // writer's own retry) turns the owner half-open, not a client request.
        assert_eq!(view.admit(t0 + ms(150)), Admission::Rejected { retry_after: ms(0) });
        let mut b = b;
        assert_eq!(b.allow(t0 + ms(150)), Admission::Permit);
        assert_eq!(view.state(), BreakerState::HalfOpen);
        assert_eq!(view.admit(t0 + ms(150)), Admission::Permit);
    }

    #[test]
    fn probes_open_it_with_no_traffic_and_half_open_it_when_the_database_is_back() {
        let t0 = Instant::now();
        let mut b = Breaker::new(CONFIG, t0);
        b.on_probe(t0, true);
        assert_eq!(b.state(), BreakerState::Closed);
        for i in 0..CONFIG.failure_threshold {
            b.on_probe(t0 + ms(u64::from(i) * 10), false);
        }
        assert_eq!(b.state(), BreakerState::Open, "failed probes count like failed batches");
        b.on_probe(t0 + ms(60), true);
        assert_eq!(b.state(), BreakerState::Open, "not before the open time has passed");
        b.on_probe(t0 + ms(500), false);
        b.on_probe(t0 + ms(600), false);
        b.on_probe(t0 + ms(700), true);
        assert_eq!(b.state(), BreakerState::HalfOpen, "back: ready for a trial batch");
        assert_eq!(b.allow(t0 + ms(700)), Admission::Permit, "the first batch is the trial");
        b.on_success(t0 + ms(701));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn failed_probes_never_double_the_open_time_but_a_failed_trial_batch_does() {
        let t0 = Instant::now();
        let mut b = opened(t0, 0);
        for at in [100, 200, 300, 400] {
            b.on_probe(t0 + ms(at), false);
        }
        b.on_probe(t0 + ms(450), true);
        assert_eq!(b.state(), BreakerState::HalfOpen, "an outage of any length is noticed within open_ms");
        b.on_probe(t0 + ms(460), false);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.allow(t0 + ms(460)), Admission::Rejected { retry_after: ms(100) }, "not doubled");
        b.on_probe(t0 + ms(560), true);
        assert_eq!(b.allow(t0 + ms(560)), Admission::Permit);
        b.on_failure(t0 + ms(560));
        assert_eq!(b.allow(t0 + ms(560)), Admission::Rejected { retry_after: ms(200) }, "a failed trial batch doubles");
    }

    #[test]
    fn view_is_shareable_across_threads() {
        let t0 = Instant::now();
        let b = opened(t0, 0);
        let view = b.view();
        let seen = std::thread::spawn(move || view.state()).join().expect("reader thread");
        assert_eq!(seen, BreakerState::Open);
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        assert_eq!(BreakerState::Open.as_gauge(), 1);
    }
}
