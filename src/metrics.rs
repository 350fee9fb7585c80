//! Counters and histograms: what each thread counts. `report` renders them
//! (with the health and the gauges of other stages) as `/stats`, `/metrics`.
//!
//! Ownership keeps the hot path free of shared writes: each shard and each
//! writer has its own cache-line-aligned block of counters that only its
//! thread writes (a plain load + store, no locked instruction); a scrape sums
//! them. Distributions (latencies, batch sizes, loop lag) are built of the
//! same counters, so recording one takes no lock either: fixed buckets for
//! `/metrics` (Prometheus histograms, summable over threads, instances and
//! any time range) and a one-minute ring of finer buckets for the quantiles
//! `/stats` shows (see [`Distribution`]). Label sets are closed: shard and
//! writer numbers, route names, status codes and rejection kinds, never
//! anything taken from a request.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::labels::{RejectKind, Route, Shed};

/// A counter written by one thread only.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning thread calls this, so load + store is exact.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Status codes counted; anything else is counted as `other`.
pub const STATUS_CODES: [u16; 18] =
    [101, 200, 202, 400, 401, 403, 404, 405, 408, 411, 413, 415, 426, 429, 431, 500, 503, 0];

fn status_slot(code: u16) -> usize {
    STATUS_CODES.iter().position(|&c| c == code).unwrap_or(STATUS_CODES.len() - 1)
}

/// One shard's counters.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardStats {
    pub requests: [Counter; Route::ALL.len()],
    pub responses: [Counter; STATUS_CODES.len()],
    pub events_accepted: Counter,
    pub events_rejected: [Counter; RejectKind::ALL.len()],
    /// Requests answered 503 without being stored, for any reason in [`Shed`].
    pub overload_rejections: Counter,
    /// The same, by reason.
    pub shed: [Counter; Shed::ALL.len()],
    pub connections_accepted: Counter,
    /// Connections closed at once because the shard was at its cap.
    pub connections_refused: Counter,
    pub connections_open: AtomicI64,
    /// WebSocket events (and notices) written to subscribers.
    pub ws_messages_sent: Counter,
    pub ws_bytes_sent: Counter,
    /// Events a subscriber did not get: dropped (`drop_oldest`), lost to a
    /// 1013 close, or missed upstream.
    pub ws_dropped: Counter,
    /// Subscribers closed with 1013 because they could not keep up.
    pub ws_slow_closes: Counter,
    /// Ingest frames received over WebSocket.
    pub ws_ingest_frames: Counter,
    /// Commit → frame written, per event, µs.
    pub ws_fanout_us: Distribution<Latency>,
    /// How late the shard's 100 ms lag probe woke up, µs: time the event
    /// loop spent on other work (or the thread was not scheduled).
    pub loop_lag_us: Distribution<LoopLag>,
    /// The probe's latest reading, µs.
    pub loop_lag_last_us: AtomicU64,
}

impl ShardStats {
    pub fn request(&self, route: Route) {
        self.requests[route as usize].inc();
    }
    pub fn response(&self, code: u16) {
        self.responses[status_slot(code)].inc();
    }
    pub fn rejected(&self, kind: RejectKind) {
        self.events_rejected[kind as usize].inc();
    }
    /// A request answered 503 without being stored.
    pub fn shed(&self, why: Shed) {
        self.overload_rejections.inc();
        self.shed[why as usize].inc();
    }
}

/// The bucket edges of one kind of [`Distribution`]: inclusive upper bounds
/// in the unit recorded (µs for durations, events for sizes), ascending;
/// values above the last edge count in the `+Inf` bucket only.
pub trait Edges {
    /// The edges, ascending.
    const EDGES: &'static [u64];
    /// Units recorded per unit exported (1e6 µs per s). A divisor, not a
    /// factor: an integer edge divided by it is exactly the decimal it
    /// names (`100 / 1e6` is `0.0001`, `100 * 1e-6` is not).
    const PER_UNIT: f64;
}

/// Request latencies: ack (ring hand-off → commit), COPY + commit per
/// batch, commit → WebSocket frame written, database probes. 100 µs
/// (in-process fan-out, an idle database) to 30 s (a stalled database;
/// `ingest.max_wait_ms` and the drain deadline bound what is kept waiting).
#[derive(Debug)]
pub struct Latency;
impl Edges for Latency {
    const EDGES: &'static [u64] = &[
        100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
        5_000_000, 10_000_000, 30_000_000,
    ];
    const PER_UNIT: f64 = 1e6;
}

/// Event-loop lag: how late a shard's 100 ms probe fires. 50 µs (an idle
/// loop, the timer's own slack) to 1 s (a shard stuck for ten probes).
#[derive(Debug)]
pub struct LoopLag;
impl Edges for LoopLag {
    const EDGES: &'static [u64] =
        &[50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];
    const PER_UNIT: f64 = 1e6;
}

/// Events per COPY batch: 1 (one request of one event) to 100,000 (above
/// the default `writer.max_batch_events` of 10,000, for raised settings).
#[derive(Debug)]
pub struct BatchSize;
impl Edges for BatchSize {
    const EDGES: &'static [u64] =
        &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000];
    const PER_UNIT: f64 = 1.0;
}

/// The recent window `/stats` reports quantiles over: [`WINDOW_SLOTS`]
/// slots of [`SLOT_SECS`] each, the current one filling; so the last
/// 55 to 60 s.
pub const SLOT_SECS: u64 = 5;
pub const WINDOW_SLOTS: usize = 12;
/// Sub-buckets per power of two in a window slot: a quantile read from it
/// is at most 1/16 (6.25 %) above the true value, never below it.
const FINE_SUB: u64 = 16;
/// Values above this (2^32 - 1: 71 min in µs) count as this.
const FINE_MAX: u64 = u32::MAX as u64;
const FINE_LEN: usize = fine_index(FINE_MAX) + 1;

/// The window slot bucket of `v`: exact below 16, then 16 log-linear
/// sub-buckets per power of two (the layout of an HDR histogram with 4
/// significant bits).
const fn fine_index(v: u64) -> usize {
    let v = if v > FINE_MAX { FINE_MAX } else { v };
    if v < FINE_SUB {
        return v as usize;
    }
    let k = 63 - v.leading_zeros() as u64; // ≥ 4
    ((k - 3) * FINE_SUB + ((v >> (k - 4)) & (FINE_SUB - 1))) as usize
}

/// The largest value that falls in window bucket `i`.
const fn fine_upper(i: usize) -> u64 {
    let i = i as u64;
    if i < FINE_SUB {
        return i;
    }
    let k = i / FINE_SUB + 3;
    let lower = (FINE_SUB + i % FINE_SUB) << (k - 4);
    lower + (1 << (k - 4)) - 1
}

/// One slot of the recent window: what was recorded during one
/// [`SLOT_SECS`] period (`epoch`, counted from the distribution's start,
/// plus one so that 0 means never used).
struct Slot {
    epoch: AtomicU64,
    count: Counter,
    sum: Counter,
    max: Counter,
    fine: Box<[Counter]>,
}

impl Slot {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            count: Counter::default(),
            sum: Counter::default(),
            max: Counter::default(),
            fine: (0..FINE_LEN).map(|_| Counter::default()).collect(),
        }
    }
}

/// A latency or size distribution, recorded by one thread (its owner) and
/// read by scrapes, with no lock: every count is a [`Counter`] only the
/// owner writes.
///
/// Two views of the same values. For `/metrics`, cumulative counts in the
/// fixed buckets of `E` (a Prometheus histogram: rates and quantiles over
/// any range, summable across threads and instances). For `/stats`, a ring
/// of [`WINDOW_SLOTS`] slots of [`SLOT_SECS`] with finer buckets, from
/// which quantiles of the last minute are read. The owner moves to a new
/// slot when the clock says so, clearing it first (one pass over ~460
/// counters every 5 s at most); a scrape reads only slots whose epoch is
/// in the window, so a slot being cleared (its epoch is a minute old) is
/// skipped. A record costs a bucket search in each view and a few plain
/// stores.
pub struct Distribution<E> {
    /// Counts per bucket of `E::EDGES`, then the `+Inf` overflow bucket.
    buckets: Box<[Counter]>,
    /// Sum of every value recorded (in the recorded unit).
    sum: Counter,
    /// Epochs count [`SLOT_SECS`] periods from here.
    start: Instant,
    window: Box<[Slot]>,
    kind: PhantomData<E>,
}

impl<E: Edges> Default for Distribution<E> {
    fn default() -> Self {
        Self {
            buckets: (0..=E::EDGES.len()).map(|_| Counter::default()).collect(),
            sum: Counter::default(),
            start: Instant::now(),
            window: (0..WINDOW_SLOTS).map(|_| Slot::new()).collect(),
            kind: PhantomData,
        }
    }
}

impl<E: Edges> Distribution<E> {
    /// Records `value` as of `now`. Only the owning thread calls this.
    pub fn record_at(&self, value: u64, now: Instant) {
        // The first edge at or above the value; past the last one: +Inf.
        self.buckets[E::EDGES.partition_point(|&edge| edge < value)].inc();
        self.sum.add(value);
        let epoch = self.epoch(now);
        let slot = &self.window[epoch as usize % WINDOW_SLOTS];
        if slot.epoch.load(Ordering::Relaxed) != epoch {
            for c in [&slot.count, &slot.sum, &slot.max].into_iter().chain(slot.fine.iter()) {
                c.0.store(0, Ordering::Relaxed);
            }
            // Release: a scrape that sees the new epoch sees the cleared counts.
            slot.epoch.store(epoch, Ordering::Release);
        }
        slot.count.inc();
        slot.sum.add(value);
        if value > slot.max.get() {
            slot.max.0.store(value, Ordering::Relaxed);
        }
        slot.fine[fine_index(value)].inc();
    }

    /// Records a size (or any value) now.
    pub fn record(&self, value: u64) {
        self.record_at(value, Instant::now());
    }

    /// Records the time since `start`, in µs, reading the clock once.
    pub fn record_since(&self, start: Instant) {
        let now = Instant::now();
        self.record_duration_at(now.saturating_duration_since(start), now);
    }

    /// Records a duration that ended now, in µs.
    pub fn record_duration(&self, d: Duration) {
        self.record_duration_at(d, Instant::now());
    }

    fn record_duration_at(&self, d: Duration, now: Instant) {
        self.record_at(d.as_micros().min(u128::from(u64::MAX)) as u64, now);
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs() / SLOT_SECS + 1
    }

    /// Adds this distribution's counts to `into` (for a scrape).
    fn add_to(&self, into: &mut Snapshot, now: Instant) {
        for (total, c) in into.buckets.iter_mut().zip(self.buckets.iter()) {
            *total += c.get();
        }
        into.sum += self.sum.get();
        let current = self.epoch(now);
        let oldest = current.saturating_sub(WINDOW_SLOTS as u64 - 1).max(1);
        let w = &mut into.window;
        for slot in self.window.iter() {
            // Acquire: pairs with the owner's Release after clearing.
            if !(oldest..=current).contains(&slot.epoch.load(Ordering::Acquire)) {
                continue;
            }
            w.count += slot.count.get();
            w.sum += slot.sum.get();
            w.max = w.max.max(slot.max.get());
            for (total, c) in w.fine.iter_mut().zip(slot.fine.iter()) {
                *total += c.get();
            }
        }
    }
}

/// Several threads' [`Distribution`]s summed, as of one scrape.
pub struct Snapshot {
    /// The edges (in the recorded unit) and [`Edges::PER_UNIT`] of the kind.
    pub edges: &'static [u64],
    pub per_unit: f64,
    /// Counts per bucket (not cumulative), the last one `+Inf`.
    pub buckets: Vec<u64>,
    /// Sum of all values recorded since start.
    pub sum: u64,
    /// The recent window.
    pub window: Window,
}

impl Snapshot {
    /// Cumulative counts per edge, then the `+Inf` total (the count).
    pub fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().scan(0u64, |acc, n| {
            *acc += n;
            Some(*acc)
        })
    }
}

/// The values recorded during the recent window.
pub struct Window {
    pub count: u64,
    pub sum: u64,
    pub max: u64,
    fine: Vec<u64>,
}

impl Window {
    /// The `q` quantile (0..=1), as the upper bound of its bucket (at most
    /// 6.25 % above the value, never above the window's max); 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.fine.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return fine_upper(i).min(self.max);
            }
        }
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum as f64 / self.count as f64 }
    }
}

/// One snapshot of several threads' distributions (for a scrape).
pub fn merge<'a, E: Edges + 'a>(parts: impl Iterator<Item = &'a Distribution<E>>, now: Instant) -> Snapshot {
    let mut all = Snapshot {
        edges: E::EDGES,
        per_unit: E::PER_UNIT,
        buckets: vec![0; E::EDGES.len() + 1],
        sum: 0,
        window: Window { count: 0, sum: 0, max: 0, fine: vec![0; FINE_LEN] },
    };
    for part in parts {
        part.add_to(&mut all, now);
    }
    all
}

/// One writer's counters and histograms.
#[derive(Default)]
#[repr(align(128))]
pub struct WriterStats {
    pub events_committed: Counter,
    /// Events whose `event_id` was already stored (or repeated in one batch).
    pub events_duplicate: Counter,
    pub batches: Counter,
    pub batch_failures: Counter,
    /// Batches that hit a unique violation and were redone through staging.
    pub staging_fallbacks: Counter,
    /// Rows sent through staging because their id was committed lately.
    pub dedup_suspects: Counter,
    /// Events PostgreSQL refused, kept in the dead-letter table.
    pub events_dead_lettered: Counter,
    /// `ack = "queue"` events that could not be committed before shutdown.
    pub events_lost: Counter,
    /// Requests a writer took from the ring after they had waited past
    /// `ingest.max_wait_ms`, and answered 503 instead of writing.
    pub jobs_expired: Counter,
    /// COPY + commit time per batch, µs.
    pub commit_us: Distribution<Latency>,
    /// From ring hand-off to commit, per request, µs.
    pub ack_us: Distribution<Latency>,
    /// Events per batch.
    pub batch_events: Distribution<BatchSize>,
}

/// Every thread's counters, shared behind an `Arc`: shards and writers
/// write their own blocks; `report` reads them all for a scrape.
pub struct Metrics {
    pub shards: Box<[ShardStats]>,
    pub writers: Box<[WriterStats]>,
    pub started: Instant,
    /// Probes by verdict (indexed by `health::DbStatus`); written by the probe only.
    pub probes: [Counter; 3],
    /// How long each probe took, µs.
    pub probe_us: Distribution<Latency>,
    /// Rows in the dead-letter table: set by the probe's periodic count,
    /// raised by writers as they add dead letters in between; -1 until
    /// first counted. See [`Metrics::dead_letters_added`].
    pub dead_letters_waiting: AtomicI64,
}

impl Metrics {
    pub fn new(shards: usize, writers: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| ShardStats::default()).collect(),
            writers: (0..writers).map(|_| WriterStats::default()).collect(),
            started: Instant::now(),
            probes: Default::default(),
            probe_us: Distribution::default(),
            dead_letters_waiting: AtomicI64::new(-1),
        }
    }

    /// A writer stored `n` dead letters: the waiting count (once known)
    /// grows by them until the next count. Off the hot path (only after a
    /// batch was refused), so one shared atomic is fine.
    pub fn dead_letters_added(&self, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let _known = self
            .dead_letters_waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| (v >= 0).then(|| v.saturating_add(n)));
    }

    /// The waiting dead letters, `None` until first counted.
    pub fn dead_letters_waiting(&self) -> Option<u64> {
        u64::try_from(self.dead_letters_waiting.load(Ordering::Relaxed)).ok()
    }

    pub fn sum_shards(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    pub fn sum_writers(&self, f: impl Fn(&WriterStats) -> u64) -> u64 {
        self.writers.iter().map(f).sum()
    }

    /// Every shard's distribution `f`, summed as of `now`.
    pub fn merged_shards<E: Edges>(&self, now: Instant, f: impl Fn(&ShardStats) -> &Distribution<E>) -> Snapshot {
        merge(self.shards.iter().map(f), now)
    }

    /// Every writer's distribution `f`, summed as of `now`.
    pub fn merged<E: Edges>(&self, now: Instant, f: impl Fn(&WriterStats) -> &Distribution<E>) -> Snapshot {
        merge(self.writers.iter().map(f), now)
    }
}

/// Resident set size from `/proc/self/statm`.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cover_every_thread() {
        let m = Metrics::new(2, 2);
        m.shards[0].events_accepted.add(2);
        m.shards[1].events_accepted.add(3);
        m.writers[1].commit_us.record(1500);
        m.writers[0].commit_us.record(20);
        assert_eq!(m.sum_shards(|s| s.events_accepted.get()), 5);
        let all = m.merged(Instant::now(), |w| &w.commit_us);
        assert_eq!(all.cumulative().last(), Some(2));
        assert_eq!((all.sum, all.window.count, all.window.max), (1520, 2, 1500));
    }

    #[test]
    fn fine_buckets_tile_the_range() {
        // Every value falls in the bucket whose bounds hold it, buckets are
        // contiguous, and each is at most 1/16 of its lower bound wide.
        let mut prev_upper = None;
        for i in 0..FINE_LEN {
            let lower = prev_upper.map_or(0, |u: u64| u + 1);
            let upper = fine_upper(i);
            assert!(upper >= lower, "bucket {i}");
            assert!((upper - lower) * FINE_SUB <= lower.max(1), "bucket {i} [{lower}, {upper}] too wide");
            for v in [lower, upper, lower + (upper - lower) / 2] {
                assert_eq!(fine_index(v), i, "value {v}");
            }
            prev_upper = Some(upper);
        }
        assert_eq!(prev_upper, Some(FINE_MAX));
        assert_eq!(fine_index(u64::MAX), FINE_LEN - 1);
    }

    #[test]
    fn prometheus_buckets_hold_values_up_to_their_edge() {
        let d = Distribution::<Latency>::default();
        for v in [0, 100, 101, 30_000_000, 30_000_001] {
            d.record(v);
        }
        let s = merge([&d].into_iter(), Instant::now());
        assert_eq!(s.buckets[0], 2, "0 and 100 are ≤ 100");
        assert_eq!(s.buckets[1], 1, "101 is in (100, 250]");
        assert_eq!(s.buckets[Latency::EDGES.len() - 1], 1, "30 s is in the last edge");
        assert_eq!(s.buckets[Latency::EDGES.len()], 1, "above the last edge: +Inf only");
        assert_eq!(s.cumulative().collect::<Vec<_>>().len(), Latency::EDGES.len() + 1);
        assert_eq!(s.sum, 60_000_202);
        for edges in [Latency::EDGES, LoopLag::EDGES, BatchSize::EDGES] {
            assert!(edges.windows(2).all(|w| w[0] < w[1]), "edges ascending: {edges:?}");
        }
    }

    #[test]
    fn window_keeps_the_last_minute_only() {
        let d = Distribution::<Latency>::default();
        let t0 = d.start;
        let at = |s: u64| t0 + Duration::from_secs(s);
        for v in 1..=1000 {
            d.record_at(v, at(1));
        }
        d.record_at(50_000, at(30));
        let w = merge([&d].into_iter(), at(30)).window;
        assert_eq!((w.count, w.max), (1001, 50_000));
        let p50 = w.quantile(0.5);
        assert!((501..=501 + 501 / 16).contains(&p50), "p50 {p50}");
        assert_eq!(w.quantile(1.0), 50_000);
        // A minute on, the first slot has left the window; the Prometheus
        // buckets keep everything.
        let later = merge([&d].into_iter(), at(62));
        assert_eq!((later.window.count, later.window.max), (1, 50_000));
        assert_eq!(later.cumulative().last(), Some(1001));
        // Recording into a reused slot clears what it held a minute ago.
        d.record_at(7, at(61));
        let w = merge([&d].into_iter(), at(62)).window;
        assert_eq!((w.count, w.sum, w.max), (2, 50_007, 50_000));
        assert_eq!(merge([&d].into_iter(), at(200)).window.count, 0);
        assert_eq!(merge([&d].into_iter(), at(200)).window.quantile(0.99), 0);
    }
}
