//! Fingerprints of the `event_id`s committed in the last `dedup_window_ms`,
//! shared by the writers: a hint, never a verdict.
//!
//! Without it, one re-sent event in a 5,000-row batch makes the direct COPY
//! fail on the primary key and the whole batch is redone through staging
//! (FACTS.md: 0.64–0.75 × raw COPY at 1 % duplicates). With it, a writer
//! splits each batch before the COPY: rows whose fingerprint was seen recently
//! ("suspects") go through the staging table and `ON CONFLICT DO NOTHING`,
//! in the same transaction as the direct COPY of the others.
//!
//! Because a suspect is still inserted idempotently rather than dropped, a
//! fingerprint collision costs a little staging work and can never lose an
//! event; the primary key and the whole-batch fallback stay the safety net
//! for what the set cannot know (ids committed before a restart, or by
//! another instance). Fingerprints are recorded only after their COPY commits.
//!
//! Memory is bounded: 8 bytes (plus hash-table slack) per id, at most
//! `dedup_max_ids`; past that the oldest generation goes early and the
//! effective window shrinks.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Generations the window is cut into; the oldest is dropped whole.
const GENERATIONS: usize = 4;

/// Fingerprints are already well-mixed 64-bit hashes: hash them no further.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type FingerprintSet = HashSet<u64, BuildHasherDefault<PassThrough>>;

/// The 64-bit fingerprint of an event id.
pub fn fingerprint(id: &[u8]) -> u64 {
    // foldhash with a fixed seed: fast and well mixed; collisions only cost work.
    foldhash::fast::FixedState::with_seed(0x0069_6e67_6573_7464).hash_one(id)
}

struct Generation {
    started: Instant,
    ids: FingerprintSet,
}

/// The shared set; one lock taken twice per batch (lookup, record).
pub struct RecentIds {
    generations: Mutex<VecDeque<Generation>>,
    span: Duration,
    max_per_generation: usize,
}

impl RecentIds {
    /// `None` when the window is 0 (the hint is off).
    pub fn new(window: Duration, max_ids: usize) -> Option<Self> {
        if window.is_zero() || max_ids == 0 {
            return None;
        }
        Some(Self {
            generations: Mutex::new(VecDeque::with_capacity(GENERATIONS + 1)),
            span: window / GENERATIONS as u32,
            max_per_generation: (max_ids / GENERATIONS).max(1),
        })
    }

    /// For each fingerprint, whether it was committed within the window.
    pub fn seen(&self, fingerprints: &[u64], out: &mut Vec<bool>) {
        out.clear();
        let generations = self.generations.lock();
        out.extend(fingerprints.iter().map(|fp| generations.iter().any(|g| g.ids.contains(fp))));
    }

    /// Records committed fingerprints.
    pub fn record(&self, fingerprints: impl IntoIterator<Item = u64>, now: Instant) {
        let mut generations = self.generations.lock();
        for fp in fingerprints {
            let fresh = generations
                .back()
                .is_some_and(|g| now.duration_since(g.started) < self.span && g.ids.len() < self.max_per_generation);
            if !fresh {
                // Reuse the oldest generation's table: growing a fresh one to
                // a million entries rehashes it twenty times and faults in
                // new pages each time (a tenth of the writers' CPU, measured).
                let mut ids = if generations.len() >= GENERATIONS {
                    generations.pop_front().map(|g| g.ids).unwrap_or_default()
                } else {
                    let expected = generations.back().map_or(0, |g| g.ids.len());
                    FingerprintSet::with_capacity_and_hasher(expected, Default::default())
                };
                ids.clear();
                generations.push_back(Generation { started: now, ids });
            }
            if let Some(current) = generations.back_mut() {
                current.ids.insert(fp);
            }
        }
    }

    /// Fingerprints held now.
    pub fn len(&self) -> usize {
        self.generations.lock().iter().map(|g| g.ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window_and_forgets_after() {
        let recent = RecentIds::new(Duration::from_secs(4), 1000).unwrap();
        let t0 = Instant::now();
        recent.record([fingerprint(b"a"), fingerprint(b"b")], t0);
        let mut out = Vec::new();
        recent.seen(&[fingerprint(b"a"), fingerprint(b"c")], &mut out);
        assert_eq!(out, [true, false]);
        // Each later second starts a generation; the fifth pushes "a" out.
        for s in 1..=4 {
            recent.record([fingerprint(format!("x{s}").as_bytes())], t0 + Duration::from_secs(s));
        }
        recent.seen(&[fingerprint(b"a"), fingerprint(b"x4")], &mut out);
        assert_eq!(out, [false, true]);
    }

    #[test]
    fn memory_is_bounded_by_max_ids() {
        let recent = RecentIds::new(Duration::from_secs(3600), 400).unwrap();
        let now = Instant::now();
        recent.record((0..10_000u64).map(|i| fingerprint(&i.to_le_bytes())), now);
        assert!(recent.len() <= 400, "{}", recent.len());
    }

    #[test]
    fn zero_window_turns_it_off() {
        assert!(RecentIds::new(Duration::ZERO, 10).is_none());
    }
}
