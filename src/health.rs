//! What is known about the database, kept current by itself.
//!
//! `/health`, the breaker and load balancers act on this state, so it must
//! follow reality without client traffic: writers report every round trip,
//! and while they have nothing to write the probe thread
//! (`writer::probe`) asks PostgreSQL itself every `database.probe_interval_ms`.
//! Before the probe existed, `/health` stayed 200 for as long as one liked
//! after PostgreSQL stopped (nothing had tried it), and stayed 503 after it
//! came back until some client write got through.
//!
//! "Unreachable" and "refused" are different things to an operator: the
//! first is an outage that ends by itself (connection refused or lost,
//! timeouts, the server starting or shutting down); the second is a
//! configuration problem that will not (a bad password, TLS required, no
//! `pg_hba.conf` entry, a missing database or table), and is logged as such.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::breaker::{BreakerState, BreakerView};
use crate::shutdown::Shutdown;
use crate::spool::Spool;

/// Whether ingestd accepts work, and why not: what `/health` answers and
/// shards consult. Owned by `app`; written by writers and the probe (the
/// database), the breaker's owner, and the shutdown.
pub struct Health {
    /// The database as last seen by a writer or the probe.
    pub database: DatabaseHealth,
    /// The database breaker, read without a lock.
    pub breaker: BreakerView,
    pub shutdown: Shutdown,
    /// The disk spool, with `ack = "spool"` (it rides out database outages).
    pub spool: OnceLock<Spool>,
    /// `auth.mode = "tokens"` is in force (shown by /health).
    pub auth_tokens: AtomicBool,
    /// A TLS listener is open (shown by /health).
    pub tls: AtomicBool,
}

impl Health {
    pub fn new(database: DbStatus, breaker: BreakerView, shutdown: Shutdown) -> Health {
        Health {
            database: DatabaseHealth::new(database),
            breaker,
            shutdown,
            spool: OnceLock::new(),
            auth_tokens: AtomicBool::new(false),
            tls: AtomicBool::new(false),
        }
    }

    /// Ready means accepting work: not shutting down, and either the spool
    /// can take appends (`ack = "spool"`, which rides out database outages)
    /// or the database answered the last writer or probe and the breaker is
    /// not open. The probe keeps this current with no client traffic.
    pub fn ready(&self) -> bool {
        if self.shutdown.has_begun() {
            return false;
        }
        if let Some(spool) = self.spool.get() {
            let st = spool.stats();
            return !st.failed && st.used_bytes < st.max_bytes;
        }
        self.database.is_up() && self.breaker.state() != BreakerState::Open
    }

    /// Whether `/health` says `"auth": "tokens"`.
    pub fn auth_tokens(&self) -> bool {
        self.auth_tokens.load(Ordering::Relaxed)
    }
}

/// The database as ingestd last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DbStatus {
    /// The last round trip (a write or a probe) succeeded.
    Up = 0,
    /// It could not be reached or did not answer in time.
    Unreachable = 1,
    /// It answered and refused us: a configuration problem.
    Refused = 2,
}

impl DbStatus {
    fn from_u8(v: u8) -> DbStatus {
        match v {
            0 => DbStatus::Up,
            2 => DbStatus::Refused,
            _ => DbStatus::Unreachable,
        }
    }

    /// Lower-case name for `/health`, `/stats` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DbStatus::Up => "up",
            DbStatus::Unreachable => "unreachable",
            DbStatus::Refused => "refused",
        }
    }

    /// Gauge value: 0 up, 1 unreachable, 2 refused.
    pub fn as_gauge(self) -> u8 {
        self as u8
    }
}

/// The database's status, written by writers and the probe, read lock-free
/// by shards, `/health` and `/metrics`.
#[derive(Debug)]
pub struct DatabaseHealth {
    epoch: Instant,
    status: AtomicU8,
    /// ms since the epoch when the status last changed.
    changed_ms: AtomicU64,
    /// ms since the epoch of the last successful round trip + 1; 0 = never.
    reached_ms: AtomicU64,
}

impl DatabaseHealth {
    pub fn new(status: DbStatus) -> DatabaseHealth {
        DatabaseHealth {
            epoch: Instant::now(),
            status: AtomicU8::new(status as u8),
            changed_ms: AtomicU64::new(0),
            reached_ms: AtomicU64::new(0),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Sets the status; returns the previous one.
    pub fn set(&self, status: DbStatus, now: Instant) -> DbStatus {
        if status == DbStatus::Up {
            self.reached_ms.store(self.ms(now) + 1, Ordering::Relaxed);
        }
        let before = DbStatus::from_u8(self.status.swap(status as u8, Ordering::AcqRel));
        if before != status {
            self.changed_ms.store(self.ms(now), Ordering::Relaxed);
        }
        before
    }

    pub fn status(&self) -> DbStatus {
        DbStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    pub fn is_up(&self) -> bool {
        self.status() == DbStatus::Up
    }

    /// Whether a round trip succeeded within `window` before `now`.
    pub fn reached_within(&self, now: Instant, window: Duration) -> bool {
        let reached = self.reached_ms.load(Ordering::Relaxed);
        reached > 0 && self.ms(now).saturating_sub(reached - 1) < window.as_millis() as u64
    }

    /// How long the status has been what it is.
    pub fn for_how_long(&self, now: Instant) -> Duration {
        Duration::from_millis(self.ms(now).saturating_sub(self.changed_ms.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_are_timed_and_reaching_is_remembered() {
        let h = DatabaseHealth::new(DbStatus::Unreachable);
        let t0 = Instant::now();
        assert!(!h.reached_within(t0, Duration::from_secs(10)), "never reached");
        assert_eq!(h.set(DbStatus::Up, t0 + Duration::from_secs(2)), DbStatus::Unreachable);
        assert!(h.is_up());
        assert!(h.reached_within(t0 + Duration::from_millis(2500), Duration::from_secs(1)));
        assert!(!h.reached_within(t0 + Duration::from_millis(3500), Duration::from_secs(1)));
        assert_eq!(h.set(DbStatus::Up, t0 + Duration::from_secs(5)), DbStatus::Up);
        assert_eq!(h.for_how_long(t0 + Duration::from_secs(6)).as_secs(), 4, "unchanged since 2 s");
        h.set(DbStatus::Refused, t0 + Duration::from_secs(6));
        assert_eq!((h.status().as_str(), h.status().as_gauge()), ("refused", 2));
    }
}
