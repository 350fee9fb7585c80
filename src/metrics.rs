//! Counters and histograms: what each thread counts. `report` renders them
//! (with the health and the gauges of other stages) as `/stats`, `/metrics`.
//!
//! Ownership keeps the hot path free of shared writes: each shard and each
//! writer has its own cache-line-aligned block of counters that only its
//! thread writes (a plain load + store, no locked instruction); a scrape sums
//! them. Histograms (`hdrhistogram`) belong to writers and are touched once
//! per batch under an uncontended `parking_lot` mutex that only a scrape
//! shares. Label sets are closed: shard and writer numbers, route names,
//! status codes and rejection kinds, never anything taken from a request.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

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
    pub ws_fanout_us: Distribution,
    /// How late the shard's 100 ms lag probe woke up, µs: time the event
    /// loop spent on other work (or the thread was not scheduled).
    pub loop_lag_us: Distribution,
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

/// A latency or size distribution, recorded by one writer.
pub struct Distribution(Mutex<Histogram<u64>>);

impl Default for Distribution {
    fn default() -> Self {
        // 1 µs .. 1 h at 3 significant digits; fixed size, never resized.
        let h = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid");
        Self(Mutex::new(h))
    }
}

impl Distribution {
    pub fn record(&self, value: u64) {
        self.0.lock().saturating_record(value.max(1));
    }
    pub fn record_duration(&self, d: Duration) {
        self.record(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }
    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().clone()
    }
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
    pub commit_us: Distribution,
    /// From ring hand-off to commit, per request, µs.
    pub ack_us: Distribution,
    /// Events per batch.
    pub batch_events: Distribution,
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
    pub probe_us: Distribution,
}

impl Metrics {
    pub fn new(shards: usize, writers: usize) -> Self {
        Self {
            shards: (0..shards).map(|_| ShardStats::default()).collect(),
            writers: (0..writers).map(|_| WriterStats::default()).collect(),
            started: Instant::now(),
            probes: Default::default(),
            probe_us: Distribution::default(),
        }
    }

    pub fn sum_shards(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.shards.iter().map(f).sum()
    }

    pub fn sum_writers(&self, f: impl Fn(&WriterStats) -> u64) -> u64 {
        self.writers.iter().map(f).sum()
    }

    pub fn merged_shards(&self, f: impl Fn(&ShardStats) -> &Distribution) -> Histogram<u64> {
        merge(self.shards.iter().map(f))
    }

    pub fn merged(&self, f: impl Fn(&WriterStats) -> &Distribution) -> Histogram<u64> {
        merge(self.writers.iter().map(f))
    }
}

/// One histogram of several threads' distributions (for a scrape).
pub fn merge<'a>(parts: impl Iterator<Item = &'a Distribution>) -> Histogram<u64> {
    let mut all = Distribution::default().snapshot();
    for part in parts {
        let _ = all.add(part.snapshot());
    }
    all
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
        assert_eq!(m.sum_shards(|s| s.events_accepted.get()), 5);
        assert_eq!(m.merged(|w| &w.commit_us).len(), 1);
    }
}
