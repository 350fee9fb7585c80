//! Memory budgets: how many bytes requests may hold at once, whatever the
//! clients and the database do.
//!
//! Why: the ring, the connection cap and the body limit bound memory in
//! *counts* (requests, connections, bytes per request); their product is
//! tens of GiB. When PostgreSQL stalls, every accepted request stays in
//! memory until it commits, and the kernel's OOM killer used to be the only
//! limit (64 clients × 8 MB bodies during a 40 s table lock: 1.7 GiB and no
//! 503). A [`Budget`] bounds the sum in bytes: everything a request holds is
//! leased from it before it is allocated, and a lease that does not fit is
//! refused, which the caller turns into `503` + `Retry-After` at once.
//!
//! Two budgets exist (see `app`): `limits.memory_budget_bytes` for requests
//! (bodies being read, gzip output, parse scratch, encoded rows in the ring
//! and in writer batches, spool appends, WebSocket ingest frames) and
//! `websocket.fanout_budget_bytes` for the live feed (the broadcaster ring,
//! the shards' inboxes and every subscriber's queue), so that slow
//! subscribers can never starve ingest and a burst of ingest never closes
//! subscribers.
//!
//! A [`Lease`] follows its bytes: a request's lease is resized as its body
//! turns into rows, travels in the [`crate::pipeline::Job`] to a writer, and
//! is released when the job is answered and dropped. Releasing is `Drop`, so
//! no path can forget it.
//!
//! Cost: one atomic add on one shared counter per resize (a few per request,
//! never per event). That is not a lock, and at the request rates of this
//! appliance (tens of thousands per second) its cache line is not contended
//! enough to measure; per-shard credit would avoid even that if it ever is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A byte budget shared by every thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The config key that sets the limit, for messages.
    key: &'static str,
    limit: AtomicUsize,
    used: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicU64,
}

/// A lease did not fit in its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// The config key of the budget.
    pub key: &'static str,
    /// Its limit, in bytes.
    pub limit: usize,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server is over its memory budget ({} = {} bytes)", self.key, self.limit)
    }
}

impl std::error::Error for OverBudget {}

impl Budget {
    /// A budget of `limit` bytes, set by config key `key`.
    pub fn new(key: &'static str, limit: usize) -> Budget {
        Budget {
            inner: Arc::new(Inner {
                key,
                limit: AtomicUsize::new(limit),
                used: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A budget with no limit, for tools and tests that do not bound memory.
    pub fn unlimited() -> Budget {
        Budget::new("(unlimited)", usize::MAX)
    }

    /// Changes the limit (SIGHUP). Leases already held stay; new ones see it.
    pub fn set_limit(&self, limit: usize) {
        self.inner.limit.store(limit, Ordering::Relaxed);
    }

    /// An empty lease, to grow with [`Lease::try_resize`].
    pub fn lease(&self) -> Lease {
        Lease { budget: Some(self.inner.clone()), bytes: 0 }
    }

    /// A lease of `bytes`, or [`OverBudget`].
    pub fn try_lease(&self, bytes: usize) -> Result<Lease, OverBudget> {
        let mut lease = self.lease();
        lease.try_resize(bytes)?;
        Ok(lease)
    }

    /// Bytes leased now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// The most bytes ever leased at once.
    pub fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Leases (and growths) refused so far.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    pub fn key(&self) -> &'static str {
        self.inner.key
    }
}

impl Inner {
    fn take(&self, n: usize) -> Result<(), OverBudget> {
        self.try_take(n).inspect_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// [`Inner::take`] without counting a refusal.
    fn try_take(&self, n: usize) -> Result<(), OverBudget> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        let after = before.saturating_add(n);
        if after > limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return Err(OverBudget { key: self.key, limit });
        }
        self.peak.fetch_max(after, Ordering::Relaxed);
        Ok(())
    }

    fn force(&self, n: usize) {
        let after = self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        self.peak.fetch_max(after, Ordering::Relaxed);
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Bytes held against a [`Budget`]; released when dropped.
#[derive(Debug, Default)]
pub struct Lease {
    /// `None`: not accounted (a detached lease, e.g. in unit tests).
    budget: Option<Arc<Inner>>,
    bytes: usize,
}

impl Lease {
    /// A lease that accounts nothing.
    pub fn detached() -> Lease {
        Lease::default()
    }

    /// Bytes this lease holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds exactly `bytes` from now on. Growing may be refused (the lease
    /// is then unchanged); shrinking always succeeds.
    pub fn try_resize(&mut self, bytes: usize) -> Result<(), OverBudget> {
        if bytes > self.bytes {
            if let Some(b) = &self.budget {
                b.take(bytes - self.bytes)?;
            }
        } else if let Some(b) = &self.budget {
            b.give(self.bytes - bytes);
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Grows by `extra` bytes, or is refused.
    pub fn try_grow(&mut self, extra: usize) -> Result<(), OverBudget> {
        self.try_resize(self.bytes.saturating_add(extra))
    }

    /// Holds at least `needed` bytes: `wanted` (with room to grow into) if
    /// that fits, else just `needed`; only failing `needed` is a refusal.
    pub fn try_reserve(&mut self, needed: usize, wanted: usize) -> Result<(), OverBudget> {
        if needed <= self.bytes {
            return Ok(());
        }
        if wanted > needed
            && let Some(b) = &self.budget
            && b.try_take(wanted - self.bytes).is_ok()
        {
            self.bytes = wanted;
            return Ok(());
        }
        self.try_resize(needed)
    }

    /// Holds exactly `bytes`, even past the limit: for truing a lease up to
    /// what an allocation turned out to take, after a checked estimate.
    pub fn set(&mut self, bytes: usize) {
        if bytes > self.bytes {
            if let Some(b) = &self.budget {
                b.force(bytes - self.bytes);
            }
        } else if let Some(b) = &self.budget {
            b.give(self.bytes - bytes);
        }
        self.bytes = bytes;
    }

    /// Moves up to `bytes` of this lease into a new one (no new check: the
    /// bytes are already held).
    pub fn split_off(&mut self, bytes: usize) -> Lease {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        Lease { budget: self.budget.clone(), bytes: moved }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_fit_or_are_refused_and_release_on_drop() {
        let budget = Budget::new("limits.memory_budget_bytes", 100);
        let a = budget.try_lease(60).expect("fits");
        let refused = budget.try_lease(41).unwrap_err();
        assert_eq!(refused, OverBudget { key: "limits.memory_budget_bytes", limit: 100 });
        assert!(refused.to_string().contains("limits.memory_budget_bytes = 100 bytes"));
        assert_eq!((budget.used(), budget.refused()), (60, 1));
        let b = budget.try_lease(40).expect("exactly fits");
        assert_eq!(budget.used(), 100);
        drop(a);
        drop(b);
        assert_eq!((budget.used(), budget.peak()), (0, 100));
    }

    #[test]
    fn resizing_grows_with_a_check_and_shrinks_freely() {
        let budget = Budget::new("k", 100);
        let mut lease = budget.lease();
        lease.try_resize(70).unwrap();
        assert!(lease.try_grow(31).is_err());
        assert_eq!(lease.bytes(), 70, "a refused growth leaves the lease as it was");
        lease.try_resize(10).unwrap();
        assert_eq!(budget.used(), 10);
        lease.set(150);
        assert_eq!(budget.used(), 150, "truing up may pass the limit");
        assert!(budget.try_lease(1).is_err());
        lease.set(0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn reserving_takes_room_ahead_when_it_fits_and_the_minimum_otherwise() {
        let budget = Budget::new("k", 100);
        let mut lease = budget.lease();
        lease.try_reserve(40, 60).unwrap();
        assert_eq!(lease.bytes(), 60);
        lease.try_reserve(50, 80).unwrap();
        assert_eq!(lease.bytes(), 60, "already covered");
        let _other = budget.try_lease(30).unwrap();
        lease.try_reserve(70, 90).unwrap();
        assert_eq!((lease.bytes(), budget.refused()), (70, 0), "the room ahead did not fit: not a refusal");
        assert!(lease.try_reserve(71, 90).is_err());
        assert_eq!(budget.refused(), 1);
    }

    #[test]
    fn split_moves_bytes_without_a_new_check() {
        let budget = Budget::new("k", 100);
        let mut session = budget.try_lease(100).unwrap();
        let frame = session.split_off(30);
        assert_eq!((session.bytes(), frame.bytes(), budget.used()), (70, 30, 100));
        drop(session);
        assert_eq!(budget.used(), 30);
        drop(frame);
        assert_eq!(budget.used(), 0);
        let mut small = budget.try_lease(5).unwrap();
        assert_eq!(small.split_off(50).bytes(), 5, "never more than it holds");
    }

    #[test]
    fn a_lower_limit_applies_to_new_leases() {
        let budget = Budget::new("k", 100);
        let held = budget.try_lease(50).unwrap();
        budget.set_limit(40);
        assert!(budget.try_lease(1).is_err());
        drop(held);
        assert!(budget.try_lease(40).is_ok());
        assert!(Lease::detached().try_resize(usize::MAX).is_ok(), "a detached lease accounts nothing");
    }
}
